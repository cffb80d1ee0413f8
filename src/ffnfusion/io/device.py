"""Device and dtype resolution for every stage: `--device auto|cpu|cuda[:N]`, `--dtype auto|float32|...`."""

from __future__ import annotations

import platform

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu.")
    if not device.startswith(("cpu", "cuda")):
        raise ValueError(f"--device {device}: use cpu or cuda (or cuda:N).")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the hardware computes it natively (CUDA, CPUs with AMX or AVX512-BF16), else float32.

    On CPUs without bf16 units, bf16 matmuls are emulated and slower than float32.
    """
    if dtype not in (None, "auto"):
        return parse_dtype(dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = [getattr(torch.cpu, f, lambda: False) for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return torch.bfloat16 if any(f() for f in native) else torch.float32


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
