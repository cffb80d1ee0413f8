"""Figures of an analysis: dependency heatmaps (log colour scale) and the attention-importance chart."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm, Normalize

REMOVED_COLOR = "#d62728"


def _ticks(n: int) -> list[int]:
    step = 1 if n <= 32 else 2 if n <= 64 else 4
    return list(range(0, n, step))


def _mark_removed(ax: plt.Axes, n: int, removed: set[int], axes: str) -> None:
    for axis in axes:
        labels = (ax.get_xticklabels if axis == "x" else ax.get_yticklabels)()
        for label in labels:
            text = label.get_text()
            if text.lstrip("-").isdigit() and int(text) in removed:
                label.set_color(REMOVED_COLOR)
                label.set_fontweight("bold")


def plot_dependency(
    matrix: list[list[float | None]], removed: set[int], title: str, path: Path, what: str = "FFN"
) -> Path:
    """Upper-triangular heatmap of M[i][j], rows = the removed sub-block i, columns = the measured j."""
    n = len(matrix)
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size:
        low, high = float(positive.min()), float(positive.max())
        norm = LogNorm(vmin=max(low, high * 1e-6), vmax=high if high > low else low * 10)
        shown = np.where(np.isfinite(values), np.maximum(values, norm.vmin), np.nan)
    else:
        norm, shown = Normalize(vmin=0.0, vmax=1.0), values
    size = min(9.0, 3.0 + 0.18 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=90)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#f2f2f2")
    image = ax.imshow(shown, norm=norm, cmap=cmap, interpolation="nearest")
    ticks = _ticks(n)
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7, rotation=90)
    ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.set_xlabel(f"measured {what} j (later)")
    ax.set_ylabel(f"removed {what} i")
    note = f"\nred indices: attention removed ({len(removed)})" if removed else ""
    ax.set_title(title + note, fontsize=10)
    _mark_removed(ax, n, removed, "xy")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("1 - cos (log scale)" if isinstance(norm, LogNorm) else "1 - cos")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_attention(kl: dict[int, float], num_layers: int, removed: set[int], path: Path) -> Path:
    """Per-layer KL of removing that attention (log scale); removed layers marked with an x on the axis."""
    fig, ax = plt.subplots(figsize=(min(12.0, 3.0 + 0.25 * num_layers), 3.6), dpi=90)
    layers = sorted(kl)
    values = [kl[i] for i in layers]
    floor = min([v for v in values if v > 0], default=1e-6) / 2
    ax.bar(layers, [max(v, floor) for v in values], color="#1f77b4")
    for i in sorted(removed):
        ax.plot(i, floor, marker="x", color=REMOVED_COLOR, markersize=8)
    ax.set_yscale("log")
    ticks = _ticks(num_layers)
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    _mark_removed(ax, num_layers, removed, "x")
    ax.set_xlim(-0.7, num_layers - 0.3)
    if values and math.isfinite(max(values)):
        ax.set_ylim(floor / 1.5, max(max(values), floor) * 2)
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(original || attention removed)")
    title = "attention importance (lower = safer to remove)"
    ax.set_title(title + ("; red x: already removed" if removed else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
