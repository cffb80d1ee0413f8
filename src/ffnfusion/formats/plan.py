"""The plan file: which attention/FFN sub-blocks to remove, which FFN runs to fuse, which blocks to run in parallel.

Indices are 0-based layers of the ORIGINAL model. Example:

    {"remove_attention": [12, 13, 14, 15],
     "fuse_ffn": [[11, 12, 13, 14]],
     "parallel_blocks": [[20, 21]]}
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENGINE_WIDTH_MULTIPLE = 256


class PlanError(ValueError):
    """A plan that cannot be applied to the model; the message lists every problem found."""


PLAN_FORMAT = "ffnfusion-plan"
PLAN_VERSION = 1


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Optional on reading: hand-written plans and plans from before the field existed carry neither.
    format: Literal["ffnfusion-plan"] = PLAN_FORMAT
    version: int = Field(default=PLAN_VERSION, ge=1, le=PLAN_VERSION)

    remove_attention: list[int] = Field(default_factory=list, description="layers whose attention becomes a no-op")
    remove_ffn: list[int] = Field(default_factory=list, description="layers whose FFN becomes a no-op")
    fuse_ffn: list[list[int]] = Field(
        default_factory=list, description="runs of consecutive layers whose FFNs become one wide FFN"
    )
    parallel_blocks: list[list[int]] = Field(
        default_factory=list, description="runs of consecutive whole layers that read the same input"
    )
    info: dict[str, Any] = Field(default_factory=dict, description="free-form metadata (who made it, predictions)")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if path.is_dir():
            inside = " (it holds a plan.json: pass that file)" if (path / "plan.json").is_file() else ""
            raise PlanError(
                f"{path} is a directory, not a plan file{inside}; --plan expects the plan.json written by "
                "`ffnfusion plan`."
            )
        if not path.is_file():
            raise PlanError(f"Plan file not found: {path}")
        try:
            raw = json.loads(path.read_text())
            if isinstance(raw, dict) and raw.get("format", PLAN_FORMAT) != PLAN_FORMAT:
                raise PlanError(
                    f"{path} is not a plan: it is a {raw['format']!r} file. Give --plan the plan.json that "
                    "`ffnfusion plan` wrote (or a hand-written one)."
                )
            return cls.model_validate(raw)
        except json.JSONDecodeError as e:
            raise PlanError(f"Plan file {path} is not valid JSON: {e}") from None
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise PlanError(f"Plan file {path} does not match the plan schema: {problems}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @property
    def is_empty(self) -> bool:
        return not (self.remove_attention or self.remove_ffn or self.fuse_ffn or self.parallel_blocks)


def check_plan_model(plan: Plan, model: str, num_layers: int, config_hash: str, where: Any = "the plan") -> bool:
    """Refuse a plan made for another model than MODEL (`num_layers` layers, architecture hash `config_hash`).

    `ffnfusion plan` records the analysed model in info.model; layer indices of a plan made for another model would
    silently change the wrong layers. Returns False for a plan that records no model (written by hand): it is
    accepted unchecked.
    """
    recorded = plan.info.get("model") if isinstance(plan.info, dict) else None
    if not isinstance(recorded, dict) or not ({"num_layers", "config_hash"} & recorded.keys()):
        return False
    diffs = []
    if "num_layers" in recorded and recorded["num_layers"] != num_layers:
        diffs.append(f"{recorded['num_layers']} layers vs {num_layers}")
    if "config_hash" in recorded and recorded["config_hash"] != config_hash:
        diffs.append(f"architecture hash {str(recorded['config_hash'])[:12]} vs {config_hash[:12]}")
    if diffs:
        raise PlanError(
            f"{where} was made for another model ({recorded.get('name', 'unnamed')}) than {model}: "
            + "; ".join(diffs)
            + ". Its layer indices would change the wrong layers. Make a plan for this model (`ffnfusion analyze "
            "MODEL` then `ffnfusion plan`), or pass --force-plan to apply it anyway."
        )
    return True


@dataclass(frozen=True)
class Block:
    """One block of the fused model and the original layers it is made from."""

    layers: tuple[int, ...]
    kind: str  # "layer" | "fused_ffn" | "parallel"
    attention_from: int | None  # original layer whose attention the block keeps (non-parallel blocks)
    ffn_from: tuple[int, ...]  # original layers whose FFNs the block holds

    @property
    def sequential_sub_blocks(self) -> int:
        if self.kind == "parallel":
            return 2
        return int(self.attention_from is not None) + int(bool(self.ffn_from))


def validate_plan(
    plan: Plan,
    num_layers: int,
    ffn_widths: list[int] | None = None,
    require_engine_widths: bool = False,
    has_o_bias: bool = False,
) -> None:
    """Raise PlanError naming every problem of `plan` for a model of `num_layers` layers."""
    problems: list[str] = []
    problems += _range_problems("remove_attention", plan.remove_attention, num_layers)
    problems += _range_problems("remove_ffn", plan.remove_ffn, num_layers)
    removed_attn, removed_ffn = set(plan.remove_attention), set(plan.remove_ffn)
    owner: dict[int, str] = {}
    for kind, groups in (("fuse_ffn", plan.fuse_ffn), ("parallel_blocks", plan.parallel_blocks)):
        for group in groups:
            label = f"{kind} group {group}"
            problems += _range_problems(label, group, num_layers)
            if len(group) < 2:
                problems.append(f"{label}: a group needs at least 2 layers (a group of one changes nothing)")
            if any(b != a + 1 for a, b in itertools.pairwise(group)):
                problems.append(f"{label}: layers must be consecutive and ascending, e.g. [{group[0]}, {group[0] + 1}]")
            for i in group:
                if i in owner:
                    problems.append(f"{label}: layer {i} is also in {owner[i]} (groups must not overlap)")
                owner[i] = label
            if kind == "fuse_ffn":
                problems += _fusion_problems(
                    label, group, removed_attn, removed_ffn, num_layers, ffn_widths, require_engine_widths
                )
            else:
                if gone := [i for i in group if i in removed_attn or i in removed_ffn]:
                    problems.append(
                        f"{label}: layers {gone} have a removed sub-block; parallel blocks must be whole layers"
                    )
                if has_o_bias:
                    problems.append(f"{label}: parallel blocks are not supported for models with an o_proj bias")
                if ffn_widths and len({ffn_widths[i] for i in group if 0 <= i < num_layers}) > 1:
                    problems.append(f"{label}: parallel blocks must have equal FFN widths")
    if problems:
        raise PlanError("Invalid plan:\n  - " + "\n  - ".join(problems))


def _range_problems(name: str, indices: list[int], num_layers: int) -> list[str]:
    problems = []
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        problems.append(f"{name}: layer indices {bad} out of range (the model has layers 0..{num_layers - 1})")
    dup = sorted({i for i in indices if indices.count(i) > 1})
    if dup:
        problems.append(f"{name}: layers {dup} listed more than once")
    return problems


def _fusion_problems(
    label: str,
    group: list[int],
    removed_attn: set[int],
    removed_ffn: set[int],
    num_layers: int,
    ffn_widths: list[int] | None,
    require_engine_widths: bool,
) -> list[str]:
    problems = []
    kept = [i for i in group[1:] if i not in removed_attn]
    if kept:
        problems.append(
            f"{label}: attention is still present in layers {kept}; FFNs can only be fused across "
            "layers whose attention is removed (add them to remove_attention)"
        )
    if gone := [i for i in group if i in removed_ffn]:
        problems.append(f"{label}: layers {gone} are also in remove_ffn; a fused FFN cannot be removed")
    if ffn_widths and all(0 <= i < num_layers for i in group):
        width = sum(ffn_widths[i] for i in group)
        if require_engine_widths and width % ENGINE_WIDTH_MULTIPLE:
            problems.append(
                f"{label}: fused FFN width {width} is not a multiple of {ENGINE_WIDTH_MULTIPLE}, which "
                "vLLM, TensorRT-LLM and llama.cpp need to read `ffn_mult`; allow engine-incompatible "
                "widths (--allow-any-width) to write it for transformers only"
            )
    return problems


def plan_blocks(plan: Plan, num_layers: int) -> list[Block]:
    """The fused model's blocks, in order. Layers left with neither attention nor FFN are dropped."""
    validate_plan(plan, num_layers)
    starts = {g[0]: ("fused_ffn", g) for g in plan.fuse_ffn} | {g[0]: ("parallel", g) for g in plan.parallel_blocks}
    removed_attn, removed_ffn = set(plan.remove_attention), set(plan.remove_ffn)
    blocks: list[Block] = []
    i = 0
    while i < num_layers:
        if i in starts:
            kind, group = starts[i]
            attention = None if kind == "parallel" or group[0] in removed_attn else group[0]
            blocks.append(Block(tuple(group), kind, attention, tuple(group)))
            i = group[-1] + 1
            continue
        attention = None if i in removed_attn else i
        ffn = () if i in removed_ffn else (i,)
        if attention is not None or ffn:
            blocks.append(Block((i,), "layer", attention, ffn))
        i += 1
    return blocks


def sequential_sub_blocks(blocks: list[Block]) -> int:
    return sum(b.sequential_sub_blocks for b in blocks)
