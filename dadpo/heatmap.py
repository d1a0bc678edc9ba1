"""Heatmaps over a (beta1, beta2) grid, one panel per metric: `dadpo sweep`'s summary.png and
`dadpo eval`'s win rate per sweep point draw with the same code.

Drawn with matplotlib's Agg canvas directly (no display, pyplot left alone); callers write the PNG
through dadpo.atomic.
"""

from __future__ import annotations

import math
from pathlib import Path

BETA1_LABEL, BETA2_LABEL = "beta1 (reference)", "beta2 (teacher)"


def beta_figure(panels: int, beta1_count: int):
    """An empty figure sized for `panels` heatmaps side by side with `beta1_count` rows each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * panels, 0.6 * beta1_count + 2.6), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def beta_axes(points) -> tuple[list[float], list[float]]:
    """The sorted beta1 and beta2 values of (beta1, beta2) keys."""
    return sorted({b1 for b1, _ in points}), sorted({b2 for _, b2 in points})


def draw_beta_heatmap(figure, axes, points: dict[tuple[float, float], float | None], title: str, *,
                      cmap: str = "viridis", value_text=lambda v: f"{v:.3g}", vmin: float | None = None,
                      vmax: float | None = None, beta1s: list[float] | None = None,
                      beta2s: list[float] | None = None) -> None:
    """One panel: beta1 down, beta2 across, each cell coloured and labelled with its value
    ("-" where it is None)."""
    if beta1s is None or beta2s is None:
        beta1s, beta2s = beta_axes(points)
    grid = [[math.nan] * len(beta2s) for _ in beta1s]
    for (beta1, beta2), value in points.items():
        if value is not None:
            grid[beta1s.index(beta1)][beta2s.index(beta2)] = value
    image = axes.imshow(grid, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    figure.colorbar(image, ax=axes, shrink=0.8)
    for i, row_values in enumerate(grid):
        for j, value in enumerate(row_values):
            axes.text(j, i, "-" if math.isnan(value) else value_text(value), ha="center", va="center",
                      fontsize=9, bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
    axes.set_xticks(range(len(beta2s)), [f"{b:g}" for b in beta2s])
    axes.set_yticks(range(len(beta1s)), [f"{b:g}" for b in beta1s])
    axes.set_xlabel(BETA2_LABEL)
    axes.set_ylabel(BETA1_LABEL)
    axes.set_title(title)


def save_png(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, format="png")
