"""The automatic eval batch size: golden cases computed by hand, and what eval records and uses."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from ffnfusion.eval.batch import CPU_BATCH, MAX_BATCH, auto_batch_size, model_bytes

MB = 10**6


@pytest.mark.parametrize(
    ("vocab", "context_len", "with_tasks", "loaded", "total", "expected"),
    [
        # 3 copies x 100 tokens x 1,000 logits x 4 bytes = 1.2 MB a sequence; (100 - 40) MB / 2 = 30 MB: 25 fit -> 16
        (1000, 100, False, 40 * MB, 100 * MB, 16),
        # tasks size a sequence at 1,024 tokens: 12.288 MB; 30 MB: 2 fit -> 2
        (1000, 100, True, 40 * MB, 100 * MB, 2),
        # a window longer than 1,024 tokens is what counts with tasks too: 24.576 MB; 60 MB: 2 fit -> 2
        (1000, 2048, True, 0, 120 * MB, 2),
        # the models leave 0.5 MB: not one sequence fits, and eval still runs one at a time
        (1000, 100, False, 99 * MB, 100 * MB, 1),
        # models larger than the device: 1, not an error here (loading them has already failed or offloaded)
        (1000, 100, False, 200 * MB, 100 * MB, 1),
        # SmolLM2-135M (49,152 logits) in fp32 beside its original on a 143 GB H200, tasks on: capped at 64
        (49152, 512, True, 2 * 135 * 4 * MB, 143 * 2**30, MAX_BATCH),
        # ... 0.604 GB a sequence: 70 fit in half of an 80 GiB card (-> 64), 34 in half of 40 GiB (-> 32)
        (49152, 512, True, 2 * 135 * 4 * MB, 80 * 2**30, 64),
        (49152, 512, True, 2 * 135 * 4 * MB, 40 * 2**30, 32),
        # Llama-3.1-8B's 128,256 logits beside two fp32 8B models on an 80 GiB card (21.7 GB left, 10.8 GB to fill):
        # 1.576 GB a sequence with tasks (6 fit -> 4), 0.788 GB without (13 fit -> 8)
        (128256, 512, True, 2 * 8030 * 4 * MB, 80 * 2**30, 4),
        (128256, 512, False, 2 * 8030 * 4 * MB, 80 * 2**30, 8),
    ],
)
def test_cuda_batch_fits_the_logits_in_half_the_memory_left(vocab, context_len, with_tasks, loaded, total, expected):
    assert auto_batch_size("cuda", vocab, context_len, with_tasks, loaded, total) == expected


def test_cpu_batch_is_fixed_whatever_the_memory():
    assert auto_batch_size("cpu", 1000, 100, True, 0, 10**15) == CPU_BATCH == 8
    assert auto_batch_size(torch.device("cpu"), 128256, 4096, False, 10**12) == CPU_BATCH


def test_model_bytes_counts_parameters_and_buffers_once():
    model = tiny_model("llama", seed=1)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert params > 0
    assert model_bytes(model) == params + buffers
    assert model_bytes(model, None, model) == params + buffers  # the reference scored as itself: loaded once
    half = tiny_model("llama", seed=2).to(torch.bfloat16)
    assert model_bytes(model, half) == params + buffers + model_bytes(half)
    assert model_bytes(half) == sum(p.numel() for p in half.parameters()) * 2 + sum(
        b.numel() * b.element_size() for b in half.buffers()
    )
