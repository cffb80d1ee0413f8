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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ffnfusion.bench.engine import DecodeEngine
from ffnfusion.bench.timing import compare_tokens, copy_bandwidth, eager_reference, ffn_group_probe
from ffnfusion.formats.bench import BENCH_FORMAT, BENCH_VERSION, is_bench_file
from ffnfusion.formats.plan import Plan
from ffnfusion.io.device import parse_dtype
from ffnfusion.io.output import Input, check_output_file, write_atomic

Log = Callable[[str], None]




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
