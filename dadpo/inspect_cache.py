"""`dadpo inspect`: what a cache holds, before spending GPU hours training on it.

Reads a finished cache (dadpo.cache.open_cache checks the manifest; every shard's checksum and
row count are verified on read) and reports rows, token counts, dropped pairs, and the
distributions of the per-pair margins the loss is built from:

    h_te   = teacher_logp_chosen - teacher_logp_rejected    (how much the teacher prefers y_t)
    h_ref  = ref_logp_chosen     - ref_logp_rejected        (how much the dSFT student does)
    d_te   = h_te - h_ref                                   (the teacher's extra preference)

With beta1 = 0 (rDPO) the policy must push h_policy past h_te; d_te shows how far that is from
where the reference starts. A long right tail of h_te usually means truncated or degenerate
student responses.

The teacher term's size (dadpo.loss.teacher_term_scale): training starts at h_policy = h_ref, where
u = beta2 * (h_ref - h_te) = -beta2 * d_te; the report gives the median |d_te| and the beta2 that
makes |u| = 1 for the median pair, and with a beta2 the median |u| and step 0's loss.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dadpo.atomic import write_atomic
from dadpo.cache import open_cache
from dadpo.cache.layout import REFERENCE, teacher_prefix
from dadpo.errors import DadpoError
from dadpo.loss import TeacherTermScale, teacher_term_scale

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _suffix(name: str) -> str:
    return f"[{name}]" if name else ""


@dataclass
class Distribution:
    count: int
    mean: float
    sd: float
    min: float
    max: float
    quantiles: dict  # q -> value

    @classmethod
    def of(cls, values: np.ndarray) -> "Distribution":
        if values.size == 0:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, {q: nan for q in QUANTILES})
        return cls(int(values.size), float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0,
                   float(values.min()), float(values.max()),
                   {q: float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))})


@dataclass
class CacheReport:
    path: str
    teachers: dict  # name -> model ("" names a single unnamed teacher; {} for a reference-only cache)
    reference: str
    rows: int
    pairs_in_source: int
    dropped: int
    tokens: dict  # column prefix (teacher, teacher_NAME, ref) -> {"chosen": total, "rejected": total}
    margins: dict  # "h_ref", then "h_te", "d_te" per teacher ("h_te[NAME]", "d_te[NAME]") -> Distribution
    values: dict  # the same names -> np.ndarray, for plotting
    teacher_terms: dict  # teacher name -> TeacherTermScale (dadpo.loss.teacher_term_scale)

    @property
    def teacher(self) -> str:
        return ", ".join(f"{name}={model}" if name else model for name, model in self.teachers.items()) or "none"


def inspect_cache(path: str | os.PathLike, beta2: float | None = None) -> CacheReport:
    """The report of the cache at `path`; with `beta2`, also how big the teacher term is for it."""
    if beta2 is not None and not (math.isfinite(beta2) and beta2 >= 0):
        raise DadpoError(f"--beta2 {beta2}: must be a finite number >= 0")
    cache = open_cache(path, flag="CACHE")
    prefixes = [teacher_prefix(name) for name in cache.teachers] + [REFERENCE]
    frame = cache.read([f"{p}_{kind}_{side}" for p in prefixes for kind in ("logp", "ntok")
                        for side in ("chosen", "rejected")])
    column = lambda name: frame[name].to_numpy().astype(np.float64) if frame.height else np.zeros(0)  # noqa: E731
    h_ref = column("ref_logp_chosen") - column("ref_logp_rejected")
    h_te = {name: column(f"{teacher_prefix(name)}_logp_chosen") - column(f"{teacher_prefix(name)}_logp_rejected")
            for name in cache.teachers}
    values = {**{f"h_te{_suffix(name)}": h for name, h in h_te.items()}, "h_ref": h_ref,
              **{f"d_te{_suffix(name)}": h - h_ref for name, h in h_te.items()}}
    tokens = {p: {side: int(column(f"{p}_ntok_{side}").sum()) for side in ("chosen", "rejected")} for p in prefixes}
    manifest = cache.manifest
    return CacheReport(str(path), {name: record["model"] for name, record in cache.teachers.items()},
                       cache.reference["model"], frame.height, manifest["pairs"]["rows"], manifest["totals"]["dropped"],
                       tokens, {name: Distribution.of(v) for name, v in values.items()}, values,
                       {name: teacher_term_scale(h_ref, h, beta2) for name, h in h_te.items()})


def format_report(report: CacheReport) -> str:
    rows = max(report.rows, 1)
    lines = [
        f"cache {report.path}",
        f"  teacher    {report.teacher}",
        f"  reference  {report.reference}",
        f"  pairs      {report.rows} cached of {report.pairs_in_source} in the pairs file, "
        f"{report.dropped} dropped by the length rule",
        "  tokens     total (mean per pair)        chosen (teacher response)   rejected (student response)",
    ]
    for model, counts in report.tokens.items():
        label = "reference" if model == REFERENCE else model.replace("teacher_", "teacher ")
        lines.append(f"    {label:<31}" + "".join(
            f"{counts[side]:>12} ({counts[side] / rows:>8.1f})     " for side in ("chosen", "rejected")).rstrip())
    header = "  ".join(f"{'q' + format(q * 100, 'g'):>8}" for q in QUANTILES)
    lines += ["", f"  {'margin':<6} {'mean':>9} {'sd':>9} {'min':>9}  {header}  {'max':>9}"]
    for name, d in report.margins.items():
        lines.append(f"  {name:<6} {_num(d.mean)} {_num(d.sd)} {_num(d.min)}  "
                     + "  ".join(_num(d.quantiles[q], 8) for q in QUANTILES) + f"  {_num(d.max)}")
    lines += [
        "",
        "  h_te = log te(chosen) - log te(rejected); h_ref likewise under the reference; d_te = h_te - h_ref.",
        *[f"  pairs where the teacher{' ' + name if name else ''} prefers its own response (h_te > 0): "
          f"{_share(report.values[f'h_te{_suffix(name)}'] > 0)}" for name in report.teachers],
        f"  pairs where the reference prefers the teacher's response (h_ref > 0): {_share(report.values['h_ref'] > 0)}",
    ]
    if report.teacher_terms:
        lines += ["", "  teacher term where training starts (policy = reference): u = beta2*(h_ref - h_te)"]
        lines += [_teacher_term_line(name, scale) for name, scale in report.teacher_terms.items()]
    return "\n".join(lines)


def _teacher_term_line(name: str, scale: TeacherTermScale) -> str:
    label = f"teacher {name}: " if name else ""
    line = (f"    {label}median |h_ref - h_te| = {_num(scale.median_gap, 0)} nats; "
            f"beta2 = {_num(scale.beta2_for_unit, 0)} keeps |beta2*(h_ref - h_te)| near 1 for the median pair")
    if scale.beta2 is not None:
        line += (f"\n    {label}with beta2 = {scale.beta2:g}: median |beta2*(h_ref - h_te)| = "
                 f"{_num(scale.median_term, 0)}, step-0 loss {_num(scale.start_loss, 0)}")
        if scale.median_term is not None and scale.median_term > 1:
            line += " (above 1 the teacher term swamps the reference term)"
    return line


def _num(value: float, width: int = 9) -> str:
    return f"{value:>{width}.3g}" if math.isfinite(value) else f"{'-':>{width}}"


def _share(mask: np.ndarray) -> str:
    return f"{mask.mean() * 100:.1f}%" if mask.size else "-"


def plot_histograms(report: CacheReport, png: str | os.PathLike) -> Path:
    """One panel per margin (h_te, h_ref, d_te), with the mean and median marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    titles = {"h_ref": "h_ref = log ref(y_t) - log ref(y_s)"}
    for name in report.teachers:
        titles[f"h_te{_suffix(name)}"] = f"h_te{_suffix(name)} = log te(y_t) - log te(y_s)"
        titles[f"d_te{_suffix(name)}"] = f"d_te{_suffix(name)} = h_te - h_ref"
    figure, axes = plt.subplots(1, len(titles), figsize=(5 * len(titles), 4), constrained_layout=True, squeeze=False)
    for axis, (name, title) in zip(axes[0], titles.items()):
        values = report.values[name]
        finite = values[np.isfinite(values)]
        if finite.size:
            axis.hist(finite, bins=min(60, max(10, finite.size // 5)), color="#4c72b0", alpha=0.85)
            axis.axvline(float(finite.mean()), color="#c44e52", label=f"mean {finite.mean():.3g}")
            axis.axvline(float(np.median(finite)), color="#55a868", linestyle="--",
                         label=f"median {np.median(finite):.3g}")
            axis.axvline(0.0, color="black", linewidth=0.8)
            axis.legend(fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("nats")
        axis.set_ylabel("pairs")
    figure.suptitle(f"{report.path}: {report.rows} pairs (teacher {report.teacher}, reference {report.reference})",
                    fontsize=10)
    out = write_atomic(Path(png), lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
    return out
