"""Decode speed in transformers itself, original vs fused: `generate` with a static cache and a compiled forward.

What a user gets who serves the fused checkpoint with plain transformers (not ffnfusion's bench engine): random
weights of a real model's shape (speed does not depend on weight values), the original LlamaForCausalLM and the
DeciLM model that `fuse_model` builds from it under a plan, each run through `model.generate(...,
cache_implementation="static", compile_config=CompileConfig(fullgraph=True))`, greedy. Per step, a stopping
criterion records a CUDA event; decode ms/token is the median interval between consecutive steps (the first
interval, which holds the prefill, is left out), over all steps of `--repeats` generations after `--warmup`
generations (which also compile). Before timing, each model's compiled static-cache tokens are compared with its
own eager dynamic-cache tokens.

    python benchmarks/hf_generate.py --shapes smollm2-135m,llama-3.1-8b --batch-sizes 1,8 --out hf_generate.json
    python benchmarks/hf_generate.py --smoke     # tiny shape, 2 tokens, runs on a CPU (no compilation there)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

from ffnfusion.bench.shapes import random_model
from ffnfusion.formats.plan import Plan, plan_blocks, sequential_sub_blocks
from ffnfusion.surgery import fuse_model

PLANS = Path(__file__).resolve().parent / "plans"
DEFAULT_PLANS = {"smollm2-135m": PLANS / "smollm2_cut27.json", "llama-3.1-8b": PLANS / "llama8b_fuse4.json"}


class StepClock(StoppingCriteria):
    """Records the time of every decoding step (CUDA events on a GPU, wall clock on a CPU); never stops."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1000 for a, b in zip(self.marks, self.marks[1:])]


def generate(model, ids: torch.Tensor, new_tokens: int, static: bool, compile_config, clock=None) -> torch.Tensor:
    kwargs = dict(cache_implementation="static", compile_config=compile_config) if static else {}
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        stopping_criteria=StoppingCriteriaList([clock] if clock else []),
        **kwargs,
    )
    return out[:, ids.shape[1] :]


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).any(0).nonzero()
    return int(diff[0]) if len(diff) else None


def measure(model, name: str, batch: int, args, device: torch.device, compile_config) -> dict:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, vocab, (batch, args.prompt_len), generator=gen).to(device)
    check = min(args.check_tokens, args.new_tokens)
    eager = generate(model, ids, check, static=False, compile_config=None)
    for _ in range(args.warmup):
        generate(model, ids, args.new_tokens, static=True, compile_config=compile_config)
    compiled = generate(model, ids, check, static=True, compile_config=compile_config)
    steps: list[float] = []
    for _ in range(args.repeats):
        clock = StepClock(device)
        generate(model, ids, args.new_tokens, static=True, compile_config=compile_config, clock=clock)
        steps += clock.intervals_ms()[1:] if len(clock.marks) > 2 else clock.intervals_ms()
    diff = first_difference(compiled, eager)
    return {
        "model": name,
        "batch": batch,
        "decode_ms_per_token": statistics.median(steps),
        "steps_timed": len(steps),
        "static_compiled_equals_dynamic_eager": "yes" if diff is None else f"differs from token {diff}",
    }


def tiny_llama(device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2-135m,llama-3.1-8b")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--check-tokens", type=int, default=32, help="tokens compared, static+compiled vs eager")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--plan", action="append", default=[], help="SHAPE=plan.json (default: benchmarks/plans)")
    parser.add_argument("--no-fullgraph", action="store_true", help="compile with graph breaks allowed")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 tokens, any device")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    compile_config = CompileConfig(fullgraph=not args.no_fullgraph)
    plans = {**DEFAULT_PLANS, **dict(p.split("=", 1) for p in args.plan)}
    if args.smoke:
        args.new_tokens, args.prompt_len, args.warmup, args.repeats = 2, 8, 0, 1
        dtype = torch.float32 if device.type == "cpu" else dtype
        cases = [("tiny", lambda: tiny_llama(device, dtype), Plan(remove_attention=[2], fuse_ffn=[[1, 2]]))]
    else:
        cases = [
            (shape, lambda s=shape: random_model(s, dtype=dtype, device=device), Plan.load(plans[shape]))
            for shape in args.shapes.split(",")
        ]
    print(f"device {device}, {args.dtype if not args.smoke else dtype}, torch {torch.__version__}", flush=True)

    rows = []
    for shape, build, plan in cases:
        original = build()
        layers = original.config.num_hidden_layers
        fused = fuse_model(original, plan)
        models = {"original": (original, 2 * layers), "fused": (fused, sequential_sub_blocks_of(plan, layers))}
        for name, (model, sub_blocks) in models.items():
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                result = measure(model, name, batch, args, device, compile_config)
                rows.append(row := {"shape": shape, "sub_blocks": sub_blocks, **result})
                print(json.dumps(row), flush=True)
        del original, fused, models
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = {(r["shape"], r["batch"]): r["decode_ms_per_token"] for r in rows if r["model"] == "original"}
    print("\n| shape | model | sub-blocks | batch | decode ms/token | speedup | static+compiled = eager |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        speedup = base[(r["shape"], r["batch"])] / r["decode_ms_per_token"]
        r["speedup"] = speedup
        print(
            f"| {r['shape']} | {r['model']} | {r['sub_blocks']} | {r['batch']} | {r['decode_ms_per_token']:.3f} | "
            f"{speedup:.2f} | {r['static_compiled_equals_dynamic_eager']} |"
        )
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
        Path(args.out).write_text(json.dumps({"settings": settings, **meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


def sequential_sub_blocks_of(plan: Plan, layers: int) -> int:
    return sequential_sub_blocks(plan_blocks(plan, layers))


if __name__ == "__main__":
    main()
