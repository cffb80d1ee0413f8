# Heterogeneous-layer causal LM in NVIDIA's DeciLM / nemotron-nas checkpoint format.
#
# This file is self-contained (torch + transformers only): `ffnfusion fuse` copies it into every checkpoint
# it writes and points `auto_map` at it, so `trust_remote_code=True` loads a fused model in a Python where
# ffnfusion is not installed.
#
# Every layer ("block") has its own entry in `config.block_configs`:
#   {"attention": {"no_op": bool, "n_heads_in_group": int | null, "replace_with_linear": false},
#    "ffn": {"no_op": bool, "ffn_mult": float | null, "intermediate_size": int | null, "replace_with_linear": false},
#    "parallel_blocks": int}   # ffnfusion extension, 1 when absent
# A block with `parallel_blocks == P > 1` holds P whole decoder layers that all read the block's input; their
# q/k/v projections are stored concatenated (one wide GEMM each), their FFNs as one wide FFN whose gate/up halves
# read each member's own post-attention stream. RMSNorm weights of such blocks and of fused FFNs are folded into
# the projections, so their norms have unit weight.
from __future__ import annotations

import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# transformers renamed `past_key_values` to `cache` (5.2x); speak whichever this version's outputs use.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width vLLM, TensorRT-LLM and llama.cpp derive from `ffn_mult`: 2/3 * mult * hidden, rounded up to 256."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return width + (-width % 256)


def block_ffn_width(block: dict, hidden_size: int) -> int:
    ffn = block["ffn"]
    if ffn.get("intermediate_size"):
        return int(ffn["intermediate_size"])
    return ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden_size)


class BlockConfig(dict):
    """One `block_configs` entry: a plain dict (as config.json stores it) whose keys also read as attributes.

    vLLM, SGLang and TensorRT-LLM take the config object from this file (trust_remote_code) and read
    `block.attention.no_op`, `block.ffn.ffn_mult`, ... as attributes; a missing key is an AttributeError there,
    so `hasattr(block.ffn, "hidden_act")` is False as they expect.
    """

    def __init__(self, data: dict):
        super().__init__({k: BlockConfig(v) if isinstance(v, dict) else v for k, v in dict(data).items()})

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        block_configs: list[dict] | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        qkv_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        source_model_type: str | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.block_configs = [BlockConfig(b) for b in (block_configs or [])]
        self.num_hidden_layers = len(self.block_configs)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # transformers 5 keeps RoPE settings in `rope_parameters` (and aliases `rope_scaling` to it, with a
        # warning); engines read the legacy `rope_theta`/`rope_scaling` keys, which config.json also carries.
        rope = kwargs.pop("rope_parameters", None) or {"rope_type": "default", **(rope_scaling or {})}
        self.rope_parameters = {**rope, "rope_theta": rope_theta}
        self.attention_bias = attention_bias  # bias on q/k/v/o (Llama's meaning)
        # Bias on q/k/v (Qwen2; implied by attention_bias): vLLM and SGLang take their q/k/v bias from this key when
        # present, so it is written true whenever q/k/v carry a bias.
        self.qkv_bias = bool(qkv_bias or attention_bias)
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.source_model_type = source_model_type
        kwargs.pop("num_hidden_layers", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self) -> dict:
        data = super().to_dict()
        # Keys that vLLM / TensorRT-LLM / llama.cpp converters read, whatever transformers version writes the file:
        # legacy top-level RoPE keys (older converters ignore rope_parameters and fall back to theta 10000),
        # num_hidden_layers == len(block_configs), and auto_map so trust_remote_code finds this file.
        rope = dict(self.rope_parameters or {})
        data["rope_theta"] = float(rope.pop("rope_theta", self.rope_theta))
        data["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
        data["num_hidden_layers"] = len(self.block_configs)
        data["architectures"] = ["DeciLMForCausalLM"]
        data["auto_map"] = {
            "AutoConfig": "modeling_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        }
        return data

    def attention_heads(self, block: dict) -> tuple[int, int] | None:
        """(query heads, KV heads) of one member layer of a block, or None for a no-op attention."""
        attn = block["attention"]
        if attn.get("no_op"):
            return None
        group = attn.get("n_heads_in_group") or self.num_attention_heads // self.num_key_value_heads
        return self.num_attention_heads, self.num_attention_heads // group


class DeciLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unit-weight RMSNorm over the last dimension, computed in fp32 like DeciLMRMSNorm."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class DeciLMRotaryEmbedding(nn.Module):
    def __init__(self, config: DeciLMConfig):
        super().__init__()
        scaling = dict(config.rope_parameters or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            dim = config.head_dim
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_scaling = 1.0
        else:
            # Reuse transformers' implementations of scaled RoPE (llama3, yarn, linear, ...), which read a Llama config.
            params = {**scaling, "rope_type": rope_type, "rope_theta": config.rope_theta}
            proxy = LlamaConfig(
                hidden_size=config.hidden_size,
                num_attention_heads=config.num_attention_heads,
                head_dim=config.head_dim,
                max_position_embeddings=config.max_position_embeddings,
                rope_parameters=params,
            )
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](proxy, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        # Under autocast the embeddings stay fp32 while q and k come out of their projections in half precision:
        # tables in x's dtype would promote q and k back to fp32 and keep attention off the flash kernels.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, head_dim] -> [batch, kv_heads * n_rep, seq, head_dim], each KV head n_rep times."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (as in modeling_llama); a missing mask means causal, as in SDPA's fast path."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    elif query.shape[2] > 1:
        q_len, k_len = query.shape[2], key.shape[2]
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
        attn_weights = attn_weights.masked_fill(future, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DeciLMAttention(nn.Module):
    """Grouped-query attention of `parallel` member layers at once (parallel=1 is a plain Llama attention).

    Member p owns query heads [p*H, (p+1)*H) and KV heads [p*K, (p+1)*K); since every member has the same
    query/KV ratio, the usual GQA head mapping over the concatenated heads pairs each query head with its own
    member's KV head, so all members run as one wide q/k/v projection and one attention call.

    The attention itself is transformers' (`config._attn_implementation`: sdpa, eager, flash-attention, ...), so
    masks, KV caches and compilation follow transformers' rules. `cache_index` is this layer's entry in the KV
    cache: attention layers are numbered consecutively, skipping blocks whose attention is a no-op.
    """

    def __init__(self, config: DeciLMConfig, n_heads: int, n_kv_heads: int, parallel: int, cache_index: int):
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.head_dim = config.head_dim
        self.n_heads = n_heads * parallel
        self.n_kv_heads = n_kv_heads * parallel
        self.cache_index = cache_index
        self.layer_idx = cache_index  # the name transformers' attention functions read
        self.num_key_value_groups = n_heads // n_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hidden, hd = config.hidden_size, config.head_dim
        bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
        # o_proj bias is refused for parallel groups at surgery time, so a plain Linear fits both cases.
        self.o_proj = nn.Linear(self.n_heads * hd, hidden, bias=config.attention_bias and parallel == 1)
        if config.qk_norm:
            # One norm weight per member (shape [P, head_dim], flattened for parallel=1 compatibility).
            shape = (hd,) if parallel == 1 else (parallel, hd)
            self.q_norm = DeciLMQKNorm(shape, config.rms_norm_eps)
            self.k_norm = DeciLMQKNorm(shape, config.rms_norm_eps)

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        **kwargs,
    ) -> torch.Tensor:
        """Attention output before o_proj: [batch, seq, n_heads * head_dim]. A None mask means causal."""
        bsz, seq, _ = hidden_states.shape
        hd = self.head_dim
        # Head counts are read off the projections' outputs, not self.n_heads: under tensor parallelism q/k/v are
        # column-sharded and this rank holds only its share of the heads.
        q = self.q_proj(hidden_states).view(bsz, seq, -1, hd)
        k = self.k_proj(hidden_states).view(bsz, seq, -1, hd)
        v = self.v_proj(hidden_states).view(bsz, seq, -1, hd)
        if self.config.qk_norm:
            q = self.q_norm(q, self.parallel)
            k = self.k_norm(k, self.parallel)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.cache_index)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return out.reshape(bsz, seq, -1)


class DeciLMQKNorm(nn.Module):
    """Per-head RMSNorm of queries or keys (Qwen3); a parallel block keeps one weight per member."""

    def __init__(self, shape: tuple[int, ...], eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, parallel: int) -> torch.Tensor:
        _bsz, _seq, heads, hd = x.shape
        normed = rms_normalize(x, self.variance_epsilon)
        weight = self.weight.view(parallel, 1, hd).expand(parallel, heads // parallel, hd).reshape(heads, hd)
        return weight * normed


class DeciLMMLP(nn.Module):
    def __init__(self, config: DeciLMConfig, intermediate_size: int, parallel: int):
        super().__init__()
        hidden, bias = config.hidden_size, config.mlp_bias
        self.parallel = parallel
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, P, hidden], member p's normalised input in x[:, :, p]. Returns the SUM of member outputs.

        gate/up are batched matmuls (each member reads its own input); down is one GEMM over the concatenated
        width, which sums the members' outputs for free.
        """
        p, hidden = self.parallel, x.shape[-1]
        width = self.intermediate_size // p
        gate = torch.einsum("btph,pfh->btpf", x, self.gate_proj.weight.view(p, width, hidden))
        up = torch.einsum("btph,pfh->btpf", x, self.up_proj.weight.view(p, width, hidden))
        if self.gate_proj.bias is not None:
            gate = gate + self.gate_proj.bias.view(p, width)
            up = up + self.up_proj.bias.view(p, width)
        act = (F.silu(gate) * up).flatten(2)
        return self.down_proj(act)


class DeciLMDecoderLayer(nn.Module):
    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_index: int):
        super().__init__()
        block = config.block_configs[layer_idx]
        self.parallel = int(block.get("parallel_blocks", 1) or 1)
        heads = config.attention_heads(block)
        self.has_attention = heads is not None
        self.has_ffn = not block["ffn"].get("no_op")
        eps = config.rms_norm_eps
        self.eps = eps
        if self.has_attention:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, eps)
            self.self_attn = DeciLMAttention(config, heads[0], heads[1], self.parallel, cache_index)
        if self.has_ffn:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps)
            self.mlp = DeciLMMLP(config, block_ffn_width(block, config.hidden_size), self.parallel)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.parallel > 1:
            return self._forward_parallel(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        if self.has_attention:
            attn = self.self_attn.attend(
                self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values, **kwargs
            )
            hidden_states = hidden_states + self.self_attn.o_proj(attn)
        if self.has_ffn:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states

    def _forward_parallel(self, x, position_embeddings, attention_mask, past_key_values, **kwargs) -> torch.Tensor:
        # Every member reads x; member p's attention output a_p feeds its own FFN (y_p = x + a_p), and the block
        # adds the sum of all members' residual contributions. Norm weights are folded, so the norms are unit.
        bsz, seq, hidden = x.shape
        p = self.parallel
        attn = self.self_attn.attend(
            rms_normalize(x, self.eps), position_embeddings, attention_mask, past_key_values, **kwargs
        )
        o_weight = self.self_attn.o_proj.weight.view(hidden, p, -1)
        members = torch.einsum("btpd,hpd->btph", attn.view(bsz, seq, p, -1), o_weight)
        ffn_in = rms_normalize(x.unsqueeze(2) + members, self.eps)
        return x + members.sum(2) + self.mlp.forward_members(ffn_in)


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    config: DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (DeciLMRMSNorm, DeciLMQKNorm)):
            nn.init.ones_(module.weight)
        elif isinstance(module, DeciLMRotaryEmbedding):
            fresh = DeciLMRotaryEmbedding(self.config)
            module.inv_freq.copy_(fresh.inv_freq.to(module.inv_freq.device))

    def _get_static_cache_init_shape(self):
        # generate() may pre-allocate a static cache with the config's one KV-head count for every layer; here blocks
        # differ (per-block n_heads_in_group, parallel groups), so let each cache layer take its shape from its first
        # update instead (transformers' lazy initialisation).
        return None


# KV cache layout. transformers builds a cache with one entry per hidden layer (`num_hidden_layers`, here one per
# block), also for the static cache that generate(cache_implementation="static") pre-sizes. Attention layers use
# entries 0, 1, 2, ... in order, skipping blocks with no attention, so entry 0 (which generate and the mask
# functions read the sequence length from) always belongs to an attention layer, and the unused tail entries stay
# empty: static layers allocate on their first update, so they cost no memory.


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        layers, cache_index = [], 0
        for i, block in enumerate(config.block_configs):
            layers.append(DeciLMDecoderLayer(config, i, cache_index))
            cache_index += config.attention_heads(block) is not None
        self.layers = nn.ModuleList(layers)
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            # As in transformers' Llama: generate() passes padding-aware positions; a plain forward counts from 0.
            past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_len
            position_ids = position_ids.unsqueeze(0)
        # transformers' own mask for the configured attention implementation and cache (None where the kernel's
        # causal mode suffices); the cache and the 2D padding mask give its size. Arguments are positional: the
        # cache argument's name differs between transformers versions.
        if past_key_values is None or isinstance(past_key_values, Cache):
            mask = create_causal_mask(self.config, inputs_embeds, attention_mask, past_key_values, position_ids)
        elif attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"padding masks need a transformers Cache, not a {type(past_key_values).__name__}")
        else:
            mask = None  # a duck-typed cache (update/get_seq_length) without padding: the kernels' causal mode
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        # Only what the attention functions may read (e.g. flash-attention's packed-sequence lengths) goes down.
        kwargs.pop("output_attentions", None)
        kwargs.pop("cache_position", None)

        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, position_embeddings, mask, None
                )
            else:
                hidden_states = layer(
                    hidden_states, position_embeddings, attention_mask=mask, past_key_values=past_key_values, **kwargs
                )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{_CACHE_FIELD: past_key_values if use_cache else None},
        )
        return output if return_dict is not False else output.to_tuple()


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        # The checkpoint carries this file so `trust_remote_code=True` loads it where ffnfusion is not installed.
        target = os.path.join(save_directory, "modeling_decilm.py")
        if kwargs.get("is_main_process", True) and os.path.abspath(__file__) != os.path.abspath(target):
            shutil.copyfile(__file__, target)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        past_key_values = cache if cache is not None else past_key_values
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # As in transformers' Llama: an int keeps the last N positions (0 = all), a tensor lists the positions to keep.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            # transformers' causal-LM loss (shifted labels, -100 ignored, num_items_in_batch honoured).
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()
