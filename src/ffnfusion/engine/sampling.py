"""Sampling with continuous batching on the decode engine: every slot at its own position, refilled as it ends.

`DecodeEngine` runs one batch in lockstep (one position for all rows), which suits timing. Writing a corpus needs
rows that start and stop at different times: a row that emits a stop token (or reaches the length cap) is handed a
new prompt at the next sync while the others keep going, so no slot idles on a finished sequence for long.

One decode step here does, for every slot at once and on the device (one CUDA graph on GPUs):
  logits at the slot's own position -> sample (temperature, top-p) -> feed the next prompt token instead while the
  slot is still inside its prompt -> record the token -> mark the slot done on a stop token or at the length cap.
Prompts are fed one token per step (their K/V are written by the same decode step), so there is no separate
prefill and every step has the same shape. The host looks at the slots every `sync_every` steps only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ffnfusion.engine import top_p_kernel
from ffnfusion.engine.decode import DecodeEngine
from ffnfusion.engine.kernels import TritonOps, rotate_half


class RowPositionOps:
    """The engine's ops with one position per row (decode only): rope/cache write and attention read `pos[b]`."""

    def __init__(self, base):
        self.base = base
        self.name = base.name
        self.triton = isinstance(base, TritonOps)

    def add_rmsnorm(self, x, delta, weight, eps):
        return self.base.add_rmsnorm(x, delta, weight, eps)

    def silu_mul(self, gate_up):
        return self.base.silu_mul(gate_up)

    def rope_store(self, qkv, cos, sin, pos, q_out, k_cache, v_cache, batch: int, seq: int) -> None:
        if seq != 1:
            raise ValueError("per-row positions take one token per row")
        heads, kv_heads, d = q_out.shape[1], k_cache.shape[1], q_out.shape[2]
        if self.triton:
            self.base.rope_store(qkv, cos, sin, pos, q_out, k_cache, v_cache, batch, 1, per_row=True)
            return
        c = cos.index_select(0, pos)[:, None, :]
        s = sin.index_select(0, pos)[:, None, :]
        q = qkv[:, : heads * d].view(batch, heads, d)
        k = qkv[:, heads * d : (heads + kv_heads) * d].view(batch, kv_heads, d)
        v = qkv[:, (heads + kv_heads) * d :].view(batch, kv_heads, d)
        q_out.copy_(q * c + rotate_half(q) * s)
        rows = torch.arange(batch, device=pos.device)
        k_cache[rows, :, pos] = k * c + rotate_half(k) * s
        v_cache[rows, :, pos] = v

    def decode_attention(self, q, k_cache, v_cache, pos):
        b, heads, d = q.shape
        kv_heads = k_cache.shape[1]
        if self.triton:
            return self.base.decode_attention(q, k_cache, v_cache, pos, per_row=True)
        length = k_cache.shape[2] if getattr(self.base, "static", False) else int(pos.max()) + 1
        keep = (torch.arange(length, device=q.device)[None] <= pos[:, None]).view(b, 1, 1, length)
        out = F.scaled_dot_product_attention(
            q.view(b, kv_heads, heads // kv_heads, d), k_cache[:b, :, :length], v_cache[:b, :, :length], attn_mask=keep
        )
        return out.reshape(b, heads * d)


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
    rounds: int = 3,
) -> torch.Tensor:
    """One token per row of `logits` [batch, vocab]: greedy at temperature 0, else sampled (fixed shapes, no sync).

    Full-vocabulary sampling is the Gumbel-max trick (argmax of logits/T + Gumbel noise): no softmax, no sort.
    Top-p is rejection sampling without a sort: draw from the tokens above a pivot probability, accept the draw when
    the mass of strictly more probable tokens is below `top_p` (it is in the nucleus), else raise the pivot to the
    draw and try again. Accepted draws are exactly nucleus samples; after `rounds` rejections (probability below
    (1 - top_p)^rounds) the most probable token is taken.
    """
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_p >= 1.0:
        noise = torch.empty_like(scaled).exponential_(generator=generator)
        return (scaled - noise.log_()).argmax(-1)
    probs = scaled.softmax(-1)
    choice = probs.argmax(-1)
    accepted = torch.zeros_like(choice, dtype=torch.bool)
    pivot = torch.full_like(probs[:, 0], -1.0)
    for _ in range(rounds):
        noise = torch.empty_like(probs).exponential_(generator=generator)
        race = torch.where(probs > pivot[:, None], probs / noise, -1.0)
        draw = race.argmax(-1)
        p_draw = probs.gather(1, draw[:, None])
        above = torch.where(probs > p_draw, probs, 0.0).sum(-1)
        ok = (above < top_p) & ~accepted
        choice = torch.where(ok, draw, choice)
        accepted |= ok
        pivot = torch.where(accepted, pivot, p_draw[:, 0])
    return choice


@dataclass
class Document:
    """One finished slot: its tokens (prompt + generated) and whether a stop token ended it (else the cap)."""

    tokens: list[int]
    prompt_len: int
    stopped: bool


class SamplingEngine(DecodeEngine):
    """`max_batch` slots, each a sequence of up to `max_len` tokens (prompt included), sampled and refilled.

    `stop_ids`: tokens that end a sequence (kept as its last token). `max_prompt`: the longest prompt accepted.
    """

    def __init__(
        self,
        model,
        max_batch: int,
        max_len: int,
        *,
        max_prompt: int,
        stop_ids: list[int] | tuple[int, ...] = (),
        temperature: float = 1.0,
        top_p: float = 1.0,
        kernels: str = "auto",
        use_graphs: bool | None = None,
        fused_top_p: bool = True,
    ):
        super().__init__(model, max_batch, max_len, kernels=kernels, use_graphs=use_graphs)
        if not 1 <= max_prompt < max_len:
            raise ValueError(f"prompts of up to {max_prompt} tokens do not fit sequences of {max_len} tokens")
        self.ops = RowPositionOps(self.ops)
        self.temperature, self.top_p = temperature, top_p
        long = dict(dtype=torch.long, device=self.device)
        b = max_batch
        self.tok = torch.zeros(b, **long)
        self.row_pos = torch.zeros(b, **long)
        self.prompt = torch.zeros((b, max_prompt), **long)
        self.prompt_len = torch.ones(b, **long)
        self.hist = torch.zeros((b, max_len), **long)
        self.done = torch.ones(b, dtype=torch.bool, device=self.device)
        self.stop_ids = torch.tensor(sorted(set(stop_ids)) or [-1], **long)
        self.generator = None if self.use_graphs else torch.Generator(self.device)
        # One Triton kernel for top-p on CUDA, its noise keyed by [seed, step] held here and advanced inside the
        # step: 192k against 122k tokens/s for the torch rounds at 1,024 slots on an H200 (RESULTS.md).
        self.fused_top_p = fused_top_p and 0 < top_p < 1 and temperature > 0 and top_p_kernel.available(self.device)
        self.rng = torch.zeros(2, **long)
        self._graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0

    # ---------------------------------------------------------------------------------------------- device
    def _step(self) -> None:
        logits = self._logits(self.tok[:, None], self.row_pos, prefill=False)
        if self.fused_top_p:
            sampled = top_p_kernel.top_p_sample(logits, self.temperature, self.top_p, self.rng)
            self.rng[1] += 1
        else:
            sampled = sample_from_logits(logits, self.temperature, self.top_p, self.generator)
        live = ~self.done
        pos1 = torch.clamp(self.row_pos + 1, max=self.max_len - 1)
        in_prompt = pos1 < self.prompt_len
        prompt_next = self.prompt.gather(1, torch.clamp(pos1, max=self.prompt.shape[1] - 1)[:, None])[:, 0]
        feed = torch.where(in_prompt, prompt_next, sampled)
        feed = torch.where(live, feed, self.tok)
        self.hist.scatter_(1, pos1[:, None], torch.where(live, feed, self.hist.gather(1, pos1[:, None])[:, 0])[:, None])
        stopped = ~in_prompt & (feed[:, None] == self.stop_ids[None, :]).any(-1)  # isin may sync
        self.done |= live & (stopped | (pos1 >= self.max_len - 1))
        self.row_pos.copy_(torch.where(live, pos1, self.row_pos))
        self.tok.copy_(feed)

    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        saved = [t.clone() for t in (self.tok, self.row_pos, self.hist, self.done)]
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self._graph, pool=self._pool):
            self._step()
        for t, s in zip((self.tok, self.row_pos, self.hist, self.done), saved):
            t.copy_(s)

    def prepare(self) -> None:
        """Capture the step graph (once; its warm-up draws noise, so do it before seeding)."""
        if self.use_graphs and self._graph is None:
            self._capture()

    @torch.no_grad()
    def step(self) -> None:
        if self.use_graphs:
            self.prepare()
            self._graph.replay()
        else:
            self._step()
        self.steps += 1

    def reseed(self, seed: int) -> None:
        """Seed the sampling noise (the default CUDA generator under graphs, which replays read at each replay; the
        fused top-p kernel's [seed, step])."""
        self.rng.copy_(torch.tensor([seed, 0]))
        if self.generator is not None:
            self.generator.manual_seed(seed)
        else:
            torch.cuda.default_generators[self.device.index or 0].manual_seed(seed)

    # ------------------------------------------------------------------------------------------------ host
    @torch.no_grad()
    def fill(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Start `prompts` in slots `rows` (at position 0; their first token is fed at the next step)."""
        width = self.prompt.shape[1]
        if any(not 1 <= len(p) <= width for p in prompts):
            raise ValueError(f"prompts must have 1 to {width} tokens")
        padded = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = torch.tensor(p)
        idx = torch.tensor(rows, device=self.device)
        padded = padded.to(self.device)
        self.prompt.index_copy_(0, idx, padded)
        self.prompt_len.index_copy_(0, idx, torch.tensor([len(p) for p in prompts], device=self.device))
        self.row_pos.index_fill_(0, idx, 0)
        self.tok.index_copy_(0, idx, padded[:, 0])
        self.hist[idx, 0] = padded[:, 0]
        self.done.index_fill_(0, idx, False)

    @torch.no_grad()
    def collect(self) -> list[tuple[int, Document]]:
        """The finished slots as (row, document), slot order; the slots stay done until filled again."""
        done = self.done.nonzero()[:, 0]
        if done.numel() == 0:
            return []
        lengths = (self.row_pos[done] + 1).tolist()
        prompt_lens = self.prompt_len[done].tolist()
        rows = self.hist[done].cpu()
        last = rows.gather(1, torch.tensor(lengths)[:, None] - 1)
        stopped = (last == self.stop_ids.cpu()[None, :]).any(-1).tolist()
        out = []
        for i, row in enumerate(done.tolist()):
            out.append((row, Document(rows[i, : lengths[i]].tolist(), prompt_lens[i], bool(stopped[i]))))
        return out

    def documents(
        self, next_prompt: Callable[[], list[int]], budget_tokens: int, seed: int, sync_every: int = 16
    ) -> Iterator[Document]:
        """Documents until `budget_tokens` tokens were yielded; unfinished slots are then dropped.

        Deterministic for one seed, batch size and `sync_every`: prompts are taken and documents returned in slot
        order at each sync, and the noise is seeded here.
        """
        self.prepare()
        self.reseed(seed)
        self.done.fill_(True)
        self.fill(list(range(self.max_batch)), [next_prompt() for _ in range(self.max_batch)])
        produced = 0
        while produced < budget_tokens:
            for _ in range(sync_every):
                self.step()
            finished = self.collect()
            for _, doc in finished:
                yield doc
                produced += len(doc.tokens)
            if finished and produced < budget_tokens:
                rows = [row for row, _ in finished]
                self.fill(rows, [next_prompt() for _ in rows])
