"""`ffnfusion run`: every stage in one folder, resumable (stage.py), configured by run.yaml (config.py)."""

from ffnfusion.pipeline.config import (
    HEAL_TOKENS_MIN,
    HEAL_TOKENS_PER_PARAMETER,
    OUTPUTS,
    STAGES,
    RunConfig,
    RunConfigError,
    stage_options,
)
from ffnfusion.pipeline.stage import Run, run

__all__ = [
    "HEAL_TOKENS_MIN", "HEAL_TOKENS_PER_PARAMETER", "OUTPUTS", "STAGES", "Run", "RunConfig", "RunConfigError", "run",
    "stage_options",
]  # fmt: skip
