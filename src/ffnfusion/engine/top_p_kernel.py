"""Nucleus (top-p) sampling in one Triton kernel: the sampler's rejection rounds without [batch, vocab] temporaries.

`sample_from_logits` (engine/sampling.py) draws a top-p token by rejection: race the tokens above a pivot
probability (the exponential race: argmax p_j / E_j, E_j ~ Exp(1), picks j with probability proportional to p_j),
accept the winner when the mass of strictly more probable tokens is below top_p, else raise the pivot to the winner
and race again, three rounds. In torch every round is about seven passes over a [batch, vocab] tensor (noise,
division, masks, argmax, gather, sum), which at 1,024 slots and a 49k vocabulary is half of a SmolLM2 decode step.

Here one program per row does the same rounds in four passes over the row's logits, with the noise generated in
registers (Philox, keyed by the seed, the step counter, the row, the round and the token):
  pass 1: max and softmax normaliser (online), race 1 over all tokens, the most probable token;
  pass 2: the mass above draw 1, and race 2 over the tokens above draw 1 (used only if draw 1 is rejected);
  pass 3: the mass above draw 2, and race 3 above draw 2;
  pass 4: the mass above draw 3.
The first accepted draw is the sample; if all three are rejected (probability below (1 - top_p)^3), the most
probable token, as in torch. Work is in logit space: p_j > p_d exactly when logit_j > logit_d, and the race
argmax p_j / E_j is argmax logit_j / T - log E_j.

`rng` is a device tensor [seed, step]: the caller advances the step (in its CUDA graph) after every call, so a
captured graph draws fresh noise at each replay and a seed reproduces a whole run.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: sample_from_logits' torch path is used
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def top_p_sample(
    logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Tensor, block: int = 2048
) -> torch.Tensor:
    """One token per row of `logits` [batch, vocab] from the top-p nucleus at `temperature` (> 0, top_p < 1).

    `rng`: int64 [seed, step] on the logits' device; the step is read, not advanced (the caller advances it).
    Rows may share memory (stride 0); tokens must be contiguous.
    """
    if logits.stride(1) != 1:
        raise ValueError("top_p_sample needs logits contiguous along the vocabulary")
    if triton is None:
        raise RuntimeError("top_p_sample needs Triton")
    if not (temperature > 0 and 0 < top_p < 1):
        raise ValueError("top_p_sample is for temperature > 0 and 0 < top_p < 1")
    if rng.dtype != torch.long or rng.numel() != 2 or rng.device != logits.device:
        raise ValueError("rng must be an int64 [seed, step] tensor on the logits' device")
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.long, device=logits.device)
    block = min(block, triton.next_power_of_2(vocab))
    # vocab is a compile-time constant: one model, one vocabulary, one compilation (and loops the interpreter runs).
    _top_p_kernel[(batch,)](logits, logits.stride(0), out, rng, 1.0 / temperature, top_p, vocab=vocab, BLOCK=block)
    return out


if triton is not None:

    @triton.jit
    def _race_key(s, seed, noise_base, j):
        # logit / T - log(E), E = -log(U) ~ Exp(1). U < 1 always; U == 0 (p = 2^-31) gives E = inf: a lost race.
        u = tl.rand(seed, noise_base + j)
        return s - tl.log(-tl.log(u))

    @triton.jit
    def _above_and_race(
        base, vocab: tl.constexpr, pivot, fallback, m, inv_temp, seed, noise_base,
        BLOCK: tl.constexpr, RACE: tl.constexpr,
    ):  # fmt: skip
        """Unnormalised mass (exp(s - m)) of the tokens whose scaled logit s is above `pivot`, and, with RACE, the
        winner of the race among them (`fallback` when there are none)."""
        cols = tl.arange(0, BLOCK)
        neg = float("-inf")
        above = tl.full([], 0.0, tl.float32)
        key = tl.full([], neg, tl.float32)
        draw = fallback
        for start in range(0, vocab, BLOCK):
            j = start + cols
            ok = j < vocab
            s = tl.load(base + j, mask=ok, other=neg).to(tl.float32) * inv_temp
            higher = ok & (s > pivot)
            above += tl.sum(tl.where(higher, tl.exp(s - m), 0.0), axis=0)
            if RACE:
                k = tl.where(higher, _race_key(s, seed, noise_base, j), neg)
                draw = tl.where(tl.max(k, axis=0) > key, (start + tl.argmax(k, axis=0)).to(tl.int64), draw)
                key = tl.maximum(key, tl.max(k, axis=0))
        return above, draw

    @triton.jit
    def _top_p_kernel(logits_ptr, stride, out_ptr, rng_ptr, inv_temp, top_p, vocab: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        rows = tl.num_programs(0).to(tl.int64)
        seed = tl.load(rng_ptr)
        step = tl.load(rng_ptr + 1)
        base = logits_ptr + row * stride
        noise = (step * rows + row) * 3 * vocab  # offsets of this row's noise: + round * vocab + token
        cols = tl.arange(0, BLOCK)
        neg = float("-inf")

        # Pass 1: running max and normaliser; race 1 over every token; the most probable token.
        m = tl.full([], neg, tl.float32)
        z = tl.full([], 0.0, tl.float32)
        key1 = tl.full([], neg, tl.float32)
        draw1 = tl.full([], 0, tl.int64)
        top = tl.full([], 0, tl.int64)
        for start in range(0, vocab, BLOCK):
            j = start + cols
            ok = j < vocab
            s = tl.load(base + j, mask=ok, other=neg).to(tl.float32) * inv_temp
            block_max = tl.max(s, axis=0)
            top = tl.where(block_max > m, (start + tl.argmax(s, axis=0)).to(tl.int64), top)
            m_new = tl.maximum(m, block_max)
            z = z * tl.exp(m - m_new) + tl.sum(tl.where(ok, tl.exp(s - m_new), 0.0), axis=0)
            m = m_new
            k = tl.where(ok, _race_key(s, seed, noise, j), neg)
            draw1 = tl.where(tl.max(k, axis=0) > key1, (start + tl.argmax(k, axis=0)).to(tl.int64), draw1)
            key1 = tl.maximum(key1, tl.max(k, axis=0))
        s1 = tl.load(base + draw1).to(tl.float32) * inv_temp

        # Passes 2-4: the mass above each draw; the next race above it (kept only if that draw is rejected).
        above1, draw2 = _above_and_race(base, vocab, s1, draw1, m, inv_temp, seed, noise + vocab, BLOCK, True)
        s2 = tl.load(base + draw2).to(tl.float32) * inv_temp
        above2, draw3 = _above_and_race(base, vocab, s2, draw2, m, inv_temp, seed, noise + 2 * vocab, BLOCK, True)
        s3 = tl.load(base + draw3).to(tl.float32) * inv_temp
        above3, _ = _above_and_race(base, vocab, s3, draw3, m, inv_temp, seed, noise, BLOCK, False)

        limit = top_p * z
        choice = tl.where(above3 < limit, draw3, top)
        choice = tl.where(above2 < limit, draw2, choice)
        choice = tl.where(above1 < limit, draw1, choice)
        tl.store(out_ptr + row, choice)
