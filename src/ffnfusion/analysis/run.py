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
from ffnfusion.analysis.attention import attention_scores_batch, base_totals, finish_attention, teacher_for
from ffnfusion.analysis.data_parallel import DataParallel
from ffnfusion.analysis.data_parallel import from_environment as data_parallel_from_environment
from ffnfusion.analysis.dependency import block_dependency_batch, ffn_dependency_batch, upper_matrix, window_scores
from ffnfusion.analysis.heatmap import plot_attention, plot_dependency
from ffnfusion.analysis.runner import SubBlockRunner
from ffnfusion.analysis.schema import (
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
from ffnfusion.analysis.stats import sub_block_stats_sums
from ffnfusion.checkpoint import atomic_output_dir
from ffnfusion.data import DataError, calibration_tokens
from ffnfusion.io.output import check_output_dir
from ffnfusion.plan import Plan, validate_plan
from ffnfusion.source import (
    ModelSource,
    ModelSourceError,
    dispatched_loader,
    load_model,
    parse_dtype,
    resolve_model,
)
from ffnfusion.surgery import ffn_widths

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


def model_identity(spec: str, decilm_config: dict[str, Any], fingerprint: str = "") -> ModelIdentity:
    return ModelIdentity(
        name=spec,
        model_type=decilm_config["source_model_type"],
        num_layers=len(decilm_config["block_configs"]),
        hidden_size=decilm_config["hidden_size"],
        num_attention_heads=decilm_config["num_attention_heads"],
        num_key_value_heads=decilm_config["num_key_value_heads"],
        ffn_widths=ffn_widths(decilm_config),
        has_o_bias=bool(decilm_config.get("attention_bias")),
        config_hash=config_hash(decilm_config),
        weights_fingerprint=fingerprint,
    )


FINGERPRINT_TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "mlp.down_proj.weight")


def fingerprint_names(num_layers: int) -> list[str]:
    """The DeciLM tensors the fingerprint hashes: the embeddings, the first q_proj and the last down_proj."""
    return [*FINGERPRINT_TENSORS[:2], f"model.layers.{num_layers - 1}.{FINGERPRINT_TENSORS[2]}"]


def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of fixed slices of the tensors, rounded to bf16 so a float32 and a bf16 load of one model agree."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().flatten()[:4096].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def getter_fingerprint(get: Callable[[str], torch.Tensor], num_layers: int, dtype: torch.dtype) -> str:
    """The fingerprint read tensor by tensor from a checkpoint, in the analysis dtype (what streaming hashes)."""
    return weights_fingerprint(get(name).to(dtype) for name in fingerprint_names(num_layers))


def model_fingerprint(model: torch.nn.Module) -> str:
    params = dict(model.named_parameters())
    return weights_fingerprint(params[name] for name in fingerprint_names(len(model.model.layers)))


def planned_evals(num_layers: int, removed: set[int]) -> dict[str, int]:
    """Sub-block evaluations per batch of each part (what the runner will count): the progress bar's total."""
    per_layer = [1 + (i not in removed) for i in range(num_layers)]
    suffix = [sum(per_layer[j:]) for j in range(num_layers + 1)]
    matrix = sum(suffix[i + 1] for i in range(num_layers - 1))
    return {
        "baseline": suffix[0],
        "teacher": 2 * num_layers if removed else 0,
        "ffn_dependency": matrix,
        "block_dependency": matrix,
        "attention": sum(1 + suffix[i + 1] for i in range(num_layers) if i not in removed),
    }


@dataclass
class Measurements:
    stats: torch.Tensor  # [L, 3 (attention, ffn, block), 2 (rel_norm, cos_distance)] token means
    ffn: list[list[float | None]]
    block: list[list[float | None]]
    attention: Any  # AttentionResult
    counter: Any  # EvalCounter
    batches: int


def new_sums(num_layers: int, device: torch.device) -> dict[str, torch.Tensor]:
    """float64 sums over calibration tokens of everything analysis.json averages."""
    n = num_layers

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=device)

    # stats: [L, 3 (attention, ffn, block), 2 (rel_norm, cos_distance)]; totals: original ce, base ce, base kl.
    return {
        "stats": zeros(n, 3, 2),
        "ffn": zeros(n, n),
        "block": zeros(n, n),
        "kl": zeros(n),
        "ce": zeros(n),
        "totals": zeros(3),
    }


def finish_measurements(
    sums: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    candidates: list[int],
    counter: Any,
    batches: int,
    dp: DataParallel | None = None,
) -> Measurements:
    """Token means from the sums (after adding up every process's share under data parallelism)."""
    if dp is not None:
        batches = dp.all_reduce(sums, counter, batches)
    count = tokens.numel()
    return Measurements(
        stats=(sums["stats"] / count).cpu(),
        ffn=upper_matrix(sums["ffn"].cpu(), count),
        block=upper_matrix(sums["block"].cpu(), count),
        attention=finish_attention(tokens, candidates, sums["kl"], sums["ce"], sums["totals"]),
        counter=counter,
        batches=batches,
    )


@torch.inference_mode()
def measure(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    removed: set[int],
    batch_size: int,
    tick: Callable[[int], None] | None = None,
    dp: DataParallel | None = None,
) -> Measurements:
    """Everything analysis.json holds, from a DeciLM model with one plain layer per original layer.

    With `dp`, this process measures its share of the batches and the sums are added up over the processes.
    """
    runner = SubBlockRunner(model, tick)
    n, device = runner.num_layers, runner.device
    sums = new_sums(n, device)
    stats = sums["stats"]
    candidates = [i for i in range(n) if i not in removed]
    batches = 0
    for index, first in enumerate(range(0, tokens.shape[0], batch_size)):
        if dp is not None and not dp.mine(index):
            continue
        batches += 1
        ids = tokens[first : first + batch_size].to(device)
        runner.part = "baseline"
        prefix = runner.prefix(ids, removed)
        for i in range(n):
            if prefix.attn_out[i] is not None:
                stats[i, 0] += sub_block_stats_sums(prefix.attn_out[i], prefix.attn_in[i])
            stats[i, 1] += sub_block_stats_sums(prefix.ffn_out[i], prefix.ffn_in[i])
            block = prefix.ffn_out[i].float() + (0 if prefix.attn_out[i] is None else prefix.attn_out[i].float())
            stats[i, 2] += sub_block_stats_sums(block, prefix.attn_in[i])
        teacher = teacher_for(runner, ids, prefix, removed)
        base_totals(runner, prefix.attn_in[-1], teacher, removed, sums["totals"])
        runner.part = "ffn_dependency"
        ffn_dependency_batch(runner, prefix, removed, sums["ffn"])
        runner.part = "block_dependency"
        block_dependency_batch(runner, prefix, removed, sums["block"])
        runner.part = "attention"
        attention_scores_batch(runner, prefix, removed, candidates, teacher, sums["kl"], sums["ce"])
        del prefix, teacher
    return finish_measurements(sums, tokens, candidates, runner.counter, batches, dp)


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
        from ffnfusion.fuse import fuse_model

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
    from ffnfusion.analysis.streamed import LayerLoader, PassProgress, measure_streamed, plan_streaming

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


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
