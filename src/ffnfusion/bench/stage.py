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

from ffnfusion.bench.settings import BenchSettings
from ffnfusion.bench.table import comparison
from ffnfusion.bench.timing import compare_tokens, copy_bandwidth, eager_reference, ffn_group_probe
from ffnfusion.bench.variants import Variant, check_model_and_plan, variants
from ffnfusion.engine.decode import DecodeEngine
from ffnfusion.formats.bench import BENCH_FORMAT, BENCH_VERSION, is_bench_file
from ffnfusion.formats.plan import Plan
from ffnfusion.formats.settings import settings_from
from ffnfusion.io.device import parse_dtype
from ffnfusion.io.output import Input, check_output_file, write_atomic

Log = Callable[[str], None]


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
    settings: BenchSettings | None = None,
    *,
    compare: list[str] | tuple[str, ...] = (),
    plan: Plan | str | Path | None = None,
    out: str | Path | None = None,
    command: str | None = None,
    log: Log | None = None,
    force_plan: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Benchmark MODEL (and its fused version under `plan`, and every `compare` model) in one engine.

    `settings`, or BenchSettings' fields as keyword `options` (`dtype` may also be a torch.dtype). Returns the
    bench.json content; writes it to `out` atomically when given.
    """
    if isinstance(options.get("dtype"), torch.dtype):
        options["dtype"] = str(options["dtype"]).removeprefix("torch.")
    s = settings_from(BenchSettings, settings, options)
    log = log or (lambda _msg: None)
    if out is not None:
        inputs = [("input model", m) for m in (model, *compare)]
        inputs += [("plan", None if isinstance(plan, Plan) else plan), ("prompt file", s.prompt_file)]
        check_bench_output(out, inputs)
    dev, torch_dtype, plan, text = _check_inputs(model, compare, plan, s, force_plan)
    copy_bw = copy_bandwidth(dev) if dev.type == "cuda" else None
    run = _Run(s, text, copy_bw)
    result = _result_header(command, dev, torch_dtype, run, plan)
    if dev.type == "cuda":
        result["copy_bandwidth_GBps"] = copy_bw / 1e9
        log(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    for build in variants(model, list(compare), plan, s.random_weights, s.shape, s.layers, torch_dtype, dev, s.seed):
        with _fresh_memory(dev):
            variant = build()
            result["models"].append(_bench_variant(variant, run, dev, log))
            if s.ffn_probe and dev.type == "cuda" and not result.get("ffn_probe"):
                config = variant.engine_model.config
                result["ffn_probe"] = _ffn_probe(config, s.ffn_probe, torch_dtype, dev, copy_bw, log)
            del variant
    result["comparison"] = comparison(result["models"])
    if out is not None:
        write_json_atomic(Path(out), result)
    return result


def _check_inputs(
    model: str | None, compare: Sequence[str], plan: Plan | str | Path | None, s: BenchSettings, force_plan: bool
) -> tuple[torch.device, torch.dtype, Plan | None, str | None]:
    """Everything checked before a model is loaded; the device, dtype, loaded plan and prompt text."""
    random_weights, prompt_file = s.random_weights, s.prompt_file
    if s.prompt_len < 1 or s.new_tokens < 1 or s.repeats < 1 or not s.batch_sizes:
        raise ValueError("prompt length, new tokens, repeats and batch sizes must be positive")
    if model is None and not random_weights and not compare:
        raise ValueError("give MODEL, --compare models, or --random-weights --shape NAME")
    if model is not None and random_weights:
        raise ValueError("--random-weights builds the model from --shape; do not pass MODEL as well")
    dev = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = parse_dtype(s.dtype)
    plan_name = "the plan" if plan is None or isinstance(plan, Plan) else f"plan file {plan}"
    if isinstance(plan, str | Path):
        plan = Plan.load(plan)
    if prompt_file is not None and not Path(prompt_file).is_file():
        what = "a directory" if Path(prompt_file).is_dir() else "not found"
        raise ValueError(f"--prompt-file {prompt_file} is {what}: give a text file to cut prompts from.")
    if model is not None and not random_weights:
        check_model_and_plan(model, compare, plan, plan_name, force_plan)
    text = Path(prompt_file).read_text(errors="replace") if prompt_file else None
    return dev, torch_dtype, plan, text


@dataclass
class _Run:
    """How every model is measured: the settings, the prompt text and the copy bandwidth of this device."""

    s: BenchSettings
    text: str | None
    copy_bw: float | None


def _result_header(
    command: str | None, dev: torch.device, torch_dtype: torch.dtype, run: _Run, plan: Plan | None
) -> dict[str, Any]:
    """bench.json before any model is measured: where and how it is measured."""
    result: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "version": BENCH_VERSION,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "command": command or " ".join(sys.argv),
        **_device_info(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "settings": {
            "batch_sizes": list(run.s.batch_sizes),
            "prompt_len": run.s.prompt_len,
            "new_tokens": run.s.new_tokens,
            "repeats": run.s.repeats,
            "reference_tokens": run.s.reference_tokens,
            "timing": "CUDA events around each graph replay after a warm-up generation; medians"
            if dev.type == "cuda"
            else "host clock (no CUDA device); medians",
            "prompts": "prompt file windows" if run.text else f"random token ids (seed {run.s.seed})",
        },
        "models": [],
    }
    if plan is not None:
        result["plan"] = plan.model_dump(exclude_defaults=True)
    return result


def _bench_variant(variant: Variant, run: _Run, dev: torch.device, log: Log) -> dict[str, Any]:
    """One model's bench.json entry: its shape, then one row per batch size."""
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
    for batch in run.s.batch_sizes:
        ids = make_prompts(config.vocab_size, batch, run.s.prompt_len, run.s.seed, variant.tokenizer, run.text).to(dev)
        row = measure_batch(
            variant,
            ids,
            run.s.new_tokens,
            run.s.repeats,
            run.s.reference_tokens,
            run.s.kernels,
            run.s.graphs,
            run.copy_bw,
        )
        entry["runs"].append(row)
        log(
            f"  batch {batch}: prefill {row['prefill_ms']:.2f} ms, decode "
            f"{row.get('decode_ms_per_token', float('nan')):.3f} ms/token{_greedy_note(row, variant)}"
        )
    return entry


def _greedy_note(row: dict[str, Any], variant: Variant) -> str:
    if "greedy_match" not in row:
        return ""
    if row["greedy_match"]:
        return f", greedy tokens = eager's ({row['tokens_compared']})"
    dtype = next(variant.engine_model.parameters()).dtype
    # In half precision the engine's packed GEMMs and fused kernels round differently from eager's separate ops,
    # so greedy decoding parts at the first near-tie; only float32 checks the engine token for token.
    why = "" if dtype == torch.float32 else " (half-precision rounding at a near-tie; --dtype float32 checks exactly)"
    return f", greedy tokens differ from eager's from token {row['first_mismatch']['step'] + 1}{why}"


def _ffn_probe(
    config: Any, ffns: int, torch_dtype: torch.dtype, dev: torch.device, copy_bw: float | None, log: Log
) -> dict[str, Any]:
    """Sequential against fused FFNs at the width of the model's first FFN (measured for the first model only)."""
    from ffnfusion.modeling.modeling_decilm import block_ffn_width

    block = next(b for b in config.block_configs if not b["ffn"].get("no_op"))
    width = block_ffn_width(block, config.hidden_size)
    p = ffn_group_probe(config.hidden_size, width, ffns, torch_dtype, dev, 1, copy_bw)
    log(f"FFN probe: {ffns} in sequence {p['sequential_ms']:.3f} ms, fused {p['fused_ms']:.3f} ms")
    return p
