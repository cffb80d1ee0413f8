"""Opening the model a user points at: a Hugging Face hub id, a local folder (safetensors), or a .gguf file."""

from __future__ import annotations

import copy
import functools
import json
import mmap
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from ffnfusion.adapters import adapter_for
from ffnfusion.io.device import parse_dtype


class ModelSourceError(ValueError):
    """MODEL does not name a model ffnfusion can open."""


@dataclass
class ModelSource:
    """Where a model lives, resolved once: `folder` holds config/tokenizer, `gguf_file` names a GGUF inside it."""

    spec: str
    folder: Path
    gguf_file: str | None = None
    _state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _lazy: Any = field(default=None, repr=False)

    @property
    def input_path(self) -> Path:
        """What the user handed in and ffnfusion must never write over: the GGUF file itself, else the folder."""
        given = Path(self.spec).expanduser()
        return given.resolve() if given.is_file() else self.folder

    @property
    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def config(self) -> Any:
        if self.gguf_file:
            return copy.deepcopy(_parsed_from_gguf(AutoConfig, *self._gguf_identity()))
        return AutoConfig.from_pretrained(self.folder)

    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The model's tokenizer, or None when the folder has none (weights-only checkpoints)."""
        try:
            if self.gguf_file:
                return copy.deepcopy(_parsed_from_gguf(AutoTokenizer, *self._gguf_identity()))
            return AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError, TypeError):
            return None

    def _gguf_identity(self) -> tuple[str, int, int]:
        path = (self.folder / str(self.gguf_file)).resolve()
        stat = path.stat()
        return str(path), stat.st_size, stat.st_mtime_ns

    def generation_config(self) -> GenerationConfig:
        """The model's generation defaults (EOS, sampling settings), derived from its config when it has none."""
        try:
            return GenerationConfig.from_pretrained(self.folder, **self.load_kwargs)
        except (OSError, ValueError):
            return GenerationConfig.from_model_config(self.config())

    @property
    def is_fused_checkpoint(self) -> bool:
        config = self.folder / "config.json"
        return not self.gguf_file and config.is_file() and "block_configs" in json.loads(config.read_text())

    def weights_folder(self) -> Path | None:
        """The folder whose safetensors hold the weights: the model's own, or for a GGUF its dequantised copy in the
        cache (None where there is none)."""
        if not self.gguf_file:
            return self.folder
        from ffnfusion.io.gguf_cache import cached_weights_folder

        return cached_weights_folder(self)

    def tensor_getter(
        self, dtype: torch.dtype | None = None, meta: bool = False, pin_memory: bool = False
    ) -> Callable[[str], torch.Tensor]:
        """name -> tensor, reading safetensors lazily (one tensor at a time) where the model is stored that way.

        With meta=True the tensors are meta tensors (shape and dtype only); from safetensors only headers are read.
        pin_memory=True reads safetensors data into page-locked memory, for tensors headed to a GPU.
        """
        folder = self.weights_folder()
        files = sorted(folder.glob("*.safetensors")) if folder is not None else []
        if files:
            from ffnfusion.io.checkpoint import LazySafetensors

            if self._lazy is None:
                self._lazy = LazySafetensors(folder)
            lazy = self._lazy

            def read(name: str) -> torch.Tensor:
                return lazy.meta(name) if meta else lazy.get(name, pin_memory)

            return read if dtype is None else lambda name: read(name).to(dtype)
        if self._state is None:
            model = load_model(self, dtype or torch.float32)
            self._state = {k: v.detach() for k, v in model.state_dict().items()}
            del model
        state = self._state

        def get(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"{self.spec} has no tensor {name!r}")
            return torch.empty_like(state[name], device="meta") if meta else state[name]

        return get


@functools.lru_cache(maxsize=8)
def _parsed_from_gguf(auto_class: Any, path: str, size: int, mtime_ns: int) -> Any:
    """A GGUF file's config or tokenizer, parsed once per process: transformers reads every metadata field (the
    whole vocabulary) for each, seconds per call, and the stages of a run open the same file again and again.
    Keyed by the file's size and modification time, so a replaced file is read afresh; callers get copies. Where the
    file's dequantised copy is cached (io.gguf_cache), the config and tokenizer parsed then are read from it."""
    from ffnfusion.io.gguf_cache import cached_metadata

    cached = cached_metadata(auto_class, path, size, mtime_ns)
    if cached is not None:
        return cached
    return auto_class.from_pretrained(Path(path).parent, gguf_file=Path(path).name)


WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")

# GGUF metadata value types: fixed-size ones by width; 8 is a string, 9 an array (see the GGUF specification).
_GGUF_WIDTH = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFTruncated(Exception):
    pass


def check_gguf(path: Path) -> None:
    """Read a GGUF file's header and tensor table (no tensor data) and refuse a corrupt or truncated file by name.

    Loading a broken file otherwise fails deep inside transformers with a struct or numpy error that names neither
    the file nor the problem.
    """
    from gguf.constants import GGML_QUANT_SIZES

    blocks = {int(t): block for t, block in GGML_QUANT_SIZES.items()}
    fix = "download or copy the .gguf again (compare its size or checksum with the original)."
    size = path.stat().st_size
    if size < 24:
        raise ModelSourceError(f"{path} is {size} bytes, too short for a GGUF header: the file is truncated; {fix}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelSourceError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); {fix}")
        r = _GGUFHeader(buf, size, path, fix)
        try:
            version = r.take("<I")
            if version not in (2, 3):
                raise ModelSourceError(f"{path} has GGUF version {version}; versions 2 and 3 can be read. {fix}")
            n_tensors, n_kv = r.take("<Q"), r.take("<Q")
            alignment = 32
            for _ in range(n_kv):
                key, kind = r.string(), r.take("<I")
                v = r.value(kind)
                if key == b"general.alignment" and isinstance(v, int) and v > 0:
                    alignment = v
            end = 0
            for _ in range(n_tensors):
                r.string()
                dims = [r.take("<Q") for _ in range(r.take("<I"))]
                ggml_type, offset = r.take("<I"), r.take("<Q")
                block = blocks.get(ggml_type)
                if block is not None:  # a type newer than the gguf package: its size is unknown, so not checked
                    numel = 1
                    for d in dims:
                        numel *= d
                    end = max(end, offset + numel // block[0] * block[1])
        except _GGUFTruncated:
            raise ModelSourceError(
                f"{path} ends inside its header ({size:,} bytes): the file is truncated or corrupt; {fix}"
            ) from None
        needed = -(-r.pos // alignment) * alignment + end
        if size < needed:
            raise ModelSourceError(
                f"{path} is truncated: its tensors need {needed:,} bytes but the file has {size:,}; {fix}"
            )


class _GGUFHeader:
    """A cursor over a GGUF header that raises _GGUFTruncated instead of reading past the end of the file."""

    def __init__(self, buf: Any, size: int, path: Path, fix: str):
        self.buf, self.size, self.path, self.fix = buf, size, path, fix
        self.pos = 4  # after the magic

    def take(self, fmt: str) -> Any:
        width = struct.calcsize(fmt)
        if self.pos + width > self.size:
            raise _GGUFTruncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += width
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _GGUFTruncated
        self.pos += n

    def string(self) -> bytes:
        n = self.take("<Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start : self.pos])

    def value(self, kind: int) -> Any:
        """A metadata value: strings and scalars are read, arrays skipped (None)."""
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _GGUF_WIDTH:
                self.skip(count * _GGUF_WIDTH[item])
            else:
                for _ in range(count):
                    self.value(item)
            return None
        if kind not in _GGUF_WIDTH:
            raise ModelSourceError(f"{self.path} is corrupt: metadata value type {kind} does not exist; {self.fix}")
        return self.take({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_GGUF_WIDTH[kind]])


def check_weights(folder: Path) -> None:
    """Refuse a model folder whose weights are absent, truncated, or disagree with their index, naming the file.

    Only headers are read (each safetensors shard's, checked against the index), before any long work starts. An
    architecture ffnfusion cannot process is reported first: no weights would make it usable.
    """
    config: Any = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelSourceError(
                f"{folder / 'config.json'} is not valid JSON ({e}): download or copy the model's config.json again."
            ) from None
    if isinstance(config, dict) and config and "block_configs" not in config:
        adapter_for(AutoConfig.from_pretrained(folder))
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelSourceError(
            f"{folder} has config.json but no weights (no *.safetensors or pytorch_model*.bin files): the download "
            "or copy is incomplete. Copy the weight files into it, or point MODEL at the complete model folder."
        )
    if next(folder.glob("*.safetensors"), None) or (folder / "model.safetensors.index.json").is_file():
        from ffnfusion.io.checkpoint import LazySafetensors

        LazySafetensors(folder)


def resolve_model(spec: str | Path) -> ModelSource:
    """Turn a user's MODEL argument into a ModelSource, with a clear error when it names nothing usable."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        check_gguf(path)
        return ModelSource(spec, path.resolve().parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                check_gguf(ggufs[0])
                return ModelSource(spec, path.resolve(), ggufs[0].name)
            raise ModelSourceError(
                f"{path} has no config.json: point MODEL at a Hugging Face model folder or a .gguf file."
            )
        check_weights(path)
        return ModelSource(spec, path.resolve())
    if path.exists():
        raise ModelSourceError(f"{path} is neither a model folder nor a .gguf file.")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelSourceError(f"Model not found: {spec} (no such folder or file, and not a hub id like org/name).")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.py"]
        )
    except Exception as e:  # the hub client raises many types; the user needs the id and the reason
        raise ModelSourceError(f"Could not download {spec!r} from the Hugging Face hub: {e}") from None
    check_weights(Path(folder))
    return ModelSource(spec, Path(folder))


def load_model(
    source: ModelSource | str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    offload_folder: str | Path | None = None,
) -> torch.nn.Module:
    """An eval-mode causal LM: the original family's transformers class, or DeciLM for fused checkpoints.

    With `offload_folder`, accelerate places the model over every visible GPU, then host memory, then that folder
    (device_map="auto"), for models larger than one device; `device` is then ignored.
    """
    import ffnfusion.modeling  # noqa: F401  (registers DeciLM with the Auto classes)

    source = source if isinstance(source, ModelSource) else resolve_model(source)
    if source.is_fused_checkpoint:
        from ffnfusion.io.checkpoint import verify_fused_checkpoint

        verify_fused_checkpoint(source.folder)
    else:
        adapter_for(source.config())
    placement = {"device_map": "auto", "offload_folder": str(offload_folder)} if offload_folder is not None else {}
    folder, load_kwargs = source.folder, dict(source.load_kwargs)
    if source.gguf_file:
        # A GGUF's config is parsed once (source.config); from_pretrained would parse the whole file's metadata
        # again. Its weights come from the dequantised copy in the cache where there is one.
        load_kwargs["config"] = source.config()
        cached = source.weights_folder()
        if cached is not None:
            folder = cached
            del load_kwargs["gguf_file"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=parse_dtype(dtype), **placement, **load_kwargs)
    return (model if placement else model.to(device)).eval()


@contextmanager
def dispatched_loader(
    source: ModelSource, dtype: torch.dtype | str, log: Callable[[str], None] | None = None
) -> Iterator[Callable[[], torch.nn.Module]]:
    """A function that loads MODEL spread by accelerate over the GPUs, host memory and a scratch folder.

    For whole forward passes (sampling calibration text) on a model larger than one device; the scratch folder is
    removed when the context ends.
    """
    with tempfile.TemporaryDirectory(prefix="ffnfusion-offload-") as folder:

        def load() -> torch.nn.Module:
            if log is not None:
                log(f"loading {source.spec} across the available devices (device_map=auto)")
            return load_model(source, dtype, offload_folder=folder)

        yield load


def export_transformers_folder(model: str | Path, folder: str | Path) -> Path:
    """Write MODEL (e.g. a .gguf, dequantised to fp32) as a plain transformers folder; reused when it exists."""
    from ffnfusion.io.gguf_cache import dequantised_model

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    source = resolve_model(model)
    model = dequantised_model(source) if source.gguf_file else load_model(source)
    model.save_pretrained(folder)
    tokenizer = source.tokenizer()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
