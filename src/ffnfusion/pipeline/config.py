"""`ffnfusion run`'s configuration: run.yaml and command-line overrides, every stage section validated by that
stage's settings model (the declaration its CLI options are made from), and the run's defaults (stages, what each
reads and writes, the heal budget)."""

from __future__ import annotations

import hashlib
import json
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


def stage_models() -> dict[str, tuple[type[BaseModel], ...]]:
    """The settings models each stage section is validated by: the stage's own declaration of its options.

    What `run` wires itself (the model, the output, progress and logging, --force-plan, heal's --resume and
    checkpoint folder) is no field of them, so a section cannot set it.
    """
    from ffnfusion.analyze.settings import AnalyzeSettings
    from ffnfusion.bench.settings import BenchSettings
    from ffnfusion.eval.settings import EvalSettings
    from ffnfusion.fuse_settings import FuseSettings
    from ffnfusion.heal.settings import HealRun, HealSettings
    from ffnfusion.plan.settings import PlanSettings

    return {
        "analyze": (AnalyzeSettings,),
        "plan": (PlanSettings,),
        "fuse": (FuseSettings,),
        "heal": (HealSettings, HealRun),
        "eval": (EvalSettings,),
        "bench": (BenchSettings,),
    }


def stage_options() -> dict[str, set[str]]:
    """Options each stage section accepts: its settings models' fields."""
    return {stage: {f for m in models for f in m.model_fields} for stage, models in stage_models().items()}


def _type_problems(stage: str, options: dict[str, Any]) -> list[str]:
    """Options whose value does not have the type the stage's settings declare (e.g. `samples: many`)."""
    problems = []
    for model in stage_models()[stage]:
        given = {k: v for k, v in options.items() if k in model.model_fields}
        try:
            model.model_validate(given, strict=True)
        except ValidationError as e:
            for err in e.errors():
                name = str(err["loc"][0]) if err["loc"] else ""
                if err["type"] == "missing" or name not in given:  # `run` supplies the required ones (heal.data)
                    continue
                hint = model.model_fields[name].annotation
                shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
                problem = f"{stage}.{name}: {given[name]!r} is not a valid {shown}"
                if problem not in problems:
                    problems.append(problem)
    return problems


def _positive(problems: list[str], stage: str, options: dict[str, Any], least: dict[str, int]) -> None:
    for name, low in least.items():
        value = options.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < low:
            problems.append(f"{stage}.{name} must be at least {low} (got {value})")


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
