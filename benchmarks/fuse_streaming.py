"""Fuse a synthetic Llama-shaped checkpoint larger than this machine's memory; measure peak RSS and throughput.

    python benchmarks/fuse_streaming.py --dir /tmp/ffnfusion-bench            # 68 layers of Llama-3.1-8B widths
    python benchmarks/fuse_streaming.py --dir D --writer both --layers 68     # also the shard-buffered writer

Writes random bf16 weights (several shards and an index), a plan that removes attention in the upper layers and
fuses their FFNs in runs of four, runs `ffnfusion fuse` under `/usr/bin/time -v`, checks the output with
safetensors and against a recomputation of one fused group, prints a Markdown table, and deletes everything it
wrote (--keep to keep it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Llama-3.1-8B widths; the layer count sets the size (68 layers: about 31.8 GB in bf16).
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def layer_shapes(config: dict, layer: int) -> dict[str, tuple[int, ...]]:
    h, i, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    p = f"model.layers.{layer}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (i, h),
        p + "mlp.up_proj.weight": (i, h),
        p + "mlp.down_proj.weight": (h, i),
    }


def all_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], config["hidden_size"])}
    for layer in range(config["num_hidden_layers"]):
        shapes |= layer_shapes(config, layer)
    shapes["model.norm.weight"] = (config["hidden_size"],)
    shapes["lm_head.weight"] = (config["vocab_size"], config["hidden_size"])
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights near 1, so that folding them into the projections changes every value
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)


def generate(folder: Path, config: dict, shard_bytes: int) -> int:
    """Write the checkpoint shard by shard with safetensors' save_file; returns its weight bytes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = all_shapes(config)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: random_tensor(n, shapes[n], gen) for n in names}, folder / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, filename)
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def make_plan(layers: int, group: int, first: int) -> dict:
    """Attention removed from `first`+1 to the second-to-last layer; FFNs fused in runs of `group` from `first`."""
    groups = [list(range(s, s + group)) for s in range(first, layers - group, group)]
    return {"remove_attention": list(range(first + 1, groups[-1][-1] + 1)), "fuse_ffn": groups}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def timed_fuse(cmd: list[str]) -> dict[str, float]:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"fuse failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    system = float(re.search(r"System time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    return {"peak_rss_gib": rss_kb / 2**20, "wall_s": seconds, "cpu_s": user + system}


def check_output(model: Path, out: Path, plan: dict) -> None:
    """Every shard opens with safetensors; one fused group's gate_proj equals its recomputation from the input."""
    from ffnfusion.io.checkpoint import LazySafetensors, verify_fused_checkpoint

    verify_fused_checkpoint(out)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        with safe_open(out / shard, framework="pt") as f:
            assert set(f.keys()) == {n for n, s in weight_map.items() if s == shard}
    source = LazySafetensors(model)
    group = plan["fuse_ffn"][-1]
    index = group[0] - sum(len(g) - 1 for g in plan["fuse_ffn"][:-1])
    want = torch.cat(
        [
            (
                source.get(f"model.layers.{i}.mlp.gate_proj.weight").float()
                * source.get(f"model.layers.{i}.post_attention_layernorm.weight").float()
            ).to(torch.bfloat16)
            for i in group
        ]
    )
    got = LazySafetensors(out).get(f"model.layers.{index}.mlp.gate_proj.weight")
    assert torch.equal(got, want), "fused group differs from its recomputation"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="scratch folder (deleted afterwards)")
    parser.add_argument("--layers", type=int, default=68)
    parser.add_argument("--group", type=int, default=4, help="FFNs per fused group")
    parser.add_argument("--first", type=int, help="first fused layer (default: just past the middle)")
    parser.add_argument("--input-shard-gb", type=float, default=5.0)
    parser.add_argument("--output-shard-gb", type=float, default=5.0)
    parser.add_argument("--writer", choices=["stream", "buffered", "both"], default="stream")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    config = dict(CONFIG, num_hidden_layers=args.layers)
    need = 2.05 * sum(2 * torch.Size(s).numel() for s in all_shapes(config).values())
    free = shutil.disk_usage(args.dir.parent if not args.dir.exists() else args.dir).free
    if need > free:
        sys.exit(f"{need / 1e9:.1f} GB needed for input and output, {free / 1e9:.1f} GB free: pass fewer --layers.")
    if args.dir.exists():
        sys.exit(f"{args.dir} exists; pass a new scratch folder.")
    model, plan_file = args.dir / "model", args.dir / "plan.json"
    try:
        t0 = time.perf_counter()
        total = generate(model, config, int(args.input_shard_gb * 2**30))
        # Flush the generated files first so their writeback is not charged to the first fuse run.
        os.sync()
        gen_s = time.perf_counter() - t0
        plan = make_plan(args.layers, args.group, first=args.first if args.first is not None else args.layers // 2 + 2)
        plan_file.write_text(json.dumps(plan))
        group_bytes = 3 * args.group * 2 * config["hidden_size"] * config["intermediate_size"]
        print(
            f"input: {total / 1e9:.2f} GB in {len(list(model.glob('*.safetensors')))} shards, written in {gen_s:.0f} s"
        )
        print(f"plan: {json.dumps(plan)}")
        print(f"one fused group's tensors: {group_bytes / 2**30:.2f} GiB; RSS budget {group_bytes / 2**30 + 1:.2f} GiB")
        print(
            "\n| writer | input GB | output GB | peak RSS GiB | wall s (incl. sync) | GB/s in | GB/s in+out | cpu s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        writers = ["stream", "buffered"] if args.writer == "both" else [args.writer]
        for writer in writers:
            out = args.dir / f"fused-{writer}"
            common = [str(model), "--plan", str(plan_file), "--out", str(out)]
            shard = ["--max-shard-size-gb", str(args.output_shard_gb)]
            if writer == "stream":
                cmd = [sys.executable, "-m", "ffnfusion.cli", "fuse", *common, *shard]
            else:
                cmd = [sys.executable, __file__, "--buffered-fuse", *common, *shard]
            print(f"<!-- /usr/bin/time -v {' '.join(cmd)} -->", flush=True)
            m = timed_fuse(cmd)
            # Neither writer fsyncs; count the writeback still pending at exit so that GB/s is the disk's real rate.
            t0 = time.perf_counter()
            os.sync()
            m["wall_s"] += time.perf_counter() - t0
            written = folder_bytes(out)
            check_output(model, out, plan)
            print(
                f"| {writer} | {total / 1e9:.2f} | {written / 1e9:.2f} | {m['peak_rss_gib']:.2f} | {m['wall_s']:.0f} "
                f"| {total / 1e9 / m['wall_s']:.3f} | {(total + written) / 1e9 / m['wall_s']:.3f} | {m['cpu_s']:.0f} |",
                flush=True,
            )
            shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


def buffered_fuse() -> None:
    """The shard-buffered baseline: fuse() with the writer that holds up to one output shard (no up-front layout)."""
    import ffnfusion.fuse as fuse_module
    from ffnfusion.cli import app

    real = fuse_module.write_fused_checkpoint

    def buffered(*args, infos=None, **kwargs):
        return real(*args, **kwargs)

    fuse_module.write_fused_checkpoint = buffered
    sys.argv = [sys.argv[0], "fuse", *sys.argv[2:]]
    app()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--buffered-fuse":
        buffered_fuse()
    else:
        main()
