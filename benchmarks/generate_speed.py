"""Corpus generation speed: the sampling engine (CUDA graphs, continuous batching) vs today's eager `generate`.

Random weights of a real model's shape (speed does not depend on weight values). For each batch size the timed
region is the real corpus loop, `generate_shard` (sampling, slot refill at every sync, host-side packing), wall
clock after `torch.cuda.synchronize`, after a warm-up shard; the step alone is timed with CUDA events over graph
replays. A random model almost never samples its EOS, so `--stop-every K` makes every K-th token id a stop token
(documents then end at varied lengths and slots are refilled, as with a real model). The baseline is the eager
path `--data self` used before (transformers `generate`, do_sample, temperature 1, batch 64), in the same run.
Before timing, temperature-0 output is checked against the greedy `DecodeEngine` on the same weights.

    python benchmarks/generate_speed.py --shape smollm2-135m --batch-sizes 256,512,1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ffnfusion.bench.shapes import random_model
from ffnfusion.engine.decode import DecodeEngine
from ffnfusion.engine.sampling import SamplingEngine
from ffnfusion.formats.plan import Plan
from ffnfusion.generate.shards import generate_shard
from ffnfusion.surgery import fuse_model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check_greedy(decilm, vocab: int) -> float:
    """Fraction of tokens where temperature-0 sampling equals the greedy DecodeEngine (1-token prompts)."""
    prompts = torch.randint(0, vocab, (8, 1), generator=torch.Generator().manual_seed(1))
    greedy = DecodeEngine(decilm, 8, 65)
    ref, _ = greedy.generate(prompts.to(greedy.device), 64)
    del greedy
    engine = SamplingEngine(decilm, 8, 65, max_prompt=1, temperature=0)
    engine.fill(list(range(8)), prompts.tolist())
    for _ in range(70):
        engine.step()
    got = torch.tensor([d.tokens[1:] for _, d in sorted(engine.collect())])
    return float((got == ref.cpu()).float().mean())


def step_ms(engine: SamplingEngine, steps: int = 50) -> float:
    engine.fill(list(range(engine.max_batch)), [[0]] * engine.max_batch)
    engine.step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(steps):
        start.record()
        engine.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_fused_top_p(vocab: int, draws: int = 1 << 20) -> dict:
    """The fused top-p kernel on the GPU: `draws` samples of one row of logits against the nucleus distribution
    (chi-square at 0.1%), and no token outside it."""
    from scipy.stats import chi2

    from ffnfusion.engine.top_p_kernel import top_p_sample

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(vocab, generator=g) * 4).cuda()
    p = logits.float().softmax(-1)
    order = p.argsort(descending=True)
    above = torch.zeros_like(p)
    above[order] = torch.cumsum(p[order], 0) - p[order]  # ties aside (random logits): mass strictly above
    q = torch.where(above < 0.95, p, 0.0)
    q /= q.sum()
    rng = torch.tensor([7, 0], dtype=torch.long, device="cuda")
    draws_ = top_p_sample(logits.expand(draws, vocab), 1.0, 0.95, rng)  # stride 0: one row in memory, read by all
    counts = torch.bincount(draws_, minlength=vocab).float()
    support = q > 0
    expected = q[support] * draws
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    critical = float(chi2.ppf(0.999, int(support.sum()) - 1))
    outside = int(counts[~support].sum())
    return {"chi_square": stat, "critical_0.1%": critical, "outside_nucleus": outside, "nucleus": int(support.sum()),
            "ok": stat < critical and outside == 0}  # fmt: skip


def engine_rate(
    decilm, batch: int, seq_len: int, tokens: int, top_p: float, stop_every: int, repeats: int, fused: bool = False
) -> dict:
    vocab = decilm.config.vocab_size
    stops = list(range(stop_every - 1, vocab, stop_every)) if stop_every else []
    engine = SamplingEngine(
        decilm, batch, seq_len, max_prompt=1, stop_ids=stops, temperature=1.0, top_p=top_p, fused_top_p=fused
    )
    sequences = max(1, tokens // seq_len)
    generate_shard(engine, lambda: [0], max(1, batch // 4), seq_len, seed=123)  # warm-up: capture, compile
    rates, doc_lens = [], []
    for r in range(repeats):
        sync()
        t0 = time.perf_counter()
        out, docs = generate_shard(engine, lambda: [0], sequences, seq_len, seed=r)
        sync()
        rates.append(out.size / (time.perf_counter() - t0))
        doc_lens.append(float(docs[:, 1].mean()))
    ms = step_ms(engine)
    fused = engine.fused_top_p  # False where the kernel does not apply (top-p 1)
    del engine
    torch.cuda.empty_cache()
    return {
        "batch": batch, "top_p": top_p, "fused_top_p": fused, "tokens_per_repeat": sequences * seq_len,
        "tokens_per_s": rates,
        "median_tokens_per_s": statistics.median(rates), "step_ms": ms, "step_tokens_per_s": batch / ms * 1e3,
        "mean_document_tokens": statistics.mean(doc_lens),
    }  # fmt: skip


def eager_rate(model, batch: int, new_tokens: int, repeats: int) -> dict:
    """Today's `--data self` path: transformers `generate` with sampling (temperature 1) from one token."""
    prompt = torch.zeros((batch, 1), dtype=torch.long, device=model.device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
    model.generate(prompt, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model.generate(prompt, **kwargs)
        sync()
        rates.append(batch * new_tokens / (time.perf_counter() - t0))
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "tokens_per_s": rates,
        "median_tokens_per_s": statistics.median(rates),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch-sizes", default="256,512,1024")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=2**20, help="tokens per timed repeat")
    p.add_argument("--top-p", default="0.95,1.0", help="top-p values (each batch size with the first; the last too)")
    p.add_argument("--stop-every", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager-batch", type=int, default=64)
    p.add_argument("--eager-tokens", type=int, default=512)
    p.add_argument("--fused-top-p", action="store_true", help="also time top-p < 1 with the fused Triton sampler")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    model = random_model(a.shape, a.layers, torch.bfloat16, "cuda")
    device = torch.cuda.get_device_name()
    result = {"shape": a.shape, "layers": model.config.num_hidden_layers, "device": device, "seq_len": a.seq_len,
              "torch": torch.__version__, "stop_every": a.stop_every}  # fmt: skip
    result["eager"] = eager_rate(model, a.eager_batch, a.eager_tokens, max(1, a.repeats - 1))
    print(f"eager generate, batch {a.eager_batch}: {result['eager']['median_tokens_per_s']:,.0f} tokens/s", flush=True)
    decilm = fuse_model(model, Plan())
    del model
    result["greedy_match"] = check_greedy(decilm, decilm.config.vocab_size)
    print(f"temperature 0 vs greedy DecodeEngine: {result['greedy_match']:.4f} of tokens equal", flush=True)
    if a.fused_top_p:
        result["fused_top_p_check"] = check_fused_top_p(decilm.config.vocab_size)
        print(f"fused top-p kernel vs the nucleus distribution: {result['fused_top_p_check']}", flush=True)
    top_ps = [float(x) for x in a.top_p.split(",")]
    runs = []
    for batch in (int(b) for b in a.batch_sizes.split(",")):
        for top_p in top_ps if batch == int(a.batch_sizes.split(",")[-1]) else top_ps[:1]:
            for fused in (False, True) if a.fused_top_p and top_p < 1 else (False,):
                r = engine_rate(decilm, batch, a.seq_len, a.tokens, top_p, a.stop_every, a.repeats, fused)
                runs.append(r)
                print(f"engine batch {batch} top-p {top_p}{' fused' if fused else ''}: "
                      f"{r['median_tokens_per_s']:,.0f} tokens/s end to end, "
                      f"step {r['step_ms']:.3f} ms ({r['step_tokens_per_s']:,.0f} tokens/s), "
                      f"mean document {r['mean_document_tokens']:.0f} tokens", flush=True)  # fmt: skip
    result["engine"] = runs
    base = result["eager"]["median_tokens_per_s"]
    print(f"\n| {a.shape} ({result['layers']} layers), {device} | batch | top-p | tokens/s | vs eager |")
    print("|---|---|---|---|---|")
    print(f"| eager `generate` (today) | {a.eager_batch} | 1.0 | {base:,.0f} | 1.0x |")
    for r in runs:
        speed = r["median_tokens_per_s"]
        name = "sampling engine, fused top-p" if r["fused_top_p"] else "sampling engine"
        print(f"| {name} | {r['batch']} | {r['top_p']} | {speed:,.0f} | {speed / base:.1f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
