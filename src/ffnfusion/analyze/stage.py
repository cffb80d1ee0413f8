"""The `analyze` stage: model + calibration text -> DIR/analysis.json + heatmap PNGs."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ffnfusion.adapters import adapter_for
from ffnfusion.analyze.data_parallel import DataParallel
from ffnfusion.analyze.data_parallel import from_environment as data_parallel_from_environment
from ffnfusion.analyze.dependency import window_scores
from ffnfusion.analyze.heatmap import plot_attention, plot_dependency
from ffnfusion.analyze.identity import getter_fingerprint, model_fingerprint, model_identity
from ffnfusion.analyze.measure import Measurements, measure, planned_evals
from ffnfusion.data import DataError, calibration_tokens
from ffnfusion.formats.analysis import (
    Analysis,
    AttentionScore,
    Calibration,
    Cost,
    CostPart,
    LayerStats,
    ModelIdentity,
    Settings,
    SubBlockStats,
    Window,
    config_hash,
)
from ffnfusion.formats.plan import Plan, validate_plan
from ffnfusion.io.checkpoint import atomic_output_dir
from ffnfusion.io.device import device_name, resolve_device, resolve_dtype
from ffnfusion.io.output import check_output_dir
from ffnfusion.io.source import (
    ModelSource,
    ModelSourceError,
    dispatched_loader,
    load_model,
    resolve_model,
)

PARTS = ("baseline", "teacher", "ffn_dependency", "block_dependency", "attention")
HEATMAPS = {
    "ffn_dependency": "ffn_dependency.png",
    "block_dependency": "block_dependency.png",
    "attention_importance": "attention_importance.png",
}


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


def _cost(m: Measurements, num_layers: int, removed: set[int]) -> Cost:
    per_forward = 2 * num_layers - len(removed)
    parts = {}
    total = 0.0
    for part in PARTS:
        evals = m.counter.sub_blocks.get(part, 0)
        heads = m.counter.lm_heads.get(part, 0)
        if not evals and not heads:
            continue
        fe = evals / (per_forward * m.batches)
        parts[part] = CostPart(sub_block_evals=evals, lm_head_evals=heads, forward_equivalents=round(fe, 4))
        total += fe
    return Cost(
        sub_blocks_per_forward=per_forward,
        batches=m.batches,
        parts=parts,
        total_forward_equivalents=round(total, 4),
        naive_forward_equivalents_per_matrix=num_layers,
    )


def build_analysis(identity: ModelIdentity, calibration: Calibration, settings: Settings, m: Measurements) -> Analysis:
    n = identity.num_layers
    removed = set(settings.remove_attention)
    s = m.stats.tolist()

    def sub(k: int, i: int) -> SubBlockStats:
        return SubBlockStats(rel_norm=s[i][k][0], cos_distance=s[i][k][1])

    layers = [
        LayerStats(layer=i, attention=None if i in removed else sub(0, i), ffn=sub(1, i), block=sub(2, i))
        for i in range(n)
    ]
    att = m.attention
    scores = [
        AttentionScore(layer=i, kl=kl, lm_loss=ce, lm_loss_delta=ce - att.original_lm_loss)
        for i, (kl, ce) in sorted(att.scores.items())
    ]
    return Analysis(
        model=identity,
        calibration=calibration,
        settings=settings,
        original_lm_loss=att.original_lm_loss,
        base_lm_loss=att.base_lm_loss,
        base_kl=att.base_kl,
        layers=layers,
        attention_importance=scores,
        ffn_dependency=m.ffn,
        block_dependency=m.block,
        ffn_windows=[Window(**w) for w in window_scores(m.ffn, settings.max_window)],
        block_windows=[Window(**w) for w in window_scores(m.block, settings.max_window)],
        cost=_cost(m, n, removed),
        heatmaps=dict(HEATMAPS),
    )


def write_figures(analysis: Analysis, folder: Path) -> None:
    removed = set(analysis.settings.remove_attention)
    name = Path(analysis.model.name).name or analysis.model.name
    where = f" with attention {sorted(removed)} removed" if removed else ""
    plot_dependency(
        analysis.ffn_dependency, removed, f"FFN dependency M[i,j]: {name}{where}", folder / HEATMAPS["ffn_dependency"]
    )
    plot_dependency(
        analysis.block_dependency,
        removed,
        f"block dependency: {name}{where}",
        folder / HEATMAPS["block_dependency"],
        what="block",
    )
    plot_attention(analysis.kl_by_layer(), analysis.num_layers, removed, folder / HEATMAPS["attention_importance"])


@contextmanager
def _progress(show: bool, total: int, description: str) -> Iterator[Callable[[int], None] | None]:
    if not show:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sub-blocks"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k: bar.advance(task, k)


def analyze(
    model: str,
    out: str | Path,
    data: str = "self",
    samples: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    text_field: str = "text",
    remove_attention: str | Iterable[int] | None = None,
    plan: str | Path | None = None,
    max_window: int = 8,
    device: str | None = None,
    dtype: str | None = "auto",
    batch_size: int | None = None,
    overwrite: bool = False,
    stream: bool = False,
    activations: str = "auto",
    stream_samples: int | None = None,
    show_progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> AnalyzeResult:
    """Measure `model` on calibration text and write `out`/analysis.json plus heatmaps (atomically).

    stream=True loads one layer at a time onto the device (see `analysis.streamed`), for models larger than the
    device or host memory; `activations` (auto, device, cpu) and `stream_samples` (sequences per pass over the
    weights) bound the memory of the activations kept between layers. Results match the in-memory path.
    """
    started = time.perf_counter()
    say = log or (lambda _msg: None)
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
    show_progress = show_progress and (dp is None or dp.is_main)
    if dp is not None:
        say(f"data parallel: {dp.world} processes, process k measures batches k, k + {dp.world}, ... (this: {dp.rank})")
    if activations not in ("auto", "device", "cpu"):
        raise ValueError(f"--activations {activations}: use auto, device or cpu.")
    if not stream and (activations != "auto" or stream_samples is not None):
        raise ValueError("--activations and --stream-samples apply to streamed analysis: add --stream.")
    if stream_samples is not None and stream_samples < 1:
        raise ValueError(f"--stream-samples must be at least 1 (got {stream_samples}).")

    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise ModelSourceError(f"{model} has no tokenizer; analysis needs one to tokenize the calibration text.")
    identity_key = config_hash(decilm_config)
    per_batch = planned_evals(num_layers, removed)
    batches = -(-samples // batch_size)
    if dp is not None:
        batches = sum(dp.mine(b) for b in range(batches))

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

    if stream:
        m, identity, tokens, measure_seconds = _measure_streamed(
            source,
            model,
            out,
            decilm_config,
            calibrate,
            removed,
            dev,
            torch_dtype,
            batch_size,
            activations=activations,
            stream_samples=stream_samples,
            show_progress=show_progress,
            progress_total=sum(per_batch.values()) * batches,
            say=say,
            dp=dp,
        )
    else:
        say(f"loading {model} ({str(torch_dtype).removeprefix('torch.')}, {dev})")
        hf_model = load_model(source, torch_dtype, dev)
        tokens = calibrate(hf_model)
        from ffnfusion.surgery import fuse_model

        decilm = fuse_model(hf_model, Plan())
        del hf_model
        identity = model_identity(model, decilm_config, model_fingerprint(decilm))
        measure_started = time.perf_counter()
        with _progress(show_progress, sum(per_batch.values()) * batches, "analyzing") as tick:
            m = measure(decilm, tokens, removed, batch_size, tick, dp)
        del decilm
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        measure_seconds = time.perf_counter() - measure_started
    calibration = Calibration(
        data=str(data),
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        text_field=text_field,
        tokens_sha256=hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest(),
    )
    settings = Settings(
        dtype=str(torch_dtype).removeprefix("torch."),
        device=dev.type,
        batch_size=batch_size,
        max_window=max_window,
        remove_attention=sorted(removed),
    )
    analysis = build_analysis(identity, calibration, settings, m)
    seconds = time.perf_counter() - started
    if dp is not None and not dp.is_main:
        dp.barrier()  # the main process writes the output
        stream_progress_path(out, dp).unlink(missing_ok=True)
        return AnalyzeResult(analysis, out, seconds, measure_seconds, device_name(dev))
    with atomic_output_dir(out, "analyze", inputs, overwrite) as tmp:
        analysis.save(tmp / "analysis.json")
        write_figures(analysis, tmp)
        # Timing lives beside analysis.json, not in it, so the same inputs give a byte-identical analysis.json.
        run_info = {
            "seconds": round(seconds, 2),
            "measure_seconds": round(measure_seconds, 2),
            "device": device_name(dev),
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
    return AnalyzeResult(analysis, out, seconds, measure_seconds, device_name(dev))


def stream_progress_path(out: Path, dp: DataParallel | None = None) -> Path:
    """Where a streamed analysis keeps its sums between passes (beside `out`, removed once `out` is written)."""
    out = Path(out).resolve()
    rank = f".rank{dp.rank}" if dp is not None else ""
    return out.parent / f".{out.name}.stream-progress{rank}.pt"


def _measure_streamed(
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
    if source.gguf_file:
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
    run_key = {
        "model": identity.config_hash,
        "weights": fingerprint,
        "tokens": hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest(),
        "removed": sorted(removed),
        "dtype": str(torch_dtype),
        "device": dev.type,
        "batch_size": batch_size,
        "samples_per_pass": stream_plan.samples_per_pass,
        "process": [dp.rank, dp.world] if dp is not None else None,
    }
    key = hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()
    progress = PassProgress(stream_progress_path(out, dp), key)
    progress.path.parent.mkdir(parents=True, exist_ok=True)
    with _progress(show_progress, progress_total, "analyzing (streamed)") as tick:
        m = measure_streamed(loader, tokens, removed, batch_size, stream_plan, tick, progress, say, dp)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return m, identity, tokens, time.perf_counter() - started
