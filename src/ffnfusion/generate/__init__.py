"""`ffnfusion generate`: the teacher writes a distillation corpus (token shards) with the graph-captured engine.

The model runs in the project's decode engine (static KV cache, CUDA graphs, Triton kernels on GPUs) with sampling
and continuous batching (`engine/sampling.py`): every slot samples its own document and is refilled with a new
prompt as soon as it ends. Documents are packed back to back into fixed-length sequences and written as
memory-mapped shards (`formats/corpus.py`); each shard is seeded on its own, so a killed run resumes at the next
shard and ends with the same corpus as an uninterrupted one. `--data self` of analyze/heal/run uses the same code.

Modules: `settings` (what decides a corpus), `prompts` (BOS, chat instructions, a file), `shards` (the loop,
diversity, model and engine helpers), `stage` (the verb and the `--data self` entry point). The stage loads on
first use, so `generate.settings` (what the command line reads) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from ffnfusion.generate.prompts import PromptError, PromptSource
from ffnfusion.generate.settings import GenerateError, GenerateSettings, parse_tokens

__all__ = [
    "GenerateError",
    "GenerateSettings",
    "GenerateSummary",
    "PromptError",
    "PromptSource",
    "generate",
    "parse_tokens",
    "self_corpus_tokens",
]

_LAZY = ("GenerateSummary", "generate", "self_corpus_tokens")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ffnfusion.generate' has no attribute {name!r}")
    value = getattr(importlib.import_module("ffnfusion.generate.stage"), name)
    globals()[name] = value
    return value
