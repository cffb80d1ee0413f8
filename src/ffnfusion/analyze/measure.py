"""The `analyze` stage's measurements on a model held in memory: every sum analysis.json averages, in one pass
over the calibration batches per part (statistics, FFN and block dependency, attention KL).

Input: a DeciLM model with one plain layer per original layer and calibration tokens; output: `Measurements`.
The layer-streamed path (`analyze.streamed`) fills the same sums and finishes them with `finish_measurements`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ffnfusion.analyze.attention import attention_scores_batch, base_totals, finish_attention, teacher_for
from ffnfusion.analyze.data_parallel import DataParallel
from ffnfusion.analyze.dependency import block_dependency_batch, ffn_dependency_batch, upper_matrix
from ffnfusion.analyze.runner import SubBlockRunner
from ffnfusion.analyze.stats import sub_block_stats_sums


def planned_evals(num_layers: int, removed: set[int]) -> dict[str, int]:
    """Sub-block evaluations per batch of each part (what the runner will count): the progress bar's total."""
    per_layer = [1 + (i not in removed) for i in range(num_layers)]
    suffix = [sum(per_layer[j:]) for j in range(num_layers + 1)]
    matrix = sum(suffix[i + 1] for i in range(num_layers - 1))
    return {
        "baseline": suffix[0],
        "teacher": 2 * num_layers if removed else 0,
        "ffn_dependency": matrix,
        "block_dependency": matrix,
        "attention": sum(1 + suffix[i + 1] for i in range(num_layers) if i not in removed),
    }


@dataclass
class Measurements:
    stats: torch.Tensor  # [L, 3 (attention, ffn, block), 2 (rel_norm, cos_distance)] token means
    ffn: list[list[float | None]]
    block: list[list[float | None]]
    attention: Any  # AttentionResult
    counter: Any  # EvalCounter
    batches: int


def new_sums(num_layers: int, device: torch.device) -> dict[str, torch.Tensor]:
    """float64 sums over calibration tokens of everything analysis.json averages."""
    n = num_layers

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=device)

    # stats: [L, 3 (attention, ffn, block), 2 (rel_norm, cos_distance)]; totals: original ce, base ce, base kl.
    return {
        "stats": zeros(n, 3, 2),
        "ffn": zeros(n, n),
        "block": zeros(n, n),
        "kl": zeros(n),
        "ce": zeros(n),
        "totals": zeros(3),
    }


def finish_measurements(
    sums: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    candidates: list[int],
    counter: Any,
    batches: int,
    dp: DataParallel | None = None,
) -> Measurements:
    """Token means from the sums (after adding up every process's share under data parallelism)."""
    if dp is not None:
        batches = dp.all_reduce(sums, counter, batches)
    count = tokens.numel()
    return Measurements(
        stats=(sums["stats"] / count).cpu(),
        ffn=upper_matrix(sums["ffn"].cpu(), count),
        block=upper_matrix(sums["block"].cpu(), count),
        attention=finish_attention(tokens, candidates, sums["kl"], sums["ce"], sums["totals"]),
        counter=counter,
        batches=batches,
    )


@torch.inference_mode()
def measure(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    removed: set[int],
    batch_size: int,
    tick: Callable[[int], None] | None = None,
    dp: DataParallel | None = None,
) -> Measurements:
    """Everything analysis.json holds, from a DeciLM model with one plain layer per original layer.

    With `dp`, this process measures its share of the batches and the sums are added up over the processes.
    """
    runner = SubBlockRunner(model, tick)
    n, device = runner.num_layers, runner.device
    sums = new_sums(n, device)
    stats = sums["stats"]
    candidates = [i for i in range(n) if i not in removed]
    batches = 0
    for index, first in enumerate(range(0, tokens.shape[0], batch_size)):
        if dp is not None and not dp.mine(index):
            continue
        batches += 1
        ids = tokens[first : first + batch_size].to(device)
        runner.part = "baseline"
        prefix = runner.prefix(ids, removed)
        for i in range(n):
            if prefix.attn_out[i] is not None:
                stats[i, 0] += sub_block_stats_sums(prefix.attn_out[i], prefix.attn_in[i])
            stats[i, 1] += sub_block_stats_sums(prefix.ffn_out[i], prefix.ffn_in[i])
            block = prefix.ffn_out[i].float() + (0 if prefix.attn_out[i] is None else prefix.attn_out[i].float())
            stats[i, 2] += sub_block_stats_sums(block, prefix.attn_in[i])
        teacher = teacher_for(runner, ids, prefix, removed)
        base_totals(runner, prefix.attn_in[-1], teacher, removed, sums["totals"])
        runner.part = "ffn_dependency"
        ffn_dependency_batch(runner, prefix, removed, sums["ffn"])
        runner.part = "block_dependency"
        block_dependency_batch(runner, prefix, removed, sums["block"])
        runner.part = "attention"
        attention_scores_batch(runner, prefix, removed, candidates, teacher, sums["kl"], sums["ce"])
        del prefix, teacher
    return finish_measurements(sums, tokens, candidates, runner.counter, batches, dp)
