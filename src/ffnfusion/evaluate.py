"""The `eval` stage: perplexity, fidelity to the original model, and zero-shot tasks through lm-eval-harness.

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
import torch.nn.functional as F


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


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, L-1, V] in fp32 (low-precision logits would bias the log-softmax)."""
    out = model(input_ids=ids.to(_device_of(model)), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, :-1].float()


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


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", disable=not enabled, dynamic_ncols=True)


@torch.inference_mode()
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
    """
    stream = _check_stream(token_stream)
    _check_vocab(model, stream)
    stride = context_len if stride is None else stride
    windows = sliding_windows(stream.numel(), context_len, stride)
    total_nll, total_tokens = 0.0, 0
    with _progress(stream.numel() - 1, "perplexity", progress) as bar:
        for ids, targets, mask, n in _batches(stream, windows, batch_size):
            logits = _logits(model, ids)
            nll = F.cross_entropy(logits.transpose(1, 2), targets.to(logits.device), reduction="none")
            # Sum in float64: tens of thousands of fp32 partial sums drift in the 5th digit.
            total_nll += float(nll[mask.to(nll.device)].double().sum())
            total_tokens += n
            bar.update(n)
    mean = total_nll / total_tokens
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "windows": len(windows),
        "context_len": context_len,
        "stride": stride,
    }


@torch.inference_mode()
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
    """
    stream = _check_stream(token_stream)
    _check_vocab(model, stream, "model")
    _check_vocab(reference, stream, "reference")
    stride = context_len if stride is None else stride
    windows = sliding_windows(stream.numel(), context_len, stride)
    total_kl, agree, total_tokens = 0.0, 0, 0
    with _progress(stream.numel() - 1, "fidelity", progress) as bar:
        for ids, _targets, mask, n in _batches(stream, windows, batch_size):
            ref_logits = _logits(reference, ids)
            logits = _logits(model, ids).to(ref_logits.device)
            if logits.shape[-1] != ref_logits.shape[-1]:
                raise EvalError(
                    f"model and reference have different vocabulary sizes ({logits.shape[-1]} vs "
                    f"{ref_logits.shape[-1]}): fidelity needs the same tokenizer."
                )
            m = mask.to(ref_logits.device)
            ref_logp = F.log_softmax(ref_logits[m], dim=-1)
            logp = F.log_softmax(logits[m], dim=-1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            total_kl += float(kl.double().sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
            total_tokens += n
            bar.update(n)
    return {
        "kl": total_kl / total_tokens,
        "top1": agree / total_tokens,
        "tokens": total_tokens,
        "windows": len(windows),
        "context_len": context_len,
        "stride": stride,
    }
