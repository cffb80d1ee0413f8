"""Model families: `adapter_for(config)` returns the family's adapter or raises with the reason it cannot be fused."""

from __future__ import annotations

from typing import Any

from ffnfusion.adapters.base import Adapter, UnsupportedModelError
from ffnfusion.adapters.llama import ADAPTER as LLAMA
from ffnfusion.adapters.mistral import ADAPTER as MISTRAL
from ffnfusion.adapters.qwen2 import ADAPTER as QWEN2
from ffnfusion.adapters.qwen3 import ADAPTER as QWEN3

ADAPTERS: tuple[Adapter, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3)

# Architectures where FFN fusion is not exact or not defined, with the reason given to the user.
_POST_FFN_NORM = "it normalises each sub-block's output (post-attention/post-FFN norms), so FFN outputs do not add up"
_MOE = "its FFNs are mixtures of experts with a router; fusing them into one wide dense FFN is not defined"
_PARALLEL = "it uses a parallel residual (attention and FFN read the same input), which has no sequential FFN chain"
_NON_GATED = "its MLP is not a gated SwiGLU FFN and no adapter exists for it"
REFUSED: dict[str, str] = {
    "gemma2": _POST_FFN_NORM,
    "gemma3": _POST_FFN_NORM,
    "gemma3_text": _POST_FFN_NORM,
    "olmo2": _POST_FFN_NORM,
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
    "deepseek_v2": _MOE,
    "deepseek_v3": _MOE,
    "dbrx": _MOE,
    "olmoe": _MOE,
    "granitemoe": _MOE,
    "jamba": _MOE,
    "gpt_neox": _PARALLEL,
    "gptj": _PARALLEL,
    "phi": _PARALLEL,
    "cohere": _PARALLEL,
    "falcon": _PARALLEL,
    "gpt2": _NON_GATED,
    "opt": _NON_GATED,
    "bloom": _NON_GATED,
    "gpt_bigcode": _NON_GATED,
    "starcoder2": _NON_GATED,
}


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config: Any) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            adapter.check(config)
            return adapter
    if model_type in REFUSED:
        raise UnsupportedModelError(f"Cannot fuse a {model_type!r} model: {REFUSED[model_type]}.")
    raise UnsupportedModelError(
        f"Unsupported architecture {model_type!r}: ffnfusion knows {', '.join(supported_model_types())}. "
        "Other Llama-like models need an adapter in ffnfusion/adapters."
    )


__all__ = ["ADAPTERS", "Adapter", "UnsupportedModelError", "adapter_for", "supported_model_types"]
