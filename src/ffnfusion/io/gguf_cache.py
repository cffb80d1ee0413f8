"""A GGUF's dequantised weights, kept as a safetensors folder in the cache.

transformers parses the whole GGUF (metadata, every tensor name) and dequantises it on every load: about 20 s for a
135M model on a CPU core, paid again by each stage of a run and each process. The fp32 copy loads in about a second
and holds the same values. Copies are keyed by the file's path, size and modification time (a replaced file gets a
new one) and by the transformers version that dequantised it; models whose copy would pass GGUF_CACHE_MAX_BYTES,
or every model when FFNFUSION_GGUF_CACHE=0, are read from the GGUF each time.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from transformers import AutoModelForCausalLM

from ffnfusion.io.cache import default_cache_dir

if TYPE_CHECKING:
    from ffnfusion.io.source import ModelSource

# fp32 is 4 bytes a parameter: up to about 2B parameters. Larger GGUFs load directly; their stages run long enough
# that the parse no longer matters, and a silent 30 GB copy would.
GGUF_CACHE_MAX_BYTES = 8 * 2**30


def dequantised_model(source: ModelSource, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """SOURCE's GGUF loaded through transformers as a plain model that can save itself.

    GGUF-loaded models carry a quantizer and cannot `save_pretrained`, so the weights are copied into a fresh model
    of the same class, with the quantizer's settings dropped from the config (else transformers would read the saved
    weights as GGUF again).
    """
    loaded = AutoModelForCausalLM.from_pretrained(
        source.folder, dtype=dtype, config=source.config(), **source.load_kwargs
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config).to(dtype)
    fresh.load_state_dict(loaded.state_dict())
    return fresh.eval()


def cached_weights_folder(source: ModelSource, cache_dir: str | Path | None = None) -> Path | None:
    """The folder holding SOURCE's dequantised weights (made on first use), or None where the cache does not apply."""
    if not source.gguf_file or os.environ.get("FFNFUSION_GGUF_CACHE", "1") == "0":
        return None
    path, size, mtime_ns = source._gguf_identity()
    key = hashlib.sha256(f"{path}\0{size}\0{mtime_ns}\0{transformers.__version__}".encode()).hexdigest()[:32]
    root = Path(cache_dir or default_cache_dir()) / "gguf_weights"
    folder = root / key
    if (folder / "config.json").is_file():
        return folder
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(source.config()).parameters())
    if parameters * 4 > GGUF_CACHE_MAX_BYTES:
        return None
    root.mkdir(parents=True, exist_ok=True)
    # Written beside its final place and renamed when complete, so a crash or a second process writing the same
    # copy at once never leaves a half-written folder under the key.
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        model = dequantised_model(source)
        model.save_pretrained(staging)
        (staging / "SOURCE.txt").write_text(f"dequantised from {path} ({size} bytes, mtime_ns {mtime_ns})\n")
        del model
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same copy first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
