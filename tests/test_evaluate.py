"""Golden tests for perplexity and fidelity: answers known analytically or from an independent computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from ffnfusion.eval.stage import EvalError, fidelity, perplexity, sliding_windows


class FixedDistribution(torch.nn.Module):
    """Predicts the same next-token distribution at every position, whatever the context."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(probs.log(), requires_grad=False)
        self.config = SimpleNamespace(vocab_size=probs.numel())

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_perplexity_of_fixed_distribution_is_analytic():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    stream = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3, 2, 1, 0])
    expected_nll = -sum(math.log(probs[t]) for t in stream[1:].tolist()) / (len(stream) - 1)
    for context_len, stride in [(4, 1), (3, 2), (32, None)]:
        out = perplexity(FixedDistribution(probs), stream, context_len, stride, batch_size=2, progress=False)
        assert out["tokens"] == len(stream) - 1
        assert out["nll"] == pytest.approx(expected_nll, rel=1e-6)
        assert out["ppl"] == pytest.approx(math.exp(expected_nll), rel=1e-6)
    # Non-overlapping windows [0,4) [4,8) [7,11): token 4 starts a window and is not scored; the last window is
    # moved back to end at the stream's end, so token 8 has context there and is scored.
    out = perplexity(FixedDistribution(probs), stream, 4, 4, progress=False)
    scored = [t for i, t in enumerate(stream.tolist()) if i not in (0, 4)]
    assert out["tokens"] == len(scored) == 9
    assert out["nll"] == pytest.approx(-sum(math.log(probs[t]) for t in scored) / 9, rel=1e-6)


def test_uniform_model_has_perplexity_equal_to_vocab():
    stream = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(0))
    out = perplexity(FixedDistribution(torch.full((10,), 0.1)), stream, 8, 3, progress=False)
    assert out["ppl"] == pytest.approx(10.0, rel=1e-5)


def test_windows_score_every_target_once():
    for n, ctx, stride in [(2, 2, 1), (10, 4, 4), (10, 4, 1), (11, 5, 3), (100, 16, 7), (5, 64, 64)]:
        windows = sliding_windows(n, ctx, stride)
        scored = [t for w in windows for t in range(w.score_from, w.end)]
        assert all(w.score_from > w.begin for w in windows)
        assert sorted(set(scored)) == scored  # each target at most once, in order
        if stride < ctx or n <= ctx:
            assert scored == list(range(1, n))
        else:  # only the first token of each window is lost
            assert set(range(1, n)) - set(scored) <= {w.begin for w in windows}
        assert all(w.end - w.begin == min(ctx, n) for w in windows)
        assert all(w.score_from - w.begin >= min(ctx - stride, w.score_from) for w in windows)


def _reference_nll(model: torch.nn.Module, stream: torch.Tensor, ctx: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity recipe, written out independently: window at every stride, score new tokens."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(stream), stride):
        end = min(begin + ctx, len(stream))
        new = end - prev_end if prev_end else end - begin - 1
        ids = stream[begin:end][None]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
        total += float(nll[-new:].sum())
        count += new
        prev_end = end
        if end == len(stream):
            break
    return total, count


def test_sliding_window_matches_independent_recipe_and_full_context():
    model = tiny_model("llama")
    stream = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(1))
    full = perplexity(model, stream, context_len=128, batch_size=3, progress=False)
    total, count = _reference_nll(model, stream, 128, 128)
    assert full["tokens"] == count == 69 and full["windows"] == 1
    assert full["nll"] == pytest.approx(total / count, rel=1e-5)
    # A window covering everything, whatever the stride, is the full-context answer.
    assert perplexity(model, stream, 70, 7, progress=False)["nll"] == pytest.approx(full["nll"], rel=1e-5)
    # Shorter windows: same as the recipe (its last window is shorter; ours ends at the same token, with more
    # context, so compare where the recipe's windows are all full: 70 = 10 + 6*10).
    windowed = perplexity(model, stream, 20, 10, batch_size=4, progress=False)
    total, count = _reference_nll(model, stream, 20, 10)
    assert windowed["tokens"] == count
    assert windowed["nll"] == pytest.approx(total / count, rel=1e-5)
    assert windowed["nll"] != pytest.approx(full["nll"], rel=1e-4)  # less context does change the answer


def test_fidelity_identical_models():
    model = tiny_model("llama", seed=3)
    stream = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(2))
    out = fidelity(model, tiny_model("llama", seed=3), stream, 32, 16, batch_size=2, progress=False)
    assert out["kl"] == pytest.approx(0.0, abs=1e-7)
    assert out["top1"] == 1.0
    assert out["tokens"] == 89


def test_fidelity_of_fixed_distributions_is_analytic():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    stream = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    out = fidelity(FixedDistribution(q), FixedDistribution(p), stream, 4, 2, progress=False)
    assert out["kl"] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-6)
    assert out["top1"] == 0.0
    out = fidelity(FixedDistribution(torch.tensor([0.5, 0.3, 0.2])), FixedDistribution(p), stream, 4, 2, progress=False)
    assert out["top1"] == 1.0 and out["kl"] > 0


def test_fidelity_detects_different_models():
    stream = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(4))
    out = fidelity(tiny_model("llama", seed=1), tiny_model("llama", seed=2), stream, 16, progress=False)
    assert out["kl"] > 1e-3 and out["top1"] < 1.0


def test_bad_settings_are_named():
    model = FixedDistribution(torch.full((5,), 0.2))
    with pytest.raises(EvalError, match="stride"):
        perplexity(model, torch.arange(5), 4, 5, progress=False)
    with pytest.raises(EvalError, match="at least 2"):
        perplexity(model, torch.tensor([1]), 4, progress=False)
    with pytest.raises(EvalError, match="vocabulary"):
        perplexity(model, torch.tensor([1, 7, 2]), 4, progress=False)
    with pytest.raises(EvalError, match="LongTensor"):
        perplexity(model, torch.ones(4), 4, progress=False)


def test_decilm_models_are_scored_like_their_original():
    from ffnfusion.formats.plan import Plan
    from ffnfusion.surgery import fuse_model

    original = tiny_model("llama", seed=4)
    stream = torch.randint(0, 97, (80,), generator=torch.Generator().manual_seed(5))
    same = fuse_model(original, Plan())  # a DeciLMForCausalLM with every block kept
    fused = fuse_model(original, Plan(remove_attention=[2, 3], fuse_ffn=[[1, 2, 3]]))
    assert type(same).__name__ == type(fused).__name__ == "DeciLMForCausalLM"
    base = perplexity(original, stream, 32, 16, progress=False)
    assert perplexity(same, stream, 32, 16, progress=False)["nll"] == pytest.approx(base["nll"], rel=1e-5)
    assert fidelity(same, original, stream, 32, 16, progress=False)["kl"] == pytest.approx(0, abs=1e-6)
    out = fidelity(fused, original, stream, 32, 16, progress=False)
    assert out["kl"] > 1e-4 and out["tokens"] == 79
