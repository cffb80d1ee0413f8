"""Attention importance (Puzzle): replace one attention sub-block with a no-op and measure the damage.

The damage is the KL divergence of the final next-token distribution from the original model's (KL picked better
architectures than LM loss in Puzzle), averaged over all calibration tokens, plus the change in next-token loss.
As in the dependency matrices, the run with attention i removed starts from the cached input of layer i.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ffnfusion.analyze.runner import Prefix, SubBlockRunner, Teacher, next_token_targets


def teacher_for(runner: SubBlockRunner, ids: torch.Tensor, prefix: Prefix, removed: set[int]) -> Teacher:
    """The original model's outputs; when nothing is removed the base prefix already is the original model."""
    targets = next_token_targets(ids)
    if not removed:
        return runner.teacher(prefix.attn_in[-1], targets)
    part, runner.part = runner.part, "teacher"
    x, pe = runner.embed(ids)
    teacher = runner.teacher(runner.run_layers(x, pe, range(runner.num_layers), set()), targets)
    runner.part = part
    return teacher


def attention_scores_batch(
    runner: SubBlockRunner,
    prefix: Prefix,
    removed: set[int],
    candidates: Iterable[int],
    teacher: Teacher,
    kl_sums: torch.Tensor,
    ce_sums: torch.Tensor,
) -> None:
    """kl_sums[i], ce_sums[i] += KL and cross-entropy sums of the base model with attention i also removed."""
    pe = prefix.position_embeddings
    for i in candidates:
        x = prefix.attn_in[i]
        x = x + runner.ffn(i, x)
        x = runner.run_layers(x, pe, range(i + 1, runner.num_layers), removed)
        kl, ce = runner.compare_to_teacher(x, teacher)
        kl_sums[i] += kl
        ce_sums[i] += ce


@dataclass
class AttentionResult:
    """Token means: per candidate layer (kl, lm_loss), plus the original's and the base model's figures."""

    scores: dict[int, tuple[float, float]]
    original_lm_loss: float
    base_lm_loss: float
    base_kl: float


@torch.inference_mode()
def score_attention(
    runner: SubBlockRunner, tokens: torch.Tensor, removed: set[int], batch_size: int
) -> AttentionResult:
    """Score every attention not in `removed` on `tokens` ([samples, seq]); what `plan --iterative` reruns."""
    n = runner.num_layers
    candidates = [i for i in range(n) if i not in removed]
    device = runner.device
    kl_sums = torch.zeros(n, dtype=torch.float64, device=device)
    ce_sums = torch.zeros(n, dtype=torch.float64, device=device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # original ce, base ce, base kl
    for first in range(0, tokens.shape[0], batch_size):
        ids = tokens[first : first + batch_size].to(device)
        runner.part = "baseline"
        prefix = runner.prefix(ids, removed)
        teacher = teacher_for(runner, ids, prefix, removed)
        base_totals(runner, prefix.attn_in[-1], teacher, removed, totals)
        runner.part = "attention"
        attention_scores_batch(runner, prefix, removed, candidates, teacher, kl_sums, ce_sums)
    return finish_attention(tokens, candidates, kl_sums, ce_sums, totals)


def base_totals(
    runner: SubBlockRunner, base_out: torch.Tensor, teacher: Teacher, removed: set[int], totals: torch.Tensor
) -> None:
    """Accumulate [original ce, base ce, base kl] sums for one batch; base_out is the base model's last layer output."""
    totals[0] += teacher.ce_sum
    if removed:
        kl, ce = runner.compare_to_teacher(base_out, teacher)
        totals[1] += ce
        totals[2] += kl
    else:
        totals[1] += teacher.ce_sum


def finish_attention(
    tokens: torch.Tensor, candidates: list[int], kl_sums: torch.Tensor, ce_sums: torch.Tensor, totals: torch.Tensor
) -> AttentionResult:
    """Token means from the sums: KL over every position, cross-entropy over positions with a next token."""
    samples, seq = tokens.shape
    positions, predicted = samples * seq, samples * (seq - 1)
    kl, ce, t = (kl_sums / positions).tolist(), (ce_sums / predicted).tolist(), totals.tolist()
    return AttentionResult(
        scores={i: (max(kl[i], 0.0), ce[i]) for i in candidates},
        original_lm_loss=t[0] / predicted,
        base_lm_loss=t[1] / predicted,
        base_kl=max(t[2] / positions, 0.0),
    )
