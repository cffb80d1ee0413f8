"""Analysis stage: which sub-blocks matter, and which FFNs depend on each other (see `analyze`).

The stage itself loads on first use, so `analyze.settings` (what the command line reads) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from ffnfusion.formats.analysis import SCHEMA_VERSION, Analysis, AnalysisError, load_analysis

__all__ = ["SCHEMA_VERSION", "Analysis", "AnalysisError", "AnalyzeResult", "analyze", "load_analysis", "parse_layers"]

_LAZY = {
    "AnalyzeResult": "ffnfusion.analyze.stage",
    "analyze": "ffnfusion.analyze.stage",
    "parse_layers": "ffnfusion.analyze.stage",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ffnfusion.analyze' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
