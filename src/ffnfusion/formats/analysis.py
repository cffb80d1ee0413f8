"""analysis.json: what `ffnfusion analyze` measured, in a versioned schema that `ffnfusion plan` reads.

Layer indices are 0-based layers of the ORIGINAL model. Matrices are L x L lists indexed [i][j] (i = the
sub-block or block removed, j = the later one measured); entries with j <= i are null. Every figure is an average
over all calibration tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
FORMAT = "ffnfusion-analysis"


class AnalysisError(ValueError):
    """An analysis file that is missing, unreadable, of another schema version, or made from another model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelIdentity(_Strict):
    """Enough of the model to tell whether a plan made from this analysis applies to another model."""

    name: str = Field(description="MODEL as given to analyze (hub id, folder or .gguf file)")
    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    ffn_widths: list[int]
    has_o_bias: bool
    config_hash: str = Field(description="sha256 of the model's architecture config (as ffnfusion translates it)")
    weights_fingerprint: str = Field(description="sha256 of a fixed sample of weights, rounded to bfloat16")


class Calibration(_Strict):
    data: str
    samples: int
    seq_len: int
    seed: int
    text_field: str
    tokens_sha256: str = Field(description="sha256 of the calibration token ids, to tell data sets apart")


class Settings(_Strict):
    dtype: str
    device: str
    batch_size: int
    max_window: int
    remove_attention: list[int] = Field(
        description="attention sub-blocks removed before measuring (the 'base' model); empty = the model as given"
    )


class SubBlockStats(_Strict):
    rel_norm: float = Field(description="mean over tokens of |h(X)| / |X|, h = the residual contribution")
    cos_distance: float = Field(description="mean over tokens of 1 - cos(f(X), X), f(X) = X + h(X)")


class LayerStats(_Strict):
    layer: int
    attention: SubBlockStats | None = Field(description="null where the attention is removed in the base model")
    ffn: SubBlockStats
    block: SubBlockStats = Field(description="the whole layer (attention + FFN)")


class AttentionScore(_Strict):
    layer: int
    kl: float = Field(description="mean KL(original || base with this attention also removed) of next-token dists")
    lm_loss: float = Field(description="next-token cross-entropy with this attention also removed")
    lm_loss_delta: float = Field(description="lm_loss minus the original model's lm_loss")


class Window(_Strict):
    start: int
    end: int = Field(description="last layer of the window (inclusive)")
    max: float = Field(description="largest M[i][j] with start <= i < j <= end")
    sum: float = Field(description="sum of M[i][j] with start <= i < j <= end")


class CostPart(_Strict):
    sub_block_evals: int = Field(description="attention/FFN sub-block evaluations over all batches")
    lm_head_evals: int = Field(description="final norm + lm_head evaluations over all batches")
    forward_equivalents: float = Field(description="sub_block_evals / (sub-blocks of one full forward x batches)")


class Cost(_Strict):
    sub_blocks_per_forward: int
    batches: int
    parts: dict[str, CostPart]
    total_forward_equivalents: float
    naive_forward_equivalents_per_matrix: int = Field(
        description="what one matrix costs without prefix caching: one full forward per removed sub-block"
    )


class Analysis(_Strict):
    format: Literal["ffnfusion-analysis"] = FORMAT
    schema_version: int = SCHEMA_VERSION
    model: ModelIdentity
    calibration: Calibration
    settings: Settings
    original_lm_loss: float
    base_lm_loss: float
    base_kl: float = Field(description="KL(original || base model); 0 when no attention is removed before measuring")
    layers: list[LayerStats]
    attention_importance: list[AttentionScore] = Field(description="one entry per attention present in the base")
    ffn_dependency: list[list[float | None]] = Field(
        description="M[i][j] = 1 - cos(h_j(X), h_j(X | FFN i removed)), h_j = FFN j's residual contribution"
    )
    block_dependency: list[list[float | None]] = Field(
        description="the same for whole layers: h_j = layer j's attention + FFN contribution, layer i removed"
    )
    ffn_windows: list[Window]
    block_windows: list[Window]
    cost: Cost
    heatmaps: dict[str, str] = Field(default_factory=dict, description="figure name -> PNG file beside this file")

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def kl_by_layer(self) -> dict[int, float]:
        return {s.layer: s.kl for s in self.attention_importance}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1) + "\n")


def load_analysis(path: str | Path) -> Analysis:
    """Read analysis.json (or a folder holding one), refusing other formats and schema versions by name."""
    path = Path(path)
    if path.is_dir():
        path = path / "analysis.json"
    if not path.is_file():
        raise AnalysisError(f"Analysis file not found: {path}; create it with `ffnfusion analyze MODEL --out DIR`.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnalysisError(f"{path} is not valid JSON ({e}); rerun `ffnfusion analyze`.") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise AnalysisError(f'{path} is not an ffnfusion analysis file (no "format": "{FORMAT}").')
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise AnalysisError(
            f"{path} has schema version {version}, but this ffnfusion reads version {SCHEMA_VERSION}; "
            "rerun `ffnfusion analyze` with this version."
        )
    try:
        analysis = Analysis.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise AnalysisError(f"{path} does not match the analysis schema: {problems}") from None
    check_consistent(analysis, path)
    return analysis


def check_consistent(analysis: Analysis, where: Any = "analysis") -> None:
    """Shapes that the schema alone cannot express: matrices L x L, one stats entry per layer."""
    n = analysis.model.num_layers
    problems = []
    if len(analysis.model.ffn_widths) != n:
        problems.append(f"model.ffn_widths has {len(analysis.model.ffn_widths)} entries for {n} layers")
    if [s.layer for s in analysis.layers] != list(range(n)):
        problems.append("layers must list layers 0..L-1 in order")
    for name in ("ffn_dependency", "block_dependency"):
        m = getattr(analysis, name)
        if len(m) != n or any(len(row) != n for row in m):
            problems.append(f"{name} must be {n} x {n}")
    if problems:
        raise AnalysisError(f"{where} is inconsistent: " + "; ".join(problems))


def config_hash(decilm_config: dict[str, Any]) -> str:
    """sha256 of the architecture: token ids and other non-architectural keys left out."""
    ignore = {"bos_token_id", "eos_token_id", "pad_token_id"}
    arch = {k: v for k, v in decilm_config.items() if k not in ignore}
    return hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()


def check_same_model(analysis: Analysis, identity: ModelIdentity, compare_weights: bool = False) -> None:
    """Raise AnalysisError when `analysis` was made from a model other than `identity`."""
    a = analysis.model
    diffs = [
        f"{key}: analysis has {getattr(a, key)!r}, model has {getattr(identity, key)!r}"
        for key in ("model_type", "num_layers", "hidden_size", "ffn_widths", "config_hash")
        if getattr(a, key) != getattr(identity, key)
    ]
    if compare_weights and a.weights_fingerprint != identity.weights_fingerprint:
        diffs.append("weights differ (another checkpoint of the same architecture)")
    if diffs:
        raise AnalysisError(
            f"The analysis was made from another model ({a.name}) than {identity.name}: "
            + "; ".join(diffs)
            + ". Run `ffnfusion analyze` on this model first."
        )
