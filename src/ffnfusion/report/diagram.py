"""A picture of a plan: which attention sub-blocks are removed, which FFNs fuse, which blocks run in parallel."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Rectangle

from ffnfusion.formats.plan import Plan, plan_blocks, sequential_sub_blocks
from ffnfusion.io.output import signature

KEPT_ATTN, KEPT_FFN, REMOVED, FUSED, PARALLEL = "#4c72b0", "#55a868", "#e6e6e6", "#dd8452", "#8172b3"


def plot_plan(plan: Plan, num_layers: int, path: str | Path, title: str | None = None) -> Path:
    """Two rows of cells (attention, FFN) per original layer; fused and parallel groups are outlined."""
    blocks = plan_blocks(plan, num_layers)
    removed_attn, removed_ffn = set(plan.remove_attention), set(plan.remove_ffn)
    fused = {i for g in plan.fuse_ffn for i in g}
    parallel = {i for g in plan.parallel_blocks for i in g}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * num_layers + 1.5), 2.5))
    for i in range(num_layers):
        attn_color = REMOVED if i in removed_attn else (PARALLEL if i in parallel else KEPT_ATTN)
        ffn_color = REMOVED if i in removed_ffn else FUSED if i in fused else PARALLEL if i in parallel else KEPT_FFN
        ax.add_patch(Rectangle((i + 0.05, 1.05), 0.9, 0.9, color=attn_color))
        ax.add_patch(Rectangle((i + 0.05, 0.05), 0.9, 0.9, color=ffn_color))
    for group, color in [(g, FUSED) for g in plan.fuse_ffn] + [(g, PARALLEL) for g in plan.parallel_blocks]:
        height = 1.0 if color == FUSED else 2.0
        ax.add_patch(
            FancyBboxPatch(
                (group[0] + 0.02, 0.02),
                len(group) - 0.04,
                height - 0.04,
                boxstyle="round,pad=0,rounding_size=0.15",
                fill=False,
                edgecolor="black",
                linewidth=1.5,
            )
        )
    ax.set_xlim(0, num_layers)
    ax.set_ylim(0, 2)
    step = 1 if num_layers <= 40 else 5
    ax.set_xticks([i + 0.5 for i in range(0, num_layers, step)], [str(i) for i in range(0, num_layers, step)])
    ax.set_yticks([0.5, 1.5], ["FFN", "attention"])
    ax.set_xlabel("layer of the original model")
    depth = sequential_sub_blocks(blocks)
    ax.set_title(
        title or f"{num_layers} layers -> {len(blocks)} blocks; sequential sub-blocks {2 * num_layers} -> {depth}"
    )
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in (KEPT_ATTN, KEPT_FFN, FUSED, PARALLEL, REMOVED)]
    ax.legend(
        handles,
        ["attention", "FFN", "fused FFN", "parallel block", "removed"],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.5),
        ncol=5,
        frameon=False,
        fontsize=8,
    )
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, metadata={"Software": signature("report")})
    plt.close(fig)
    return path
