"""bench.json, written by the `bench` stage and read by `report`: latency and throughput of each model.

Files from before `format` existed are recognised by their keys, so `bench --out` may still replace them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ffnfusion.io.output import json_format_is

BENCH_FORMAT = "ffnfusion-bench"
BENCH_VERSION = 1


def is_bench_file(path: Path) -> bool:
    """Whether `path` holds an earlier bench.json (older ones carry no `format`: recognised by their keys)."""
    if json_format_is(BENCH_FORMAT)(path):
        return True
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and {"date", "command", "torch"} <= raw.keys() and ("models" in raw or "tp" in raw)
