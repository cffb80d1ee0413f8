"""Pairwise dependency matrices from cached prefix activations, and window scores over them.

Row i of a matrix needs the model run with sub-block (or block) i removed, but only from i on: everything before i
is unchanged, so the run starts from the cached input of i. Row i costs L-1-i layers, the whole matrix
L(L-1)/2 layers, i.e. (L-1)/2 full-forward equivalents instead of the L of restarting every run at the embeddings.
"""

from __future__ import annotations

import torch

from ffnfusion.analyze.runner import Prefix, SubBlockRunner
from ffnfusion.analyze.stats import cos_distance_sum


def ffn_dependency_batch(runner: SubBlockRunner, prefix: Prefix, removed: set[int], sums: torch.Tensor) -> None:
    """sums[i, j] += sum over tokens of 1 - cos(h_j, h_j | FFN i removed), h_j = FFN j's residual contribution."""
    n = runner.num_layers
    for i in range(n - 1):

        def measure(j: int, _attention: torch.Tensor | None, ffn: torch.Tensor, i: int = i) -> None:
            sums[i, j] += cos_distance_sum(prefix.ffn_out[j], ffn)

        # With FFN i removed, layer i's output is its FFN input, which the prefix already holds.
        runner.run_layers(prefix.ffn_in[i], prefix.position_embeddings, range(i + 1, n), removed, measure)


def block_contribution(attention: torch.Tensor | None, ffn: torch.Tensor) -> torch.Tensor:
    # Summed in float32: subtracting a layer's input from its output would lose the small contribution to the
    # rounding of the much larger residual stream in bf16.
    return ffn.float() if attention is None else attention.float() + ffn.float()


def block_dependency_batch(runner: SubBlockRunner, prefix: Prefix, removed: set[int], sums: torch.Tensor) -> None:
    """sums[i, j] += sum over tokens of 1 - cos(b_j, b_j | layer i removed), b_j = layer j's contribution."""
    n = runner.num_layers
    for i in range(n - 1):

        def measure(j: int, attention: torch.Tensor | None, ffn: torch.Tensor, i: int = i) -> None:
            base = block_contribution(prefix.attn_out[j], prefix.ffn_out[j])
            sums[i, j] += cos_distance_sum(base, block_contribution(attention, ffn))

        runner.run_layers(prefix.attn_in[i], prefix.position_embeddings, range(i + 1, n), removed, measure)


def upper_matrix(sums: torch.Tensor, tokens: int) -> list[list[float | None]]:
    """Token means of the upper triangle; null where j <= i (no dependency is defined there)."""
    n = sums.shape[0]
    values = (sums / tokens).tolist()
    return [[values[i][j] if j > i else None for j in range(n)] for i in range(n)]


def window_scores(matrix: list[list[float | None]], max_window: int) -> list[dict[str, float | int]]:
    """max and sum of M[i][j] (start <= i < j <= end) for every contiguous window of 2..max_window layers."""
    n = len(matrix)
    out = []
    for start in range(n):
        largest, total = 0.0, 0.0
        for end in range(start + 1, min(n, start + max_window)):
            # Growing the window by one layer adds the column `end` from every earlier member.
            column = [matrix[i][end] or 0.0 for i in range(start, end)]
            largest = max(largest, *column)
            total += sum(column)
            out.append({"start": start, "end": end, "max": largest, "sum": total})
    return out
