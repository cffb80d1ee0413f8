"""A static-shape greedy decode engine for DeciLM models: static KV cache, prefill and decode steps as CUDA graphs.

transformers' eager `generate` spends most of a small model's step launching kernels from Python and checking
masks on the host, which hides exactly what FFN Fusion changes (fewer, wider sequential sub-blocks). This engine
runs the model's own weights through a fixed sequence of GEMMs and fused elementwise kernels, with every buffer
allocated up front, so a whole step replays as one CUDA graph. The original model runs in the same engine after
`fuse_model(model, Plan())`, so original and fused are timed on equal terms.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ffnfusion.engine.kernels import TorchOps, TritonOps, prefill_attention
from ffnfusion.modeling.modeling_decilm import DeciLMForCausalLM, rms_normalize


def _pack(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of Linears that read the same input into one GEMM operand.

    The modules' parameters are replaced by views into the packed tensor, so the model keeps working (eager
    `generate` included) and the packed copy costs no extra memory once the old storage is released.
    """
    if (packed := _already_packed([lin.weight for lin in linears])) is not None:
        biases = [lin.bias for lin in linears]
        bias = _already_packed(biases) if all(b is not None for b in biases) else None
        if bias is not None or all(b is None for b in biases):
            return packed, bias
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot pack projections where only some carry a bias")
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


def _already_packed(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor spanning `tensors` when they already lie back to back in one storage (an engine built before)."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    expected = first.data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage or t.data_ptr() != expected or not t.is_contiguous():
            return None
        expected += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return torch.as_strided(first.detach(), (rows, *first.shape[1:]), first.stride())


@dataclass
class _Attention:
    module: nn.Module
    norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool
    parallel: int
    k_cache: torch.Tensor | None = None
    v_cache: torch.Tensor | None = None


@dataclass
class _FFN:
    module: nn.Module
    norm: torch.Tensor
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    width: int


@dataclass
class _Block:
    attention: _Attention | None
    ffn: _FFN | None
    parallel: int

    @property
    def sequential_sub_blocks(self) -> int:
        if self.parallel > 1:
            return 2
        return int(self.attention is not None) + int(self.ffn is not None)


@dataclass
class Timing:
    """Device time of one generation: the prefill, and every decode step after it (milliseconds)."""

    prefill_ms: float
    step_ms: list[float] = field(default_factory=list)


@dataclass
class _Session:
    """Buffers (and captured graphs) for one (batch, prompt length) shape."""

    batch: int
    prompt_len: int
    prompt: torch.Tensor
    tokens: torch.Tensor
    out: torch.Tensor
    prefill_graph: torch.cuda.CUDAGraph | None = None
    decode_graph: torch.cuda.CUDAGraph | None = None


class DecodeEngine:
    """Greedy generation for one DeciLMForCausalLM with a static KV cache of `max_batch` x `max_len`.

    `kernels`: "triton" (fused kernels, CUDA), "torch" (plain torch ops, any device) or "auto".
    `use_graphs`: capture prefill and decode as CUDA graphs (default: on CUDA); off, the same code runs eagerly.
    Building the engine packs q/k/v and gate/up weights of `model` into single GEMM operands in place.
    """

    def __init__(
        self,
        model: DeciLMForCausalLM,
        max_batch: int,
        max_len: int,
        *,
        kernels: str = "auto",
        use_graphs: bool | None = None,
    ):
        if not isinstance(model, DeciLMForCausalLM):
            raise TypeError("DecodeEngine runs DeciLM models; convert others with fuse_model(model, Plan()) first")
        self.model = model.eval()
        config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.on_cuda = self.device.type == "cuda"
        self.use_graphs = self.on_cuda if use_graphs is None else use_graphs
        if self.use_graphs and not self.on_cuda:
            raise ValueError("CUDA graphs need a CUDA device; pass use_graphs=False")
        self.max_batch, self.max_len = max_batch, max_len
        self.eps = config.rms_norm_eps
        self.hidden = config.hidden_size
        if kernels == "auto":
            kernels = "triton" if self.on_cuda and TritonOps.supports(config.head_dim) else "torch"
        if kernels == "triton":
            if not self.on_cuda:
                raise ValueError("the Triton kernels run on CUDA only; use kernels='torch'")
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.ops: TorchOps | TritonOps = TritonOps(sms)
        elif kernels == "torch":
            self.ops = TorchOps(static=self.use_graphs)
        else:
            raise ValueError(f"unknown kernels {kernels!r}: use auto, triton or torch")

        inner = model.model
        with torch.no_grad():
            self.blocks = [self._block(layer) for layer in inner.layers]
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(torch.empty(0, device=self.device, dtype=self.dtype), positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.unit_norm = torch.ones(self.hidden, device=self.device, dtype=self.dtype)
        for block in self.blocks:
            if (attn := block.attention) is not None:
                shape = (max_batch, attn.kv_heads, max_len, attn.head_dim)
                # Zero-filled once: the masked torch path multiplies unread slots by a zero weight (never NaN).
                attn.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
                attn.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._origin = torch.zeros(1, dtype=torch.long, device=self.device)
        self._sessions: dict[tuple[int, int], _Session] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # ----------------------------------------------------------------------------------------------- build
    def _block(self, layer: nn.Module) -> _Block:
        attention = ffn = None
        if layer.has_attention:
            mod = layer.self_attn
            qkv_w, qkv_b = _pack([mod.q_proj, mod.k_proj, mod.v_proj])
            attention = _Attention(
                module=mod,
                norm=layer.input_layernorm.weight,
                qkv_weight=qkv_w,
                qkv_bias=qkv_b,
                o_weight=mod.o_proj.weight,
                o_bias=mod.o_proj.bias,
                heads=mod.n_heads,
                kv_heads=mod.n_kv_heads,
                head_dim=mod.head_dim,
                qk_norm=bool(mod.config.qk_norm),
                parallel=mod.parallel,
            )
        if layer.has_ffn:
            mlp = layer.mlp
            gu_w, gu_b = _pack([mlp.gate_proj, mlp.up_proj])
            ffn = _FFN(
                module=mlp,
                norm=layer.post_attention_layernorm.weight,
                gate_up_weight=gu_w,
                gate_up_bias=gu_b,
                down_weight=mlp.down_proj.weight,
                down_bias=mlp.down_proj.bias,
                width=mlp.intermediate_size,
            )
        return _Block(attention, ffn, layer.parallel)

    @property
    def sequential_sub_blocks(self) -> int:
        return sum(b.sequential_sub_blocks for b in self.blocks)

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads: every parameter but the embedding table, plus the LM head."""
        seen: set[int] = set()
        total = 0
        for name, p in self.model.named_parameters():
            if name.endswith("embed_tokens.weight") or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
        if self.lm_head is self.embed:
            total += self.lm_head.numel() * self.lm_head.element_size()
        return total

    def kv_bytes_per_step(self, batch: int, context: int) -> int:
        """Bytes of K and V one decode step reads at `context` cached positions."""
        per_pos = sum(2 * b.attention.kv_heads * b.attention.head_dim for b in self.blocks if b.attention)
        return per_pos * context * batch * self.dtype.itemsize

    # ---------------------------------------------------------------------------------------------- forward
    def _attention(
        self, attn: _Attention, h: torch.Tensor, batch: int, seq: int, pos: torch.Tensor, prefill: bool
    ) -> torch.Tensor:
        """Attention output before o_proj, [rows, heads*head_dim]; writes this step's K/V into the cache."""
        heads, kv_heads, d = attn.heads, attn.kv_heads, attn.head_dim
        qkv = F.linear(h, attn.qkv_weight, attn.qkv_bias)
        if attn.qk_norm:
            q = attn.module.q_norm(qkv[:, : heads * d].view(batch, seq, heads, d), attn.parallel)
            k = attn.module.k_norm(
                qkv[:, heads * d : (heads + kv_heads) * d].view(batch, seq, kv_heads, d), attn.parallel
            )
            qkv = torch.cat([q.flatten(2), k.flatten(2), qkv[:, (heads + kv_heads) * d :].view(batch, seq, -1)], -1)
            qkv = qkv.view(batch * seq, -1)
        q = torch.empty((batch * seq, heads, d), device=h.device, dtype=h.dtype)
        self.ops.rope_store(qkv, self.cos, self.sin, pos, q, attn.k_cache, attn.v_cache, batch, seq)
        if prefill:
            k = attn.k_cache[:batch, :, :seq]
            v = attn.v_cache[:batch, :, :seq]
            return prefill_attention(q.view(batch, seq, heads, d), k, v)
        return self.ops.decode_attention(q.view(batch, heads, d), attn.k_cache, attn.v_cache, pos)

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor, prefill: bool) -> torch.Tensor:
        """Next greedy token of every sequence, [batch]. Prefill starts at position 0; decode reads `pos`."""
        return self._logits(tokens, pos, prefill).argmax(-1)

    def _logits(self, tokens: torch.Tensor, pos: torch.Tensor, prefill: bool) -> torch.Tensor:
        """Next-token logits of every sequence's last position, [batch, vocab] (in the model dtype)."""
        ops, eps = self.ops, self.eps
        batch, seq = tokens.shape
        x = F.embedding(tokens, self.embed).view(batch * seq, self.hidden)
        delta: torch.Tensor | None = None
        for block in self.blocks:
            attn, ffn = block.attention, block.ffn
            if block.parallel > 1:
                delta = self._parallel_block(block, x, delta, batch, seq, pos, prefill)
                continue
            if attn is not None:
                h = ops.add_rmsnorm(x, delta, attn.norm, eps)
                delta = F.linear(self._attention(attn, h, batch, seq, pos, prefill), attn.o_weight, attn.o_bias)
            if ffn is not None:
                h = ops.add_rmsnorm(x, delta, ffn.norm, eps)
                act = ops.silu_mul(F.linear(h, ffn.gate_up_weight, ffn.gate_up_bias))
                delta = F.linear(act, ffn.down_weight, ffn.down_bias)
        # Only the last position's logits are needed: the next token.
        last = x.view(batch, seq, self.hidden)[:, -1]
        last_delta = delta.view(batch, seq, self.hidden)[:, -1] if delta is not None else None
        h = ops.add_rmsnorm(last, last_delta, self.final_norm, eps)
        return F.linear(h, self.lm_head)

    def _parallel_block(self, block, x, delta, batch, seq, pos, prefill) -> torch.Tensor:
        # Same arithmetic, in the same order, as DeciLMDecoderLayer._forward_parallel; returns the FFN part of the
        # residual update and adds the attention part to x here (eager adds them one after the other).
        attn, p = block.attention, block.parallel
        rows = batch * seq
        h = self.ops.add_rmsnorm(x, delta, self.unit_norm, self.eps)
        out = self._attention(attn, h, batch, seq, pos, prefill)
        o_weight = attn.o_weight.view(self.hidden, p, -1)
        members = torch.einsum("tpd,hpd->tph", out.view(rows, p, -1), o_weight)
        ffn_in = rms_normalize(x.unsqueeze(1) + members, self.eps)
        x.add_(members.sum(1))
        return block.ffn.module.forward_members(ffn_in.view(batch, seq, p, self.hidden)).view(rows, self.hidden)

    # --------------------------------------------------------------------------------------------- sessions
    def _prefill(self, s: _Session) -> None:
        nxt = self._forward(s.prompt, self._origin, prefill=True)
        s.tokens.copy_(nxt.view(-1, 1))
        s.out[:, :1].copy_(nxt.view(-1, 1))
        self.pos.fill_(s.prompt_len)

    def _decode(self, s: _Session) -> None:
        nxt = self._forward(s.tokens, self.pos, prefill=False)
        s.tokens.copy_(nxt.view(-1, 1))
        s.out.index_copy_(1, self.pos - (s.prompt_len - 1), nxt.view(-1, 1))
        self.pos.add_(1)

    def _session(self, batch: int, prompt_len: int) -> _Session:
        key = (batch, prompt_len)
        if key in self._sessions:
            return self._sessions[key]
        if batch > self.max_batch or prompt_len + 2 > self.max_len:
            raise ValueError(
                f"batch {batch} x prompt {prompt_len} does not fit the engine ({self.max_batch} x {self.max_len})"
            )
        long = dict(dtype=torch.long, device=self.device)
        s = _Session(
            batch=batch,
            prompt_len=prompt_len,
            prompt=torch.zeros((batch, prompt_len), **long),
            tokens=torch.zeros((batch, 1), **long),
            out=torch.zeros((batch, self.max_len - prompt_len), **long),
        )
        if self.use_graphs:
            # Warm up off the capture stream: Triton compiles, cuBLAS picks its kernels and workspaces.
            # (The prompt buffer is all zeros here; the warm-up output is discarded and never timed.)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    self._prefill(s)
                    self._decode(s)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            with torch.no_grad():
                s.prefill_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(s.prefill_graph, pool=self._pool):
                    self._prefill(s)
                s.decode_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(s.decode_graph, pool=self._pool):
                    self._decode(s)
        self._sessions[key] = s
        return s

    def release(self) -> None:
        """Drop the captured graphs and their buffers (the KV cache stays)."""
        self._sessions.clear()

    # ------------------------------------------------------------------------------------------------- API
    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, new_tokens: int, timed: bool = False
    ) -> tuple[torch.Tensor, Timing | None]:
        """Greedy continuation of `input_ids` [batch, prompt_len]: (new token ids [batch, new_tokens], timing).

        No stopping at EOS: every sequence gets exactly `new_tokens` tokens, so steps are comparable. With
        `timed`, the prefill and each decode step are timed with CUDA events (host clock on CPU).
        """
        batch, prompt_len = input_ids.shape
        if new_tokens < 1 or prompt_len + new_tokens > self.max_len:
            raise ValueError(f"prompt {prompt_len} + {new_tokens} new tokens exceeds the cache length {self.max_len}")
        s = self._session(batch, prompt_len)
        s.prompt.copy_(input_ids)
        steps = [self._prefill_step] + [self._decode_step] * (new_tokens - 1)
        if timed and self.on_cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(new_tokens + 1)]
            marks[0].record()
            for step, mark in zip(steps, marks[1:]):
                step(s)
                mark.record()
            torch.cuda.synchronize(self.device)
            times = [a.elapsed_time(b) for a, b in itertools.pairwise(marks)]
        elif timed:
            times = []
            for step in steps:
                t0 = time.perf_counter()
                step(s)
                times.append((time.perf_counter() - t0) * 1e3)
        else:
            for step in steps:
                step(s)
        timing = Timing(times[0], times[1:]) if timed else None
        return s.out[:, :new_tokens].clone(), timing

    def _prefill_step(self, s: _Session) -> None:
        if s.prefill_graph is not None:
            s.prefill_graph.replay()
        else:
            self._prefill(s)

    def _decode_step(self, s: _Session) -> None:
        if s.decode_graph is not None:
            s.decode_graph.replay()
        else:
            self._decode(s)
