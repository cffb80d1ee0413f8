"""What `plan` chooses under which budget: PlanSettings, the one declaration of its options.

The budget and search options of `ffnfusion plan` (cli/plan.py) and run.yaml's `plan:` section are these fields;
each description is the option's help text. The options that re-measure on the model (--iterative's data,
samples, device, ...) belong to the verb alone: a run re-measures with its own model and the analysis' settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PlanSettings(BaseModel):
    """The attention budget, the fusion and parallel limits, the cost model and the recipe comparison."""

    model_config = ConfigDict(extra="forbid")

    remove_attention: int | None = Field(
        None, description="budget: this many attention sub-blocks removed in all (lowest KL first)"
    )
    max_kl: float | None = Field(None, description="budget: remove attention while the predicted KL stays <= this")
    target_depth: int | None = Field(
        None, description="remove attention until at most this many sub-blocks run in sequence"
    )
    max_group: int = Field(8, description="most FFNs in one fused group")
    fuse_last: bool = Field(False, description="also fuse the last FFN of each attention-free run")
    max_dependency: float | None = Field(None, description="never fuse two FFNs whose dependency M[i][j] exceeds this")
    parallel_threshold: float | None = Field(
        None, description="run intact layers as parallel blocks where block dependency <= this"
    )
    max_parallel: int = Field(2, description="most layers in one parallel block")
    costs: str | Path | None = Field(
        None, description="measured costs, JSON: attention_ms, ffn_ms, overhead_ms, fixed_ms"
    )
    iterative: bool = Field(
        False, description="re-score attention on the model after each removal (loads the model; slower)"
    )
    recipe: str | None = Field(
        None,
        description="with --target-depth: auto (the default there: lowest predicted KL), attention, fusion, parallel "
        "or layer-drop",
    )
    measure_recipes: bool = Field(
        False,
        description="with --target-depth: measure every recipe's KL on the model (loads it once) instead of predicting "
        "it",
    )
    max_pairs: int = Field(4, description="parallel recipe: try 1..this many parallel pairs")
    engines: list[str] | None = Field(
        None,
        description="the result must load in these engines (comma-separated: vllm, sglang, tensorrt-llm, llama.cpp, "
        "or all): recipes they cannot run (block-parallel groups) are left out",
    )

    @field_validator("engines", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """`engines: vllm, llama.cpp` in run.yaml, as on the command line."""
        if not isinstance(value, str):
            return value
        return [n.strip() for n in value.split(",") if n.strip()] or None

    def compares_recipes(self) -> bool:
        """Recipes are compared when asked for, or when a target depth is the only budget."""
        alone = self.target_depth is not None and self.remove_attention is None and self.max_kl is None
        return self.recipe is not None or self.measure_recipes or alone

    def check_recipes(self) -> None:
        if self.compares_recipes() and (
            self.target_depth is None or self.remove_attention is not None or self.max_kl is not None
        ):
            raise ValueError(
                "--recipe and --measure-recipes compare recipes at a --target-depth D; give --target-depth "
                "without --remove-attention or --max-kl."
            )

    def check_engines(self) -> list[str]:
        """The engines the result must load in (ENGINES' spelling); parallel blocks asked for where one cannot."""
        from ffnfusion.formats.engines import EXTERNAL, PARALLEL_GROUPS, engine_names

        engines = engine_names(self.engines or [])
        external = [e for e in engines if e in EXTERNAL]
        if external and self.parallel_threshold is not None and not self.compares_recipes():
            raise ValueError(
                f"--parallel-threshold makes block-parallel groups, which {', '.join(external)} cannot load "
                f"({PARALLEL_GROUPS}): leave out one of the two."
            )
        return engines

    def budgets(self) -> dict[str, Any]:
        """search_plan's keyword options (the budgets and limits)."""
        return self.model_dump(exclude={"costs", "iterative", "recipe", "measure_recipes", "max_pairs", "engines"})
