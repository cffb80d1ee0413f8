"""`ffnfusion run`'s configuration: run.yaml and command-line overrides, every stage section validated against
that stage's own options, and the run's defaults (stages, what each reads and writes, the heal budget)."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ffnfusion.io.output import Input

# A run whose configuration names no healing budget heals on this many tokens per parameter of the model (within
# the bounds below): 27M tokens for a 135M model, which with the teacher writing them and the analysis fits one
# 10-minute job on one H200 (benchmarks/RESULTS.md); larger models are capped at 268M tokens.
HEAL_TOKENS_PER_PARAMETER = 0.2
HEAL_TOKENS_MIN, HEAL_TOKENS_MAX = 2**22, 2**28
# Options that size the heal (without them the default budget applies); `minutes` only caps it.
HEAL_SIZE_KEYS = {"tokens", "max_steps", "epochs"}
HEAL_BUDGET_KEYS = HEAL_SIZE_KEYS | {"minutes"}

STAGES = ("analyze", "plan", "fuse", "heal", "eval", "bench", "report")
UPSTREAM = {
    "analyze": (),
    "plan": ("analyze",),
    "fuse": ("plan",),
    "heal": ("fuse",),
    "eval": ("fuse", "heal"),
    "bench": ("fuse",),
    "report": ("analyze", "plan", "fuse", "heal", "eval", "bench"),
}
OUTPUTS = {
    "analyze": ("analysis/analysis.json",),
    "plan": ("plan.json",),
    "fuse": ("fused/config.json",),
    "heal": ("healed/config.json",),
    "eval": ("eval.json",),
    "bench": ("bench.json",),
    "report": ("report.md", "report.html"),
}


class RunConfigError(ValueError):
    """A run configuration with unknown stages or options."""


class RunConfig(BaseModel):
    """Everything `ffnfusion run` does; each stage section takes that stage's options (`ffnfusion STAGE --help`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="original model: hub id, local folder or .gguf file")
    data: str = Field(default="self", description="calibration and healing text (`self`: sampled from the model)")
    eval_data: str | None = Field(default=None, description="perplexity/fidelity text; default: held-out text")
    seed: int = 0
    device: str | None = Field(default=None, description="cpu or cuda (default: cuda when available)")
    analyze: dict[str, Any] = Field(default_factory=dict)
    plan: dict[str, Any] = Field(default_factory=dict)
    fuse: dict[str, Any] = Field(default_factory=dict)
    heal: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    bench: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None, **overrides: Any) -> RunConfig:
        raw: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if path.is_dir():
                raise RunConfigError(f"{path} is a directory; --config expects a run.yaml file.")
            if not path.is_file():
                raise RunConfigError(f"Run configuration not found: {path}")
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise RunConfigError(f"{path} is not valid YAML: {e}") from None
            if not isinstance(raw, dict):
                raise RunConfigError(f"{path} must hold a mapping of settings, not {type(raw).__name__}.")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            config = cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise RunConfigError(f"Invalid run configuration: {problems}") from None
        if config.model is None:
            raise RunConfigError("No model given: pass --model or set `model:` in the configuration file.")
        config.check_stage_options()
        return config

    def inputs(self) -> list[Input]:
        """The user's files this run reads, which no stage may write over."""
        return [("input model", self.model), ("data", self.data), ("evaluation data", self.eval_data)]

    def check_stage_options(self) -> None:
        problems = []
        for stage, allowed in stage_options().items():
            unknown = sorted(set(getattr(self, stage)) - allowed)
            if unknown:
                problems.append(f"{stage}: unknown options {unknown}; known: {sorted(allowed)}")
        if problems:
            raise RunConfigError("Invalid run configuration:\n  - " + "\n  - ".join(problems))


def _params(fn: Callable[..., Any], exclude: set[str]) -> set[str]:
    return {p for p in inspect.signature(fn).parameters if p not in exclude}


def stage_options() -> dict[str, set[str]]:
    """Options each stage section accepts: the stage function's parameters, minus those `run` wires itself."""
    from ffnfusion.analyze import analyze
    from ffnfusion.bench.stage import bench
    from ffnfusion.eval.stage import evaluate
    from ffnfusion.fuse import fuse
    from ffnfusion.heal.settings import HealSettings
    from ffnfusion.heal.stage import heal
    from ffnfusion.plan.search import search_plan

    # force_plan: the run makes its own plan from its own model, so a mismatch is always an error there.
    wired = {"model", "out", "overwrite", "log", "show_progress", "progress", "callbacks", "command", "force_plan"}
    return {
        "analyze": _params(analyze, wired),
        "plan": _params(search_plan, {"analysis", "rescore", "costs", "fuse", "fixed_parallel"})
        | {"iterative", "costs", "recipe", "measure_recipes", "max_pairs"},
        "fuse": _params(fuse, wired | {"plan"}),
        "heal": {f.name for f in fields(HealSettings)} | _params(heal, wired | {"student", "teacher", "settings"}),
        "eval": _params(evaluate, wired | {"models", "reference", "labels"}),
        "bench": _params(bench, wired | {"compare", "plan"}),
    }


def _stage_functions() -> dict[str, Any]:
    from ffnfusion.analyze import analyze
    from ffnfusion.bench.stage import bench
    from ffnfusion.eval.stage import evaluate
    from ffnfusion.fuse import fuse
    from ffnfusion.heal.settings import HealSettings
    from ffnfusion.heal.stage import heal
    from ffnfusion.plan.search import search_plan

    return {
        "analyze": [analyze],
        "plan": [search_plan],
        "fuse": [fuse],
        "heal": [HealSettings, heal],
        "eval": [evaluate],
        "bench": [bench],
    }


def _type_problems(stage: str, options: dict[str, Any]) -> list[str]:
    """Options whose value does not have the type the stage function declares (e.g. `samples: many`)."""
    import typing

    from pydantic import TypeAdapter

    hints: dict[str, Any] = {}
    for fn in _stage_functions()[stage]:
        try:
            hints.update(typing.get_type_hints(fn))
        except Exception:  # an annotation that cannot be resolved here: leave those options to the stage
            continue
    problems = []
    for name, value in options.items():
        if name not in hints or (stage == "heal" and name == "data"):
            continue
        try:
            adapter = TypeAdapter(hints[name], config=ConfigDict(arbitrary_types_allowed=True))
        except Exception:  # a type pydantic cannot check (callables, tensors): left to the stage
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError:
            hint = hints[name]
            shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            problems.append(f"{stage}.{name}: {value!r} is not a valid {shown}")
    return problems


def _positive(problems: list[str], stage: str, options: dict[str, Any], least: dict[str, int]) -> None:
    for name, low in least.items():
        value = options.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < low:
            problems.append(f"{stage}.{name} must be at least {low} (got {value})")


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
