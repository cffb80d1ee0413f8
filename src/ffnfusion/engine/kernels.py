"""The elementwise steps of the decode engine: Triton kernels on CUDA and plain-torch equivalents.

Between the GEMMs of a decoder layer sit a handful of elementwise steps (residual add + RMSNorm, RoPE + KV-cache
write, SiLU * up, attention over the cache). As separate torch ops they are ~40 launches per layer, which at batch 1
is most of the decode step even inside a CUDA graph; each Triton kernel here is one launch for one of those chains.

Both implementations round at the same points as the eager DeciLM modules (fp32 statistics, results rounded to the
model dtype where eager rounds), so the engine follows eager greedy decoding token for token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch ops below are used
    triton = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of a prompt over itself. q: [b, s, H, d]; k, v: [b, K, s, d]. Returns [b*s, H*d].

    Written exactly as the eager DeciLM attention (repeat_interleave for GQA, SDPA's causal path), so prefill
    logits match eager ones to the last bit where the backend is deterministic.
    """
    b, s, heads, d = q.shape
    groups = heads // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2).contiguous(), k, v, is_causal=s > 1)
    return out.transpose(1, 2).reshape(b * s, heads * d)


class TorchOps:
    """Reference implementation (CPU, or CUDA without Triton).

    `static=True` keeps every shape fixed for CUDA-graph capture: decode attention then reads the whole cache
    under a mask built from the position tensor, instead of slicing the cache to the current length.
    """

    name = "torch"

    def __init__(self, static: bool = False):
        self.static = static

    def add_rmsnorm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """x += delta (in place: x is the residual stream), then weight * RMSNorm(x). x: [rows, hidden]."""
        if delta is not None:
            x.add_(delta)
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return weight * normed

    def rope_store(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pos: torch.Tensor,
        q_out: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: int,
        seq: int,
    ) -> None:
        """Rotate q and k of tokens at positions pos..pos+seq-1; q -> q_out [b*s, H, d], k/v -> cache[:b, :, pos+t]."""
        heads, kv_heads, d = q_out.shape[1], k_cache.shape[1], q_out.shape[2]
        positions = pos + torch.arange(seq, device=pos.device)
        c = cos.index_select(0, positions)[None, :, None, :]
        s = sin.index_select(0, positions)[None, :, None, :]
        q = qkv[:, : heads * d].view(batch, seq, heads, d)
        k = qkv[:, heads * d : (heads + kv_heads) * d].view(batch, seq, kv_heads, d)
        v = qkv[:, (heads + kv_heads) * d :].view(batch, seq, kv_heads, d)
        q_out.view(batch, seq, heads, d).copy_(q * c + rotate_half(q) * s)
        k_cache[:batch].index_copy_(2, positions, (k * c + rotate_half(k) * s).transpose(1, 2))
        v_cache[:batch].index_copy_(2, positions, v.transpose(1, 2))

    def decode_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """One query per sequence at position pos over keys 0..pos. q: [b, H, d] -> [b, H*d]."""
        b, heads, d = q.shape
        kv_heads = k_cache.shape[1]
        if self.static:
            # GQA without copies: a KV head's query heads become the rows of one query block.
            keep = (torch.arange(k_cache.shape[2], device=q.device) <= pos).view(1, 1, 1, -1)
            out = F.scaled_dot_product_attention(
                q.view(b, kv_heads, heads // kv_heads, d), k_cache[:b], v_cache[:b], attn_mask=keep
            )
            return out.reshape(b, heads * d)
        n = int(pos.item()) + 1
        k, v = k_cache[:b, :, :n], v_cache[:b, :, :n]
        groups = heads // kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v)
        return out.reshape(b, heads * d)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[rows, 2W] (gate | up) -> silu(gate) * up, [rows, W]."""
        width = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :width]) * gate_up[:, width:]


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(
        x_ptr, d_ptr, w_ptr, out_ptr, stride_x, stride_d, stride_o, n_cols, eps,
        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(dtype)
            tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        normed = (xf * rstd).to(dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_o + cols, y, mask=mask)

    @triton.jit
    def _rope_store_kernel(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
        stride_qkv, stride_cb, stride_ch, stride_cl, seq, n_heads, n_kv,
        HALF: tl.constexpr, PER_ROW: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        head = tl.program_id(1)
        if PER_ROW:  # one token per row, each at its own position (the sampler's continuous batching)
            b = row
            p = tl.load(pos_ptr + row)
        else:  # rows of `seq` tokens from one start position shared by the batch
            b = row // seq
            p = tl.load(pos_ptr) + row % seq
        offs = tl.arange(0, HALF)
        dim = 2 * HALF
        dtype = q_ptr.dtype.element_ty
        c1 = tl.load(cos_ptr + p * dim + offs).to(tl.float32)
        c2 = tl.load(cos_ptr + p * dim + HALF + offs).to(tl.float32)
        s1 = tl.load(sin_ptr + p * dim + offs).to(tl.float32)
        s2 = tl.load(sin_ptr + p * dim + HALF + offs).to(tl.float32)
        src = qkv_ptr + row * stride_qkv + head * dim
        x1 = tl.load(src + offs).to(tl.float32)
        x2 = tl.load(src + HALF + offs).to(tl.float32)
        # x * cos + rotate_half(x) * sin with eager's roundings: each product, then the sum.
        o1 = ((x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)).to(dtype)
        o2 = ((x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)).to(dtype)
        if head < n_heads:
            dst = q_ptr + (row * n_heads + head) * dim
            tl.store(dst + offs, o1)
            tl.store(dst + HALF + offs, o2)
        else:
            kv = head - n_heads
            slot = b * stride_cb + kv * stride_ch + p * stride_cl
            tl.store(k_ptr + slot + offs, o1)
            tl.store(k_ptr + slot + HALF + offs, o2)
            vsrc = qkv_ptr + row * stride_qkv + (n_heads + n_kv + kv) * dim
            tl.store(v_ptr + slot + offs, tl.load(vsrc + offs))
            tl.store(v_ptr + slot + HALF + offs, tl.load(vsrc + HALF + offs))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, width, stride_gu, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        dtype = out_ptr.dtype.element_ty
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + width + cols, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (act * u).to(dtype), mask=mask)

    @triton.jit
    def _decode_attn_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr,
        stride_cb, stride_ch, stride_cl, n_heads, n_kv, groups, n_splits, sm_scale,
        SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr, PER_ROW: tl.constexpr,
    ):  # fmt: skip
        # Split-K ("flash decoding"): program (b*kv_head, split) reads keys [split*SPLIT, (split+1)*SPLIT) once
        # for all query heads of its KV head, so a batch-1 step still spreads the cache over the SMs.
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // n_kv
        kv = bh % n_kv
        # PER_ROW: each row has its own cache length (the sampler), and splits past it skip their loads; otherwise
        # one length for the batch and a fixed trip count. Conditional expressions on a constexpr are resolved when
        # the kernel is compiled, so each variant is the plain kernel it stands for.
        n_keys = (tl.load(pos_ptr + b) if PER_ROW else tl.load(pos_ptr)) + 1
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_DIM)
        gmask = g < groups
        head = kv * groups + g
        q = tl.load(q_ptr + ((b * n_heads + head) * HEAD_DIM)[:, None] + d[None, :], mask=gmask[:, None], other=0.0)
        base = b * stride_cb + kv * stride_ch
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for start in range(0, tl.minimum(n_keys - split * SPLIT, SPLIT) if PER_ROW else SPLIT, BLOCK_N):
            n = split * SPLIT + start + tl.arange(0, BLOCK_N)
            nmask = n < n_keys
            offs = base + n[:, None] * stride_cl + d[None, :]
            k = tl.load(k_ptr + offs, mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + offs, mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        part = (b * n_heads + head) * n_splits + split
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        tl.store(m_ptr + part, m, mask=gmask)
        tl.store(l_ptr + part, l_sum, mask=gmask)

    @triton.jit
    def _decode_combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, n_splits, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
        row = tl.program_id(0)
        sp = tl.arange(0, BLOCK_S)
        smask = sp < n_splits
        m = tl.load(m_ptr + row * n_splits + sp, mask=smask, other=float("-inf"))
        l_sum = tl.load(l_ptr + row * n_splits + sp, mask=smask, other=0.0)
        top = tl.max(m, 0)  # finite: split 0 always holds key 0
        w = tl.where(smask, tl.exp(m - top), 0.0)
        d = tl.arange(0, HEAD_DIM)
        acc = tl.load(acc_ptr + (row * n_splits + sp)[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(w * l_sum, 0)
        tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonOps:
    """The same steps as TorchOps, one Triton launch each; shapes and buffers are graph-capture safe."""

    name = "triton"
    BLOCK_N = 64

    def __init__(self, num_sms: int | None = None):
        if triton is None:
            raise RuntimeError("Triton is not installed")
        self.num_sms = num_sms or 132

    @staticmethod
    def supports(head_dim: int) -> bool:
        return triton is not None and head_dim >= 16 and head_dim == _pow2(head_dim)

    def add_rmsnorm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        rows, cols = x.shape
        out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
        block = _pow2(cols)
        _add_rmsnorm_kernel[(rows,)](
            x, delta if delta is not None else x, weight, out,
            x.stride(0), delta.stride(0) if delta is not None else 0, out.stride(0), cols, eps,
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
        return out

    def rope_store(
        self, qkv, cos, sin, pos, q_out, k_cache, v_cache, batch: int, seq: int, per_row: bool = False
    ) -> None:
        """RoPE on q and k, k and v into the cache; `pos` is the batch's start position, or one per row (per_row)."""
        heads, d = q_out.shape[1], q_out.shape[2]
        kv_heads = k_cache.shape[1]
        _rope_store_kernel[(batch * seq, heads + kv_heads)](
            qkv, cos, sin, pos, q_out, k_cache, v_cache,
            qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), seq, heads, kv_heads,
            HALF=d // 2, PER_ROW=per_row, num_warps=1,
            enable_fp_fusion=False,  # an FMA would skip eager's rounding of x * cos before the add
        )  # fmt: skip

    def decode_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, per_row: bool = False
    ) -> torch.Tensor:
        """One query token per row over its cache; `pos` is one position for all rows, or one per row (per_row)."""
        b, heads, d = q.shape
        kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
        groups = heads // kv_heads
        blocks = triton.cdiv(max_len, self.BLOCK_N)
        # Enough splits to give every SM two programs, never more than there are key blocks.
        n_splits = max(1, min(blocks, triton.cdiv(2 * self.num_sms, b * kv_heads)))
        split = triton.cdiv(blocks, n_splits) * self.BLOCK_N
        n_splits = triton.cdiv(max_len, split)
        acc = torch.empty((b * heads * n_splits, d), dtype=torch.float32, device=q.device)
        m = torch.empty((b * heads * n_splits,), dtype=torch.float32, device=q.device)
        l_sum = torch.empty_like(m)
        out = torch.empty((b, heads * d), dtype=q.dtype, device=q.device)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        _decode_attn_kernel[(b * kv_heads, n_splits)](
            q, k_cache, v_cache, pos, acc, m, l_sum,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), heads, kv_heads, groups, n_splits,
            1.0 / math.sqrt(d),
            SPLIT=split, BLOCK_N=self.BLOCK_N, BLOCK_G=max(16, _pow2(groups)), HEAD_DIM=d, PRECISION=precision,
            PER_ROW=per_row, num_warps=4,
        )  # fmt: skip
        _decode_combine_kernel[(b * heads,)](
            acc, m, l_sum, out, n_splits, BLOCK_S=max(2, _pow2(n_splits)), HEAD_DIM=d, num_warps=1
        )
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty((rows, width), dtype=gate_up.dtype, device=gate_up.device)
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(width, block))](
            gate_up, out, width, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
        )
        return out
