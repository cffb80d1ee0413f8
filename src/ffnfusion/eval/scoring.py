"""The `eval` stage's text scores: perplexity and fidelity to a reference (KL, top-1), exact to float64 sums.

Perplexity and fidelity share one sliding-window scheme over a token stream (the usual Hugging Face recipe):
windows of `context_len` tokens start every `stride` tokens, and each window scores only the tokens no earlier
window scored, each with at least `context_len - stride` tokens of context (all of them when one window covers
the stream). A window's first token has no context inside it and is never scored, so with `stride <
context_len` every token after the stream's first is scored exactly once, and with non-overlapping windows
(`stride == context_len`) one token per window is skipped. The last window is moved back to end at the
stream's end, so all windows have the same length and batch without padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ffnfusion.io.progress import progress_bar


class EvalError(ValueError):
    """Evaluation input that cannot be used: bad settings, mismatched tokenizers, unknown tasks."""


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    score_from: int  # first token (stream index) whose prediction is scored in this window


def sliding_windows(n_tokens: int, context_len: int, stride: int | None = None) -> list[Window]:
    """The windows covering a stream of `n_tokens`; no target is scored twice (see the module docstring)."""
    stride = context_len if stride is None else stride
    if context_len < 2:
        raise EvalError(f"context length must be at least 2 tokens (got {context_len}).")
    if not 1 <= stride <= context_len:
        raise EvalError(f"stride must be between 1 and the context length {context_len} (got {stride}).")
    if n_tokens < 2:
        raise EvalError(f"the text has {n_tokens} token(s); at least 2 are needed to score a prediction.")
    windows, scored_to, begin = [], 1, 0
    while scored_to < n_tokens:
        end = min(begin + context_len, n_tokens)
        start = max(0, end - context_len)
        windows.append(Window(start, end, max(scored_to, start + 1)))
        scored_to = end
        begin += stride
    return windows


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _batches(
    stream: torch.Tensor, windows: list[Window], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(input ids [B, L], target ids [B, L-1], score mask [B, L-1], scored tokens) per batch of windows."""
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        ids = torch.stack([stream[w.begin : w.end] for w in chunk])
        length = ids.shape[1]
        # Logit at window position p predicts stream token begin + p + 1.
        target_pos = torch.stack([torch.arange(w.begin + 1, w.begin + length) for w in chunk])
        mask = target_pos >= torch.tensor([w.score_from for w in chunk])[:, None]
        yield ids, ids[:, 1:], mask, int(mask.sum())


def _check_stream(token_stream: torch.Tensor) -> torch.Tensor:
    if not isinstance(token_stream, torch.Tensor) or token_stream.dtype != torch.long or token_stream.ndim != 1:
        raise EvalError("token_stream must be a 1-D LongTensor of token ids.")
    return token_stream.cpu()


def _check_vocab(model: torch.nn.Module, token_stream: torch.Tensor, name: str = "model") -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and token_stream.numel() and int(token_stream.max()) >= vocab:
        raise EvalError(
            f"the text holds token id {int(token_stream.max())} but the {name}'s vocabulary has {vocab} entries: "
            "was it tokenized with another model's tokenizer?"
        )


# Elements of one [tokens, vocab] temporary: a batch's scored positions are reduced this many logits at a time
# (2**23 fp32 values = 32 MiB, a handful of them alive at once; 55 tokens at a 152k vocabulary, 170 at 49k), so
# memory depends neither on the number of windows nor on the batch size.
_CHUNK_ELEMENTS = 2**23


def _head_split(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, LM head) of a causal LM whose logits are exactly `lm_head(decoder(ids).last_hidden_state)`.

    Only the classes known to compute their logits that way (the supported families and DeciLM, exact types: a
    subclass may change its forward); None for any other module, which is then run whole.
    """
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    from ffnfusion.modeling.modeling_decilm import DeciLMForCausalLM

    known = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, DeciLMForCausalLM)
    if type(model) not in known:
        return None
    body, head = getattr(model, "model", None), model.get_output_embeddings()
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


class _NextTokenLogits:
    """Next-token logits of one batch of windows [B, L], computed for a few positions at a time.

    Models with a known LM head run only their decoder here, and the head is applied to the positions asked for,
    so a batch never holds its [B, L-1, V] logits (2.5 GB in fp32 for 8 x 512 tokens at a 152k vocabulary). Any
    other module (whose forward takes `input_ids` and returns logits) is run whole and its logits indexed.
    """

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor):
        ids = ids.to(_device_of(model))
        split = _head_split(model)
        if split is None:
            out = model(input_ids=ids, use_cache=False)
            self._head = None
            self._states = (out.logits if hasattr(out, "logits") else out[0])[:, :-1]
            self.vocab = self._states.shape[-1]
        else:
            body, self._head = split
            self._states = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            self.vocab = self._head.out_features

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, V] at (window `rows[i]`, position `cols[i]`); position p predicts token p + 1."""
        device = self._states.device
        x = self._states[rows.to(device), cols.to(device)]
        # fp32 at least: low-precision logits would bias the log-softmax.
        return (x if self._head is None else self._head(x)).float()


def _normalize(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u = logits - row max, exp(u), s = sum of exp(u) in float64) for fp32 logits [n, V].

    Log-probabilities over the last (vocabulary) dimension are u - log s. The sum is torch's `sum`, which adds
    pairwise (cascade summation): on SmolLM2's 49k vocabulary it is within 1e-8 of float64 per token, where the
    fused fp32 log_softmax kernel, which adds each vector lane sequentially, reads 3e-6 low (and the former
    cross-entropy over a non-last dimension 4e-5 low). The elementwise work stays in fp32, about the cost of one
    log_softmax.
    """
    u = logits - logits.amax(-1, keepdim=True)
    e = u.exp()
    return u, e, e.sum(-1).double()


@torch.inference_mode()
def _score_batch(
    logits: _NextTokenLogits,
    ref: _NextTokenLogits | None,
    mask: torch.Tensor,
    targets: torch.Tensor,
    n: int,
    sums: torch.Tensor,
) -> None:
    """Add one batch's NLL, KL and top-1 agreements to `sums`, `_CHUNK_ELEMENTS` logits at a time."""
    device = sums.device
    where = mask.nonzero()  # (window, position) of each scored prediction, in the order of targets[mask]
    scored_targets = targets[mask].to(device)
    step = max(1, _CHUNK_ELEMENTS // logits.vocab)
    for first in range(0, n, step):
        rows, cols = where[first : first + step].unbind(1)
        u, e, s = _normalize(logits(rows, cols).to(device))
        del e
        log_s = s.log()
        # -log q(target) = log s - u[target]
        sums[0] += (log_s - u.gather(1, scored_targets[first : first + step, None])[:, 0].double()).sum()
        if ref is None:
            continue
        if ref is logits:
            sums[2] += len(rows)  # KL 0, every top-1 agrees
            continue
        ref_u, ref_e, ref_s = _normalize(ref(rows, cols))
        sums[2] += (ref_u.argmax(-1) == u.argmax(-1)).sum()
        # KL(p || q) = sum_v p_v (log p_v - log q_v) = E_p[ref_u - u] - log s_p + log s_q, p = ref_e / s_p.
        # The shifted logits are small where p is large; terms with p_v = 0 add nothing (even where
        # log q_v = -inf, which would make 0 * inf = nan).
        weighted = ref_u.sub_(u).masked_fill_(ref_e == 0, 0.0).mul_(ref_e)
        sums[1] += (weighted.sum(-1).double() / ref_s - ref_s.log() + log_s).sum()
        del weighted, ref_u, ref_e


def score_windows(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    token_stream: torch.Tensor,
    context_len: int,
    stride: int | None,
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(perplexity of `model`, its fidelity to `reference` or None) in one pass over the windows.

    Each batch of windows is reduced to per-token sums as soon as it is computed: the reference and the model run
    on the same batch, their logits are taken `_CHUNK_ELEMENTS` at a time and normalized over the vocabulary (last)
    dimension (`_normalize`), per-token values are formed in float64 and summed in float64. Memory is flat in the
    number of windows and in the batch size; a model that is its own reference runs once.
    """
    stream = _check_stream(token_stream)
    _check_vocab(model, stream, "model")
    if reference is not None:
        _check_vocab(reference, stream, "reference")
    stride = context_len if stride is None else stride
    windows = sliding_windows(stream.numel(), context_len, stride)
    device = _device_of(reference if reference is not None else model)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, KL(reference || model), top-1 agreements
    total_tokens = 0
    desc = "perplexity" if reference is None else "perplexity, fidelity"
    # rich, like every stage's bar: in a log file it writes the finished bar once, not a line per update
    with progress_bar(progress, stream.numel() - 1, desc, unit="tokens") as advance:
        for ids, targets, mask, n in _batches(stream, windows, batch_size):
            logits = _NextTokenLogits(model, ids)
            ref = None
            if reference is not None:
                ref = logits if reference is model else _NextTokenLogits(reference, ids)
                if ref.vocab != logits.vocab:
                    raise EvalError(
                        f"model and reference have different vocabulary sizes ({logits.vocab} vs {ref.vocab}): "
                        "fidelity needs the same tokenizer."
                    )
            _score_batch(logits, ref, mask, targets, n, sums)
            total_tokens += n
            if advance is not None:
                advance(n)
            del logits, ref
    nll, kl, agree = sums.tolist()
    common = {"tokens": total_tokens, "windows": len(windows), "context_len": context_len, "stride": stride}
    ppl = {"ppl": math.exp(nll / total_tokens), "nll": nll / total_tokens, **common}
    if reference is None:
        return ppl, None
    return ppl, {"kl": kl / total_tokens, "top1": agree / total_tokens, **common}


def perplexity(
    model: torch.nn.Module,
    token_stream: torch.Tensor,
    context_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-weighted sliding-window perplexity of `model` on `token_stream` (1-D LongTensor).

    Returns {"ppl", "nll" (mean per scored token, nats), "tokens" (scored), "windows", "context_len", "stride"}.
    `stride` defaults to `context_len` (non-overlapping windows); a smaller stride gives each token more context.
    Works for any module whose forward takes `input_ids` and returns logits (transformers models, DeciLM).
    Log-probabilities are taken in float64 over the vocabulary, a bounded number of positions at a time.
    """
    return score_windows(model, None, token_stream, context_len, stride, batch_size, progress)[0]


def fidelity(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    token_stream: torch.Tensor,
    context_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """How closely `model` follows `reference` on `token_stream`, over the same windows as `perplexity`.

    Returns {"kl": mean KL(reference || model) of next-token distributions (nats per token),
    "top1": fraction of positions where both models' most likely next token is the same, "tokens", ...}.
    Both models run on one batch of windows at a time; memory does not grow with the number of windows.
    """
    fid = score_windows(model, reference, token_stream, context_len, stride, batch_size, progress)[1]
    assert fid is not None
    return fid


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot tasks through lm-eval-harness
