"""Inference benchmark: a graph-captured static-cache decode engine, and the `bench` stage built on it.

The engine and the stage load on first use, so `bench.settings` (what the command line reads) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SHAPES", "DecodeEngine", "Timing", "bench", "ffn_group_probe", "random_model"]

_LAZY = {
    "DecodeEngine": "ffnfusion.engine.decode",
    "Timing": "ffnfusion.engine.decode",
    "SHAPES": "ffnfusion.bench.shapes",
    "random_model": "ffnfusion.bench.shapes",
    "bench": "ffnfusion.bench.stage",
    "ffn_group_probe": "ffnfusion.bench.timing",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ffnfusion.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
