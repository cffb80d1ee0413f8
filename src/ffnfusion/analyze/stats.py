"""Token-wise comparisons of residual-stream vectors, summed over tokens on the device (no host sync per call)."""

from __future__ import annotations

import torch


def cos_distance_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of 1 - cos(a_t, b_t), in float64, as a 0-d tensor on a's device.

    Two zero vectors count as identical (distance 0) and one zero vector against a non-zero one as orthogonal
    (distance 1): an FFN that writes nothing, measured before and after an unrelated change, has not changed.
    """
    a = a.reshape(-1, a.shape[-1]).float()
    b = b.reshape(-1, b.shape[-1]).float()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    denom = na * nb
    cos = (a * b).sum(-1) / denom.clamp_min(torch.finfo(torch.float32).tiny)
    both_zero = (na == 0) & (nb == 0)
    cos = torch.where(denom > 0, cos.clamp(-1.0, 1.0), both_zero.float())
    return (1.0 - cos).double().sum()


def rel_norm_sum(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of |h_t| / |x_t| in float64 (a zero input token contributes 0)."""
    h = h.reshape(-1, h.shape[-1]).float()
    x = x.reshape(-1, x.shape[-1]).float()
    nx = x.norm(dim=-1)
    ratio = h.norm(dim=-1) / nx.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(nx > 0, ratio, torch.zeros_like(ratio)).double().sum()


def sub_block_stats_sums(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[rel_norm_sum, cos_distance_sum] of a sub-block with input x and residual contribution h."""
    return torch.stack([rel_norm_sum(h, x), cos_distance_sum(x.float() + h.float(), x)])
