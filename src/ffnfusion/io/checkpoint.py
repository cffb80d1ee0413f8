"""Reading safetensors checkpoints lazily and writing fused checkpoints atomically.

A checkpoint is written into a hidden temporary folder beside the destination and renamed into place only when
complete, so an interrupted run never leaves a half-written model under the final name.

Models larger than memory are streamed: the reader serves one tensor at a time, and the writer lays out every shard
(header and offsets) from the tensors' names, shapes and dtypes before any data exists, then writes each tensor into
its place as it is produced (the shard writers live in `io.shards`). The files are byte-identical to what
safetensors' save_file writes for the same shards.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ffnfusion.io.output import check_output_dir, write_marker
from ffnfusion.io.shards import DTYPE_FROM_CODE, INDEX_NAME, TensorInfo, stream_safetensors, write_safetensors
from ffnfusion.modeling import modeling_decilm
from ffnfusion.modeling.modeling_decilm import DeciLMConfig

MODELING_FILE = Path(modeling_decilm.__file__)


class CheckpointError(ValueError):
    """A checkpoint on disk is missing files, truncated, or disagrees with its own index or config."""


def _safe_open(path: Path) -> Any:
    # The mmap backend hands out tensors that share the mapping, and every page touched stays in this process's RSS
    # while the file is mapped (safetensors 0.8 keeps it mapped after the handle is closed), so streaming a model
    # larger than RAM would report, and under pressure cost, the whole model. pread(2) gives ordinary memory that is
    # freed with the tensor. Releases before 0.8 have only mmap.
    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:
        return safe_open(path, framework="pt")


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid index file ({e}): download or write it again.") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index} has no 'weight_map' of tensor name -> shard file: download or write it again.")
    return weight_map


class _ShardReader:
    """Tensor data of one safetensors file read with os.preadv, which releases the GIL.

    safetensors' own reader holds the GIL while it copies, so a read-ahead thread would stall the thread that
    launches GPU work; here the copy runs in the kernel while Python goes on. The header was already validated by
    safe_open; the bytes are the file's own, so the tensors are exactly what safetensors returns.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        self.data_start = 8 + size
        self.entries = {k: v for k, v in header.items() if k != "__metadata__" and v.get("dtype") in DTYPE_FROM_CODE}

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        # Reading straight into (cached) pinned memory saves a copy and the page faults of fresh memory when the
        # tensor goes on to a GPU.
        buf = torch.empty(end - start, dtype=torch.uint8, pin_memory=pin_memory)
        view = memoryview(buf.numpy())
        offset = self.data_start + start
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while view:
                got = os.preadv(fd, [view], offset)
                if got == 0:
                    raise CheckpointError(
                        f"{self.path} ends inside tensor {name!r}: the file is truncated; download or write it again."
                    )
                view = view[got:]
                offset += got
        finally:
            os.close(fd)
        return buf.view(DTYPE_FROM_CODE[entry["dtype"]]).reshape(entry["shape"])


class LazySafetensors:
    """name -> tensor over one or many safetensors files, reading one tensor at a time.

    Every shard's header is read and checked against the index on construction, so a missing or truncated shard,
    or an index naming a tensor its shard lacks, is reported before any work is done. Tensor data is read only in
    `get`, into memory owned by the returned tensor (nothing stays resident once the caller drops it).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._handles: dict[str, Any] = {}
        self._readers: dict[str, _ShardReader] = {}
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = _read_index(index)
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder} holds no .safetensors files.")
            weight_map = {}
            for f in files:
                for name in self._open(f.name).keys():  # noqa: SIM118 (safe_open is not iterable)
                    weight_map[name] = f.name
        by_file: dict[str, list[str]] = {}
        for name, filename in weight_map.items():
            by_file.setdefault(filename, []).append(name)
        missing = sorted(f for f in by_file if not (self.folder / f).is_file())
        if missing:
            raise CheckpointError(
                f"{self.folder}: shards named in {INDEX_NAME} are missing: {', '.join(missing)}. "
                "Download or copy the complete checkpoint."
            )
        for filename, names in by_file.items():
            present = set(self._open(filename).keys())
            if lacking := [n for n in names if n not in present]:
                shown = ", ".join(lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
                raise CheckpointError(
                    f"{index} places {len(lacking)} tensor(s) in {filename} that the shard does not hold ({shown}); "
                    "the index and the shards come from different versions: download or write the checkpoint again."
                )
        self.weight_map: dict[str, str] = weight_map

    def _open(self, filename: str) -> Any:
        if filename not in self._handles:
            try:
                self._handles[filename] = _safe_open(self.folder / filename)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{self.folder / filename} is not a readable safetensors file ({e}); "
                    "it may be truncated: download or write it again."
                ) from None
        return self._handles[filename]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, name: str) -> Any:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: no tensor named {name!r} in the checkpoint.")
        return self._open(self.weight_map[name])

    def get(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        """The tensor, in memory it owns; pin_memory=True reads it into page-locked memory (for a GPU copy)."""
        handle = self._handle(name)
        filename = self.weight_map[name]
        if filename not in self._readers:
            self._readers[filename] = _ShardReader(self.folder / filename)
        reader = self._readers[filename]
        if name in reader.entries:
            return reader.read(name, pin_memory)
        try:  # a dtype this reader does not decode itself
            return handle.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.folder / filename}: cannot read {name!r} ({e}).") from None

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor with `name`'s shape and dtype, from the shard header alone."""
        view = self._handle(name).get_slice(name)
        code = view.get_dtype()
        if code not in DTYPE_FROM_CODE:
            raise CheckpointError(f"{self.folder}: tensor {name!r} has dtype {code}, which ffnfusion cannot process.")
        return torch.empty(view.get_shape(), dtype=DTYPE_FROM_CODE[code], device="meta")


def config_json(config_kwargs: dict[str, Any]) -> dict[str, Any]:
    """config.json content for a fused model (DeciLMConfig.to_dict adds the keys engines and auto_map need)."""
    return DeciLMConfig(**config_kwargs).to_dict()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_output_dir(
    out: str | Path, verb: str, inputs: Iterable[str | Path | None] = (), overwrite: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, marked as the output of `ffnfusion VERB`.

    `check_output_dir` decides whether `out` may be replaced (never an input, never an unmarked folder).
    """
    out = check_output_dir(out, verb, inputs, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.partial-"
    # A run killed with SIGKILL (or by the OOM killer) cannot clean up, and its partial folder may hold hundreds of
    # GB: remove those left by processes that no longer exist.
    for stale in out.parent.iterdir():
        pid = stale.name[len(prefix) :]
        if stale.name.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, verb)
        # Asked again: something may have appeared under the output's name while the stage ran.
        check_output_dir(out, verb, inputs, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _name_tokenizer_class(folder: Path, tokenizer: Any) -> None:
    """Make sure tokenizer_config.json names its tokenizer class.

    transformers has no tokenizer registered for model_type "nemotron-nas", so AutoTokenizer must find the class in
    the tokenizer files; some tokenizers save without it.
    """
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if not data.get("tokenizer_class"):
        data["tokenizer_class"] = type(tokenizer).__name__
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_fused_checkpoint(
    folder: Path,
    config_kwargs: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer: Any | None = None,
    generation_config: Any | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: dict[str, str] | None = None,
    infos: Sequence[TensorInfo] | None = None,
) -> int:
    """Write a complete loadable checkpoint into `folder` (inside atomic_output_dir); returns the parameter count.

    With `infos` (every tensor's name, shape and dtype, in stream order) the weights are streamed one tensor at a
    time; without, up to one shard is held in memory.
    """
    if infos is None:
        params = write_safetensors(folder, tensors, max_shard_bytes)
    else:
        params = stream_safetensors(folder, infos, tensors, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config_json(config_kwargs), indent=2) + "\n")
    shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        _name_tokenizer_class(folder, tokenizer)
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
