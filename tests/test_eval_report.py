"""summary.json's schema (data_specs/eval.v1.schema.json), the markdown table and the plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dadpo.errors import DadpoError
from dadpo.eval.report import plot_sweep_heatmap, plot_winrates, render_table, validate_summary
from dadpo.eval.stats import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stats_entry(win, tie, loss, failures, rate, ci95, consistency, lc, length, unit="tokens"):
    return {"win": win, "tie": tie, "loss": loss, "parse_failures": failures, "win_rate": rate, "ci95": ci95,
            "position_consistency": consistency, "lc_win_rate": lc, "mean_length": length, "length_unit": unit}


def full_summary() -> dict:
    """Every part of the format: a served judge, two models (one with categories and lm-eval, one
    whose every judgment failed), the baseline's lm-eval."""
    dadpo = stats_entry(5, 2, 3, 0, 0.6, [0.35, 0.8], 0.7, 0.55, 123.25)
    dadpo["by_category"] = {"math": stats_entry(3, 0, 1, 0, 0.75, [0.25, 1.0], 1.0, 0.7, 80.0),
                            "chat": stats_entry(2, 2, 2, 0, 0.5, [0.25, 0.75], 0.5, 0.45, 152.1666)}
    dadpo.update(source="runs/b1=0.1_b2=0.01/model", accuracy=None,
                 lm_eval={"gsm8k": {"metric": "exact_match", "value": 0.31, "stderr": 0.02, "baseline_value": 0.35,
                                    "difference": -0.04}})
    silent = stats_entry(0, 0, 0, 10, None, None, None, None, 40.5, "characters")
    silent.update(by_category={}, source="api_outputs.jsonl", accuracy=None, lm_eval={})
    return {
        "format": "dadpo.eval.v1",
        "baseline": "teacher",
        "judge": {"kind": "served", "model": "Qwen/Qwen2.5-72B-Instruct", "url": "http://judge:8000/v1",
                  "template": "judge_prompt.v1.jinja", "template_digest": "ab" * 32, "max_new_tokens": 512,
                  "retries": 2, "weights_digest": None, "concurrency": 64},  # extra judge keys are allowed
        "prompts": {"path": "heldout.jsonl", "digest": "cd" * 32, "count": 10},
        "models": {"dadpo": dadpo, "api|model": silent},
        "baseline_accuracy": None,
        "baseline_lm_eval": {"gsm8k": {"metric": "exact_match", "value": 0.35, "stderr": 0.021}},
    }


def test_validate_summary_accepts_the_full_example_and_summarize_output():
    summary = full_summary()
    validate_summary(summary)
    json.dumps(summary, allow_nan=False)
    # What summarize returns is a valid model entry, with and without categories and agreement.
    scores = np.array([1, 0.5, 0, np.nan, 1])
    entry = summarize(scores, candidate_lengths=[3, 4, 5, 6, 7], baseline_lengths=[5, 5, 5, 5, 5],
                      agree=[True, False, True, None, True], categories=["a", "b", "a", "b", None])
    entry.update(source="sft/model", accuracy=None, lm_eval={})
    summary["models"] = {"sft": entry}
    validate_summary(summary)
    # An answer judge: no template, accuracies, no lm-eval.
    answer = full_summary()
    answer["judge"] = {"kind": "answer", "model": None, "url": None, "template": None, "template_digest": None,
                       "max_new_tokens": None, "retries": 0, "weights_digest": None}
    answer["baseline_accuracy"], answer["baseline_lm_eval"] = 0.8, None
    answer["models"]["dadpo"]["accuracy"] = 0.7
    validate_summary(answer)


def _break(change):
    summary = full_summary()
    change(summary)
    return summary


BROKEN = {
    "wrong format": (lambda s: s.update(format="dadpo.eval.v2"), "$.format"),
    "no baseline": (lambda s: s.pop("baseline"), "baseline"),
    "unknown top-level key": (lambda s: s.update(notes="hi"), "notes"),
    "unknown judge kind": (lambda s: s["judge"].update(kind="oracle"), "$.judge.kind"),
    "judge without retries": (lambda s: s["judge"].pop("retries"), "retries"),
    "template digest not sha256": (lambda s: s["judge"].update(template_digest="xyz"), "$.judge.template_digest"),
    "rate above one": (lambda s: s["models"]["dadpo"].update(win_rate=1.5), "$.models.dadpo.win_rate"),
    "negative count": (lambda s: s["models"]["dadpo"].update(loss=-1), "$.models.dadpo.loss"),
    "count as a float": (lambda s: s["models"]["dadpo"].update(win=5.5), "$.models.dadpo.win"),
    "interval of three": (lambda s: s["models"]["dadpo"].update(ci95=[0.1, 0.2, 0.3]), "$.models.dadpo.ci95"),
    "interval without a rate": (lambda s: s["models"]["api|model"].update(ci95=[0.1, 0.2]), "ci95"),
    "model without source": (lambda s: s["models"]["dadpo"].pop("source"), "source"),
    "unknown model key": (lambda s: s["models"]["dadpo"].update(elo=1200), "elo"),
    "category with model keys": (lambda s: s["models"]["dadpo"]["by_category"]["math"].update(source="x"), "source"),
    "category missing a field": (lambda s: s["models"]["dadpo"]["by_category"]["chat"].pop("tie"), "tie"),
    "lm-eval without difference": (lambda s: s["models"]["dadpo"]["lm_eval"]["gsm8k"].pop("difference"), "difference"),
    "no models": (lambda s: s.update(models={}), "$.models"),
    "unit unknown": (lambda s: s["models"]["dadpo"].update(length_unit="words"), "length_unit"),
    "prompts without digest": (lambda s: s["prompts"].pop("digest"), "digest"),
    "interval upside down": (lambda s: s["models"]["dadpo"].update(ci95=[0.8, 0.35]), "models.dadpo.ci95"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_validate_summary_rejects_a_broken_one(case):
    change, fragment = BROKEN[case]
    with pytest.raises(DadpoError) as raised:
        validate_summary(_break(change))
    message = str(raised.value)
    assert message.startswith("summary.json: ") and "\n" not in message
    assert fragment in message, message


# ---------------------------------------------------------------- the table


def test_render_table():
    expected = ("Against `teacher`, judged by served Qwen/Qwen2.5-72B-Instruct (template judge_prompt.v1.jinja), "
                "10 prompts (heldout.jsonl).\n\n") + """\
| model | win rate | 95% CI | LC win rate | win | tie | loss | parse failures | position consistency | mean length |
|---|---|---|---|---|---|---|---|---|---|
| dadpo | 60.0% | 35.0-80.0% | 55.0% | 5 | 2 | 3 | 0 | 70.0% | 123.2 tokens |
| api\\|model | - | - | - | 0 | 0 | 0 | 10 | - | 40.5 chars |

By category:

| model | category | win rate | 95% CI | LC win rate | win | tie | loss | parse failures |
|---|---|---|---|---|---|---|---|---|
| dadpo | math | 75.0% | 25.0-100.0% | 70.0% | 3 | 0 | 1 | 0 |
| dadpo | chat | 50.0% | 25.0-75.0% | 45.0% | 2 | 2 | 2 | 0 |

lm-eval (the alignment tax: difference to the baseline):

| model | task | metric | value | stderr | baseline | difference |
|---|---|---|---|---|---|---|
| dadpo | gsm8k | exact_match | 0.3100 | 0.0200 | 0.3500 | -0.0400 |
"""
    assert render_table(full_summary()) == expected


def test_render_table_of_an_answer_judge():
    summary = full_summary()
    summary["judge"] = {"kind": "answer", "model": None, "url": None, "template": None, "template_digest": None,
                        "max_new_tokens": None, "retries": 0, "weights_digest": None}
    summary["baseline_accuracy"] = 0.625
    for model in summary["models"].values():
        model.update(position_consistency=None, by_category={}, lm_eval={})
    summary["models"]["dadpo"]["accuracy"] = 0.75
    table = render_table(summary)
    lines = table.splitlines()
    assert lines[0] == "Against `teacher`, judged by answer, 10 prompts (heldout.jsonl)."
    assert lines[2] == ("| model | win rate | 95% CI | LC win rate | win | tie | loss | parse failures | mean length "
                        "| accuracy |")
    assert lines[4] == "| dadpo | 60.0% | 35.0-80.0% | 55.0% | 5 | 2 | 3 | 0 | 123.2 tokens | 75.0% |"
    assert lines[5].endswith("| 40.5 chars | - |")
    assert lines[-1] == "Baseline accuracy: 62.5%."
    assert "By category" not in table and "lm-eval" not in table


# ---------------------------------------------------------------- plots


def test_plot_winrates_writes_a_png(tmp_path):
    path = tmp_path / "eval" / "winrates.png"
    plot_winrates(full_summary(), path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    height, width, _ = imread(path).shape
    assert width == 700 and height > 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["winrates.png"]  # no temporary file left


def test_plot_sweep_heatmap_writes_a_png(tmp_path):
    path = tmp_path / "winrate_heatmap.png"
    points = {(0.0, 0.01): 0.42, (0.1, 0.0): 0.3, (0.1, 0.01): 0.55, (0.0, 0.0): None, (1.0, 0.01): float("nan")}
    plot_sweep_heatmap(points, path, "win rate against teacher")
    assert path.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    image = imread(path)
    assert image.shape[1] == 420  # one panel, as wide as one of sweep's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["winrate_heatmap.png"]
    with pytest.raises(ValueError, match="no sweep points"):
        plot_sweep_heatmap({}, tmp_path / "none.png", "nothing")
