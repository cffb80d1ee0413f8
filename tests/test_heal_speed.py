"""The chunked distillation loss, token/time budgets, the automatic batch size and their bad input (issue 15)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from ffnfusion.cli import app
from ffnfusion.heal import loss as distill_loss
from ffnfusion.heal.budget import plan_budget
from ffnfusion.heal.loss import chunked_distillation_loss, default_chunk
from ffnfusion.heal.settings import HealError, HealSettings
from ffnfusion.heal.stage import heal
from ffnfusion.heal.trainer import distillation_loss
from test_heal import setup  # noqa: F401 (the module fixture: tiny teacher, fused student, text)

# (batch, length, hidden, vocab, temperature, lm_weight, chunk): vocabularies and token counts not divisible by
# the chunk, temperatures on both sides of 1, with and without the LM term.
SHAPES = [
    (2, 7, 8, 37, 1.0, 0.0, 5),
    (3, 5, 6, 50, 2.0, 0.5, 4),
    (1, 9, 4, 33, 0.7, 0.0, 64),
    (2, 16, 12, 101, 1.0, 1.0, 16),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_loss_equals_plain_loss_and_gradients(shape, monkeypatch) -> None:
    b, length, hidden, vocab, temperature, lm_weight, chunk = shape
    # A small gradient group too, so the head-weight gradient is summed over several groups.
    monkeypatch.setattr(distill_loss, "GROUP_ELEMENTS", 2 * chunk * vocab)
    g = torch.Generator().manual_seed(sum(shape[:4]))
    hs, ht = torch.randn(b, length, hidden, generator=g), torch.randn(b, length, hidden, generator=g)
    ws, wt = torch.randn(vocab, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    ids = torch.randint(0, vocab, (b, length), generator=g)
    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    args = (0.8, 0.6, lm_weight, temperature)
    want, want_parts = distillation_loss(h1 @ w1.T, ht @ wt.T, h1, ht, ids, *args)
    got, parts = chunked_distillation_loss(h2, ht, w2, wt, ids, *args, chunk=chunk)
    (2 * want).backward()
    (2 * got).backward()  # a non-unit upstream gradient
    assert parts.keys() == want_parts.keys()
    for name in parts:
        assert torch.allclose(parts[name], want_parts[name], rtol=1e-5, atol=1e-6), name
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    for mine, ref in ((h2.grad, h1.grad), (w2.grad, w1.grad)):
        assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-6), (mine - ref).abs().max()


def test_compiled_chunk_is_compiled_once_per_chunk_shape_not_per_batch_size(monkeypatch) -> None:
    """The automatic batch probe tries batch after batch: the compiled chunk function must not specialise on the
    loss scales that change with them (it did, and hit dynamo's recompile limit of 8 within one probe)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # dynamo's own graph capture without a C++ compiler: the same guards and recompiles as the GPU's inductor.
    monkeypatch.setattr(
        distill_loss, "_compiled_chunk_terms", torch.compile(distill_loss._chunk_terms, dynamic=False, backend="eager")
    )
    g = torch.Generator().manual_seed(3)
    ws, wt = torch.randn(37, 8, generator=g), torch.randn(37, 8, generator=g)
    for batch in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        hs = torch.randn(batch, 8, 8, generator=g, requires_grad=True)
        ht = torch.randn(batch, 8, 8, generator=g)
        ids = torch.randint(0, 37, (batch, 8), generator=g)
        got, _ = chunked_distillation_loss(hs, ht, ws, wt, ids, lm_weight=0.5, chunk=8, compile_chunks=True)
        want, _ = chunked_distillation_loss(hs, ht, ws, wt, ids, lm_weight=0.5, chunk=8)
        torch.testing.assert_close(got, want)
    assert counters["stats"]["unique_graphs"] == 1  # every chunk is [8, 37]: one graph for ten batch sizes
    torch._dynamo.reset()


def test_chunked_loss_frozen_head_and_default_chunk() -> None:
    hs = torch.randn(2, 5, 4, requires_grad=True)
    ws = torch.randn(11, 4)  # frozen head (--scope changed): only the hidden states get a gradient
    loss, _ = chunked_distillation_loss(hs, torch.randn(2, 5, 4), ws, torch.randn(11, 4), torch.zeros(2, 5).long())
    loss.backward()
    assert hs.grad is not None and torch.isfinite(hs.grad).all()
    assert default_chunk(49152) == 1024 and default_chunk(128256) == 512 and default_chunk(10) == 8192


def test_budget_plans_steps() -> None:
    # 100 sequences, micro-batch 4, 2 processes: 12 steps per epoch of 512 tokens each.
    kw = dict(sequences=100, seq_len=64, micro_batch=4, grad_accum=1, world_size=2, max_steps=-1, epochs=1.0)
    b = plan_budget(tokens=2048, minutes=None, max_epochs=1, **kw)
    assert (b.steps, b.tokens, b.limited_by, b.warning) == (4, 2048, "tokens", None)
    assert plan_budget(tokens=2047 + 512, minutes=None, max_epochs=1, **kw).tokens == 2048  # whole steps
    small = plan_budget(tokens=10**6, minutes=None, max_epochs=2, **kw)
    assert small.steps == 24 and small.limited_by == "data" and "too small" in small.warning
    assert plan_budget(tokens=None, minutes=5.0, max_epochs=1, **kw).steps == 12
    with pytest.raises(ValueError, match="smaller than one optimizer step"):
        plan_budget(tokens=100, minutes=None, max_epochs=1, **kw)


def test_token_budget_stops_exactly(setup) -> None:  # noqa: F811
    settings = HealSettings(data=[str(setup["text"])], seq_len=32, batch_size=2, tokens=320, lr=1e-3, bf16=False)
    summary = heal(setup["student"], setup["teacher"], setup["root"] / "budget", settings, progress=True)
    assert summary.steps == 5 and summary.tokens == 320 and summary.limited_by == "tokens"
    assert summary.batch_size == 2 and summary.train_tflops > 0


def test_auto_batch_size_and_time_budget(setup) -> None:  # noqa: F811
    settings = HealSettings(data=[str(setup["text"])], seq_len=32, minutes=1e-6, lr=1e-3, bf16=False)
    summary = heal(setup["student"], setup["teacher"], setup["root"] / "timed", settings, progress=False)
    assert summary.batch_size == 8  # automatic on CPU
    assert summary.steps == 1 and summary.stopped_by_time and summary.limited_by == "minutes"


def test_corpus_too_small_for_the_budget_warns(setup) -> None:  # noqa: F811
    settings = HealSettings(data=[str(setup["text"])], seq_len=32, batch_size=8, tokens=10**7, lr=1e-3, bf16=False)
    settings.max_sequences = 16
    summary = heal(setup["student"], setup["teacher"], setup["root"] / "small", settings, progress=False)
    assert summary.steps == 2 and summary.limited_by == "data"  # one epoch of 16 sequences
    assert any("too small" in w for w in summary.warnings)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tokens", "0"], "--tokens must be a positive"),
        (["--tokens", "100", "--batch-size", "4"], "smaller than one optimizer step"),
        (["--minutes", "-1"], "--minutes must be positive"),
        (["--max-epochs", "0"], "--max-epochs must be at least 1"),
        (["--tokens", "4096", "--max-steps", "3"], "cannot be combined"),
        (["--loss-impl", "fast"], "--loss-impl must be one of"),
    ],
)
def test_bad_budgets_are_refused_before_any_work(setup, tmp_path, extra, message) -> None:  # noqa: F811
    args = ["heal", str(setup["student"]), "--teacher", str(setup["teacher"]), "--data", str(setup["text"])]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o"), "--seq-len", "32", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.checkpoints").exists()
    with pytest.raises(HealError):
        HealSettings(data=["x"], seq_len=32, tokens=0).check()


class _FakeCudaMemory:
    """A device of `total` bytes whose training step at batch b peaks at base + b * per_seq, plus `spike` bytes at
    b=2 only (what makes the b=1 -> b=2 estimate err high, like a loss buffer that stops growing), and runs out of
    memory above `oom_from` sequences."""

    def __init__(self, monkeypatch, total: int, base: int, per_seq: int, spike: int = 0, oom_from: int = 10**9):
        self.total, self.base, self.per_seq, self.spike, self.oom_from = total, base, per_seq, spike, oom_from
        self.peak, self.tried = 0, []
        for name in ("synchronize", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: setattr(self, "peak", 0))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: self.peak)
        props = type("Props", (), {"total_memory": total})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)

    def step(self, b: int) -> None:
        self.tried.append(b)
        if b >= self.oom_from:
            raise torch.cuda.OutOfMemoryError("fake: out of memory")
        self.peak = self.base + b * self.per_seq + (self.spike if b == 2 else 0)


GIB = 2**30


@pytest.mark.parametrize(
    ("per_seq_mib", "spike_gib", "oom_from", "expected"),
    [
        (400, 0, 10**9, 128),  # the estimate is right: the target (65,536 tokens / 512 = 128) fits at once
        (400, 2, 10**9, 128),  # the estimate errs high (picks 32): the doublings to 128 are measured and kept
        (700, 2, 10**9, 64),  # 128 would pass 90% of the device: stops at 64
        (400, 2, 128, 64),  # 128 runs out of memory: caught, 64 kept
    ],
)
def test_auto_batch_size_measures_the_doublings_up_to_the_target(
    monkeypatch, per_seq_mib, spike_gib, oom_from, expected
) -> None:
    from ffnfusion.heal.budget import auto_batch_size

    fake = _FakeCudaMemory(monkeypatch, 100 * GIB, 10 * GIB, per_seq_mib * 2**20, spike_gib * GIB, oom_from)
    chosen = auto_batch_size(fake.step, 512, torch.device("cuda"), fixed_bytes=GIB, upper=4096)
    assert chosen == expected
    # Every measured batch stayed within 90% of the device less the optimizer state, or was refused.
    assert fake.base + chosen * fake.per_seq <= 0.9 * fake.total - GIB
    assert auto_batch_size(fake.step, 512, torch.device("cuda"), fixed_bytes=GIB, upper=16) <= 16


def test_auto_batch_size_says_what_to_change_when_one_sequence_does_not_fit(monkeypatch) -> None:
    from ffnfusion.heal.budget import auto_batch_size

    fake = _FakeCudaMemory(monkeypatch, 100 * GIB, 10 * GIB, 400 * 2**20, oom_from=1)
    with pytest.raises(ValueError, match="--gradient-checkpointing"):
        auto_batch_size(fake.step, 512, torch.device("cuda"), fixed_bytes=GIB, upper=4096)


def test_heal_runs_the_loss_head_products_in_the_mixed_precision_dtype(setup, monkeypatch) -> None:  # noqa: F811
    """Accelerate autocasts only the student's forward; the loss outside it ran its head products in fp32 (slow)."""
    seen: list[torch.dtype] = []
    original = distill_loss._autocast_dtype

    def spy(device: torch.device, fallback: torch.dtype) -> torch.dtype:
        seen.append(original(device, fallback))
        return seen[-1]

    monkeypatch.setattr(distill_loss, "_autocast_dtype", spy)
    settings = HealSettings(data=[str(setup["text"])], seq_len=32, batch_size=2, max_steps=2, lr=1e-3, bf16=True)
    heal(setup["student"], setup["teacher"], setup["root"] / "bf16", settings, progress=False)
    assert seen == [torch.bfloat16, torch.bfloat16]
