"""`analyze`'s record: the measurements -> the Analysis (analysis.json) and its heatmap PNGs.

Input: Measurements (sums already reduced), the model identity, calibration and settings records. Output: an
Analysis and, written into a folder, the figures it names.
"""

from __future__ import annotations

from pathlib import Path

from ffnfusion.analyze.dependency import window_scores
from ffnfusion.analyze.heatmap import plot_attention, plot_dependency
from ffnfusion.analyze.measure import Measurements
from ffnfusion.formats.analysis import (
    Analysis,
    AttentionScore,
    Calibration,
    Cost,
    CostPart,
    LayerStats,
    ModelIdentity,
    Settings,
    SubBlockStats,
    Window,
)

PARTS = ("baseline", "teacher", "ffn_dependency", "block_dependency", "attention")
HEATMAPS = {
    "ffn_dependency": "ffn_dependency.png",
    "block_dependency": "block_dependency.png",
    "attention_importance": "attention_importance.png",
}


def _cost(m: Measurements, num_layers: int, removed: set[int]) -> Cost:
    per_forward = 2 * num_layers - len(removed)
    parts = {}
    total = 0.0
    for part in PARTS:
        evals = m.counter.sub_blocks.get(part, 0)
        heads = m.counter.lm_heads.get(part, 0)
        if not evals and not heads:
            continue
        fe = evals / (per_forward * m.batches)
        parts[part] = CostPart(sub_block_evals=evals, lm_head_evals=heads, forward_equivalents=round(fe, 4))
        total += fe
    return Cost(
        sub_blocks_per_forward=per_forward,
        batches=m.batches,
        parts=parts,
        total_forward_equivalents=round(total, 4),
        naive_forward_equivalents_per_matrix=num_layers,
    )


def build_analysis(identity: ModelIdentity, calibration: Calibration, settings: Settings, m: Measurements) -> Analysis:
    n = identity.num_layers
    removed = set(settings.remove_attention)
    s = m.stats.tolist()

    def sub(k: int, i: int) -> SubBlockStats:
        return SubBlockStats(rel_norm=s[i][k][0], cos_distance=s[i][k][1])

    layers = [
        LayerStats(layer=i, attention=None if i in removed else sub(0, i), ffn=sub(1, i), block=sub(2, i))
        for i in range(n)
    ]
    att = m.attention
    scores = [
        AttentionScore(layer=i, kl=kl, lm_loss=ce, lm_loss_delta=ce - att.original_lm_loss)
        for i, (kl, ce) in sorted(att.scores.items())
    ]
    return Analysis(
        model=identity,
        calibration=calibration,
        settings=settings,
        original_lm_loss=att.original_lm_loss,
        base_lm_loss=att.base_lm_loss,
        base_kl=att.base_kl,
        layers=layers,
        attention_importance=scores,
        ffn_dependency=m.ffn,
        block_dependency=m.block,
        ffn_windows=[Window(**w) for w in window_scores(m.ffn, settings.max_window)],
        block_windows=[Window(**w) for w in window_scores(m.block, settings.max_window)],
        cost=_cost(m, n, removed),
        heatmaps=dict(HEATMAPS),
    )


def write_figures(analysis: Analysis, folder: Path) -> None:
    removed = set(analysis.settings.remove_attention)
    name = Path(analysis.model.name).name or analysis.model.name
    where = f" with attention {sorted(removed)} removed" if removed else ""
    plot_dependency(
        analysis.ffn_dependency, removed, f"FFN dependency M[i,j]: {name}{where}", folder / HEATMAPS["ffn_dependency"]
    )
    plot_dependency(
        analysis.block_dependency,
        removed,
        f"block dependency: {name}{where}",
        folder / HEATMAPS["block_dependency"],
        what="block",
    )
    plot_attention(analysis.kl_by_layer(), analysis.num_layers, removed, folder / HEATMAPS["attention_importance"])
