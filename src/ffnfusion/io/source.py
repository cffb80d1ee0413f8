"""Opening the model a user points at: a Hugging Face hub id, a local folder (safetensors), or a .gguf file."""

from __future__ import annotations

import copy
import json
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
        return AutoConfig.from_pretrained(self.folder, **self.load_kwargs)

    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The model's tokenizer, or None when the folder has none (weights-only checkpoints)."""
        try:
            return AutoTokenizer.from_pretrained(self.folder, **self.load_kwargs)
        except (OSError, ValueError, TypeError):
            return None

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

    def tensor_getter(
        self, dtype: torch.dtype | None = None, meta: bool = False, pin_memory: bool = False
    ) -> Callable[[str], torch.Tensor]:
        """name -> tensor, reading safetensors lazily (one tensor at a time) where the model is stored that way.

        With meta=True the tensors are meta tensors (shape and dtype only); from safetensors only headers are read.
        pin_memory=True reads safetensors data into page-locked memory, for tensors headed to a GPU.
        """
        files = sorted(self.folder.glob("*.safetensors")) if not self.gguf_file else []
        if files:
            from ffnfusion.io.checkpoint import LazySafetensors

            if self._lazy is None:
                self._lazy = LazySafetensors(self.folder)
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


def resolve_model(spec: str | Path) -> ModelSource:
    """Turn a user's MODEL argument into a ModelSource, with a clear error when it names nothing usable."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return ModelSource(spec, path.resolve().parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec, path.resolve(), ggufs[0].name)
            raise ModelSourceError(
                f"{path} has no config.json: point MODEL at a Hugging Face model folder or a .gguf file."
            )
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
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, dtype=parse_dtype(dtype), **placement, **source.load_kwargs
    )
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
    """Write MODEL (e.g. a .gguf, dequantised to fp32) as a plain transformers folder; reused when it exists.

    Later loads are then fast safetensors reads. GGUF-loaded models carry a quantizer and cannot save themselves,
    so the weights are copied into a fresh model of the same class first.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    source = resolve_model(model)
    loaded = load_model(source, torch.float32)
    config = copy.deepcopy(loaded.config)
    # The GGUF quantizer's settings would make transformers treat the saved fp32 weights as GGUF again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(folder)
    tokenizer = source.tokenizer()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
