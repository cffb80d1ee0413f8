"""Tensor-parallel latency of the original vs the fused model, random weights of a real shape.

Launch one process per GPU with torchrun (NCCL); without CUDA it runs on CPU over gloo, which is how the tests
exercise it with the `tiny` shape:

    torchrun --nproc-per-node 8 benchmarks/tp_bench.py --shape llama-3.1-8b --batch-sizes 1,8,32 --out tp8.json
    torchrun --nproc-per-node 1 benchmarks/tp_bench.py --shape llama-3.1-8b --out tp1.json      # same engine, 1 GPU

Per model (the original, and the fused model of `--plan` or a default plan that removes attention from a run of
layers and fuses their FFNs in groups of 4) and per batch size it reports:
- prefill latency of `--prompt-len` tokens (eager; logits of the last position only, as a server computes them);
- decode latency per token at context `prompt_len + new_tokens // 2` (the mean context of a generation of
  `new_tokens` after the prompt), one decode step captured in a CUDA graph and replayed; eager on CPU;
- all-reduces per decode step, counted with PyTorch's CommDebugMode, next to the expected count (the plan's
  sequential sub-blocks); every sequence of the batch gets one token per step, so this is also per token.

The environment is used as given: NCCL/PyTorch communication variables are recorded in the output, never changed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from transformers import LlamaConfig

from ffnfusion.adapters import adapter_for
from ffnfusion.modeling.modeling_decilm import DeciLMConfig, DeciLMForCausalLM, DeciLMRotaryEmbedding
from ffnfusion.plan import Plan, plan_blocks, sequential_sub_blocks
from ffnfusion.surgery import fused_config
from ffnfusion.tp import count_collectives, expected_all_reduces, init_random_, shard_model

LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=LLAMA31_ROPE,
    ),
    "llama-3.1-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=LLAMA31_ROPE,
    ),
    # For exercising the code path on CPU.
    "tiny": dict(
        vocab_size=250,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    ),
}
ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_SYMM_MEM", "NVSHMEM_", "CUDA_VISIBLE_DEVICES")


def default_plan(num_layers: int, group: int = 4) -> Plan:
    """Remove attention from layers [L/2, 7L/8) and fuse FFNs from L/2 - 1 in groups of `group`.

    The run's last FFN stays unfused (the paper found fusing it costs the most quality); the first group starts at
    the layer before the run, whose attention is kept, as in the paper's fused Llama models.
    """
    start, stop = num_layers // 2, num_layers - num_layers // 8
    fusable = list(range(start - 1, stop - 1))
    groups = [fusable[i : i + group] for i in range(0, len(fusable), group)]
    return Plan(remove_attention=list(range(start, stop)), fuse_ffn=[g for g in groups if len(g) > 1])


def model_config(shape: str, layers: int | None, plan: Plan) -> DeciLMConfig:
    kwargs = dict(SHAPES[shape])
    if layers:
        kwargs["num_hidden_layers"] = layers
    base = adapter_for(LlamaConfig(**kwargs)).decilm_config(LlamaConfig(**kwargs))
    return DeciLMConfig(**fused_config(base, plan))


def build_model(
    config: DeciLMConfig, mesh: DeviceMesh, device: torch.device, dtype: torch.dtype, seed: int
) -> DeciLMForCausalLM:
    """Random-weight model, sharded before it is materialised so no rank ever holds the full weights."""
    with torch.device("meta"):
        model = DeciLMForCausalLM(config).to(dtype)
    if mesh.size() > 1:
        shard_model(model, mesh)
    model.to_empty(device=device)
    init_random_(model, seed=seed)
    # The RoPE frequencies are a meta buffer until rebuilt; they stay fp32 as in transformers' own models.
    model.model.rotary_emb = DeciLMRotaryEmbedding(config).to(device)
    return model.eval()


class FixedContextCache:
    """KV buffers of exactly `context` positions (this rank's KV heads).

    A prefill fills the first context - 1 positions; from then on every decode step writes position context - 1
    and attends over all `context` keys. The step is therefore shape-static, so one captured CUDA graph replays
    it, and each replay decodes at the same context length, exactly.
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

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        seq = k.shape[2]
        start = min(self.lengths[layer_idx], self.context - seq)
        self.keys[layer_idx][:, :, start : start + seq].copy_(k)
        self.values[layer_idx][:, :, start : start + seq].copy_(v)
        self.lengths[layer_idx] = start + seq
        end = start + seq
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def next_token_logits(output: Any) -> torch.Tensor:
    """The last position's logits in fp32, as a sampler reads them.

    Under tensor parallelism the logits come out of an asynchronous all-gather that completes when an op first
    reads them; the forced copy is such an op (`.float()` of fp32 logits is not), which keeps the wait inside the
    timed and captured step.
    """
    return output.logits[:, -1].to(torch.float32, copy=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_step_ms(step: Callable[[], torch.Tensor], steps: int) -> tuple[float, torch.Tensor]:
    """Capture `step` in a CUDA graph, replay it `steps` times; the median replay time and the captured output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    torch.cuda.synchronize()
    dist.barrier()
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), out


@torch.no_grad()
def measure(
    model: DeciLMForCausalLM, batch: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).to(device)
    prefill_ms = median_ms(
        lambda: next_token_logits(model(prompt, use_cache=True, logits_to_keep=1)),
        device,
        warmup=1,
        reps=args.prefill_reps,
    )

    context = args.prompt_len + args.new_tokens // 2
    cache = FixedContextCache(model, batch, context, device, dtype)
    history = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    next_token_logits(model(history[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1))
    token = history[:, -1:].contiguous()

    def step() -> torch.Tensor:
        return next_token_logits(model(token, past_key_values=cache, use_cache=True, logits_to_keep=1))

    eager_logits = step()
    counts = count_collectives(step)
    result: dict[str, Any] = {
        "batch": batch,
        "prefill_ms": round(prefill_ms, 4),
        "decode_context": context,
        "all_reduces_per_decode_step": counts.pop("all_reduce", 0),
        "other_collectives_per_decode_step": counts,
    }
    if device.type == "cuda" and not args.eager:
        decode_ms, graph_logits = graph_step_ms(step, args.decode_steps)
        result["decode_mode"] = "cuda_graph"
        result["graph_vs_eager_max_abs_diff"] = (graph_logits.float() - eager_logits.float()).abs().max().item()
    else:
        decode_ms = median_ms(step, device, warmup=2, reps=args.decode_steps)
        result["decode_mode"] = "eager"
    result["decode_ms_per_token"] = round(decode_ms, 4)
    result["tokens_per_s"] = round(batch * 1e3 / decode_ms, 2)
    return result


@torch.no_grad()
def check_against_unsharded(model: DeciLMForCausalLM, device: torch.device) -> float:
    """Max |logits difference| of a decode step, sharded vs the same weights gathered into one process."""
    state = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7)).to(device)
    cache = FixedContextCache(model, 2, 12, device, state["model.embed_tokens.weight"].dtype)
    next_token_logits(model(ids[:, :-1], past_key_values=cache, use_cache=True))
    sharded = next_token_logits(model(ids[:, -1:], past_key_values=cache, use_cache=True))
    if dist.get_rank() != 0:
        return 0.0
    with torch.device("meta"):
        single = DeciLMForCausalLM(model.config)
    single.load_state_dict(state, assign=True)
    single.model.rotary_emb = DeciLMRotaryEmbedding(model.config).to(device)
    return (sharded - next_token_logits(single(ids))).abs().max().item()


@contextlib.contextmanager
def process_group(device_kind: str) -> Iterator[tuple[DeviceMesh, torch.device]]:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    try:
        yield init_device_mesh(device_kind, (dist.get_world_size(),)), device
    finally:
        dist.destroy_process_group()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--plan", type=Path, default=None, help="plan.json (default: see default_plan)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=50, help="timed decode steps (median reported)")
    parser.add_argument("--prefill-reps", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eager", action="store_true", help="time decode eagerly even on CUDA")
    parser.add_argument("--check", action="store_true", help="compare sharded logits with the gathered model")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    num_layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    fused_plan = Plan.load(args.plan) if args.plan else default_plan(num_layers)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with process_group(args.device) as (mesh, device):
        tp = mesh.size()
        report: dict[str, Any] = {
            "date": date.today().isoformat(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "tp": tp,
            "shape": args.shape,
            "layers": num_layers,
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "plan": fused_plan.model_dump(exclude={"info"}),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "models": {},
        }
        for name, plan in (("original", Plan()), ("fused", fused_plan)):
            model = build_model(model_config(args.shape, args.layers, plan), mesh, device, dtype, seed=0)
            entry: dict[str, Any] = {
                "sequential_sub_blocks": sequential_sub_blocks(plan_blocks(plan, num_layers)),
                "expected_all_reduces_per_step": expected_all_reduces(model) if tp > 1 else 0,
                "results": [measure(model, b, args, device, dtype) for b in batches],
            }
            if args.check:
                entry["check_max_abs_diff"] = check_against_unsharded(model, device)
            report["models"][name] = entry
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        original, fused = report["models"]["original"]["results"], report["models"]["fused"]["results"]
        report["decode_speedup"] = {
            str(o["batch"]): round(o["decode_ms_per_token"] / f["decode_ms_per_token"], 4)
            for o, f in zip(original, fused)
        }
        report["prefill_speedup"] = {
            str(o["batch"]): round(o["prefill_ms"] / f["prefill_ms"], 4) for o, f in zip(original, fused)
        }
        if dist.get_rank() == 0:
            print(json.dumps(report, indent=2))
            if args.out:
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
