"""`analyze --stream`: a model's checkpoint -> Measurements, one layer on the device at a time, resumable.

Input: the model source (safetensors folder or GGUF), its DeciLM config, a calibration function. Output: the
Measurements, the model identity and the calibration tokens; the sums of the completed passes are kept beside the
output folder so that running the same command again after a crash resumes at the next pass.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ffnfusion.analyze.data_parallel import DataParallel
from ffnfusion.analyze.identity import getter_fingerprint, model_identity
from ffnfusion.analyze.measure import Measurements
from ffnfusion.formats.analysis import ModelIdentity
from ffnfusion.io.progress import progress_bar
from ffnfusion.io.source import ModelSource, dispatched_loader


def stream_progress_path(out: Path, dp: DataParallel | None = None) -> Path:
    """Where a streamed analysis keeps its sums between passes (beside `out`, removed once `out` is written)."""
    out = Path(out).resolve()
    rank = f".rank{dp.rank}" if dp is not None else ""
    return out.parent / f".{out.name}.stream-progress{rank}.pt"


def measure_streamed_model(
    source: ModelSource,
    spec: str,
    out: Path,
    decilm_config: dict[str, Any],
    calibrate: Callable[[Any], torch.Tensor],
    removed: set[int],
    dev: torch.device,
    torch_dtype: torch.dtype,
    batch_size: int,
    activations: str,
    stream_samples: int | None,
    show_progress: bool,
    progress_total: int,
    say: Callable[[str], None],
    dp: DataParallel | None = None,
) -> tuple[Measurements, ModelIdentity, torch.Tensor, float]:
    """The streamed counterpart of load + calibrate + measure: no step holds more than one layer on the device.

    The sums are saved after every pass over the weights beside `out`; running the same command again after a crash
    resumes at the next pass.
    """
    from ffnfusion.analyze.streamed import LayerLoader, PassProgress, measure_streamed, plan_streaming

    num_layers = len(decilm_config["block_configs"])
    if source.gguf_file and source.weights_folder() is None:
        say(
            "note: a .gguf is dequantised whole into host memory before streaming; a safetensors folder is read "
            "one tensor at a time"
        )
    get = source.tensor_getter(pin_memory=dev.type == "cuda")
    loader = LayerLoader(decilm_config, get, torch_dtype, dev)
    # Sampling text (--data self) needs whole forward passes: the model is spread over the devices for that.
    with dispatched_loader(source, torch_dtype, say) as load:
        tokens = calibrate(load)
    seq_len = tokens.shape[1]
    samples = dp.my_tokens(tokens, batch_size).shape[0] if dp is not None else tokens.shape[0]
    stream_plan = plan_streaming(loader, samples, seq_len, batch_size, removed, activations, stream_samples)
    fingerprint = getter_fingerprint(get, num_layers, torch_dtype)
    identity = model_identity(spec, decilm_config, fingerprint)
    say(stream_plan.describe())
    started = time.perf_counter()
    key = _resume_key(
        identity, fingerprint, tokens, removed, torch_dtype, dev, batch_size, stream_plan.samples_per_pass, dp
    )
    progress = PassProgress(stream_progress_path(out, dp), key)
    progress.path.parent.mkdir(parents=True, exist_ok=True)
    with progress_bar(show_progress, progress_total, "analyzing (streamed)") as tick:
        m = measure_streamed(loader, tokens, removed, batch_size, stream_plan, tick, progress, say, dp)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return m, identity, tokens, time.perf_counter() - started


def _resume_key(
    identity: ModelIdentity,
    fingerprint: str,
    tokens: torch.Tensor,
    removed: set[int],
    torch_dtype: torch.dtype,
    dev: torch.device,
    batch_size: int,
    samples_per_pass: int,
    dp: DataParallel | None,
) -> str:
    """Everything the saved sums depend on: a progress file with another key belongs to another run."""
    run_key = {
        "model": identity.config_hash,
        "weights": fingerprint,
        "tokens": hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest(),
        "removed": sorted(removed),
        "dtype": str(torch_dtype),
        "device": dev.type,
        "batch_size": batch_size,
        "samples_per_pass": samples_per_pass,
        "process": [dp.rank, dp.world] if dp is not None else None,
    }
    return hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()
