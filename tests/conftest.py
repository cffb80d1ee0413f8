"""Tiny random models of every supported family, built in-process (no hub access needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
SMOLLM2_GGUF = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"

COMMON = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)

FAMILIES = {
    "llama": lambda **kw: LlamaForCausalLM(LlamaConfig(**{**COMMON, **kw})),
    "llama-bias-tied-rope3": lambda **kw: LlamaForCausalLM(
        LlamaConfig(
            **{
                **COMMON,
                "attention_bias": True,
                "mlp_bias": True,
                "tie_word_embeddings": True,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
                **kw,
            }
        )
    ),
    "mistral": lambda **kw: MistralForCausalLM(MistralConfig(**{**COMMON, "sliding_window": None, **kw})),
    "qwen2": lambda **kw: Qwen2ForCausalLM(Qwen2Config(**{**COMMON, **kw})),
    "qwen3": lambda **kw: Qwen3ForCausalLM(Qwen3Config(**{**COMMON, "head_dim": 16, **kw})),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norms and biases included, so that folding and bias paths are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim > 1 else 0.05))
    return model.eval()


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(FAMILIES[family](**overrides), seed)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def save_model(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path
