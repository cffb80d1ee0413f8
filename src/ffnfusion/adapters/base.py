"""What differs between the model families ffnfusion can fuse, and the translation to the DeciLM config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be fused exactly (or is not known to ffnfusion)."""


@dataclass(frozen=True)
class Adapter:
    """One model family. All supported families use Llama's tensor names; they differ in attention details."""

    family: str
    model_types: tuple[str, ...]
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2), o_proj does not
    qk_norm: bool = False  # per-head RMSNorm on queries and keys after projection (Qwen3)

    def check(self, config: Any) -> None:
        """Raise UnsupportedModelError for variants of the family where fusion is not exact."""
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(
                f"{config.model_type} with hidden_act={act!r}: ffnfusion supports SwiGLU FFNs (silu) only."
            )
        window = getattr(config, "sliding_window", None)
        uses_window = getattr(config, "use_sliding_window", window is not None)
        if uses_window and window is not None and window < getattr(config, "max_position_embeddings", 0):
            raise UnsupportedModelError(
                f"{config.model_type} with sliding_window={window} (< max_position_embeddings): sliding-window "
                "attention is not supported yet; use a checkpoint with full attention."
            )
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise UnsupportedModelError("pretraining_tp != 1 is not supported; set it to 1 (it changes no weights).")

    def decilm_config(self, config: Any) -> dict[str, Any]:
        """DeciLM config kwargs (block_configs included) describing the unmodified model."""
        self.check(config)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        hidden = config.hidden_size
        width = config.intermediate_size
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_theta = rope.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
        if not rope:
            rope = dict(getattr(config, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        block = {
            "attention": {"no_op": False, "n_heads_in_group": heads // kv_heads, "replace_with_linear": False},
            "ffn": {
                "no_op": False,
                "ffn_mult": ffn_mult_for(width, hidden),
                "intermediate_size": width,
                "replace_with_linear": False,
            },
        }
        return {
            "vocab_size": config.vocab_size,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": getattr(config, "head_dim", None) or hidden // heads,
            "block_configs": [dict(block) for _ in range(config.num_hidden_layers)],
            "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": float(rope_theta),
            "rope_scaling": rope_scaling,
            "attention_bias": bool(getattr(config, "attention_bias", False)) and not self.qkv_bias,
            "qkv_bias": self.qkv_bias,
            "mlp_bias": bool(getattr(config, "mlp_bias", False)),
            "qk_norm": self.qk_norm,
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "bos_token_id": getattr(config, "bos_token_id", None),
            "eos_token_id": getattr(config, "eos_token_id", None),
            "pad_token_id": getattr(config, "pad_token_id", None),
            "source_model_type": config.model_type,
        }


def ffn_mult_for(width: int, hidden: int) -> float:
    """The `ffn_mult` engines turn back into `width` (exact when width is a multiple of 256)."""
    return float(1.5 * width / hidden)
