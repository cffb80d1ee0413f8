"""Shapes of real models, for speed measurements with random weights (speed does not depend on weight values)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

_LLAMA3_VOCAB = 128256


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


# From each model's published config.json.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        vocab_size=_LLAMA3_VOCAB,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters=_llama3_rope(32.0),
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        vocab_size=_LLAMA3_VOCAB,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters=_llama3_rope(8.0),
        tie_word_embeddings=False,
    ),
    "llama-3.1-70b": dict(
        vocab_size=_LLAMA3_VOCAB,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters=_llama3_rope(8.0),
        tie_word_embeddings=False,
    ),
}


def shape_config(name: str, layers: int | None = None) -> LlamaConfig:
    """The LlamaConfig of shape `name`, optionally cut to its first `layers` layers."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}: choose one of {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[name])
    if layers is not None:
        if layers < 1:
            raise ValueError("--layers must be at least 1")
        kwargs["num_hidden_layers"] = layers
    # No special tokens: generation never stops early on a random model.
    return LlamaConfig(**kwargs, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)


@torch.no_grad()
def random_model(
    name: str,
    layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama of shape `name`, built directly on `device` in `dtype`.

    Built on the meta device and filled in place, so an 8B model never exists in fp32 or on the host.
    Weights are N(0, 0.02) and norm weights N(1, 0.05): never zeros, which can run faster than real data.
    """
    config = shape_config(name, layers)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name_, p in model.named_parameters():
        p.normal_(1.0 if "norm" in name_ else 0.0, 0.05 if "norm" in name_ else 0.02, generator=gen)
    # Buffers (RoPE frequencies) were never materialised on meta: build them again.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()
