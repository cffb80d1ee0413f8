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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
