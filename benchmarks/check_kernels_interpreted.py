"""The decode engine's Triton kernels checked on a CPU, in Triton's interpreter, against eager torch.

    pip install triton            # the interpreter needs the package, not a GPU
    TRITON_INTERPRET=1 python benchmarks/check_kernels_interpreted.py

Covers the RoPE + KV-cache write kernel for both position modes (the batch's start position, and one position per
row as the sampler uses it; fp32 and fp16 must equal eager's `x * cos + rotate_half(x) * sin` exactly) and the
split-K decode attention for one length per batch (against SDPA). Not covered: the per-row attention variant (its
loop bound is a tensor, which the interpreter cannot iterate) and the CUDA compiler itself: run
`tests/test_bench.py` and `benchmarks/check_engine.py` on a GPU for those.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from ffnfusion.engine.kernels import TritonOps, rotate_half
from ffnfusion.engine.sampling import RowPositionOps
from ffnfusion.engine.top_p_kernel import top_p_sample

SHAPES = ((3, 4, 4, 2, 16), (2, 1, 6, 2, 32), (1, 5, 3, 3, 16))  # batch, seq, heads, kv heads, head dim


def rope_errors(dtype: torch.dtype, batch: int, seq: int, heads: int, kv: int, d: int) -> tuple[float, float]:
    """Max |kernel - eager| of the rotated q, lockstep and per-row."""
    g = torch.Generator().manual_seed(batch * 100 + seq * 10 + d)
    max_len, rows = 24, batch * seq
    qkv = torch.randn(rows, (heads + 2 * kv) * d, generator=g).to(dtype)
    angles = torch.rand(max_len, d, generator=g) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q = qkv[:, : heads * d].view(rows, heads, d)
    ops = TritonOps(num_sms=4)

    q_out, caches = torch.empty(rows, heads, d, dtype=dtype), torch.zeros(2, batch, kv, max_len, d, dtype=dtype)
    ops.rope_store(qkv, cos, sin, torch.tensor([7], dtype=torch.int32), q_out, caches[0], caches[1], batch, seq)
    p = 7 + torch.arange(rows) % seq
    lockstep = (q * cos[p][:, None] + rotate_half(q) * sin[p][:, None] - q_out).abs().max().item()

    pos = torch.randint(0, max_len, (rows,), generator=g, dtype=torch.int32)
    q_row, row_caches = torch.empty(rows, heads, d, dtype=dtype), torch.zeros(2, rows, kv, max_len, d, dtype=dtype)
    RowPositionOps(ops).rope_store(qkv, cos, sin, pos, q_row, row_caches[0], row_caches[1], rows, 1)
    c, s = cos[pos.long()][:, None], sin[pos.long()][:, None]
    per_row = (q * c + rotate_half(q) * s - q_row).abs().max().item()
    return lockstep, per_row


def attention_error(dtype: torch.dtype, batch: int, heads: int, kv: int, d: int, max_len: int) -> float:
    g = torch.Generator().manual_seed(batch * 1000 + heads * 10 + d)
    q = torch.randn(batch, heads, d, generator=g).to(dtype)
    k_cache = torch.randn(batch, kv, max_len, d, generator=g).to(dtype)
    v_cache = torch.randn(batch, kv, max_len, d, generator=g).to(dtype)
    n = max_len // 2 + 3
    got = TritonOps(num_sms=4).decode_attention(q, k_cache, v_cache, torch.tensor([n - 1], dtype=torch.int32))
    k = k_cache[:, :, :n].float().repeat_interleave(heads // kv, 1)
    v = v_cache[:, :, :n].float().repeat_interleave(heads // kv, 1)
    want = F.scaled_dot_product_attention(q.float()[:, :, None], k, v)[:, :, 0].reshape(batch, -1)
    return (want - got.float()).abs().max().item()


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The nucleus distribution: tokens whose strictly more probable tokens hold less than top_p, renormalised."""
    p = (logits.float() / temperature).softmax(-1)
    above = torch.stack([p[p > x].sum() for x in p])
    q = torch.where(above < top_p, p, 0.0)
    return q / q.sum()


def top_p_check(vocab: int, block: int, temperature: float, top_p: float, dtype: torch.dtype, n: int) -> tuple:
    """(chi-square statistic, its 0.1% critical value, nucleus size, tokens outside the nucleus, reproducible) of n
    kernel draws from one row of logits repeated n times."""
    from scipy.stats import chi2

    g = torch.Generator().manual_seed(vocab * 7 + block)
    logits = torch.randn(vocab, generator=g).to(dtype)
    rows = logits.expand(n, vocab).contiguous()
    rng = torch.tensor([1234, 5], dtype=torch.long)
    draws = top_p_sample(rows, temperature, top_p, rng, block=block)
    # The same (seed, step, batch) draws the same tokens; the next step others.
    few = top_p_sample(rows[:16], temperature, top_p, rng, block=block)
    reproducible = torch.equal(top_p_sample(rows[:16], temperature, top_p, rng, block=block), few)
    rng[1] += 1
    moved = not torch.equal(top_p_sample(rows[:16], temperature, top_p, rng, block=block), few)
    q = nucleus(logits, temperature, top_p)
    outside = int((q[draws] == 0).sum())
    support = q > 0
    counts = torch.bincount(draws, minlength=vocab).float()[support]
    expected = q[support] * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    size = int(support.sum())
    return stat, float(chi2.ppf(0.999, size - 1)), size, outside, reproducible and moved


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (this check runs the kernels in Triton's interpreter, on the CPU)")
        return 2
    failed = 0
    for dtype in (torch.float32, torch.float16):
        for batch, seq, heads, kv, d in SHAPES:
            lockstep, per_row = rope_errors(dtype, batch, seq, heads, kv, d)
            attn = attention_error(dtype, batch, heads, kv, d, max_len=150)
            ok = lockstep == per_row == 0 and attn < (1e-5 if dtype == torch.float32 else 2e-3)
            failed += not ok
            print(f"{dtype!s:14} b{batch} s{seq} h{heads}/{kv} d{d}: rope {lockstep:.1e} / {per_row:.1e} "
                  f"(lockstep / per-row), attention {attn:.1e}  {'ok' if ok else 'FAILED'}")  # fmt: skip
    # The fused top-p sampler: only nucleus tokens, in the nucleus' proportions (chi-square at 0.1%), one draw per
    # (seed, step, row): vocabularies that are and are not a multiple of the block, temperature != 1, bf16 logits.
    cases = ((40, 16, 1.0, 0.8, torch.float32), (64, 64, 0.7, 0.9, torch.bfloat16))
    for vocab, block, temperature, top_p, dtype in cases:
        stat, critical, size, outside, reproducible = top_p_check(vocab, block, temperature, top_p, dtype, n=1500)
        ok = stat < critical and outside == 0 and reproducible and size > 4
        failed += not ok
        print(f"top-p vocab {vocab} block {block} T {temperature} p {top_p} {dtype!s}: chi-square {stat:.1f} "
              f"(< {critical:.1f}) over a nucleus of {size}, {outside} outside it, seeded per step {reproducible}  "
              f"{'ok' if ok else 'FAILED'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
