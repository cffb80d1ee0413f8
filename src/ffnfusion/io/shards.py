"""safetensors shards as safetensors itself writes them: dtype codes, headers, shard layout, and two writers.

Input: (name, tensor) pairs, and for the streamed writer every tensor's name, shape and dtype up front. Output:
shard files (and an index when there are several) byte-identical to safetensors' save_file for the same shards.
Used by the checkpoint writer in `io.checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"

# torch dtype -> safetensors dtype code, in the order safetensors' serializer lays a file's tensors out (descending
# order of its Dtype enum, then by name): writing the same order is what makes streamed files byte-identical.
DTYPE_CODES: dict[torch.dtype, str] = {
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
DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_CODES)}
DTYPE_FROM_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


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
    if unknown := sorted({str(i.dtype) for i in infos if i.dtype not in DTYPE_CODES}):
        raise ValueError(f"safetensors cannot store dtypes {unknown}.")
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    starts: dict[str, int] = {}
    pos = 0
    for info in sorted(infos, key=lambda i: (DTYPE_RANK[i.dtype], i.name)):
        header[info.name] = {
            "dtype": DTYPE_CODES[info.dtype],
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
