"""Reading safetensors checkpoints lazily and writing fused checkpoints atomically.

A checkpoint is written into a hidden temporary folder beside the destination and renamed into place only when
complete, so an interrupted run never leaves a half-written model under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ffnfusion.modeling import modeling_decilm
from ffnfusion.modeling.modeling_decilm import DeciLMConfig

MODELING_FILE = Path(modeling_decilm.__file__)


class CheckpointError(ValueError):
    """A checkpoint on disk is missing files, truncated, or disagrees with its own index or config."""


class LazySafetensors:
    """name -> tensor over one or many safetensors files, opening each shard only when a tensor in it is asked for."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._handles: dict[str, Any] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder} holds no .safetensors files.")
            weight_map = {}
            for f in files:
                for name in self._open(f.name).keys():  # noqa: SIM118 (safe_open is not iterable)
                    weight_map[name] = f.name
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{self.folder}: shards named in the index are missing: {', '.join(missing)}")
        self.weight_map: dict[str, str] = weight_map

    def _open(self, filename: str) -> Any:
        if filename not in self._handles:
            try:
                self._handles[filename] = safe_open(self.folder / filename, framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{self.folder / filename} is not a readable safetensors file ({e}); "
                    "it may be truncated: download or write it again."
                ) from None
        return self._handles[filename]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: no tensor named {name!r} in the checkpoint.")
        handle = self._open(self.weight_map[name])
        try:
            return handle.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(
                f"{self.folder / self.weight_map[name]}: tensor {name!r} named in the index is not in the shard ({e})."
            ) from None


def config_json(config_kwargs: dict[str, Any]) -> dict[str, Any]:
    """config.json content for a fused model (DeciLMConfig.to_dict adds the keys engines and auto_map need)."""
    return DeciLMConfig(**config_kwargs).to_dict()


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `out`. Refuses a non-empty `out` unless overwrite."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_safetensors(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> int:
    """Write tensors into shards of at most max_shard_bytes (plus an index when there are several).

    Tensors arrive one block at a time, so a shard is flushed as soon as it is full and never more than one
    shard is held in memory. Returns the number of parameters written.
    """
    shards: list[dict[str, str]] = []
    current: dict[str, torch.Tensor] = {}
    size = params = 0

    def flush() -> None:
        nonlocal current, size
        name = f"shard-{len(shards):05d}.safetensors.tmp"
        save_file(current, folder / name, metadata={"format": "pt"})
        shards.append({k: name for k in current})
        current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.detach().contiguous().cpu()
        size += nbytes
        params += tensor.numel()
    if current or not shards:
        flush()
    total = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (folder / next(iter(shard.values()))).rename(folder / final)
        weight_map.update({k: final for k in shard})
    if total > 1:
        index = {"metadata": {"total_parameters": params}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return params


def write_fused_checkpoint(
    folder: Path,
    config_kwargs: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer: Any | None = None,
    generation_config: Any | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: dict[str, str] | None = None,
) -> int:
    """Write a complete loadable checkpoint into `folder` (inside atomic_output_dir); returns the parameter count."""
    params = write_safetensors(folder, tensors, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config_json(config_kwargs), indent=2) + "\n")
    shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return params


def verify_fused_checkpoint(folder: str | Path) -> None:
    """Raise CheckpointError when a fused checkpoint's tensors disagree with what its config.json describes."""
    from ffnfusion.modeling.modeling_decilm import DeciLMForCausalLM

    folder = Path(folder)
    config = DeciLMConfig.from_pretrained(folder)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DeciLMForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    lazy = LazySafetensors(folder)
    found = {}
    for name in lazy.weight_map:
        handle = lazy._open(lazy.weight_map[name])
        found[name] = tuple(handle.get_slice(name).get_shape())
    problems = [f"missing tensor {k}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected tensor {k}" for k in sorted(found.keys() - expected.keys() - {"lm_head.weight"})]
    problems += [
        f"{k} has shape {list(found[k])}, config.json implies {list(v)}"
        for k, v in expected.items()
        if k in found and found[k] != v
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(
            f"{folder}: the weights do not match config.json ({shown}). The config was edited or the weights "
            "come from another model: re-run `ffnfusion fuse` to write a consistent checkpoint."
        )
