"""Reading safetensors checkpoints lazily and writing fused checkpoints atomically.

A checkpoint is written into a hidden temporary folder beside the destination and renamed into place only when
complete, so an interrupted run never leaves a half-written model under the final name.

Models larger than memory are streamed: the reader serves one tensor at a time, and the writer lays out every shard
(header and offsets) from the tensors' names, shapes and dtypes before any data exists, then writes each tensor into
its place as it is produced. The files are byte-identical to what safetensors' save_file writes for the same shards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ffnfusion.io.output import check_output_dir, write_marker
from ffnfusion.modeling import modeling_decilm
from ffnfusion.modeling.modeling_decilm import DeciLMConfig

MODELING_FILE = Path(modeling_decilm.__file__)


INDEX_NAME = "model.safetensors.index.json"

# torch dtype -> safetensors dtype code, in the order safetensors' serializer lays a file's tensors out (descending
# order of its Dtype enum, then by name): writing the same order is what makes streamed files byte-identical.
_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_DTYPE_CODES)}
_DTYPE_FROM_CODE = {code: dtype for dtype, code in _DTYPE_CODES.items()}


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
        self.entries = {
            k: v for k, v in header.items() if k != "__metadata__" and v.get("dtype") in _DTYPE_FROM_CODE
        }

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
        return buf.view(_DTYPE_FROM_CODE[entry["dtype"]]).reshape(entry["shape"])


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
        if code not in _DTYPE_FROM_CODE:
            raise CheckpointError(f"{self.folder}: tensor {name!r} has dtype {code}, which ffnfusion cannot process.")
        return torch.empty(view.get_shape(), dtype=_DTYPE_FROM_CODE[code], device="meta")


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


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint writer needs to know about a tensor before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorInfo:
        return cls(name, tuple(tensor.shape), tensor.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def safetensors_header(infos: Iterable[TensorInfo], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The bytes safetensors' serializer puts before the data, and the file offset of each tensor's data.

    Mirrors the serializer: tensors ordered by dtype (its enum order, descending) then name; compact JSON with
    `__metadata__` first; padded with spaces so the data starts 8-byte aligned.
    """
    infos = list(infos)
    if unknown := sorted({str(i.dtype) for i in infos if i.dtype not in _DTYPE_CODES}):
        raise ValueError(f"safetensors cannot store dtypes {unknown}.")
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    starts: dict[str, int] = {}
    pos = 0
    for info in sorted(infos, key=lambda i: (_DTYPE_RANK[i.dtype], i.name)):
        header[info.name] = {
            "dtype": _DTYPE_CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [pos, pos + info.nbytes],
        }
        starts[info.name] = pos
        pos += info.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    prefix = len(text).to_bytes(8, "little") + text
    return prefix, {name: len(prefix) + start for name, start in starts.items()}


def plan_shards(infos: Iterable[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Tensors split in stream order into shards of at most max_shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def shard_file_name(index: int, total: int) -> str:
    return "model.safetensors" if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _write_index(folder: Path, weight_map: dict[str, str], params: int) -> None:
    index = {"metadata": {"total_parameters": params}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def write_safetensors(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> int:
    """The in-memory writer: shards of at most max_shard_bytes, each saved with safetensors' own save_file.

    Holds up to one shard in memory. stream_safetensors writes the same bytes holding one tensor at a time; this
    writer is the reference it is tested against and the fallback when tensor shapes are not known up front.
    Returns the number of parameters written.
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
        final = shard_file_name(i, total)
        (folder / f"shard-{i:05d}.safetensors.tmp").rename(folder / final)
        weight_map.update({k: final for k in shard})
    if total > 1:
        _write_index(folder, weight_map, params)
    return params


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    # One write(2) moves at most ~2 GiB on Linux, less than a 70B model's embedding: loop until all is written.
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _tensor_bytes(tensor: torch.Tensor) -> Any:
    # Raw little-endian bytes without a copy when the tensor is already contiguous on the CPU (numpy has no bfloat16,
    # hence the uint8 view).
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def stream_safetensors(
    folder: Path, infos: Sequence[TensorInfo], tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> int:
    """Write `tensors`, which must arrive in the order and with the shapes of `infos`, holding one at a time.

    Shards, headers and offsets are fixed from `infos` before any data exists, so each tensor goes straight to its
    place in its shard file: the files are byte-identical to write_safetensors' for the same stream.
    Returns the number of parameters written.
    """
    shards = plan_shards(infos, max_shard_bytes)
    stream = iter(tensors)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        filename = shard_file_name(i, len(shards))
        header, starts = safetensors_header(shard, {"format": "pt"})
        fd = os.open(folder / filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, header, 0)
            for info in shard:
                item = next(stream, None)
                if item is None:
                    raise RuntimeError(f"the tensor stream ended before {info.name!r}, which the plan of tensors names")
                name, tensor = item
                del item
                if TensorInfo.of(name, tensor) != info:
                    raise RuntimeError(f"the tensor stream gave {TensorInfo.of(name, tensor)}, expected {info}")
                _pwrite_all(fd, _tensor_bytes(tensor), starts[name])
                # Drop the reference now: otherwise it lives on while the next (possibly large) tensor is computed.
                del tensor
                weight_map[name] = filename
        finally:
            os.close(fd)
    if (extra := next(stream, None)) is not None:
        raise RuntimeError(f"the tensor stream gave {extra[0]!r} after every tensor the plan of tensors names")
    params = sum(info.numel for info in infos)
    if len(shards) > 1:
        _write_index(folder, weight_map, params)
    return params


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
