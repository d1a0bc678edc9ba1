"""The replication's RESULTS.md (benchmarks/replicate/report.py) from a hand-made results.json: eval's
win rate and its interval (the mean over seeds of each seed's ci95 bounds), wins/losses, the command,
the tokenization rule and the seed count, checked against numbers worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPLICATE = Path(__file__).resolve().parents[1] / "benchmarks" / "replicate"


def _render(results: dict) -> str:
    sys.path.insert(0, str(REPLICATE))
    try:
        from report import render_results
    finally:
        sys.path.remove(str(REPLICATE))
    return render_results(results)


def _row(seed: int, method: str, accuracy: float, win_rate: float, ci95: list[float], wins: float, losses: float,
         level: float = 0.2):
    return {"level": level, "seed": seed, "method": method, "accuracy": accuracy, "win_rate": win_rate, "ci95": ci95,
            "wins": wins, "losses": losses, "ties": 1 - wins - losses, "teacher_accuracy": 0.9,
            "pairs": {"rows": 10, "teacher_correct": 0.9, "student_correct": 0.5, "identical": 0.4}}


def test_table_reports_eval_win_rate_and_mean_of_seed_bounds():
    settings = dict(min_len=3, max_len=10, teacher=dict(hidden_size=64, num_layers=4, num_heads=4,
                    intermediate_size=256), teacher_examples=10, teacher_steps=1, recovery_steps=1,
                    distill_prompts=10, test_prompts=100, seeds=[0, 1], levels=[0.2], temperature=0.7,
                    max_new_tokens=12, rejected_from="dsft", sft_epochs=1, sft_lr=1e-3, dpo_epochs=1, dpo_batch=2,
                    dpo_lr=1e-4, beta1s=[0.1], beta2s=[0.0, 0.1])
    results = {
        "settings": settings, "teacher": {"accuracy": 0.9}, "workers": 2, "wall_seconds": 600.0,
        "stage_seconds": {"teacher": 60.0}, "complete": True, "quick": False, "tokenization_rule": 2,
        "command": "python benchmarks/replicate/run.py --out /tmp/x --set seeds=[0,1]",
        "overrides": ["seeds=[0,1]"],
        "students": {"0.2": {"removed": 0.2, "heads": 3, "teacher_heads": 4, "intermediate_size": 209,
                             "teacher_intermediate_size": 256, "accuracy": 0.8, "win_rate": 0.45,
                             "ci95": [0.41, 0.49], "wins": 0.02, "losses": 0.12, "ties": 0.86}},
        "runs": [_row(0, "dSFT", 0.86, 0.48, [0.44, 0.52], 0.03, 0.07),
                 _row(1, "dSFT", 0.88, 0.49, [0.46, 0.53], 0.02, 0.04),
                 _row(0, "dDPO (b1=0.1, b2=0)", 0.84, 0.47, [0.43, 0.51], 0.02, 0.08),
                 _row(1, "dDPO (b1=0.1, b2=0)", 0.86, 0.48, [0.45, 0.52], 0.02, 0.06),
                 _row(0, "daDPO (b1=0.1, b2=0.1)", 0.90, 0.50, [0.47, 0.53], 0.05, 0.05),
                 _row(1, "daDPO (b1=0.1, b2=0.1)", 0.92, 0.51, [0.48, 0.55], 0.06, 0.04)],
    }
    text = _render(results)
    lines = text.splitlines()
    assert "| model | accuracy | its 95% interval | win rate vs teacher | its 95% interval | wins | losses |" in lines
    # accuracy intervals, Wilson with z = 1.96 and n = 100 (z²/n = 0.038415, so the divisor is 1.038415):
    # 80/100: centre (0.8 + 0.019207) / 1.038415 = 0.788926, half 1.96 x sqrt(0.0016 + 0.000096) / 1.038415
    # = 0.077731 -> [71.1, 86.7]; the teacher's 90/100 likewise -> [82.6, 94.5]
    assert "| teacher | 90.0 | [82.6, 94.5] | (baseline) | - | - | - |" in lines
    # pruned + recovery: one eval, its own intervals
    assert "| student: pruned + recovery | 80.0 | [71.1, 86.7] | 45.0 | [41.0, 49.0] | 2.0 | 12.0 |" in lines
    # dSFT over two seeds: means 87.0 / 48.5; sd of (0.86, 0.88) = 0.01414 -> 1.4, of (0.48, 0.49) -> 0.7;
    # win-rate interval: mean lower bound (0.44 + 0.46) / 2 = 45.0, mean upper (0.52 + 0.53) / 2 = 52.5;
    # accuracy: 86/100 -> [0.7786, 0.9147], 88/100 -> [0.8019, 0.9300], their mean -> [79.0, 92.2]
    assert "| dSFT | 87.0 ± 1.4 | [79.0, 92.2] | 48.5 ± 0.7 | [45.0, 52.5] | 2.5 ± 0.7 | 5.5 ± 2.1 |" in lines
    assert any(line.startswith("| daDPO (b1=0.1, b2=0.1) | 91.0 ± 1.4 | [") and
               line.endswith(" | 50.5 ± 0.7 | [47.5, 54.0] | 5.5 ± 0.7 | 4.5 ± 0.7 |") for line in lines)
    assert "`python benchmarks/replicate/run.py --out /tmp/x --set seeds=[0,1]`" in text
    assert "`--set seeds=[0,1]`" in text
    assert "tokenization rule 2 (data_specs/tokenization.v2.md)" in text
    assert "Wall time **10.0 min**" in text
    assert "50 = on par with the teacher" in text
    assert "over 2 seeds" in text
    # claim (1): daDPO - dDPO at b1=0.1 is +6 points on both seeds
    assert "daDPO (b1=0.1, b2=0.1) - dDPO (b1=0.1, b2=0): +6.0 ± 0.0 points (better on 2, worse on 0 of 2 seeds)" \
        in text
    # a record without `rejected_by` counted the first generation: its rejected side is the pruned student's
    assert ("Pairs (seed 0) generated with the pruned student: 10; responses correct: teacher 90.0%, pruned "
            "student 50.0%; identical 40.0%.") in lines
    # the dSFT student's pairs, one record per seed: teacher right on 9 and 7 of 10, the student on 5, 4 identical
    for row in results["runs"]:
        row["pairs"] = dict(row["pairs"], rejected_by="dSFT student", dropped=3,
                            teacher_correct=0.9 if row["seed"] == 0 else 0.7)
    # mean ± sd: (0.9, 0.7) -> 80.0 ± 14.1. Wilson, n = 10 (z²/n = 0.384146, divisor 1.384146, z²/4n² = 0.0096036):
    # 9/10: centre 1.092073 / 1.384146 = 0.788990, half 1.96 x sqrt(0.009 + 0.0096036) / 1.384146 = 0.193136;
    # 7/10: centre 0.644495, half 1.96 x sqrt(0.021 + 0.0096036) / 1.384146 = 0.247714; mean bounds
    # ((0.595854 + 0.396781) / 2, (0.982126 + 0.892209) / 2) -> [49.6, 93.7]. 5/10: centre 0.5, half
    # 1.96 x sqrt(0.025 + 0.0096036) / 1.384146 = 0.263413 -> [23.7, 76.3]; 4/10: centre 0.427753, half
    # 1.96 x sqrt(0.024 + 0.0096036) / 1.384146 = 0.259578 -> [16.8, 68.7]
    assert ("Pairs DPO learns from, over 2 seed(s) (mean ± sd, then the Wilson 95% interval of a seed's fraction "
            "averaged over seeds): 10, 10 generated (6 more left out by generate: an empty response), rejected side "
            "by the dSFT student; responses correct: teacher 80.0 ± 14.1% [49.6, 93.7], dSFT student 50.0 ± 0.0% "
            "[23.7, 76.3]; identical (left out) 40.0 ± 0.0% [16.8, 68.7].") in _render(results).splitlines()


def test_wilson_interval_by_hand():
    """The accuracy interval: hand values at p = 0.5 (symmetric), p = 0 (not empty, lower bound 0) and p = 1."""
    sys.path.insert(0, str(REPLICATE))
    try:
        from report import wilson_interval
    finally:
        sys.path.remove(str(REPLICATE))
    # p = 0.5, n = 100: centre 0.5; half 1.96 x sqrt(0.0025 + 0.000096) / 1.038415 = 0.096168
    assert wilson_interval(50, 100) == pytest.approx((0.403832, 0.596168), abs=1e-6)
    # p = 0: centre = half = 0.019207 / 1.038415 = 0.018497 -> [0, 0.036993]
    assert wilson_interval(0, 100) == pytest.approx((0.0, 0.036993), abs=1e-6)
    assert wilson_interval(100, 100) == pytest.approx((1 - 0.036993, 1.0), abs=1e-6)


def test_claim_two_and_the_dpo_stage_against_dsft_by_hand():
    """Claim (2) counts rDPO as breaking down when its best setting is more than 5 points below the best dDPO
    (its own failure, not DPO's); the DPO stage is called below dSFT only when every setting is, on every seed."""
    accuracies = {0.2: {"dSFT": (0.50, 0.40), "dDPO (b1=0.1, b2=0)": (0.45, 0.35), "rDPO (b1=0, b2=0.1)": (0.45, 0.37),
                        "daDPO (b1=0.1, b2=0.1)": (0.46, 0.38)},
                  0.5: {"dSFT": (0.20, 0.30), "dDPO (b1=0.1, b2=0)": (0.22, 0.30), "rDPO (b1=0, b2=0.1)": (0.15, 0.20),
                        "daDPO (b1=0.1, b2=0.1)": (0.22, 0.32)}}
    student = {"removed": 0.2, "heads": 3, "teacher_heads": 4, "intermediate_size": 209,
               "teacher_intermediate_size": 256, "accuracy": 0.1, "win_rate": 0.1, "ci95": [0.0, 0.2], "wins": 0.0,
               "losses": 0.5, "ties": 0.5}
    results = {"settings": dict(min_len=3, max_len=10, teacher=dict(hidden_size=64, num_layers=4, num_heads=4,
                                intermediate_size=256), teacher_examples=10, teacher_steps=1, recovery_steps=1,
                                distill_prompts=10, test_prompts=100, seeds=[0, 1], levels=[0.2, 0.5],
                                temperature=0.7, max_new_tokens=12, sft_epochs=1, sft_lr=1e-3, dpo_epochs=1,
                                dpo_batch=2, dpo_lr=1e-4, beta1s=[0, 0.1], beta2s=[0.0, 0.1]),
               "teacher": {"accuracy": 0.9}, "workers": 2, "wall_seconds": 60.0, "stage_seconds": {}, "complete": True,
               "quick": False, "tokenization_rule": 2, "command": "run.py", "overrides": [],
               "students": {"0.2": student, "0.5": student},
               "runs": [_row(seed, method, values[seed], 0.5, [0.4, 0.6], 0.1, 0.1, level=level)
                        for level, methods in accuracies.items() for method, values in methods.items()
                        for seed in (0, 1)]}
    text = _render(results)
    # Paired by seed, mean ± sd of the differences. 20%: rDPO - dDPO (0.45 - 0.45, 0.37 - 0.35) = (0, +2) points
    # -> +1.0 ± 1.4; 50%: (0.15 - 0.22, 0.20 - 0.30) = (-7, -10) -> -8.5 ± 2.1 (more than 5: breaks down).
    # DPO minus dSFT: 20% best daDPO (0.46 - 0.50, 0.38 - 0.40) = (-4, -2) -> -3.0 ± 1.4, every setting below dSFT
    # on both seeds; 50% best daDPO (0.22 - 0.20, 0.32 - 0.30) -> +2.0 ± 0.0 (dDPO ties dSFT on seed 1: not every
    # setting below)
    assert ("Claim (2): rDPO breaks down only far from the teacher (its best setting against the best dDPO, paired "
            "by seed: +1.0 ± 1.4 points at 20% pruning, -8.5 ± 2.1 at 50%) (agrees). Best DPO-family result minus "
            "dSFT, paired by seed: 20% pruning -3.0 ± 1.4 points (every DPO-family setting below dSFT on every seed), "
            "50% pruning +2.0 ± 0.0 points.") in text
    # sd of (0.50, 0.40) and of (0.45, 0.35): 7.1; of (0.22, 0.30): 5.7
    assert ("rDPO (b1=0, b2=0.1) 41.0 ± 5.7%; dSFT 45.0 ± 7.1%, best dDPO 40.0 ± 7.1% -> does not break down (its "
            "best setting within 5 points") in text
    assert "dSFT 25.0 ± 7.1%, best dDPO 26.0 ± 5.7% -> breaks down (its best setting more than 5 points below" in text
    # rDPO level with dDPO at 50% as well: no breakdown anywhere
    for row in results["runs"]:
        if row["level"] == 0.5 and row["method"].startswith("rDPO"):
            row["accuracy"] += 0.08
    # 50%: (0.23 - 0.22, 0.28 - 0.30) = (+1, -2) -> -0.5 ± 2.1
    assert ("Claim (2): rDPO does not break down here (its best setting against the best dDPO, paired by seed: "
            "+1.0 ± 1.4 points at 20% pruning, -0.5 ± 2.1 at 50%; 5 points would count) (does not agree).") \
        in _render(results)

    def set_rdpo(level: float, values: tuple[float, float]) -> str:
        for row in results["runs"]:
            if row["level"] == level and row["method"].startswith("rDPO"):
                row["accuracy"] = values[row["seed"]]
        return _render(results)

    # 20%: rDPO (0.33, 0.37) = 0.35 against dDPO 0.40 is exactly -5.0 points: shown as -5.0, not a breakdown
    # (0.35 - 0.40 is -0.050000000000000044 in floats)
    text = set_rdpo(0.2, (0.33, 0.37))
    assert "dSFT 45.0 ± 7.1%, best dDPO 40.0 ± 7.1% -> does not break down" in text
    # 20%: (0.32 - 0.45, 0.36 - 0.35) = (-13, +1) -> -6.0 ± 9.9, a breakdown near the teacher only (50% still -0.5)
    assert ("Claim (2): rDPO breaks down only near the teacher (its best setting against the best dDPO, paired by "
            "seed: -6.0 ± 9.9 points at 20% pruning, -0.5 ± 2.1 at 50%), the opposite of the claim (disagrees).") \
        in set_rdpo(0.2, (0.32, 0.36))
    # and at 50% too: (0.18 - 0.22, 0.22 - 0.30) = (-4, -8) -> -6.0 ± 2.8
    assert ("Claim (2): rDPO is more than 5 points below dDPO at both levels (its best setting against the best "
            "dDPO, paired by seed: -6.0 ± 9.9 points at 20% pruning, -6.0 ± 2.8 at 50%): below dDPO, but not only far "
            "from the teacher (partly agrees).") in set_rdpo(0.5, (0.18, 0.22))


def test_real_weights_data_and_report():
    """real.py's task (every single-digit question, test and distillation prompts disjoint) and the report of
    its committed 3-seed run (its layer-pruned students named), and of its first seed alone: marked a pilot,
    one seed never called a result."""
    import json

    sys.path.insert(0, str(REPLICATE))
    try:
        import real
    finally:
        sys.path.remove(str(REPLICATE))
    questions = real.arithmetic_prompts()
    assert len(questions) == 81 + 81 + 45 and len({q["prompt"] for q in questions}) == len(questions)
    seven_eight = [q for q in questions if q["prompt"] == "What is 7 x 8? Reply with the number only."]
    assert seven_eight == [{"prompt": "What is 7 x 8? Reply with the number only.", "answer": "56"}]
    assert all(int(q["answer"]) >= 0 for q in questions)  # a - b only for b <= a

    results = json.loads((REPLICATE / "results-real.json").read_text())
    text = _render(results)
    assert text == (REPLICATE / "RESULTS-real.md").read_text()  # the committed report is this file's render
    assert "A pilot" not in text and "over 3 seeds" in text and results["settings"]["seeds"] == [0, 1, 2]
    assert "6 of the teacher's 30 decoder layers removed" in text
    assert "15 of the teacher's 30 decoder layers removed" in text

    pilot = dict(results, quick=True, runs=[row for row in results["runs"] if row["seed"] == 0])
    text = _render(pilot)
    assert "**A pilot: 1 seed(s)" in text and "not the replication" in text
    assert "; clearly better" not in text and "; clearly worse" not in text  # one seed decides nothing
    assert "daDPO clearly better in 0, clearly worse in 0" in text
