"""Tensor-parallel latency of the original vs the fused model, random weights of a real shape.

One process per device, launched by torchrun (NCCL on CUDA, gloo on CPU). The model is sharded with
`ffnfusion.bench.sharding.shard_model` (PyTorch's own tensor-parallel API) and runs its own forward, so the
collectives are the ones DTensor issues; the single-device engine (`DecodeEngine`) bypasses the modules and is not
used here. Run at world size 1 the same code gives the like-for-like single-device baseline (nothing is sharded).

Per model and batch size:
- prefill latency of `prompt_len` tokens (logits of the last position only, as a server computes them);
- decode latency per token at context `prompt_len + new_tokens // 2` (the mean context of a generation of
  `new_tokens` after the prompt): one decode step replayed at that fixed context;
- all-reduces per decode step, counted with PyTorch's CommDebugMode, next to the expected count (the plan's
  sequential sub-blocks). Every sequence of the batch gets one token per step, so this is also per token.
On CUDA both steps are captured in CUDA graphs (DTensor's Python dispatch would otherwise dominate a decode step)
and timed with CUDA events; without CUDA they run eagerly under the host clock. Latencies are the slowest rank's
median. The environment is used as given: communication variables are recorded in the output, never changed.
"""

from __future__ import annotations

import datetime
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from transformers import LlamaConfig

from ffnfusion.adapters import adapter_for
from ffnfusion.bench.sharding import (
    count_collectives,
    expected_all_reduces,
    init_random_,
    process_group,
    shard_model,
)
from ffnfusion.formats.plan import Plan, plan_blocks, sequential_sub_blocks
from ffnfusion.modeling.modeling_decilm import DeciLMConfig, DeciLMForCausalLM, DeciLMRotaryEmbedding
from ffnfusion.surgery import fused_config

ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_SYMM_MEM", "NVSHMEM_", "CUDA_VISIBLE_DEVICES")


class FixedContextCache:
    """KV buffers of exactly `context` positions, holding this rank's KV heads.

    A prefill fills the first positions; once `context - 1` are filled, every decode step writes position
    `context - 1` and attends over all `context` keys. The step is therefore shape-static, so one captured CUDA
    graph replays it, and each replay decodes at the same context length, exactly.
    """

    def __init__(self, model: DeciLMForCausalLM, batch: int, context: int, device: torch.device, dtype: torch.dtype):
        self.context = context
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in model.model.layers:
            if layer.has_attention:
                attn = layer.self_attn
                shape = (batch, attn.n_kv_heads, context, attn.head_dim)
                self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
                self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self.lengths = [0] * len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return min(self.lengths[layer_idx], self.context - 1)

    def reset(self) -> None:
        self.lengths = [0] * len(self.keys)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq = k.shape[2]
        start = min(self.lengths[layer_idx], self.context - seq)
        end = start + seq
        self.keys[layer_idx][:, :, start:end].copy_(k)
        self.values[layer_idx][:, :, start:end].copy_(v)
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def next_token_logits(output: Any) -> torch.Tensor:
    """The last position's logits in fp32, as a sampler reads them.

    Under tensor parallelism the logits come out of an asynchronous all-gather that completes when an op first
    reads them; the forced copy is such an op (`.float()` of fp32 logits is not), which keeps the wait inside the
    timed and captured step.
    """
    return output.logits[:, -1].to(torch.float32, copy=True)


def decilm_config(hf_config: LlamaConfig, plan: Plan) -> DeciLMConfig:
    base = adapter_for(hf_config).decilm_config(hf_config)
    return DeciLMConfig(**fused_config(base, plan))


def build_model(
    config: DeciLMConfig, mesh: DeviceMesh, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> DeciLMForCausalLM:
    """Random-weight model, sharded before it is materialised so that no rank ever holds the full weights."""
    with torch.device("meta"):
        model = DeciLMForCausalLM(config).to(dtype)
    if mesh.size() > 1:
        shard_model(model, mesh)
    model.to_empty(device=device)
    init_random_(model, seed=seed)
    # The RoPE frequencies are a meta buffer until rebuilt; they stay fp32 as in transformers' own models.
    model.model.rotary_emb = DeciLMRotaryEmbedding(config).to(device)
    return model.eval()


def _slowest_rank(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_ms(fn: Callable[[], torch.Tensor], device: torch.device, reps: int, graphs: bool) -> tuple[float, Any]:
    """Median milliseconds of `fn` and its last output; with `graphs`, `fn` is captured once and replayed."""
    if graphs:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize(device)
        dist.barrier()
        for s, e in zip(starts, ends):
            s.record()
            graph.replay()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        del graph
    else:
        out = fn()
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _slowest_rank(statistics.median(times), device), out


@torch.no_grad()
def measure_batch(
    model: DeciLMForCausalLM,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    decode_steps: int,
    prefill_reps: int,
    graphs: bool,
    seed: int = 0,
) -> dict[str, Any]:
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + batch)
    context = prompt_len + new_tokens // 2
    history = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    cache = FixedContextCache(model, batch, context, device, dtype)
    prompt = history[:, :prompt_len].contiguous()

    def prefill() -> torch.Tensor:
        cache.reset()
        return next_token_logits(model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1))

    prefill_ms, _ = time_ms(prefill, device, prefill_reps, graphs)

    cache.reset()
    next_token_logits(model(history[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1))
    token = history[:, -1:].contiguous()

    def decode() -> torch.Tensor:
        return next_token_logits(model(token, past_key_values=cache, use_cache=True, logits_to_keep=1))

    eager_logits = decode()
    counts = count_collectives(decode)
    decode_ms, logits = time_ms(decode, device, decode_steps, graphs)
    row: dict[str, Any] = {
        "batch": batch,
        "prefill_ms": prefill_ms,
        "decode_context": context,
        "decode_ms_per_token": decode_ms,
        "decode_tokens_per_s": batch / decode_ms * 1e3,
        "all_reduces_per_decode_step": counts.pop("all_reduce", 0),
        "other_collectives_per_decode_step": counts,
        "cuda_graphs": graphs,
    }
    if graphs:
        row["graph_vs_eager_max_abs_diff"] = (logits - eager_logits).abs().max().item()
    return row


@torch.no_grad()
def check_against_unsharded(model: DeciLMForCausalLM) -> float | None:
    """Max |logits difference| of a decode step, sharded vs the same weights gathered into one process (rank 0).

    The gathered model must fit on one device: meant for small shapes.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    state = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7)).to(device)
    cache = FixedContextCache(model, 2, 12, device, dtype)
    next_token_logits(model(ids[:, :-1], past_key_values=cache, use_cache=True))
    sharded = next_token_logits(model(ids[:, -1:], past_key_values=cache, use_cache=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        single = DeciLMForCausalLM(model.config)
    single.load_state_dict(state, assign=True)
    single.model.rotary_emb = DeciLMRotaryEmbedding(model.config).to(device)
    return (sharded - next_token_logits(single(ids))).abs().max().item()


def bench_tp(
    hf_config: LlamaConfig,
    plan: Plan,
    tp: int,
    batch_sizes: list[int] | tuple[int, ...] = (1, 8, 32),
    prompt_len: int = 512,
    new_tokens: int = 128,
    decode_steps: int = 50,
    prefill_reps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
    graphs: bool | None = None,
    check: bool = False,
    shape: str = "",
    command: str = "",
    seed: int = 0,
) -> dict[str, Any]:
    """Original and `plan`-fused model of `hf_config`'s shape over `tp` ranks: the report (same on every rank)."""
    if prompt_len < 1 or new_tokens < 1 or decode_steps < 1 or prefill_reps < 1 or not batch_sizes:
        raise ValueError("prompt length, new tokens, decode steps, prefill repeats and batch sizes must be positive")
    num_layers = hf_config.num_hidden_layers
    with process_group(tp, device) as (mesh, dev):
        use_graphs = dev.type == "cuda" if graphs is None else graphs
        if use_graphs and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        report: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
            "command": command,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "tp": tp,
            "backend": dist.get_backend(),
            "shape": shape,
            "layers": num_layers,
            "dtype": str(dtype).removeprefix("torch."),
            "settings": {
                "batch_sizes": list(batch_sizes),
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "decode_context": prompt_len + new_tokens // 2,
                "decode_steps": decode_steps,
                "prefill_reps": prefill_reps,
                "timing": "CUDA graphs replayed, CUDA events" if use_graphs else "eager, host clock",
                "collectives": "counted with CommDebugMode over one eager decode step",
            },
            "plan": plan.model_dump(exclude_defaults=True),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
            "models": [],
        }
        runs = (batch_sizes, prompt_len, new_tokens, decode_steps, prefill_reps, use_graphs, seed)
        for name, p in (("original", Plan()), ("fused", plan)):
            model = build_model(decilm_config(hf_config, p), mesh, dev, dtype, seed)
            report["models"].append(_tp_entry(name, model, p, num_layers, tp, runs, check))
            del model
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        report["comparison"] = _tp_comparison(*report["models"])
    return report


def _tp_entry(
    name: str, model: DeciLMForCausalLM, plan: Plan, num_layers: int, tp: int, runs: tuple[Any, ...], check: bool
) -> dict[str, Any]:
    """One model's report entry: its collectives and one row per batch size (`runs`: measure_batch's settings)."""
    batch_sizes, *settings = runs
    entry: dict[str, Any] = {
        "name": name,
        "layers": len(model.model.layers),
        "sequential_sub_blocks": sequential_sub_blocks(plan_blocks(plan, num_layers)),
        "expected_all_reduces_per_step": expected_all_reduces(model) if tp > 1 else 0,
        "runs": [measure_batch(model, b, *settings) for b in batch_sizes],
    }
    if check:
        entry["check_max_abs_diff"] = check_against_unsharded(model)
    return entry


def _tp_comparison(original: dict[str, Any], fused: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "batch": o["batch"],
            "sub_block_ratio": original["sequential_sub_blocks"] / fused["sequential_sub_blocks"],
            "prefill_speedup": o["prefill_ms"] / f["prefill_ms"],
            "decode_speedup": o["decode_ms_per_token"] / f["decode_ms_per_token"],
        }
        for o, f in zip(original["runs"], fused["runs"])
    ]


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        f"TP {report['tp']} ({report['backend']}, {report['device']}), {report['shape']} {report['layers']} layers, "
        f"{report['dtype']}, decode at context {report['settings']['decode_context']}",
        "",
        "| model | sub-blocks | batch | prefill ms | decode ms/token | tokens/s | all-reduces/step (expected) "
        "| other collectives | decode speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    speedups = {c["batch"]: c["decode_speedup"] for c in report["comparison"]}
    for m in report["models"]:
        for r in m["runs"]:
            other = ", ".join(f"{k} {v}" for k, v in r["other_collectives_per_decode_step"].items()) or "-"
            speed = "1 (baseline)" if m["name"] == "original" else f"{speedups[r['batch']]:.3f}"
            lines.append(
                f"| {m['name']} | {m['sequential_sub_blocks']} | {r['batch']} | {r['prefill_ms']:.3f} "
                f"| {r['decode_ms_per_token']:.3f} | {r['decode_tokens_per_s']:,.0f} "
                f"| {r['all_reduces_per_decode_step']} ({m['expected_all_reduces_per_step']}) | {other} | {speed} |"
            )
    return "\n".join(lines)


def bench_tp_stage(
    *,
    tp: int,
    model: str | None,
    compare: list[str],
    plan: Plan | str | os.PathLike | None,
    random_weights: bool,
    shape: str | None,
    layers: int | None,
    batch_sizes: list[int],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    dtype: str | torch.dtype,
    device: str | None,
    graphs: bool | None,
    out: str | os.PathLike | None,
    command: str = "",
    seed: int = 0,
) -> dict[str, Any] | None:
    """`ffnfusion bench --tp N`: the report on rank 0 (written to `out` there), None on the other ranks."""
    from pathlib import Path

    from ffnfusion.bench.shapes import shape_config
    from ffnfusion.bench.stage import check_bench_output, write_json_atomic
    from ffnfusion.formats.bench import BENCH_FORMAT, BENCH_VERSION
    from ffnfusion.io.device import parse_dtype

    if tp < 1:
        raise ValueError(f"--tp must be at least 1, got {tp}")
    if out is not None:
        check_bench_output(out, [("plan", None if isinstance(plan, Plan) else plan)])
    if model is not None or compare or not random_weights or not shape:
        raise ValueError("--tp runs random-weight models only: use --random-weights --shape NAME --plan PLAN")
    if plan is None:
        raise ValueError("--tp needs --plan: the fused model is timed against the original")
    if device not in (None, "cuda", "cpu"):
        raise ValueError("--tp takes --device auto, cuda or cpu (each rank uses the GPU of its LOCAL_RANK)")
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    report = bench_tp(
        shape_config(shape, layers),
        plan,
        tp,
        batch_sizes=batch_sizes,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        decode_steps=max(new_tokens - 1, 1) * repeats,
        prefill_reps=repeats,
        dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype,
        device=device,
        graphs=graphs,
        shape=shape,
        command=command,
        seed=seed,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if out is not None:
        write_json_atomic(Path(out), {"format": BENCH_FORMAT, "version": BENCH_VERSION, **report})
    return report
