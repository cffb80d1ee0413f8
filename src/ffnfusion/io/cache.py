"""Where ffnfusion caches what it can recompute: $FFNFUSION_CACHE or ~/.cache/ffnfusion, one folder per kind
(CACHE_KINDS); `ffnfusion cache` lists and clears them."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

# Every kind of entry, by its folder under the cache, and what it holds.
CACHE_KINDS = {
    "gguf_weights": "dequantised copies of .gguf models (safetensors, config, tokenizer)",
    "self_corpus": "token corpora the models wrote for `--data self`",
    "self_text": "texts the models wrote where the sampling engine cannot run, and run's held-out text",
    "eval_scores": "the reference model's evaluation scores",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("FFNFUSION_CACHE", Path.home() / ".cache" / "ffnfusion"))


@dataclass
class CacheUsage:
    kind: str
    entries: int  # files or folders directly inside the kind's folder
    bytes: int


def cache_usage(cache_dir: Path | None = None) -> list[CacheUsage]:
    """Entries and bytes of every kind, in CACHE_KINDS order (zero for a kind with no folder)."""
    root = Path(cache_dir or default_cache_dir())
    return [_usage(root, kind) for kind in CACHE_KINDS]


def clear_cache(kinds: list[str], cache_dir: Path | None = None) -> int:
    """Delete the folders of `kinds` (names from CACHE_KINDS) and return the bytes freed. Only those folders are
    touched, so a cache location shared with other files keeps them. Everything in them can be recomputed."""
    unknown = sorted(set(kinds) - set(CACHE_KINDS))
    if unknown:
        raise ValueError(f"unknown cache kinds {unknown}; known: {', '.join(CACHE_KINDS)} (or all)")
    root = Path(cache_dir or default_cache_dir())
    freed = 0
    for kind in dict.fromkeys(kinds):  # each once, in the order given
        if (root / kind).is_dir():
            freed += _usage(root, kind).bytes
            shutil.rmtree(root / kind)
    return freed


def _usage(root: Path, kind: str) -> CacheUsage:
    folder = root / kind
    if not folder.is_dir():
        return CacheUsage(kind, 0, 0)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return CacheUsage(kind, sum(1 for _ in folder.iterdir()), size)
