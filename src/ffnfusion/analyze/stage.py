"""The `analyze` stage: model + calibration text -> DIR/analysis.json + heatmap PNGs."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ffnfusion.adapters import adapter_for
from ffnfusion.analyze.data_parallel import DataParallel
from ffnfusion.analyze.data_parallel import from_environment as data_parallel_from_environment
from ffnfusion.analyze.identity import model_fingerprint, model_identity
from ffnfusion.analyze.measure import Measurements, measure, planned_evals
from ffnfusion.analyze.record import build_analysis, write_figures
from ffnfusion.analyze.settings import AnalyzeSettings
from ffnfusion.analyze.streamed_model import measure_streamed_model, stream_progress_path
from ffnfusion.data import DataError, calibration_tokens
from ffnfusion.formats.analysis import (
    Analysis,
    Calibration,
    ModelIdentity,
    Settings,
    config_hash,
)
from ffnfusion.formats.plan import Plan, validate_plan
from ffnfusion.formats.settings import settings_from
from ffnfusion.io.checkpoint import atomic_output_dir
from ffnfusion.io.device import device_name, resolve_device, resolve_dtype
from ffnfusion.io.output import Input, check_output_dir
from ffnfusion.io.progress import progress_bar
from ffnfusion.io.source import (
    ModelSource,
    ModelSourceError,
    load_model,
    resolve_model,
)


@dataclass
class AnalyzeResult:
    analysis: Analysis
    out: Path
    seconds: float  # everything: loading, tokenizing, measuring, writing
    measure_seconds: float  # the measurements alone
    device: str


def parse_layers(spec: str | Iterable[int] | None) -> list[int]:
    """'12,13,20-23' -> [12, 13, 20, 21, 22, 23]; lists pass through."""
    if spec is None:
        return []
    if not isinstance(spec, str):
        return sorted({int(i) for i in spec})
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(
                f"cannot read layer list {spec!r}: use comma-separated indices and ranges, e.g. 12,13,20-23"
            ) from None
    return sorted(out)


def analyze(
    model: str,
    out: str | Path,
    settings: AnalyzeSettings | None = None,
    *,
    overwrite: bool = False,
    show_progress: bool = False,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> AnalyzeResult:
    """Measure `model` on calibration text and write `out`/analysis.json plus heatmaps (atomically).

    `settings`, or AnalyzeSettings' fields as keyword `options`. stream=True loads one layer at a time onto the
    device (see `analysis.streamed`), for models larger than the device or host memory; `activations` (auto,
    device, cpu) and `stream_samples` (sequences per pass over the weights) bound the memory of the activations
    kept between layers. Results match the in-memory path.
    """
    started = time.perf_counter()
    s = settings_from(AnalyzeSettings, settings, options)
    data, samples, seq_len, seed, text_field = s.data, s.samples, s.seq_len, s.seed, s.text_field
    say = log or (lambda _msg: None)
    job = _prepare(
        model, out, data, samples, s.max_window, s.remove_attention, s.plan, s.device, s.dtype, s.batch_size, overwrite
    )
    dp, dev = job.dp, job.dev
    show_progress = show_progress and (dp is None or dp.is_main)
    if dp is not None:
        say(f"data parallel: {dp.world} processes, process k measures batches k, k + {dp.world}, ... (this: {dp.rank})")
    _check_streaming(s.stream, s.activations, s.stream_samples)
    tokenizer = job.source.tokenizer()
    if tokenizer is None:
        raise ModelSourceError(f"{model} has no tokenizer; analysis needs one to tokenize the calibration text.")
    calibrate = _calibrator(job, tokenizer, data, samples, seq_len, seed, text_field, say)
    per_batch = planned_evals(job.num_layers, job.removed)
    batches = -(-samples // job.batch_size)
    if dp is not None:
        batches = sum(dp.mine(b) for b in range(batches))
    progress_total = sum(per_batch.values()) * batches

    m, identity, tokens, measure_seconds = _measure(
        job, model, s.stream, s.activations, s.stream_samples, calibrate, show_progress, progress_total, say
    )
    calibration, recorded = _records(job, data, samples, seq_len, seed, text_field, tokens, s.max_window)
    analysis = build_analysis(identity, calibration, recorded, m)
    seconds = time.perf_counter() - started
    _write(job, analysis, seconds, measure_seconds, overwrite)
    return AnalyzeResult(analysis, job.out, seconds, measure_seconds, device_name(dev))


@dataclass
class _Job:
    """What `analyze` knows once its inputs are checked: the model, its config, the output, the device."""

    source: ModelSource
    out: Path
    inputs: list[Input]
    decilm_config: dict[str, Any]
    num_layers: int
    removed: set[int]
    dp: DataParallel | None
    dev: torch.device
    torch_dtype: torch.dtype
    batch_size: int


def _prepare(
    model: str,
    out: str | Path,
    data: str,
    samples: int,
    max_window: int,
    remove_attention: str | Iterable[int] | None,
    plan: str | Path | None,
    device: str | None,
    dtype: str | None,
    batch_size: int | None,
    overwrite: bool,
) -> _Job:
    if samples < 1:
        raise DataError(f"--samples must be at least 1 (got {samples}).")
    if max_window < 2:
        raise ValueError(f"--max-window must be at least 2 (got {max_window}).")
    source = resolve_model(model)
    if source.is_fused_checkpoint:
        raise ModelSourceError(
            f"{model} is a fused checkpoint; analysis indexes the ORIGINAL model's layers, so analyze the original."
        )
    out = Path(out)
    inputs = [("input model", source.input_path), ("data", data), ("plan", plan)]
    check_output_dir(out, "analyze", inputs, overwrite, error=ValueError)
    hf_config = source.config()
    decilm_config = adapter_for(hf_config).decilm_config(hf_config)
    num_layers = len(decilm_config["block_configs"])
    removed = set(parse_layers(remove_attention))
    if plan is not None:
        removed |= set(Plan.load(plan).remove_attention)
    validate_plan(Plan(remove_attention=sorted(removed)), num_layers)
    dp = data_parallel_from_environment()
    # Under torchrun / accelerate launch every process takes its own GPU.
    dev = dp.device if dp is not None and device in (None, "auto", "cuda") else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    batch_size = batch_size or (16 if dev.type == "cuda" else 8)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {batch_size}).")
    return _Job(source, out, inputs, decilm_config, num_layers, removed, dp, dev, torch_dtype, batch_size)


def _check_streaming(stream: bool, activations: str, stream_samples: int | None) -> None:
    if activations not in ("auto", "device", "cpu"):
        raise ValueError(f"--activations {activations}: use auto, device or cpu.")
    if not stream and (activations != "auto" or stream_samples is not None):
        raise ValueError("--activations and --stream-samples apply to streamed analysis: add --stream.")
    if stream_samples is not None and stream_samples < 1:
        raise ValueError(f"--stream-samples must be at least 1 (got {stream_samples}).")


def _calibrator(
    job: _Job,
    tokenizer: Any,
    data: str,
    samples: int,
    seq_len: int,
    seed: int,
    text_field: str,
    say: Callable[[str], None],
) -> Callable[[Any], torch.Tensor]:
    """model (or layer loader) -> the calibration tokens; `--data self` samples them from that model."""
    identity_key = config_hash(job.decilm_config)
    dp = job.dp

    def calibrate(model_or_loader: Any) -> torch.Tensor:
        say(f"calibration data: {data} ({samples} x {seq_len} tokens, seed {seed})")

        def tokens() -> torch.Tensor:
            return calibration_tokens(
                data, tokenizer, samples, seq_len, seed, model_or_loader, model_key=identity_key, text_field=text_field
            )

        if dp is None or data != "self":
            return tokens()
        # The main process samples the text and caches it; the others then read the cache.
        if dp.is_main:
            result = tokens()
            dp.barrier()
            return result
        dp.barrier()
        return tokens()

    return calibrate


def _measure(
    job: _Job,
    model: str,
    stream: bool,
    activations: str,
    stream_samples: int | None,
    calibrate: Callable[[Any], torch.Tensor],
    show_progress: bool,
    progress_total: int,
    say: Callable[[str], None],
) -> tuple[Measurements, ModelIdentity, torch.Tensor, float]:
    if not stream:
        return _measure_in_memory(job, model, calibrate, show_progress, progress_total, say)
    return measure_streamed_model(
        job.source,
        model,
        job.out,
        job.decilm_config,
        calibrate,
        job.removed,
        job.dev,
        job.torch_dtype,
        job.batch_size,
        activations=activations,
        stream_samples=stream_samples,
        show_progress=show_progress,
        progress_total=progress_total,
        say=say,
        dp=job.dp,
    )


def _records(
    job: _Job,
    data: str,
    samples: int,
    seq_len: int,
    seed: int,
    text_field: str,
    tokens: torch.Tensor,
    max_window: int,
) -> tuple[Calibration, Settings]:
    """What analysis.json records about the calibration text and the settings it was measured with."""
    calibration = Calibration(
        data=str(data),
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        text_field=text_field,
        tokens_sha256=hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest(),
    )
    settings = Settings(
        dtype=str(job.torch_dtype).removeprefix("torch."),
        device=job.dev.type,
        batch_size=job.batch_size,
        max_window=max_window,
        remove_attention=sorted(job.removed),
    )
    return calibration, settings


def _measure_in_memory(
    job: _Job,
    model: str,
    calibrate: Callable[[Any], torch.Tensor],
    show_progress: bool,
    progress_total: int,
    say: Callable[[str], None],
) -> tuple[Measurements, ModelIdentity, torch.Tensor, float]:
    """Load the whole model onto the device as DeciLM and measure it; the tokens, and the measuring time alone."""
    from ffnfusion.surgery import fuse_model

    dev = job.dev
    say(f"loading {model} ({str(job.torch_dtype).removeprefix('torch.')}, {dev})")
    hf_model = load_model(job.source, job.torch_dtype, dev)
    tokens = calibrate(hf_model)
    decilm = fuse_model(hf_model, Plan())
    del hf_model
    identity = model_identity(model, job.decilm_config, model_fingerprint(decilm))
    measure_started = time.perf_counter()
    with progress_bar(show_progress, progress_total, "analyzing") as tick:
        m = measure(decilm, tokens, job.removed, job.batch_size, tick, job.dp)
    del decilm
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return m, identity, tokens, time.perf_counter() - measure_started


def _write(job: _Job, analysis: Analysis, seconds: float, measure_seconds: float, overwrite: bool) -> None:
    """analysis.json, the heatmaps and run.json, written by the main process only."""
    dp, out = job.dp, job.out
    if dp is not None and not dp.is_main:
        dp.barrier()  # the main process writes the output
        stream_progress_path(out, dp).unlink(missing_ok=True)
        return
    with atomic_output_dir(out, "analyze", job.inputs, overwrite) as tmp:
        analysis.save(tmp / "analysis.json")
        write_figures(analysis, tmp)
        # Timing lives beside analysis.json, not in it, so the same inputs give a byte-identical analysis.json.
        run_info = {
            "seconds": round(seconds, 2),
            "measure_seconds": round(measure_seconds, 2),
            "device": device_name(job.dev),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "host": platform.node(),
            "pid": os.getpid(),
            "processes": dp.world if dp is not None else 1,
        }
        (tmp / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
    if dp is not None:
        dp.barrier()
    stream_progress_path(out, dp).unlink(missing_ok=True)
