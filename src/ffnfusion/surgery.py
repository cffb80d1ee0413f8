"""Model surgery, shared by every stage: (unmodified DeciLM config, original tensors, plan) -> fused config and
tensors, and `fuse_model` for the same surgery on a loaded model in memory (analyze, plan and bench use it; the
`fuse` stage writes its result to disk).

Tensors are pulled by name through `get`, one block at a time, so the same code serves an in-memory state dict
and a lazily opened safetensors checkpoint. Norm weights are folded in fp32 and cast back to the input dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ffnfusion.adapters import adapter_for
from ffnfusion.adapters.base import ffn_mult_for
from ffnfusion.formats.plan import Block, Plan, plan_blocks, validate_plan
from ffnfusion.modeling.modeling_decilm import block_ffn_width

TensorGetter = Callable[[str], torch.Tensor]


def ffn_widths(config: dict[str, Any]) -> list[int]:
    return [block_ffn_width(b, config["hidden_size"]) for b in config["block_configs"]]


def _attention_config(n_heads_in_group: int | None) -> dict[str, Any]:
    # Engines read n_heads_in_group, not no_op (llama.cpp), so a no-op attention must say null there too.
    return {"no_op": n_heads_in_group is None, "n_heads_in_group": n_heads_in_group, "replace_with_linear": False}


def _ffn_config(width: int | None, hidden: int) -> dict[str, Any]:
    if width is None:
        return {"no_op": True, "ffn_mult": None, "intermediate_size": None, "replace_with_linear": False}
    return {
        "no_op": False,
        "ffn_mult": ffn_mult_for(width, hidden),
        "intermediate_size": width,
        "replace_with_linear": False,
    }


def fused_config(config: dict[str, Any], plan: Plan, require_engine_widths: bool = False) -> dict[str, Any]:
    """The DeciLM config kwargs of the model that `plan` makes from the unmodified model described by `config`."""
    source_blocks = config["block_configs"]
    widths = ffn_widths(config)
    validate_plan(plan, len(source_blocks), widths, require_engine_widths, has_o_bias=config.get("attention_bias"))
    hidden = config["hidden_size"]
    blocks = []
    for block in plan_blocks(plan, len(source_blocks)):
        first = block.attention_from if block.attention_from is not None else block.layers[0]
        group = source_blocks[first]["attention"]["n_heads_in_group"]
        has_attention = block.kind == "parallel" or block.attention_from is not None
        width = sum(widths[i] for i in block.ffn_from) if block.ffn_from else None
        entry = {"attention": _attention_config(group if has_attention else None), "ffn": _ffn_config(width, hidden)}
        if block.kind == "parallel":
            entry["parallel_blocks"] = len(block.layers)
        blocks.append(entry)
    out = copy.deepcopy(config)
    out["block_configs"] = blocks
    return out


def _fold(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """W diag(g): RMSNorm's per-channel weight moved into the projection that reads it."""
    # The same fp32 product as `weight.float() * norm`, without a second fp32 temporary; copy=True because float()
    # of an fp32 weight is the caller's own tensor.
    return weight.to(torch.float32, copy=True).mul_(norm.float()[None, :]).to(weight.dtype)


def _ones_like(norm: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(norm)


def block_tensors(
    config: dict[str, Any], block: Block, index: int, get: TensorGetter
) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of fused-model block `index`, built from original layers through `get`."""
    out = f"model.layers.{index}."

    def src(layer: int, name: str) -> torch.Tensor:
        return get(f"model.layers.{layer}.{name}")

    yield from _attention_tensors(config, block, out, src)
    if block.ffn_from:
        yield from _ffn_tensors(config, block, out, src)


def _attention_tensors(
    config: dict[str, Any], block: Block, out: str, src: Callable[[int, str], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """A parallel block's attentions side by side (one wide attention), or one layer's attention as it is."""
    qkv_bias = config.get("attention_bias") or config.get("qkv_bias")
    o_bias = config.get("attention_bias")
    if block.kind == "parallel":
        members = block.layers
        g_in = [src(i, "input_layernorm.weight") for i in members]
        yield out + "input_layernorm.weight", _ones_like(g_in[0])
        for proj in ("q_proj", "k_proj", "v_proj"):
            yield (
                out + f"self_attn.{proj}.weight",
                torch.cat([_fold(src(i, f"self_attn.{proj}.weight"), g) for i, g in zip(members, g_in)]),
            )
            if qkv_bias:
                yield out + f"self_attn.{proj}.bias", torch.cat([src(i, f"self_attn.{proj}.bias") for i in members])
        yield out + "self_attn.o_proj.weight", torch.cat([src(i, "self_attn.o_proj.weight") for i in members], dim=1)
        if config.get("qk_norm"):
            for norm in ("q_norm", "k_norm"):
                yield (
                    out + f"self_attn.{norm}.weight",
                    torch.stack([src(i, f"self_attn.{norm}.weight") for i in members]),
                )
    elif block.attention_from is not None:
        i = block.attention_from
        yield out + "input_layernorm.weight", src(i, "input_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield out + f"self_attn.{proj}.weight", src(i, f"self_attn.{proj}.weight")
            if qkv_bias and (proj != "o_proj" or o_bias):
                yield out + f"self_attn.{proj}.bias", src(i, f"self_attn.{proj}.bias")
        if config.get("qk_norm"):
            for norm in ("q_norm", "k_norm"):
                yield out + f"self_attn.{norm}.weight", src(i, f"self_attn.{norm}.weight")


def _ffn_tensors(
    config: dict[str, Any], block: Block, out: str, src: Callable[[int, str], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """One layer's FFN as it is, or a fused FFN group / parallel block's FFNs as one wide FFN."""
    mlp_bias = config.get("mlp_bias")
    if block.kind == "layer":
        i = block.ffn_from[0]
        yield out + "post_attention_layernorm.weight", src(i, "post_attention_layernorm.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield out + f"mlp.{proj}.weight", src(i, f"mlp.{proj}.weight")
            if mlp_bias:
                yield out + f"mlp.{proj}.bias", src(i, f"mlp.{proj}.bias")
        return
    # Fused FFN or parallel block: one wide FFN, each member's norm weight folded into its own gate/up rows.
    members = block.ffn_from
    g_post = [src(i, "post_attention_layernorm.weight") for i in members]
    yield out + "post_attention_layernorm.weight", _ones_like(g_post[0])
    for proj in ("gate_proj", "up_proj"):
        yield (
            out + f"mlp.{proj}.weight",
            torch.cat([_fold(src(i, f"mlp.{proj}.weight"), g) for i, g in zip(members, g_post)]),
        )
        if mlp_bias:
            yield out + f"mlp.{proj}.bias", torch.cat([src(i, f"mlp.{proj}.bias") for i in members])
    yield out + "mlp.down_proj.weight", torch.cat([src(i, "mlp.down_proj.weight") for i in members], dim=1)
    if mlp_bias:
        yield out + "mlp.down_proj.bias", torch.stack([src(i, "mlp.down_proj.bias") for i in members]).sum(0)


def fused_tensors(config: dict[str, Any], plan: Plan, get: TensorGetter) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the fused model, block by block (lm_head omitted when embeddings are tied)."""
    yield "model.embed_tokens.weight", get("model.embed_tokens.weight")
    for index, block in enumerate(plan_blocks(plan, len(config["block_configs"]))):
        yield from block_tensors(config, block, index, get)
    yield "model.norm.weight", get("model.norm.weight")
    if not config.get("tie_word_embeddings"):
        yield "lm_head.weight", get("lm_head.weight")


def fuse_state_dict(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor], plan: Plan, require_engine_widths: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """In-memory convenience: (fused config kwargs, fused state dict)."""
    new_config = fused_config(config, plan, require_engine_widths)
    return new_config, dict(fused_tensors(config, plan, state_dict.__getitem__))


def fuse_model(model: Any, plan: Plan, require_engine_widths: bool = False) -> Any:
    """In-memory fusion of a loaded transformers model: returns a DeciLMForCausalLM on the same device and dtype."""
    import torch

    from ffnfusion.modeling.modeling_decilm import DeciLMConfig, DeciLMForCausalLM

    base = adapter_for(model.config).decilm_config(model.config)
    new_config = fused_config(base, plan, require_engine_widths)
    state = model.state_dict()
    tensors = dict(fused_tensors(base, plan, state.__getitem__))
    param = next(model.parameters())
    with torch.device("meta"):
        fused = DeciLMForCausalLM(DeciLMConfig(**new_config))
    fused.load_state_dict(tensors, strict=False, assign=True)
    if new_config.get("tie_word_embeddings"):
        fused.tie_weights()
    missing = [n for n, p in fused.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"fusion left parameters without weights: {missing[:5]}")
    rotary = type(fused.model.rotary_emb)
    del fused.model.rotary_emb  # its frequencies are meta tensors, which cannot be moved
    fused = fused.to(device=param.device, dtype=param.dtype).eval()
    # Built after the cast: RoPE frequencies stay float32, as in a transformers model loaded in bf16.
    fused.model.rotary_emb = rotary(fused.config).to(param.device)
    return fused
