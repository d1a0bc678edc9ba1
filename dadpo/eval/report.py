"""What `dadpo eval` shows: summary.json checked against data_specs/eval.v1.schema.json, the
markdown table (summary.md, also printed), the win-rate plot and a sweep's win-rate heatmap.

Plots are drawn with matplotlib's Agg canvas directly (no display, pyplot left alone) and written
through dadpo.atomic.
"""

from __future__ import annotations

import math
from pathlib import Path

from dadpo.atomic import write_atomic
from dadpo.errors import DadpoError
from dadpo.heatmap import beta_axes, beta_figure, draw_beta_heatmap, save_png
from dadpo.specs import validate_json

SPEC = "eval.v1.schema.json"
FORMAT = "dadpo.eval.v1"


def validate_summary(summary: dict) -> None:
    """summary.json against data_specs/eval.v1.schema.json (and lo <= hi in every interval);
    DadpoError naming the first problem."""
    validate_json(summary, SPEC, "summary.json")
    for name, model in summary["models"].items():
        for where, stats in [(f"models.{name}", model)] + [(f"models.{name}.by_category.{category}", entry)
                                                             for category, entry in model["by_category"].items()]:
            if stats["ci95"] is not None and stats["ci95"][0] > stats["ci95"][1]:
                raise DadpoError(f"summary.json: {where}.ci95 {stats['ci95']} has its low end above its high end")


# ---------------------------------------------------------------- the table


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _interval(ci95) -> str:
    return "-" if ci95 is None else f"{100 * ci95[0]:.1f}-{100 * ci95[1]:.1f}%"


def _number(value, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rows(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _judge_text(judge: dict) -> str:
    text = judge["kind"] + (f" {judge['model']}" if judge.get("model") else "")
    if judge.get("template"):
        text += f" (template {judge['template']})"
    return text


def _length_text(stats: dict) -> str:
    if stats["mean_length"] is None:
        return "-"
    return f"{stats['mean_length']:.1f} {'chars' if stats['length_unit'] == 'characters' else 'tokens'}"


def render_table(summary: dict) -> str:
    """The summary as markdown: one row per model (win rate with its interval, length-controlled
    rate, counts, position consistency where the judge has positions, mean length, accuracy for
    the answer judge), then per category and lm-eval tables when there are any."""
    models = summary["models"]
    prompts = summary["prompts"]
    lines = [f"Against `{summary['baseline']}`, judged by {_judge_text(summary['judge'])}, "
             f"{prompts['count']} prompts ({prompts['path']}).", ""]
    positions = any(m["position_consistency"] is not None for m in models.values())
    accuracy = summary.get("baseline_accuracy") is not None or any(m["accuracy"] is not None for m in models.values())
    header = ["model", "win rate", "95% CI", "LC win rate", "win", "tie", "loss", "parse failures"]
    header += ["position consistency"] if positions else []
    header += ["mean length"] + (["accuracy"] if accuracy else [])
    rows = []
    for name, m in models.items():
        row = [name, _percent(m["win_rate"]), _interval(m["ci95"]), _percent(m["lc_win_rate"]), m["win"], m["tie"],
               m["loss"], m["parse_failures"]]
        row += [_percent(m["position_consistency"])] if positions else []
        row += [_length_text(m)] + ([_percent(m["accuracy"])] if accuracy else [])
        rows.append(row)
    lines += _rows(header, rows)
    if accuracy:
        lines += ["", f"Baseline accuracy: {_percent(summary.get('baseline_accuracy'))}."]

    by_category = [(name, category, s) for name, m in models.items() for category, s in m["by_category"].items()]
    if by_category:
        lines += ["", "By category:", ""]
        lines += _rows(["model", "category", "win rate", "95% CI", "LC win rate", "win", "tie", "loss",
                        "parse failures"],
                       [[name, category, _percent(s["win_rate"]), _interval(s["ci95"]), _percent(s["lc_win_rate"]),
                         s["win"], s["tie"], s["loss"], s["parse_failures"]] for name, category, s in by_category])

    lm_eval = [(name, task, result) for name, m in models.items() for task, result in m["lm_eval"].items()]
    if lm_eval:
        lines += ["", "lm-eval (the alignment tax: difference to the baseline):", ""]
        lines += _rows(["model", "task", "metric", "value", "stderr", "baseline", "difference"],
                       [[name, task, r["metric"], _number(r["value"]), _number(r["stderr"]),
                         _number(r["baseline_value"]), _number(r["difference"], signed=True)]
                        for name, task, r in lm_eval])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _winrate_figure(summary: dict):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(summary["models"])
    figure = Figure(figsize=(7.0, 1.2 + 0.45 * len(names)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    drew_rate = drew_lc = False
    for y, name in enumerate(names):
        m = summary["models"][name]
        rate = m["win_rate"]
        if rate is None:
            axes.text(0.5, y, "nothing judged", ha="center", va="center", fontsize=9, color="grey")
            continue
        if m["ci95"] is not None:
            low, high = m["ci95"]
            axes.errorbar(rate, y, xerr=[[rate - low], [high - rate]], fmt="o", color="C0", capsize=4,
                          label=None if drew_rate else "win rate, 95% CI")
        else:
            axes.plot(rate, y, "o", color="C0", label=None if drew_rate else "win rate")
        drew_rate = True
        if m["lc_win_rate"] is not None:
            axes.plot(m["lc_win_rate"], y, "D", color="C1", fillstyle="none",
                      label=None if drew_lc else "length-controlled")
            drew_lc = True
        axes.annotate(f"{100 * rate:.1f}%", (rate, y), textcoords="offset points", xytext=(0, 7), ha="center",
                      fontsize=8)
    axes.set_yticks(range(len(names)), names)
    axes.set_ylim(len(names) - 0.5, -0.5 - 0.3)  # first model on top, room for its label
    axes.set_xlim(0, 1)
    axes.set_xlabel(f"win rate against {summary['baseline']} (ties count half)")
    axes.set_title(f"judged by {_judge_text(summary['judge'])}", fontsize=9)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize=8)
    return figure


def plot_winrates(summary: dict, path) -> None:
    """winrates.png: each model's win rate with its 95% interval and its length-controlled rate."""
    figure = _winrate_figure(summary)
    write_atomic(Path(path), lambda tmp: save_png(figure, tmp))


def plot_sweep_heatmap(points: dict[tuple[float, float], float | None], path, title: str) -> None:
    """A sweep's win rate over (beta1, beta2), drawn as `dadpo sweep`'s heatmaps are; "-" where a
    point has no rate."""
    if not points:
        raise ValueError("plot_sweep_heatmap: no sweep points")
    clean = {key: None if value is None or (isinstance(value, float) and math.isnan(value)) else value
             for key, value in points.items()}
    beta1s, _ = beta_axes(clean)
    figure = beta_figure(1, len(beta1s))
    axes = figure.add_subplot(1, 1, 1)
    draw_beta_heatmap(figure, axes, clean, title, cmap="RdYlGn", vmin=0.0, vmax=1.0,
                      value_text=lambda v: f"{100 * v:.1f}%")
    write_atomic(Path(path), lambda tmp: save_png(figure, tmp))
