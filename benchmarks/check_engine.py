"""GPU correctness checks of the decode engine (run before timing anything).

1. Every Triton kernel against the plain-torch op on fresh random inputs, fp32 and bf16, with outputs and KV cache
   poisoned (NaN) beforehand so that unwritten or misplaced elements show.
2. The graph-captured engine (Triton kernels, and plain torch ops) against transformers' eager `generate`, token for
   token, on a random model of SmolLM2's shape: original and fused (FFN runs, parallel blocks), fp32 with TF32 off.
   In bf16 the fraction of matching tokens is reported (rounding differs between GEMM shapes, so near-ties can flip).

    python benchmarks/check_engine.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ffnfusion.bench.shapes import random_model
from ffnfusion.bench.timing import compare_tokens, eager_generate
from ffnfusion.engine.decode import DecodeEngine
from ffnfusion.engine.kernels import TorchOps, TritonOps
from ffnfusion.formats.plan import Plan
from ffnfusion.surgery import fuse_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_ops(dtype: torch.dtype, gen: torch.Generator) -> dict[str, float]:
    dev = "cuda"
    ref, tri = TorchOps(), TritonOps(torch.cuda.get_device_properties(0).multi_processor_count)

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=dev) * std).to(dtype)

    out: dict[str, float] = {}
    for hidden in (576, 4096):
        x, d, w = rnd(7, hidden), rnd(7, hidden), 1 + rnd(hidden, std=0.1)
        xa, xb = x.clone(), x.clone()
        ya, yb = ref.add_rmsnorm(xa, d, w, 1e-5), tri.add_rmsnorm(xb, d, w, 1e-5)
        out[f"add_rmsnorm[{hidden}] residual"] = rel(xb, xa)
        out[f"add_rmsnorm[{hidden}]"] = rel(yb, ya)
    gu = rnd(5, 2 * 1536)
    out["silu_mul"] = rel(tri.silu_mul(gu), ref.silu_mul(gu))
    for batch, seq, heads, kv, hd, length, p0 in ((2, 9, 9, 3, 64, 40, 0), (3, 1, 32, 8, 128, 600, 517)):
        qkv = rnd(batch * seq, (heads + 2 * kv) * hd)
        angles = torch.rand(length, hd // 2, generator=gen, device=dev) * 6
        cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
        sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
        pos = torch.tensor([p0], device=dev)
        res = {}
        for name, ops in (("torch", ref), ("triton", tri)):
            q = torch.full((batch * seq, heads, hd), float("nan"), device=dev, dtype=dtype)
            kc = torch.full((batch + 1, kv, length, hd), float("nan"), device=dev, dtype=dtype)
            vc = kc.clone()
            ops.rope_store(qkv, cos, sin, pos, q, kc, vc, batch, seq)
            res[name] = (q, kc, vc)
        for i, part in enumerate(("q", "k", "v")):
            a, b = res["torch"][i], res["triton"][i]
            written = ~torch.isnan(a)
            out[f"rope_store[{hd}] {part} writes the same slots"] = float((written != ~torch.isnan(b)).sum())
            out[f"rope_store[{hd}] {part}"] = rel(b[written], a[written])
    for batch, heads, kv, hd, length, p0 in (
        (1, 9, 3, 64, 640, 600),
        (8, 32, 8, 128, 640, 511),
        (32, 9, 3, 64, 640, 0),
    ):
        q = rnd(batch, heads, hd)
        kc, vc = rnd(batch, kv, length, hd), rnd(batch, kv, length, hd)
        pos = torch.tensor([p0], device=dev)
        # Slots past pos hold NaN: they must never be read.
        kc[:, :, p0 + 1 :] = float("nan")
        vc[:, :, p0 + 1 :] = float("nan")
        a = ref.decode_attention(q, kc, vc, pos)
        out[f"decode_attention[b{batch},{heads}/{kv},{hd},pos {p0}]"] = rel(tri.decode_attention(q, kc, vc, pos), a)
    return out


def check_engine(dtype: torch.dtype) -> list[dict]:
    rows = []
    base = random_model("smollm2-135m", layers=12, dtype=dtype, device="cuda", seed=1)
    plans = {
        "original": Plan(),
        "fused": Plan(remove_attention=[4, 5, 6, 8, 9], fuse_ffn=[[3, 4, 5, 6], [7, 8, 9]]),
        "parallel": Plan(parallel_blocks=[[1, 2], [10, 11]], remove_attention=[5], fuse_ffn=[[4, 5]]),
    }
    gen = torch.Generator().manual_seed(3)
    for name, plan in plans.items():
        model = fuse_model(base, plan)
        for batch in (1, 4):
            ids = torch.randint(0, model.config.vocab_size, (batch, 64), generator=gen).cuda()
            eager = eager_generate(model, ids, 32)
            for kernels in ("triton", "torch"):
                engine = DecodeEngine(model, batch, 96, kernels=kernels, use_graphs=True)
                tokens, _ = engine.generate(ids, 32)
                again, _ = engine.generate(ids, 32)
                row = {"model": name, "dtype": str(dtype), "batch": batch, "kernels": kernels}
                row |= compare_tokens(tokens, eager)
                row["replay_deterministic"] = bool(torch.equal(tokens, again))
                rows.append(row)
                del engine
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    report = {"ops": {str(dt): check_ops(dt, gen) for dt in (torch.float32, torch.bfloat16)}}
    report["engine"] = check_engine(torch.float32) + check_engine(torch.bfloat16)
    ok = True
    for dt, errs in report["ops"].items():
        for name, err in errs.items():
            limit = 0.0 if "same slots" in name else (1e-5 if "float32" in dt else 1e-2)
            bad = not err <= limit
            ok &= not bad
            print(f"{'FAIL' if bad else 'ok  '} {dt:15s} {name:50s} {err:.2e}")
    for row in report["engine"]:
        must = "float32" in row["dtype"]
        bad = must and not (row["greedy_match"] and row["replay_deterministic"])
        ok &= not bad
        print(("FAIL " if bad else "ok   ") + json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
