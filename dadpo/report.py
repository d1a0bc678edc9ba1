"""`dadpo report`: training curves of one or more runs, overlaid, to a PNG.

Reads RUN/metrics.jsonl (one line per optimizer step) and RUN/eval.jsonl (eval points) and
draws loss, margin and reward accuracy against the step, one colour per run, labelled by the
run folder's name. A sweep folder (dadpo sweep --out RUNS) stands for all its runs.
Drawn with matplotlib's Agg canvas directly, so it needs no display and leaves pyplot alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from dadpo.atomic import write_atomic
from dadpo.errors import DadpoError

PANELS = [("loss", "loss"), ("margin", "margin (u)"), ("reward_accuracy", "reward accuracy")]


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders named by `paths`: a run itself, or a folder whose subfolders are runs."""
    if not paths:
        raise DadpoError("name at least one run folder")
    runs = []
    for name in paths:
        path = Path(name)
        if not path.is_dir():
            raise DadpoError(f"{name}: no such folder")
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
            continue
        inner = sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file())
        if not inner:
            raise DadpoError(f"{name}: no metrics.jsonl in it or its subfolders, so not a dadpo run (or sweep) folder")
        runs.extend(inner)
    return runs


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise DadpoError(f"{path}:{number}: not a JSON line") from None
    return records


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` steps (the first points average what exists)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(paths: list[str], out: str, smooth: int = 1, width: float = 15.0, height: float = 4.5,
              dpi: int = 100) -> tuple[Path, list[Path]]:
    """Write the PNG; return (its path, the runs drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if smooth < 1:
        raise DadpoError(f"--smooth {smooth}: must be at least 1")
    runs = find_runs(paths)
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, len(PANELS), i + 1) for i in range(len(PANELS))]
    drawn = 0
    for index, run in enumerate(runs):
        steps = read_jsonl(run / "metrics.jsonl")
        evals = read_jsonl(run / "eval.jsonl")
        color = f"C{index % 10}"
        for ax, (key, _) in zip(axes, PANELS):
            points = [(s["step"], s[key]) for s in steps if key in s]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, smoothed(list(ys), smooth), color=color, label=run.name, linewidth=1.5)
                drawn += 1
            eval_points = [(e["step"], e[f"eval_{key}"]) for e in evals if f"eval_{key}" in e]
            if eval_points:
                xs, ys = zip(*eval_points)
                ax.plot(xs, ys, color=color, marker="o", linestyle="--", linewidth=1, markersize=5)
    if not drawn:
        raise DadpoError(f"{', '.join(map(str, runs))}: metrics.jsonl has no steps yet")
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(title + (f" (moving average of {smooth})" if smooth > 1 else ""))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="run (o = eval)", title_fontsize=8)
    figure.tight_layout()
    target = Path(out)
    try:  # write_atomic makes the folder too, and turns a failure into one line naming the file
        write_atomic(target, lambda tmp: figure.savefig(tmp, format="png"))
    except DadpoError as exc:
        raise DadpoError(f"--out {exc}") from None
    return target, runs
