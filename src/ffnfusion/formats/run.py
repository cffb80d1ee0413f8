"""run.json, the state file of `ffnfusion run`: the configuration and, per stage, the key of its inputs.

Written by the pipeline after every stage and read when a run is resumed. Files from before `format` existed are
read as version 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN_FORMAT = "ffnfusion-run"
RUN_VERSION = 1


class RunStateError(ValueError):
    """A run.json that is not the state of an ffnfusion run this version can resume."""


def load_run_state(path: Path) -> dict[str, Any]:
    """The state in `path`, or a fresh one when the file does not exist."""
    if not path.is_file():
        return {"format": RUN_FORMAT, "version": RUN_VERSION, "stages": {}}
    try:
        state = json.loads(path.read_text())
    except ValueError as e:
        raise RunStateError(f"{path} is not valid JSON ({e}); delete it to start the run afresh.") from None
    if not isinstance(state, dict) or state.get("format", RUN_FORMAT) != RUN_FORMAT or "stages" not in state:
        raise RunStateError(f"{path} is not the state file of an ffnfusion run; choose another run folder.")
    if state.get("version", RUN_VERSION) > RUN_VERSION:
        raise RunStateError(f"{path} was written by a newer ffnfusion (version {state['version']}); upgrade it.")
    return {**state, "format": RUN_FORMAT, "version": RUN_VERSION}
