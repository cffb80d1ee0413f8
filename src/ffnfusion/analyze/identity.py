"""Which model an analysis was made from: its architecture (ModelIdentity) and a fingerprint of its weights.

Used by `analyze` to record the model in analysis.json, and by `plan` to refuse an analysis of another model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ffnfusion.formats.analysis import ModelIdentity, config_hash
from ffnfusion.surgery import ffn_widths


def model_identity(spec: str, decilm_config: dict[str, Any], fingerprint: str = "") -> ModelIdentity:
    return ModelIdentity(
        name=spec,
        model_type=decilm_config["source_model_type"],
        num_layers=len(decilm_config["block_configs"]),
        hidden_size=decilm_config["hidden_size"],
        num_attention_heads=decilm_config["num_attention_heads"],
        num_key_value_heads=decilm_config["num_key_value_heads"],
        ffn_widths=ffn_widths(decilm_config),
        has_o_bias=bool(decilm_config.get("attention_bias")),
        config_hash=config_hash(decilm_config),
        weights_fingerprint=fingerprint,
    )


FINGERPRINT_TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "mlp.down_proj.weight")


def fingerprint_names(num_layers: int) -> list[str]:
    """The DeciLM tensors the fingerprint hashes: the embeddings, the first q_proj and the last down_proj."""
    return [*FINGERPRINT_TENSORS[:2], f"model.layers.{num_layers - 1}.{FINGERPRINT_TENSORS[2]}"]


def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of fixed slices of the tensors, rounded to bf16 so a float32 and a bf16 load of one model agree."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().flatten()[:4096].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def getter_fingerprint(get: Callable[[str], torch.Tensor], num_layers: int, dtype: torch.dtype) -> str:
    """The fingerprint read tensor by tensor from a checkpoint, in the analysis dtype (what streaming hashes)."""
    return weights_fingerprint(get(name).to(dtype) for name in fingerprint_names(num_layers))


def model_fingerprint(model: torch.nn.Module) -> str:
    params = dict(model.named_parameters())
    return weights_fingerprint(params[name] for name in fingerprint_names(len(model.model.layers)))
