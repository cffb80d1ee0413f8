"""Golden tests for perplexity and fidelity: answers known analytically or from an independent computation."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from ffnfusion.eval.scoring import EvalError, fidelity, perplexity, sliding_windows


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


# ---------------------------------------------------------------------------------------------------------------
# Numerics against float64, and memory bounded by chunking (issues 13 and 18)


def _large_vocab_model(seed: int, vocab: int = 50_000) -> torch.nn.Module:
    """A tiny random Llama with a large vocabulary and large logits, where fp32 vocabulary sums go wrong."""
    model = tiny_model(
        "llama",
        seed=seed,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """A copy of `model` with every weight moved by noise `scale` times its own RMS: close enough to agree on
    some top-1 tokens, different enough for a clearly non-zero KL."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.pow(2).mean().sqrt())
    return other


def _float64_reference(
    model: torch.nn.Module, reference: torch.nn.Module, stream: torch.Tensor, ctx: int, stride: int
) -> tuple[float, float, float, int]:
    """(mean NLL of model, mean KL(reference || model), top-1 agreement, tokens): each window run on its own through
    the model's whole forward, everything after the logits in float64."""
    nll = kl = 0.0
    agree = count = 0
    for w in sliding_windows(len(stream), ctx, stride):
        ids = stream[w.begin : w.end][None]
        keep = slice(w.score_from - w.begin - 1, None)  # logit at position p predicts token begin + p + 1
        with torch.no_grad():
            logq = F.log_softmax(model(input_ids=ids).logits[0, :-1][keep].double(), dim=-1)
            logp = F.log_softmax(reference(input_ids=ids).logits[0, :-1][keep].double(), dim=-1)
        targets = stream[w.score_from : w.end]
        nll -= float(logq[torch.arange(len(targets)), targets].sum())
        kl += float((logp.exp() * (logp - logq)).sum())
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        count += len(targets)
    return nll / count, kl / count, agree / count, count


@pytest.mark.parametrize(
    ("n_tokens", "ctx", "stride", "batch_size"), [(33, 32, 32, 1), (200, 32, 32, 3), (150, 24, 10, 4)]
)
def test_large_vocabulary_matches_float64_reference(n_tokens, ctx, stride, batch_size):
    model = _large_vocab_model(seed=11)
    reference = _perturbed(model, seed=12)
    stream = torch.randint(0, 50_000, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    nll, kl, top1, count = _float64_reference(model, reference, stream, ctx, stride)
    assert nll > 4.0 and kl > 0.1 and 0.2 < top1 < 0.9  # distributions far from uniform and from each other
    ppl = perplexity(model, stream, ctx, stride, batch_size, progress=False)
    fid = fidelity(model, reference, stream, ctx, stride, batch_size, progress=False)
    assert ppl["tokens"] == fid["tokens"] == count
    assert ppl["nll"] == pytest.approx(nll, rel=1e-6)
    assert ppl["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert fid["kl"] == pytest.approx(kl, rel=1e-6)
    assert fid["top1"] == top1


def test_results_do_not_depend_on_batch_or_chunk_size(monkeypatch):
    import ffnfusion.eval.scoring as ev

    model = _large_vocab_model(seed=13)
    reference = _perturbed(model, seed=14)
    stream = torch.randint(0, 50_000, (181,), generator=torch.Generator().manual_seed(6))  # 7 windows x 25 tokens
    results = []
    for batch_size, chunk_tokens in [(1, None), (3, None), (8, 6), (5, 13)]:
        if chunk_tokens is not None:  # 6 and 13 divide neither a window's 25 scored tokens nor a batch's 50/125/175
            monkeypatch.setattr(ev, "_CHUNK_ELEMENTS", chunk_tokens * 50_000 + 123)
        ppl = perplexity(model, stream, 26, None, batch_size, progress=False)
        fid = fidelity(model, reference, stream, 26, None, batch_size, progress=False)
        results.append((ppl, fid))
        monkeypatch.undo()
    (ppl0, fid0), *rest = results
    assert ppl0["tokens"] == 175 and ppl0["windows"] == 7 and 0 < fid0["top1"] < 1
    for ppl, fid in rest:
        assert ppl["tokens"] == fid["tokens"] == 175
        # Equal up to the fp32 rounding of the logits themselves: matrix products over a different number of rows
        # (batch size, chunk size) may round differently; the reductions add nothing measurable on top.
        assert ppl["nll"] == pytest.approx(ppl0["nll"], rel=1e-8)
        assert fid["kl"] == pytest.approx(fid0["kl"], rel=1e-7)
        assert fid["top1"] == fid0["top1"]


def test_supported_families_score_through_the_head_like_their_forward(family):
    model, reference = tiny_model(family, seed=21), tiny_model(family, seed=22)
    stream = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(7))
    nll, kl, top1, count = _float64_reference(model, reference, stream, 24, 16)
    ppl = perplexity(model, stream, 24, 16, batch_size=2, progress=False)
    fid = fidelity(model, reference, stream, 24, 16, batch_size=2, progress=False)
    assert ppl["tokens"] == fid["tokens"] == count
    assert ppl["nll"] == pytest.approx(nll, rel=1e-6)
    assert fid["kl"] == pytest.approx(kl, rel=1e-6)
    assert fid["top1"] == top1


def test_logits_are_computed_a_chunk_at_a_time(monkeypatch):
    """A batch never holds its [B, L, V] logits: the LM head sees at most one chunk of positions, the model's own
    forward (which would compute every logit) is not called, and a model that is its own reference runs once."""
    import ffnfusion.eval.scoring as ev

    monkeypatch.setattr(ev, "_CHUNK_ELEMENTS", 10 * 97)
    model = tiny_model("llama", seed=5)
    head_rows, decoder_calls = [], []
    model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[0]))
    model.model.register_forward_hook(lambda m, args, out: decoder_calls.append(1))
    model.register_forward_hook(lambda m, args, out: pytest.fail("the whole forward computed every logit"))
    stream = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(8))
    fid = fidelity(model, model, stream, 25, None, batch_size=4, progress=False)
    assert fid["kl"] == 0.0 and fid["top1"] == 1.0 and fid["tokens"] == 96
    assert max(head_rows) == 10 and sum(head_rows) == 96
    assert len(decoder_calls) == 1  # 4 windows in one batch, one decoder pass for model and reference


def test_fidelity_with_zero_probability_tokens_is_analytic():
    # The reference gives token 2 probability 0 (logit -inf): those terms of KL are 0, not 0 * -inf = nan.
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    stream = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    out = fidelity(FixedDistribution(q), FixedDistribution(p), stream, 4, 2, progress=False)
    assert out["kl"] == pytest.approx(math.log(2), rel=1e-7)  # fp32 logits log(0.25), log(0.5)
    assert out["top1"] == 0.0  # argmax is token 0 for the reference, token 2 for the model
    same = fidelity(FixedDistribution(p), FixedDistribution(p), stream, 4, 2, progress=False)
    assert same["kl"] == 0.0 and same["top1"] == 1.0
