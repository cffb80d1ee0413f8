"""Families are recognised; architectures where fusion is not exact are refused with the reason."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, MistralConfig

from ffnfusion.adapters import UnsupportedModelError, adapter_for


@pytest.mark.parametrize(
    "model_type,reason",
    [
        ("gemma2", "post-FFN norms"),
        ("mixtral", "mixtures of experts"),
        ("qwen3_moe", "mixtures of experts"),
        ("gpt_neox", "parallel residual"),
        ("phi", "parallel residual"),
        ("gpt2", "not a gated SwiGLU"),
        ("opt", "not a gated SwiGLU"),
    ],
)
def test_refused_architectures_name_the_reason(model_type: str, reason: str) -> None:
    config = AutoConfig.for_model(model_type)
    with pytest.raises(UnsupportedModelError, match=reason) as err:
        adapter_for(config)
    assert model_type in str(err.value)


def test_unknown_architecture_lists_supported() -> None:
    config = AutoConfig.for_model("bert")
    with pytest.raises(UnsupportedModelError, match="Unsupported architecture 'bert'.*llama"):
        adapter_for(config)


def test_sliding_window_mistral_refused_full_attention_accepted() -> None:
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        adapter_for(MistralConfig(sliding_window=4096, max_position_embeddings=32768))
    assert adapter_for(MistralConfig(sliding_window=None)).family == "mistral"


def test_non_silu_refused() -> None:
    config = AutoConfig.for_model("llama", hidden_act="gelu")
    with pytest.raises(UnsupportedModelError, match="SwiGLU"):
        adapter_for(config)


@pytest.mark.parametrize("model_type,family", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_families(model_type: str, family: str) -> None:
    adapter = adapter_for(AutoConfig.for_model(model_type))
    assert adapter.family == family
    cfg = adapter.decilm_config(AutoConfig.for_model(model_type))
    assert cfg["qkv_bias"] == (family == "qwen2") and cfg["qk_norm"] == (family == "qwen3")
