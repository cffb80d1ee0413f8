"""The `bench` stage: latency and throughput of the original and fused models in one engine, side by side.

Per model and batch size: prefill latency, decode latency per token (median over steps), tokens/s, peak memory,
sequential sub-blocks, the memory floor of a decode step (weight + KV bytes over the copy bandwidth measured in the
same run), and transformers' eager `generate` as a reference column whose greedy tokens the engine must reproduce.
"""

from __future__ import annotations

import datetime
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ffnfusion.bench.engine import DecodeEngine
from ffnfusion.bench.kernels import TritonOps
from ffnfusion.formats.bench import BENCH_FORMAT, BENCH_VERSION, is_bench_file
from ffnfusion.formats.plan import Plan
from ffnfusion.io.device import parse_dtype
from ffnfusion.io.output import Input, check_output_file, write_atomic

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------- primitives
def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median of repeats)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (nbytes // 4) * 4 / statistics.median(times)


def graph_time_ms(fns: dict[str, Callable[[], None]], repeats: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median device time of one replay of each function captured as a CUDA graph, replays interleaved."""
    graphs = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    for name, fn in fns.items():
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for g in graphs.values():
            g.replay()
    for _ in range(repeats):
        for name, g in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def ffn_group_probe(
    hidden: int,
    width: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    batch: int = 1,
    copy_bw: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """k FFN sub-blocks in sequence vs the same k fused into one wide FFN, one decode step each (CUDA graphs).

    Both sides run the engine's own steps (fused residual-add + RMSNorm, one gate|up GEMM, SiLU*up, one down GEMM).
    The fused FFN is built from the very same weights (norms folded into gate/up rows), so bytes moved are equal.
    A third chain runs the k FFNs as transformers' LlamaMLP does (separate gate and up GEMMs, SiLU and the product
    as two torch ops), to show how much of a fusion speedup a weaker sequential baseline would add.
    `floor_ms` (weights over copy bandwidth) bounds every chain from below, so sequential_ms / floor_ms bounds
    the speedup fusion can give.
    """
    ops = TritonOps(torch.cuda.get_device_properties(device).multi_processor_count)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * std + mean).to(dtype)

    norms = [rand(hidden, mean=1.0, std=0.05) for _ in range(k)]
    gate_up = [rand(2 * width, hidden) for _ in range(k)]
    down = [rand(hidden, width) for _ in range(k)]
    fused_gate_up = torch.cat(
        [gu[:width] * n for gu, n in zip(gate_up, norms)] + [gu[width:] * n for gu, n in zip(gate_up, norms)]
    )
    fused_down = torch.cat(down, dim=1)
    unit = torch.ones(hidden, device=device, dtype=dtype)
    x = rand(batch, hidden, std=1.0)
    delta = rand(batch, hidden, std=1.0)
    eps = 1e-5

    def sequential() -> None:
        d = delta
        for i in range(k):
            h = ops.add_rmsnorm(x, d, norms[i], eps)
            d = F.linear(ops.silu_mul(F.linear(h, gate_up[i])), down[i])

    def sequential_unpacked() -> None:
        d = delta
        for i in range(k):
            h = ops.add_rmsnorm(x, d, norms[i], eps)
            d = F.linear(F.silu(F.linear(h, gate_up[i][:width])) * F.linear(h, gate_up[i][width:]), down[i])

    def fused() -> None:
        h = ops.add_rmsnorm(x, delta, unit, eps)
        F.linear(ops.silu_mul(F.linear(h, fused_gate_up)), fused_down)

    times = graph_time_ms({"sequential": sequential, "sequential_unpacked": sequential_unpacked, "fused": fused})
    weight_bytes = 3 * k * hidden * width * dtype.itemsize
    result = {
        "ffns": k,
        "hidden": hidden,
        "width": width,
        "batch": batch,
        "sequential_ms": times["sequential"],
        "fused_ms": times["fused"],
        "speedup": times["sequential"] / times["fused"],
        "sequential_unpacked_ms": times["sequential_unpacked"],
        "speedup_over_unpacked": times["sequential_unpacked"] / times["fused"],
        "weight_bytes": weight_bytes,
    }
    if copy_bw:
        result["floor_ms"] = weight_bytes / copy_bw * 1e3
        result["max_speedup_at_floor"] = times["sequential"] / result["floor_ms"]
    return result


def eager_generate(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' own greedy `generate`, with no stopping tokens, so it runs exactly `new_tokens` steps."""
    from transformers import GenerationConfig

    saved = model.generation_config
    # Replacing the model's config (rather than passing one) keeps generate from merging the model's
    # defaults back in (eos, repetition penalty).
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=None
    )
    try:
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        model.generation_config = saved
    return out[:, input_ids.shape[1] :]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_reference(
    model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, float | None]:
    """(eager greedy tokens, eager decode ms per token). Per-token time: (T(n tokens) - T(1 token)) / (n - 1)."""
    device = input_ids.device
    eager_generate(model, input_ids, min(2, new_tokens))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    eager_generate(model, input_ids, 1)
    _sync(device)
    t1 = time.perf_counter()
    tokens = eager_generate(model, input_ids, new_tokens)
    _sync(device)
    t2 = time.perf_counter()
    per_token = ((t2 - t1) - (t1 - t0)) / (new_tokens - 1) * 1e3 if new_tokens > 1 else None
    return tokens, per_token


def compare_tokens(engine: torch.Tensor, eager: torch.Tensor) -> dict[str, Any]:
    n = min(engine.shape[1], eager.shape[1])
    same = engine[:, :n].cpu() == eager[:, :n].cpu()
    result: dict[str, Any] = {"greedy_match": bool(same.all()), "tokens_compared": int(same.numel())}
    if not result["greedy_match"]:
        row, step = (~same).nonzero()[0].tolist()
        result["first_mismatch"] = {"row": row, "step": step}
        result["matching_fraction"] = float(same.float().mean())
    return result


# ----------------------------------------------------------------------------------------------- models
@dataclass
class Variant:
    """A model to benchmark: the DeciLM model the engine runs, and what eager `generate` runs for reference."""

    name: str
    source: str
    engine_model: torch.nn.Module
    reference_model: torch.nn.Module
    tokenizer: Any = None


def _decilm(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    from ffnfusion.modeling.modeling_decilm import DeciLMForCausalLM
    from ffnfusion.surgery import fuse_model

    if isinstance(model, DeciLMForCausalLM):
        if not plan.is_empty:
            raise ValueError("the model is already fused; plans index the ORIGINAL model's layers")
        return model
    return fuse_model(model, plan)


def _check_model_and_plan(model: str, compare: Sequence[str], plan: Plan | None, where: str, force: bool) -> None:
    """Before any model is loaded: every model readable, and a plan that fits MODEL (unless `force`)."""
    from ffnfusion.adapters import adapter_for
    from ffnfusion.formats.analysis import config_hash
    from ffnfusion.formats.plan import check_plan_model, validate_plan
    from ffnfusion.io.source import resolve_model

    for other in compare:
        resolve_model(other)
    source = resolve_model(model)
    if plan is None or plan.is_empty or source.is_fused_checkpoint:
        return
    hf_config = source.config()
    base = adapter_for(hf_config).decilm_config(hf_config)
    num_layers = len(base["block_configs"])
    if not force:
        check_plan_model(plan, model, num_layers, config_hash(base), where)
    validate_plan(plan, num_layers)


def _variants(
    model: str | None,
    compare: list[str],
    plan: Plan | None,
    random_weights: bool,
    shape: str | None,
    layers: int | None,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> Iterator[Callable[[], Variant]]:
    """Builders, so that only one model (plus its reference) is on the device at a time."""
    if random_weights:
        from ffnfusion.bench.shapes import random_model

        if not shape:
            raise ValueError("--random-weights needs --shape NAME")
        label = shape + (f" ({layers} layers)" if layers else "")

        def build_random(p: Plan, name: str) -> Variant:
            hf = random_model(shape, layers, dtype, device, seed)
            m = _decilm(hf, p)
            del hf
            return Variant(name, f"random {label}", m, m)

        yield lambda: build_random(Plan(), "original")
        if plan is not None and not plan.is_empty:
            yield lambda: build_random(plan, "fused")
    elif model is not None:
        from ffnfusion.io.source import load_model, resolve_model

        source = resolve_model(model)
        loaded: dict[str, Any] = {}

        def original() -> torch.nn.Module:
            if "model" not in loaded:
                loaded["model"] = load_model(source, dtype, device)
                loaded["tokenizer"] = source.tokenizer()
            return loaded["model"]

        yield lambda: Variant("original", model, _decilm(original(), Plan()), original(), loaded.get("tokenizer"))
        if plan is not None and not plan.is_empty:

            def fused() -> Variant:
                m = _decilm(original(), plan)
                return Variant("fused", f"{model} + plan", m, m, loaded.get("tokenizer"))

            yield fused
        loaded.clear()
    elif plan is not None and not plan.is_empty:
        raise ValueError("--plan needs MODEL or --random-weights --shape NAME")
    for other in compare:

        def build_other(other: str = other) -> Variant:
            from ffnfusion.io.source import load_model, resolve_model

            src = resolve_model(other)
            m = load_model(src, dtype, device)
            return Variant(other, other, _decilm(m, Plan()), m, src.tokenizer())

        yield build_other


def make_prompts(
    vocab_size: int, batch: int, prompt_len: int, seed: int, tokenizer: Any = None, text: str | None = None
) -> torch.Tensor:
    """[batch, prompt_len] token ids: windows of a tokenized text, or seeded random ids (never all one token)."""
    if text is not None and tokenizer is not None:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if len(ids) < prompt_len:
            raise ValueError(f"the prompt file has {len(ids)} tokens, fewer than --prompt-len {prompt_len}")
        stride = max(1, (len(ids) - prompt_len) // max(1, batch - 1)) if batch > 1 else 0
        return torch.stack([ids[r * stride : r * stride + prompt_len] for r in range(batch)])
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=gen)


@contextmanager
def _fresh_memory(device: torch.device) -> Iterator[None]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_batch(
    variant: Variant,
    input_ids: torch.Tensor,
    new_tokens: int,
    repeats: int,
    reference_tokens: int,
    kernels: str,
    graphs: bool | None,
    copy_bw: float | None,
) -> dict[str, Any]:
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    row: dict[str, Any] = {"batch": batch}
    with _fresh_memory(device):
        engine = DecodeEngine(
            variant.engine_model, batch, prompt_len + max(new_tokens, 2), kernels=kernels, use_graphs=graphs
        )
        row["kernels"] = engine.ops.name
        row["cuda_graphs"] = engine.use_graphs
        tokens, _ = engine.generate(input_ids, new_tokens)  # capture + warm-up, not timed
        prefill, steps = [], []
        for _ in range(repeats):
            again, timing = engine.generate(input_ids, new_tokens, timed=True)
            if not torch.equal(again, tokens):
                raise RuntimeError("the engine is not deterministic: two runs of one prompt gave different tokens")
            prefill.append(timing.prefill_ms)
            steps.extend(timing.step_ms)
        row["prefill_ms"] = statistics.median(prefill)
        row["prefill_tokens_per_s"] = batch * prompt_len / row["prefill_ms"] * 1e3
        if steps:
            row["decode_ms_per_token"] = statistics.median(steps)
            row["decode_ms_per_token_min"] = min(steps)
            row["decode_tokens_per_s"] = batch / row["decode_ms_per_token"] * 1e3
            if copy_bw:
                context = prompt_len + new_tokens // 2
                floor_bytes = engine.weight_bytes_per_step() + engine.kv_bytes_per_step(batch, context)
                row["decode_floor_ms"] = floor_bytes / copy_bw * 1e3
                row["decode_over_floor"] = row["decode_ms_per_token"] / row["decode_floor_ms"]
        if device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        engine.release()
        del engine
    if reference_tokens > 0:
        n = min(reference_tokens, new_tokens)
        eager_tokens, per_token = eager_reference(variant.reference_model, input_ids, n)
        row["eager_decode_ms_per_token"] = per_token
        row.update(compare_tokens(tokens, eager_tokens))
    return row


def _device_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"device": props.name, "multiprocessors": props.multi_processor_count}
    else:
        info["device"] = "cpu"
    return info


def check_bench_output(out: str | Path, inputs: Iterable[Input]) -> Path:
    """Refuse a bench.json location that is an input, a folder, or a file an earlier bench did not write."""
    return check_output_file(out, "bench", is_bench_file, inputs)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def bench(
    model: str | None = None,
    compare: list[str] | tuple[str, ...] = (),
    plan: Plan | str | Path | None = None,
    batch_sizes: tuple[int, ...] | list[int] = (1, 8, 32),
    prompt_len: int = 512,
    new_tokens: int = 128,
    out: str | Path | None = None,
    dtype: str | torch.dtype = "bfloat16",
    device: str | None = None,
    random_weights: bool = False,
    shape: str | None = None,
    layers: int | None = None,
    reference_tokens: int = 32,
    repeats: int = 3,
    kernels: str = "auto",
    graphs: bool | None = None,
    ffn_probe: int = 0,
    prompt_file: str | Path | None = None,
    seed: int = 0,
    command: str | None = None,
    log: Log | None = None,
    force_plan: bool = False,
) -> dict[str, Any]:
    """Benchmark MODEL (and its fused version under `plan`, and every `compare` model) in one engine.

    Returns the bench.json content; writes it to `out` atomically when given.
    """
    log = log or (lambda _msg: None)
    if out is not None:
        inputs = [("input model", m) for m in (model, *compare)]
        inputs += [("plan", None if isinstance(plan, Plan) else plan), ("prompt file", prompt_file)]
        check_bench_output(out, inputs)
    if prompt_len < 1 or new_tokens < 1 or repeats < 1 or not batch_sizes:
        raise ValueError("prompt length, new tokens, repeats and batch sizes must be positive")
    if model is None and not random_weights and not compare:
        raise ValueError("give MODEL, --compare models, or --random-weights --shape NAME")
    if model is not None and random_weights:
        raise ValueError("--random-weights builds the model from --shape; do not pass MODEL as well")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = parse_dtype(dtype)
    plan_name = "the plan" if plan is None or isinstance(plan, Plan) else f"plan file {plan}"
    if isinstance(plan, str | Path):
        plan = Plan.load(plan)
    if prompt_file is not None and not Path(prompt_file).is_file():
        what = "a directory" if Path(prompt_file).is_dir() else "not found"
        raise ValueError(f"--prompt-file {prompt_file} is {what}: give a text file to cut prompts from.")
    if model is not None and not random_weights:
        _check_model_and_plan(model, compare, plan, plan_name, force_plan)
    text = Path(prompt_file).read_text(errors="replace") if prompt_file else None

    result: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "version": BENCH_VERSION,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "command": command or " ".join(sys.argv),
        **_device_info(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "settings": {
            "batch_sizes": list(batch_sizes),
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "reference_tokens": reference_tokens,
            "timing": "CUDA events around each graph replay after a warm-up generation; medians"
            if dev.type == "cuda"
            else "host clock (no CUDA device); medians",
            "prompts": "prompt file windows" if text else f"random token ids (seed {seed})",
        },
        "models": [],
    }
    if plan is not None:
        result["plan"] = plan.model_dump(exclude_defaults=True)
    copy_bw = None
    if dev.type == "cuda":
        copy_bw = copy_bandwidth(dev)
        result["copy_bandwidth_GBps"] = copy_bw / 1e9
        log(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")

    for build in _variants(model, list(compare), plan, random_weights, shape, layers, torch_dtype, dev, seed):
        with _fresh_memory(dev):
            variant = build()
            config = variant.engine_model.config
            probe = DecodeEngine(variant.engine_model, 1, 4, kernels="torch", use_graphs=False)
            entry: dict[str, Any] = {
                "name": variant.name,
                "source": variant.source,
                "layers": len(config.block_configs),
                "sequential_sub_blocks": probe.sequential_sub_blocks,
                "parameters": sum(p.numel() for p in {id(p): p for p in variant.engine_model.parameters()}.values()),
                "weight_bytes_per_step": probe.weight_bytes_per_step(),
                "runs": [],
            }
            del probe
            log(f"{variant.name}: {entry['layers']} blocks, {entry['sequential_sub_blocks']} sequential sub-blocks")
            for batch in batch_sizes:
                ids = make_prompts(config.vocab_size, batch, prompt_len, seed, variant.tokenizer, text).to(dev)
                row = measure_batch(variant, ids, new_tokens, repeats, reference_tokens, kernels, graphs, copy_bw)
                entry["runs"].append(row)
                log(
                    f"  batch {batch}: prefill {row['prefill_ms']:.2f} ms, decode "
                    f"{row.get('decode_ms_per_token', float('nan')):.3f} ms/token"
                    + (f", greedy match {row['greedy_match']}" if "greedy_match" in row else "")
                )
            if ffn_probe and dev.type == "cuda" and not result.get("ffn_probe"):
                block = next(b for b in config.block_configs if not b["ffn"].get("no_op"))
                from ffnfusion.modeling.modeling_decilm import block_ffn_width

                width = block_ffn_width(block, config.hidden_size)
                result["ffn_probe"] = ffn_group_probe(
                    config.hidden_size, width, ffn_probe, torch_dtype, dev, 1, copy_bw
                )
                p = result["ffn_probe"]
                log(f"FFN probe: {ffn_probe} in sequence {p['sequential_ms']:.3f} ms, fused {p['fused_ms']:.3f} ms")
            result["models"].append(entry)
            del variant
    result["comparison"] = _comparison(result["models"])
    if out is not None:
        write_json_atomic(Path(out), result)
    return result


def _comparison(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every model against the first one (the original), batch by batch."""
    if len(models) < 2:
        return []
    base = models[0]
    rows = []
    for other in models[1:]:
        for b_run, o_run in zip(base["runs"], other["runs"]):
            row: dict[str, Any] = {
                "model": other["name"],
                "baseline": base["name"],
                "batch": b_run["batch"],
                "sub_block_ratio": base["sequential_sub_blocks"] / other["sequential_sub_blocks"],
                "prefill_speedup": b_run["prefill_ms"] / o_run["prefill_ms"],
            }
            if "decode_ms_per_token" in b_run and "decode_ms_per_token" in o_run:
                row["decode_speedup"] = b_run["decode_ms_per_token"] / o_run["decode_ms_per_token"]
                row["decode_speedup_over_ratio"] = row["decode_speedup"] / row["sub_block_ratio"]
            rows.append(row)
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    """bench.json as a Markdown table: one row per model and batch size, the first model as the baseline."""

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    speedups = {(c["model"], c["batch"]): c for c in result.get("comparison", [])}
    lines = [
        "| model | sub-blocks | batch | prefill ms | decode ms/token | tokens/s | x floor | decode speedup "
        "| eager ms/token | greedy = eager | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for m in result["models"]:
        for r in m["runs"]:
            c = speedups.get((m["name"], r["batch"]), {})
            speed = "1 (baseline)" if not c else f"{c.get('decode_speedup', 0):.2f} (ratio {c['sub_block_ratio']:.2f})"
            match = "-"
            if r.get("greedy_match"):
                match = f"yes ({r['tokens_compared']} tokens)"
            elif "greedy_match" in r:
                match = f"differs from token {r['first_mismatch']['step'] + 1}"
            peak = r.get("peak_memory_bytes")
            lines.append(
                f"| {m['name']} | {m['sequential_sub_blocks']} | {r['batch']} | {r['prefill_ms']:.2f} "
                f"| {fmt(r.get('decode_ms_per_token'), '.3f')} | {fmt(r.get('decode_tokens_per_s'), ',.0f')} "
                f"| {fmt(r.get('decode_over_floor'), '.2f')} | {speed} "
                f"| {fmt(r.get('eager_decode_ms_per_token'), '.2f')} | {match} "
                f"| {fmt(peak / 2**30 if peak else None, '.2f')} |"
            )
    if probe := result.get("ffn_probe"):
        lines.append("")
        lines.append(
            f"FFN probe (batch {probe['batch']}, hidden {probe['hidden']}, width {probe['width']}): "
            f"{probe['ffns']} FFNs in sequence {probe['sequential_ms']:.3f} ms, fused {probe['fused_ms']:.3f} ms, "
            f"speedup {probe['speedup']:.2f}x"
            + (f" (memory floor {probe['floor_ms']:.3f} ms)" if "floor_ms" in probe else "")
            + (
                f"; in sequence with separate gate/up GEMMs {probe['sequential_unpacked_ms']:.3f} ms "
                f"({probe['speedup_over_unpacked']:.2f}x)"
                if "sequential_unpacked_ms" in probe
                else ""
            )
        )
    return "\n".join(lines)
