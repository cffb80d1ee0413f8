"""A GGUF's dequantised weights, kept as a safetensors folder in the cache, with its parsed config and tokenizer.

transformers parses the whole GGUF (metadata, every tensor name) and dequantises it on every load: about 15 s for a
135M model on a CPU core, paid again by each stage of a run, and another 11 s per process for the config and the
tokenizer. The copy loads in a fraction of a second and holds the same values. Copies are keyed by the file's path,
size and modification time (a replaced file gets a new one) and by the transformers version that dequantised it;
models whose copy would pass GGUF_CACHE_MAX_BYTES, or every model when FFNFUSION_GGUF_CACHE=0, are read from the
GGUF each time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ffnfusion.io.cache import default_cache_dir

if TYPE_CHECKING:
    from ffnfusion.io.source import ModelSource

# fp32 is 4 bytes a parameter: up to about 2B parameters. Larger GGUFs load directly; their stages run long enough
# that the parse no longer matters, and a silent 30 GB copy would.
GGUF_CACHE_MAX_BYTES = 8 * 2**30


def dequantised_model(source: ModelSource) -> torch.nn.Module:
    """SOURCE's GGUF loaded through transformers (fp32) as a plain model that can save itself.

    GGUF-loaded models carry a quantizer and cannot `save_pretrained`, so the weights are copied into a fresh model
    of the same class, with the quantizer's settings dropped from the config (else transformers would read the saved
    weights as GGUF again).
    """
    loaded = AutoModelForCausalLM.from_pretrained(
        source.folder, dtype=torch.float32, config=source.config(), **source.load_kwargs
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    return fresh.eval()


CONFIG_FILE, TOKENIZER_FOLDER = "gguf_config.json", "tokenizer"


def _enabled() -> bool:
    return os.environ.get("FFNFUSION_GGUF_CACHE", "1") != "0"


def _folder(path: str, size: int, mtime_ns: int) -> Path:
    key = hashlib.sha256(f"{path}\0{size}\0{mtime_ns}\0{transformers.__version__}".encode()).hexdigest()[:32]
    return default_cache_dir() / "gguf_weights" / key


def cached_metadata(auto_class: Any, path: str, size: int, mtime_ns: int) -> Any | None:
    """The GGUF's config (auto_class AutoConfig) or tokenizer (AutoTokenizer) as parsed when its copy was made, or
    None when there is no copy yet. The config is kept as parsed (not the saved model's config.json, which names
    another folder and a dtype), so whatever hashes it sees the same config with the cache or without."""
    if not _enabled():
        return None
    folder = _folder(path, size, mtime_ns)
    if auto_class is AutoConfig and (folder / CONFIG_FILE).is_file():
        parsed = json.loads((folder / CONFIG_FILE).read_text())
        return CONFIG_MAPPING[parsed["model_type"]].from_dict(parsed)
    if auto_class is AutoTokenizer and (folder / TOKENIZER_FOLDER).is_dir():
        return AutoTokenizer.from_pretrained(folder / TOKENIZER_FOLDER)
    return None


def cached_weights_folder(source: ModelSource) -> Path | None:
    """The folder holding SOURCE's dequantised weights (made on first use), or None where the cache does not apply."""
    if not source.gguf_file or not _enabled():
        return None
    path, size, mtime_ns = source._gguf_identity()
    folder = _folder(path, size, mtime_ns)
    root, key = folder.parent, folder.name
    if (folder / "config.json").is_file():
        return folder
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(source.config()).parameters())
    if parameters * 4 > GGUF_CACHE_MAX_BYTES:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Written beside its final place and renamed when complete, so a crash or a second process writing the
        # same copy at once never leaves a half-written folder under the key.
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    except OSError:  # an unwritable cache only costs speed: read the GGUF directly
        return None
    try:
        model = dequantised_model(source)
        try:
            _write_copy(model, source, staging, f"dequantised from {path} ({size} bytes, mtime_ns {mtime_ns})\n")
        except OSError:  # e.g. a full disk, as above
            return None
        del model
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same copy first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_copy(model: torch.nn.Module, source: ModelSource, folder: Path, provenance: str) -> None:
    model.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(source.config().to_json_string(use_diff=False))
    tokenizer = source.tokenizer()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / TOKENIZER_FOLDER)
    (folder / "SOURCE.txt").write_text(provenance)
