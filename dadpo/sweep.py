"""`dadpo sweep`: a (beta1, beta2) grid of daDPO runs from one cache.

The cache holds the teacher's and the reference's log-probs, so every grid point loads only the
student: the teacher and reference models are never needed again (their folders may be gone).

    RUNS/b1=0.1_b2=0.01/     one `dadpo train` run folder per point
    RUNS/summary.csv         final train and eval metrics per point
    RUNS/summary.md          the same as a markdown table
    RUNS/summary.png         eval loss, reward accuracy and margin per (beta1, beta2)

A point whose folder holds a readable summary.json is finished and skipped on a re-run (after
checking it was trained with the same settings); one with checkpoints is resumed; one left half
written (a damaged summary, no checkpoints) is trained again. beta2 = 0 points are dDPO, beta1 = 0
points rDPO; beta1 = beta2 = 0 is skipped (the loss would be constant).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from dadpo import stop
from dadpo.atomic import write_atomic
from dadpo.cache import open_cache
from dadpo.errors import DadpoError
from dadpo.heatmap import beta_axes, beta_figure, draw_beta_heatmap, save_png
from dadpo.config import TrainConfig
from dadpo.recipes.dadpo import cache_fingerprint, policy_start, teacher_weights, train
from dadpo.training.config import run_differences
from dadpo.training.checkpoint import list_checkpoints
from dadpo.training.run_folder import RunFolder

METRICS = [("eval_loss", "eval loss"), ("eval_reward_accuracy", "eval reward accuracy"), ("eval_margin", "eval margin")]
COLUMNS = ["beta1", "beta2", "method", "run", "status", "steps", "final_loss", "final_reward_accuracy",
           "final_margin", "eval_loss", "eval_reward_accuracy", "eval_margin"]


def run_name(beta1: float, beta2: float) -> str:
    return f"b1={beta1:g}_b2={beta2:g}"


def method_name(beta1: float, beta2: float) -> str:
    if beta1 == 0 and beta2 == 0:
        return "-"
    return "dDPO" if beta2 == 0 else "rDPO" if beta1 == 0 else "daDPO"


def parse_betas(text: str, flag: str) -> list[float]:
    """'0.01,0.1,1' -> [0.01, 0.1, 1.0]; one clear line for anything else."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise DadpoError(f"{flag} {text}: '{item.strip()}' is not a number (expected e.g. 0.01,0.1,1)") from None
        if not math.isfinite(value) or value < 0:
            raise DadpoError(f"{flag} {text}: {item.strip()} must be a finite number >= 0")
        if value not in values:
            values.append(value)
    return values


def run_sweep(base: TrainConfig, beta1s: list[float], beta2s: list[float],
              say: Callable[[str], None] = print) -> list[dict]:
    """Train every grid point into base.out/<run_name>; return one result row per point."""
    from accelerate import PartialState

    if not beta1s or not beta2s:
        raise DadpoError("--beta1 and --beta2 each need at least one value")
    replace(base, resume=False).check()
    root = Path(base.out)
    # Fail before the first run if the policy start cannot be found (e.g. the reference folder
    # was deleted after caching and no --model was given) or does not match the cache.
    cache = open_cache(base.cache)
    model, _ = policy_start(base.model, cache, base.trust_remote_code)
    mixture = teacher_weights(cache, base.teacher_weights, max(beta2s))  # refuses beta2 > 0 without a teacher
    state = PartialState()
    # what train() records for a run, less beta1/beta2: to tell whether a finished point is this sweep's
    shared_record = {"model": model.name, "cache_fingerprint": cache_fingerprint(cache),
                     "global_batch": base.batch_size * base.grad_accum * state.num_processes, "teacher_mixture": mixture,
                     "mixed_precision": base.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")}
    points = [(b1, b2) for b1 in beta1s for b2 in beta2s]
    main = state.is_main_process
    results = []
    for number, (beta1, beta2) in enumerate(points, 1):
        name = run_name(beta1, beta2)
        where = f"[{number}/{len(points)}] {name} ({method_name(beta1, beta2)})"
        if beta1 == 0 and beta2 == 0:
            say(f"{where}: skipped, beta1 = beta2 = 0 makes the loss constant")
            results.append({"beta1": beta1, "beta2": beta2, "method": "-", "run": name,
                            "status": "skipped (beta1 = beta2 = 0)"})
            continue
        cfg = replace(base, out=str(root / name), beta1=beta1, beta2=beta2, resume=False)
        run = RunFolder(root / name)
        finished = run.finished_summary()
        if finished is not None and not base.overwrite:
            _check_same_settings(run, cfg.record(shared_record))
            say(f"{where}: finished earlier, skipped")
            summary, status = finished, "finished earlier"
        else:
            cfg.resume = bool(list_checkpoints(run.path)) and not base.overwrite
            say(f"{where}: {'resuming' if cfg.resume else 'training'} -> {run.path}")
            try:
                summary, status = train(cfg), "trained"
            except stop.Stopped as stopped:  # sweep has no --resume: a re-run resumes this point by itself
                raise stop.Stopped(f"{where}: {stopped.what}", "re-run the same sweep command to continue (finished "
                                   "points are skipped, this one resumes from its checkpoint)") from None
        results.append(_result_row(beta1, beta2, name, status, summary))
    if main:
        write_summary(root, results)
        say(f"summary: {root / 'summary.csv'}, {root / 'summary.md'}, {root / 'summary.png'}")
    return results


def _check_same_settings(run: RunFolder, now: dict) -> None:
    before = run.record() or {}
    changed = run_differences({k: v for k, v in before.items() if k in now}, now)
    if changed:
        raise DadpoError(f"{run.path}: finished earlier with other settings ({'; '.join(changed)}); use another --out, "
                         "or --overwrite to retrain every point")


def _result_row(beta1: float, beta2: float, name: str, status: str, summary: dict) -> dict:
    last, ev = summary.get("final_train") or {}, summary.get("eval") or {}
    return {"beta1": beta1, "beta2": beta2, "method": method_name(beta1, beta2), "run": name, "status": status,
            "steps": summary.get("steps"), "final_loss": last.get("loss"),
            "final_reward_accuracy": last.get("reward_accuracy"), "final_margin": last.get("margin"),
            "eval_loss": ev.get("eval_loss"), "eval_reward_accuracy": ev.get("eval_reward_accuracy"),
            "eval_margin": ev.get("eval_margin")}


# ---------------------------------------------------------------- summary files


def write_summary(root: Path, results: list[dict]) -> None:
    import polars as pl

    rows = [{column: row.get(column) for column in COLUMNS} for row in results]
    frame = pl.DataFrame(rows, schema={c: (pl.Float64 if c not in ("method", "run", "status", "steps") else
                                           pl.Int64 if c == "steps" else pl.Utf8) for c in COLUMNS})
    write_atomic(root / "summary.csv", lambda tmp: frame.write_csv(tmp))
    write_atomic(root / "summary.md", lambda tmp: Path(tmp).write_text(summary_markdown(rows)))
    write_atomic(root / "summary.png", lambda tmp: plot_grid(rows, tmp))


def summary_markdown(rows: list[dict]) -> str:
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    header = ["beta1", "beta2", "method", "eval loss", "eval reward acc.", "eval margin", "final train loss",
              "steps", "run", "status"]
    keys = ["beta1", "beta2", "method", "eval_loss", "eval_reward_accuracy", "eval_margin", "final_loss", "steps",
            "run", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row[k]:g}" if k in ("beta1", "beta2") else fmt(row[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    scored = [r for r in rows if r.get("eval_loss") is not None]
    if scored:
        best = min(scored, key=lambda r: r["eval_loss"])
        lines += ["", f"Lowest eval loss: beta1={best['beta1']:g}, beta2={best['beta2']:g} ({best['method']}, "
                      f"{best['eval_loss']:.4f}). beta2 = 0 rows are dDPO, beta1 = 0 rows rDPO."]
    return "\n".join(lines) + "\n"


def plot_grid(rows: list[dict], path: Path) -> None:
    """Heatmaps over (beta1, beta2): eval loss, reward accuracy and margin (final train values
    where a run has no eval split)."""
    beta1s, beta2s = beta_axes([(r["beta1"], r["beta2"]) for r in rows])
    use_eval = any(r.get("eval_loss") is not None for r in rows)
    panels = METRICS if use_eval else [("final_loss", "final train loss"),
                                       ("final_reward_accuracy", "final train reward accuracy"),
                                       ("final_margin", "final train margin")]
    figure = beta_figure(len(panels), len(beta1s))
    for index, (key, title) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        points = {(row["beta1"], row["beta2"]): row.get(key) for row in rows}
        draw_beta_heatmap(figure, axes, points, title, cmap="viridis_r" if key.endswith("loss") else "viridis",
                          beta1s=beta1s, beta2s=beta2s)
    save_png(figure, path)  # (the caller writes through dadpo.atomic)
