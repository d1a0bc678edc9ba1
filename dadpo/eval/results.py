"""What the judgments say: per-prompt outcomes against the baseline, the summary, the output files.

    LM judge (served, local)  outcome = order_outcome(verdict with the model as A, verdict with it as B):
                              1 win, 0 loss only when both orders agree, else 0.5; NaN when either
                              order has no verdict (a parse failure: left out of every rate, counted)
    reward judge              outcome = sigma(r_model - r_baseline) per prompt
    answer judge              1 when only the model's final answer matches, 0 when only the baseline's,
                              else 0.5; accuracy = the share of matching answers
"""

from __future__ import annotations

import numpy as np

from dadpo.atomic import write_json_atomic, write_text_atomic
from dadpo.eval.store import FORMAT, JudgmentStore


def outcomes(prompt_ids: list[str], name: str, baseline: str, kind: str,
             rows: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Per prompt: the model's score against the baseline (NaN: a parse failure) and, for LM judges,
    whether the two orders agreed (NaN where either failed)."""
    from dadpo.eval.verdicts import order_outcome, orders_agree

    scores = np.full(len(prompt_ids), np.nan)
    if kind in ("served", "local"):
        agree = np.full(len(prompt_ids), np.nan)
        for i, row_id in enumerate(prompt_ids):
            first, second = rows[(row_id, name, "AB")]["verdict"], rows[(row_id, name, "BA")]["verdict"]
            outcome = order_outcome(first, second)
            if outcome is not None:
                scores[i] = outcome
                agree[i] = float(orders_agree(first, second))
        return scores, agree
    if kind == "reward":
        from dadpo.eval.reward import reward_outcome

        for i, row_id in enumerate(prompt_ids):
            scores[i] = reward_outcome(rows[(row_id, name, "reward")]["score"],
                                       rows[(row_id, baseline, "reward")]["score"])
        return scores, None
    for i, row_id in enumerate(prompt_ids):
        c, b = rows[(row_id, name, "answer")]["score"], rows[(row_id, baseline, "answer")]["score"]
        scores[i] = 1.0 if c > b else 0.0 if b > c else 0.5
    return scores, None


def build_summary(plan, judge_record: dict, sets: dict, store: JudgmentStore, lm_eval: dict | None) -> dict:
    """summary.json's content (data_specs/eval.v1.md). plan: dadpo.eval.run's (prompts, baseline,
    models, judge_kind, cfg); sets: each model's ResponseSet; lm_eval: {model: {task: result}} or None."""
    from dadpo.eval.harness import compare_to_baseline
    from dadpo.eval.stats import summarize

    cfg, base_name = plan.cfg, plan.baseline.name
    base = sets[base_name]
    models = {}
    for spec in plan.models:
        cand = sets[spec.name]
        scores, agree = outcomes(plan.prompts.ids, spec.name, base_name, plan.judge_kind, store.rows)
        unit = "tokens" if cand.length_unit == base.length_unit == "tokens" else "characters"
        c_len, b_len = (cand.lengths, base.lengths) if unit == "tokens" else (cand.characters(), base.characters())
        stats = summarize(scores, candidate_lengths=c_len, baseline_lengths=b_len, agree=agree,
                          categories=plan.prompts.categories, bootstrap=cfg.bootstrap, seed=cfg.seed, length_unit=unit)
        stats["source"] = spec.source
        stats["accuracy"] = _accuracy(plan, spec.name, store) if plan.judge_kind == "answer" else None
        stats["lm_eval"] = {}
        if lm_eval and spec.name in lm_eval and base_name in lm_eval:
            stats["lm_eval"] = compare_to_baseline(lm_eval[spec.name], lm_eval[base_name])
        models[spec.name] = stats
    return {"format": FORMAT, "baseline": base_name,
            "judge": {**judge_record, "retries": cfg.judge_retries},
            "prompts": {"path": str(plan.prompts.path), "digest": plan.prompts.digest, "count": len(plan.prompts)},
            "models": models,
            "baseline_accuracy": _accuracy(plan, base_name, store) if plan.judge_kind == "answer" else None,
            "baseline_lm_eval": (lm_eval or {}).get(base_name) if lm_eval is not None else None}


def _accuracy(plan, name: str, store: JudgmentStore) -> float:
    return float(np.mean([store.rows[(row_id, name, "answer")]["score"] for row_id in plan.prompts.ids]))


def write_outputs(plan, summary: dict) -> None:
    """summary.json (validated first), summary.md, winrates.png, and a heatmap per sweep folder."""
    from dadpo.eval.report import plot_sweep_heatmap, plot_winrates, render_table, validate_summary

    validate_summary(summary)
    write_json_atomic(plan.out / "summary.json", summary)
    write_text_atomic(plan.out / "summary.md", render_table(summary))
    plot_winrates(summary, plan.out / "winrates.png")
    sweeps: dict[str, dict] = {}
    for spec in plan.models:
        if spec.sweep is not None:
            sweeps.setdefault(spec.sweep, {})[spec.point] = summary["models"][spec.name]["win_rate"]
    for number, (folder, points) in enumerate(sorted(sweeps.items())):
        name = "sweep_heatmap.png" if len(sweeps) == 1 else f"sweep_heatmap-{number + 1}.png"
        plot_sweep_heatmap(points, plan.out / name, f"win rate against {plan.baseline.name}: {folder}")
