"""Timing primitives of the `bench` stage: copy bandwidth (the memory floor), CUDA-graph timing, the FFN group
probe, and transformers' eager `generate` as the reference the engine's greedy tokens must reproduce."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ffnfusion.engine.kernels import TritonOps


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
    chains = _probe_chains(hidden, width, k, dtype, device, batch, seed)
    times = graph_time_ms(chains)
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


def _probe_chains(
    hidden: int, width: int, k: int, dtype: torch.dtype, device: torch.device, batch: int, seed: int
) -> dict[str, Callable[[], None]]:
    """ffn_group_probe's three decode steps over one set of seeded random weights."""
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

    return {"sequential": sequential, "sequential_unpacked": sequential_unpacked, "fused": fused}


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
