"""Layer-streamed vs in-memory `analyze` on a random Llama-shaped model: peak GPU memory, time, agreement.

    python benchmarks/analyze_streaming.py --dir /tmp/ffnfusion-analyze              # Llama-3.1-8B shape
    python benchmarks/analyze_streaming.py --dir D --shape llama3-70b --layers 12    # 70B widths, 12 layers

Writes a random bf16 checkpoint (several shards, an index, and a word-level tokenizer over the model's vocabulary),
a calibration text of random vocabulary words, then runs `ffnfusion.analyze.analyze` once per mode, each in its own
process so that peak memory is that mode's alone:

- `streamed`: --stream with the activations wherever they fit (on the GPU when they do),
- `streamed-cpu`: --stream --activations cpu (activations in pinned host memory, copied per layer),
- `memory`: the whole model on the GPU (skipped with --no-memory, e.g. when it does not fit).

Prints one Markdown table (peak allocated GPU memory, wall and measurement seconds, host peak RSS) and the largest
difference of every streamed analysis from the in-memory one, then deletes what it wrote unless --keep.
Random weights: the analysis values mean nothing, the memory and time do.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuse_streaming import CONFIG, all_shapes

SHAPES = {
    "llama3-8b": dict(CONFIG, num_hidden_layers=32),
    "llama3-70b": dict(
        CONFIG, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_hidden_layers=80
    ),
    # For a dry run of the script itself on a CPU.
    "tiny": dict(CONFIG, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, num_hidden_layers=4),
}
MODES = ("streamed", "streamed-cpu", "memory")


def write_checkpoint(folder: Path, config: dict, device: str, shard_bytes: int = 5 * 2**30) -> int:
    """Random bf16 weights drawn on the GPU (fast), written shard by shard; plus a tokenizer over the vocabulary."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = all_shapes(config)
    gen = torch.Generator(device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []
    total = 0

    def flush() -> None:
        files.append(list(shard))
        save_file(shard, folder / f"part-{len(files)}.safetensors", metadata={"format": "pt"})
        shard.clear()

    for name, shape in shapes.items():
        if len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=gen, device=device)
        else:
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(0.02)
        nbytes = t.numel() * 2
        if shard and sum(v.numel() * 2 for v in shard.values()) + nbytes > shard_bytes:
            flush()
        shard[name] = t.to(torch.bfloat16).cpu()
        total += nbytes
    flush()
    n = len(files)
    weight_map = {}
    for i, names in enumerate(files):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (folder / f"part-{i + 1}.safetensors").rename(folder / new)
        weight_map |= dict.fromkeys(names, new)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    vocab = {f"w{i}": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w128000", eos_token="w128001")
    fast.save_pretrained(folder)
    return total


def write_text(path: Path, vocab: int, words: int) -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(vocab, 128000), (words,), generator=gen).tolist()
    lines = [" ".join(f"w{i}" for i in ids[k : k + 100]) for k in range(0, words, 100)]
    path.write_text("\n".join(lines) + "\n")


def child(args: argparse.Namespace) -> None:
    """One analyze run; prints its figures as JSON on the last line."""
    from ffnfusion.analyze import analyze

    options = {"streamed": {"stream": True}, "streamed-cpu": {"stream": True, "activations": "cpu"}, "memory": {}}
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = analyze(
        str(args.dir / "model"),
        args.dir / f"out-{args.child}",
        data=str(args.dir / "text.txt"),
        samples=args.samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
        dtype="bfloat16",
        overwrite=True,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
        **options[args.child],
    )
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "mode": args.child,
                "seconds": round(wall, 1),
                "measure_seconds": round(result.measure_seconds, 1),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "forward_equivalents": result.analysis.cost.total_forward_equivalents,
                "device": result.device,
            }
        )
    )


def differences(a: dict, b: dict) -> dict[str, float]:
    def flat(x: dict, key: str) -> list[float]:
        return [v for row in x[key] for v in row if v is not None]

    out = {}
    for key in ("ffn_dependency", "block_dependency"):
        out[key] = max(abs(p - q) for p, q in zip(flat(a, key), flat(b, key)))
    kl = [abs(p["kl"] - q["kl"]) for p, q in zip(a["attention_importance"], b["attention_importance"])]
    out["attention_kl"] = max(kl)
    out["attention_kl_scale"] = max(p["kl"] for p in b["attention_importance"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    config = dict(SHAPES[args.shape])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    model = args.dir / "model"
    try:
        if not model.is_dir():
            started = time.perf_counter()
            size = write_checkpoint(model, config, args.device)
            print(f"wrote {size / 1e9:.1f} GB in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            write_text(args.dir / "text.txt", config["vocab_size"], args.samples * args.seq_len * 2)
        rows, analyses = [], {}
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--dir", str(args.dir), "--child", mode, "--samples", str(args.samples)]
            cmd += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            sys.stderr.write(proc.stderr[-4000:])
            if proc.returncode:
                rows.append({"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            analyses[mode] = json.loads((args.dir / f"out-{mode}" / "analysis.json").read_text())
        layers = config["num_hidden_layers"]
        shape = f"{args.shape} shape, {layers} layers, {args.samples} x {args.seq_len} tokens, batch {args.batch_size}"
        print(f"\n{shape}\n")
        print("| mode | peak GPU alloc. (GiB) | peak reserved (GiB) | wall (s) | measure (s) | host peak RSS (GiB) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['mode']} | failed: {r['error']} | | | | |")
                continue
            print(
                f"| {r['mode']} | {r['peak_allocated_gib']} | {r['peak_reserved_gib']} | {r['seconds']} | "
                f"{r['measure_seconds']} | {r['host_peak_rss_gib']} |"
            )
        print(json.dumps(rows))
        if "memory" in analyses:
            for mode in ("streamed", "streamed-cpu"):
                if mode in analyses:
                    diff = differences(analyses[mode], analyses["memory"])
                    print(f"{mode} vs memory, largest difference:", json.dumps(diff))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
