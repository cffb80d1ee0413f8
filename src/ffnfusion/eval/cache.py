"""The reference model's scores, kept from one eval to the next.

Every `run` scores the original beside the fused and healed models, on the same text and tasks; so does every
variant of a study. The original's scores do not change between those evals, and its tasks are most of an eval's
time, so they are stored under a key of everything that decides them: the weights' content, the token stream of the
text, the task files, and the scoring settings. Any change to one of them is a new key, never a stale score.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ffnfusion.io.cache import default_cache_dir
from ffnfusion.io.output import write_atomic

CACHE_VERSION = 1
# Paths: the key holds digests of what they hold instead (a moved file is the same text, an edited one is not).
_NOT_KEYED = ("data", "task_data_dir")
_SCORES = ("perplexity", "fidelity", "tasks")


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, shape, dtype, float64 sum and norm: any change to any weight changes it.

    Reduced on the model's own device, without a float64 copy of any tensor (an 8B model takes a fraction of a
    second on a GPU)."""
    names, stats = [], []
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            names.append(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}")
            if tensor.is_floating_point():
                stats += [tensor.sum(dtype=torch.float64), torch.linalg.vector_norm(tensor, dtype=torch.float64)]
            else:
                stats += [tensor.sum(dtype=torch.float64), tensor.abs().sum(dtype=torch.float64)]
    values = torch.stack([s.cpu() for s in stats]).tolist() if stats else []
    return hashlib.sha256(json.dumps([names, values]).encode()).hexdigest()


def stream_digest(stream: torch.Tensor | None) -> str | None:
    """sha256 of the token ids scored for perplexity (the text as this tokenizer sees it)."""
    if stream is None:
        return None
    return hashlib.sha256(stream.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def files_digest(folder: str | Path | None) -> str | None:
    """sha256 of every file's relative path, size and modification time under the task data folder."""
    if folder is None:
        return None
    root = Path(folder)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    entries = [f"{p.relative_to(root)}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def score_key(weights: str, settings: dict[str, Any], text: str | None, task_files: str | None) -> str:
    """The key of one model's scores: its weights, the scored token stream, the task files, the settings."""
    keyed = {k: v for k, v in settings.items() if k not in _NOT_KEYED}
    payload = {"version": CACHE_VERSION, "weights": weights, "text": text, "task_files": task_files, **keyed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _path(key: str, cache_dir: Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "eval_scores" / f"{key}.json"


def load_scores(key: str, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """The stored scores (perplexity, fidelity, tasks) under `key`, or None (never stored, or unreadable)."""
    path = _path(key, cache_dir)
    try:
        scores = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return scores if isinstance(scores, dict) and set(scores) == set(_SCORES) else None


def store_scores(key: str, row: dict[str, Any], cache_dir: Path | None = None) -> None:
    write_atomic(_path(key, cache_dir), json.dumps({k: row[k] for k in _SCORES}, indent=1) + "\n")
