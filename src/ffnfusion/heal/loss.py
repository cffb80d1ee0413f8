"""Distillation loss that never holds [tokens x vocab] logits of both models: the LM heads run inside the loss.

`chunked_distillation_loss` computes exactly the loss of `ffnfusion.heal.distillation_loss`
(`kl_weight * T^2 * KL(teacher_T || student_T)` averaged over every position, `cos_weight * (1 - cos)` of the final
hidden states, optional `lm_weight * cross-entropy` of the next token) from the final hidden states and the two
LM head weights. The vocabulary-sized part runs a chunk of tokens at a time: per chunk the student and teacher
logits are one matrix product each, the softmaxes and the KL are taken in fp32, and the gradient of the loss with
respect to the student logits is formed there and then and pushed through the head at once (into the hidden
states and the head weight). So the backward pass has nothing vocabulary-sized left to do, and the peak extra
memory is a few [chunk x vocab] fp32 tensors instead of several [tokens x vocab] ones. The four head products
(student, teacher, two gradient products) are exactly the ones the plain loss does.

Matrix products run in the autocast dtype when autocast is on (bf16 under `--bf16`, as the plain path's
`lm_head` would), otherwise in the inputs' dtype; everything after the product is fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Elements of one [chunk x vocab] fp32 tensor: 2^26 is 256 MiB, about 1,365 tokens of a 49,152 vocabulary.
CHUNK_ELEMENTS = 1 << 26
# Logit gradients (compute dtype) gathered before one head-weight gradient product: 2^30 elements (2 GiB in bf16).
# One product over many tokens is much faster than one per chunk, each adding a [vocab x hidden] fp32 tensor.
GROUP_ELEMENTS = 1 << 30


def default_chunk(vocab: int) -> int:
    """Tokens per chunk: a power of two with about CHUNK_ELEMENTS logits, between 128 and 8192."""
    target = max(1, CHUNK_ELEMENTS // max(1, vocab))
    return int(min(8192, max(128, 1 << (target.bit_length() - 1))))


def _chunk_terms(
    zs: torch.Tensor,
    zt: torch.Tensor,
    target: torch.Tensor | None,
    temperature: float,
    scales: torch.Tensor,
    lm_grad: bool,
    want_lm: bool,
    want_grad: bool,
    grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sum of KL over the chunk's rows, sum of NLL, d loss / d student logits) for one chunk of fp32 logits.

    `scales` = [kl_scale, lm_scale], the factors of the KL sum and the NLL sum in the loss (weights, T^2, 1/count).
    They are a tensor, not floats: they change with the number of tokens per micro-batch, and the compiled function
    specialises on a float's value, so each batch size the automatic probe tried compiled it once more (until
    dynamo's limit of 8, after which it runs uncompiled). `lm_grad`: whether the LM term has a gradient.
    """
    zs, zt = zs.float(), zt.float()
    if temperature != 1.0:
        s_logp = F.log_softmax(zs / temperature, dim=-1)
        t_logp = F.log_softmax(zt / temperature, dim=-1)
    else:
        s_logp = F.log_softmax(zs, dim=-1)
        t_logp = F.log_softmax(zt, dim=-1)
    t_p = t_logp.exp()
    # As F.kl_div(s_logp, t_logp, log_target=True): sum of p_t * (log p_t - log p_s).
    kl = (t_p * (t_logp - s_logp)).sum()
    nll = zs.new_zeros(())
    grad = None
    if want_grad:
        # d/dz_s of KL(p_t || softmax(z_s / T)) = (softmax(z_s / T) - p_t) / T; kl_scale holds the T^2.
        grad = (s_logp.exp() - t_p) * (scales[0] / temperature)
    if want_lm:
        lm_logp = s_logp if temperature == 1.0 else F.log_softmax(zs, dim=-1)
        valid = target >= 0
        safe = target.clamp_min(0)
        picked = lm_logp.gather(1, safe[:, None])[:, 0]
        nll = -(picked * valid).sum()
        if want_grad and lm_grad:
            g_lm = lm_logp.exp()
            g_lm.scatter_add_(1, safe[:, None], -torch.ones_like(picked)[:, None])
            grad = grad + g_lm * (valid[:, None] * scales[1])
    return kl, nll, grad.to(grad_dtype) if grad is not None else None


_compiled_chunk_terms: Any = None


def _chunk_fn(compile_chunks: bool) -> Any:
    global _compiled_chunk_terms
    if not compile_chunks:
        return _chunk_terms
    if _compiled_chunk_terms is None:
        _compiled_chunk_terms = torch.compile(_chunk_terms, dynamic=False)
    return _compiled_chunk_terms


def _head_sums(
    s_hidden: torch.Tensor,
    ws: torch.Tensor,
    t_hidden: torch.Tensor,
    wt: torch.Tensor,
    target: torch.Tensor | None,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    chunk: int,
    fn: Any,
    compute_dtype: torch.dtype,
    terms: tuple[float, torch.Tensor, bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL and NLL over all tokens, chunk by chunk; fills grad_h and accumulates grad_w in place.

    The logits of one chunk never outlive it: only their gradients are kept, for a group of chunks, so the weight
    gradient is one large product per group instead of one small one per chunk.
    """
    temperature, scales, lm_grad, want_lm, want_grad = terms
    n, vocab = s_hidden.shape[0], ws.shape[0]
    kl_sum = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
    nll_sum = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
    group = max(chunk, GROUP_ELEMENTS // max(1, vocab) // chunk * chunk)
    for g_start in range(0, n, group):
        g_end = min(n, g_start + group)
        grads = (
            torch.empty(g_end - g_start, vocab, dtype=compute_dtype, device=s_hidden.device)
            if grad_w is not None
            else None
        )
        for start in range(g_start, g_end, chunk):
            end = min(g_end, start + chunk)
            zs = s_hidden[start:end].to(compute_dtype) @ ws.t()
            zt = t_hidden[start:end].to(compute_dtype) @ wt.t()
            tgt = target[start:end] if want_lm else None
            kl, nll, g = fn(zs, zt, tgt, temperature, scales, lm_grad, want_lm, want_grad, compute_dtype)
            kl_sum += kl
            nll_sum += nll
            if g is not None:
                if grad_h is not None:
                    grad_h[start:end] = g @ ws
                if grads is not None:
                    grads[start - g_start : end - g_start] = g
        if grads is not None:
            hs = s_hidden[g_start:g_end].to(compute_dtype)
            if compute_dtype == torch.float32:
                grad_w.addmm_(grads.t(), hs)
            else:
                grad_w += (grads.t() @ hs).float()
            del grads
    return kl_sum, nll_sum


class _FusedHeadDistill(torch.autograd.Function):
    """Loss of the head part (weighted KL + LM) with its gradients formed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        s_hidden: torch.Tensor,
        s_weight: torch.Tensor,
        t_hidden: torch.Tensor,
        t_weight: torch.Tensor,
        target: torch.Tensor | None,
        n_lm: int,
        kl_weight: float,
        lm_weight: float,
        temperature: float,
        want_lm: bool,
        chunk: int,
        compute_dtype: torch.dtype,
        compile_chunks: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = s_hidden.shape[0]
        kl_scale = kl_weight * temperature**2 / n
        lm_scale = lm_weight / max(1, n_lm)
        grad_h_needed, grad_w_needed = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_grad = grad_h_needed or grad_w_needed
        fn = _chunk_fn(compile_chunks)
        ws = s_weight.to(compute_dtype)
        wt = t_weight.to(compute_dtype)
        grad_h = torch.empty_like(s_hidden) if grad_h_needed else None
        grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if grad_w_needed else None
        # Filled on the device (a kernel argument each), not copied from the host: no sync in the training step.
        scales = torch.full((2,), kl_scale, dtype=torch.float32, device=s_hidden.device)
        scales[1] = lm_scale
        tm = (temperature, scales, lm_scale != 0, want_lm, want_grad)
        kl_sum, nll_sum = _head_sums(s_hidden, ws, t_hidden, wt, target, grad_h, grad_w, chunk, fn, compute_dtype, tm)
        kl = kl_sum * (temperature**2 / n)
        lm = nll_sum / max(1, n_lm)
        total = kl_weight * kl + (lm_weight * lm if want_lm else 0.0)
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w.to(s_weight.dtype) if grad_w is not None else torch.empty(0),
        )
        ctx.mark_non_differentiable(kl, lm)
        return total, kl, lm

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_total.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return (gh, gw) + (None,) * 11


def _autocast_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    kind = device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return fallback


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Flattened targets for every position: the next token, or -1 at the last position of each row."""
    target = torch.full_like(input_ids, -1)
    target[:, :-1] = input_ids[:, 1:]
    return target.reshape(-1)


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_head: torch.Tensor,
    input_ids: torch.Tensor,
    kl_weight: float = 1.0,
    cos_weight: float = 1.0,
    lm_weight: float = 0.0,
    temperature: float = 1.0,
    chunk: int | None = None,
    compile_chunks: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of `heal.distillation_loss`, from final hidden states [B, L, H] and LM head weights [V, H].

    Returns (total, detached parts for logging) with the same keys as `distillation_loss`: "kl", "cos", and "lm"
    when lm_weight > 0 or temperature == 1 (where it costs nothing extra).
    """
    hidden = student_hidden.shape[-1]
    s_flat = student_hidden.reshape(-1, hidden)
    t_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    want_lm = lm_weight > 0 or temperature == 1.0
    target = next_token_targets(input_ids) if want_lm else None
    dtype = _autocast_dtype(s_flat.device, s_flat.dtype)
    chunk = chunk or default_chunk(student_head.shape[0])
    with torch.autocast(s_flat.device.type, enabled=False):
        head_loss, kl, lm = _FusedHeadDistill.apply(
            s_flat,
            student_head,
            t_flat,
            teacher_head.detach(),
            target,
            input_ids.shape[0] * (input_ids.shape[1] - 1),
            kl_weight,
            lm_weight,
            temperature,
            want_lm,
            chunk,
            dtype,
            compile_chunks,
        )
    cos = 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1).mean()
    total = head_loss + cos_weight * cos
    parts = {"kl": kl.detach(), "cos": cos.detach()}
    if want_lm:
        parts["lm"] = lm.detach()
    return total, parts
