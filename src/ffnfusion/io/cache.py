"""Where ffnfusion caches what it can recompute (self-generated text and corpora, the reference's eval scores):
$FFNFUSION_CACHE or ~/.cache/ffnfusion."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("FFNFUSION_CACHE", Path.home() / ".cache" / "ffnfusion"))
