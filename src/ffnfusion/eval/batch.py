"""The automatic eval batch size: sequences per forward pass, sized by the logits they produce and the GPU's memory.

A forward pass keeps [batch x length x vocab] logits, and the scoring around it (the reference's logits beside the
model's for fidelity; lm-eval's fp32 log-softmax for tasks) about as much again, so logits set the memory a batch
needs. Small batches leave a GPU idle: on one H200, SmolLM2-135M's six-task eval (8,500 lm-eval requests and
301,360 tokens of perplexity) took 35.2 s at batch 8 and 14.1 s at 64, with the same scores (benchmarks/RESULTS.md,
"Eval: the automatic batch size").
"""

from __future__ import annotations

import torch

MAX_BATCH = 64
CPU_BATCH = 8
# lm-eval's task requests have their own lengths (context + continuation): a batch is sized for this many tokens a
# sequence when tasks run, or the perplexity window if that is longer.
TASK_TOKENS = 1024
# Fp32 logits a sequence costs: the model's, the reference's (or lm-eval's log-softmax), and headroom for the
# per-chunk float64 work and the allocator.
LOGIT_COPIES = 3
# The share of the memory the loaded models leave that the batch may fill.
MEMORY_SHARE = 0.5


def model_bytes(*models: torch.nn.Module | None) -> int:
    """Bytes of the parameters and buffers of `models` (None and repeats counted once)."""
    seen, total = set(), 0
    for model in models:
        if model is None or id(model) in seen:
            continue
        seen.add(id(model))
        total += sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return total


def auto_batch_size(
    device: torch.device | str,
    vocab: int,
    context_len: int,
    with_tasks: bool,
    loaded_bytes: int,
    total_bytes: int | None = None,
) -> int:
    """Sequences per forward pass on `device` for a model of `vocab` output logits.

    CPU and other devices: CPU_BATCH. CUDA: the largest power of two, at most MAX_BATCH and at least 1, whose logits
    (LOGIT_COPIES fp32 copies of `context_len` tokens, or TASK_TOKENS with tasks if longer) fit MEMORY_SHARE of the
    device memory (`total_bytes`, default: the device's) that `loaded_bytes` of models leave.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH
    if total_bytes is None:
        total_bytes = torch.cuda.get_device_properties(device).total_memory
    tokens = max(context_len, TASK_TOKENS) if with_tasks else context_len
    per_sequence = LOGIT_COPIES * tokens * max(1, vocab) * 4
    fits = int(MEMORY_SHARE * max(0, total_bytes - loaded_bytes) // per_sequence)
    return 1 if fits < 1 else min(MAX_BATCH, 1 << (fits.bit_length() - 1))
