"""Tensor-parallel latency of the original vs the fused model (random weights of a real shape), under torchrun.

    torchrun --nproc-per-node 8 benchmarks/tp_bench.py --shape llama-3.1-8b \
        --plan benchmarks/plans/llama8b_fuse4.json --batch-sizes 1,8,32 --out tp8_llama8b.json
    torchrun --nproc-per-node 1 benchmarks/tp_bench.py ...   # the same code on one device: the baseline

`ffnfusion bench --random-weights --shape NAME --plan PLAN --tp N` runs the same measurement; this script adds
`--shape tiny` (for exercising the code path on CPU over gloo) and `--check` (sharded logits against the gathered
model). What is measured, and how: see ffnfusion.bench.tensor_parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig

from ffnfusion.bench.shapes import SHAPES, shape_config
from ffnfusion.bench.stage import write_json_atomic
from ffnfusion.bench.tensor_parallel import bench_tp, markdown_table
from ffnfusion.formats.plan import Plan

TINY = dict(
    vocab_size=250,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[*SHAPES, "tiny"], default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers of the shape")
    parser.add_argument("--plan", type=Path, required=True, help="plan.json (0-based layers of the original)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=50, help="timed decode steps (median reported)")
    parser.add_argument("--prefill-reps", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--check", action="store_true", help="compare sharded logits with the gathered model")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if args.shape == "tiny":
        config = LlamaConfig(**{**TINY, **({"num_hidden_layers": args.layers} if args.layers else {})})
    else:
        config = shape_config(args.shape, args.layers)
    report = bench_tp(
        config,
        Plan.load(args.plan),
        tp=int(os.environ.get("WORLD_SIZE", "1")),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        decode_steps=args.decode_steps,
        prefill_reps=args.prefill_reps,
        dtype=dtype,
        device=device,
        graphs=False if args.eager else None,
        check=args.check,
        shape=args.shape,
        command=" ".join(["benchmarks/tp_bench.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(markdown_table(report))
        if args.out:
            write_json_atomic(args.out, report)
        else:
            print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
