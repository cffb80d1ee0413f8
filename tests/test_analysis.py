"""`analyze`: golden dependencies on hand-built models, cached vs brute-force agreement, cost, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config

from analysis_fakes import save_with_tokenizer, text_file
from conftest import tiny_model
from ffnfusion.adapters.base import UnsupportedModelError
from ffnfusion.analyze import AnalysisError, analyze, load_analysis, parse_layers
from ffnfusion.analyze.attention import score_attention
from ffnfusion.analyze.measure import measure, planned_evals
from ffnfusion.analyze.runner import SubBlockRunner
from ffnfusion.data import DataError
from ffnfusion.formats.plan import Plan, plan_blocks
from ffnfusion.surgery import fuse_model


def _tokens(vocab: int, samples: int = 5, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(seed))


def _decilm(model: torch.nn.Module) -> torch.nn.Module:
    return fuse_model(model, Plan())


def test_runner_reproduces_model_log_probs() -> None:
    model = tiny_model("qwen3", seed=4)
    ids = _tokens(97, 3, 10)
    runner = SubBlockRunner(_decilm(model))
    with torch.inference_mode():
        got = runner.log_probs(runner.prefix(ids, set()).attn_in[-1])
        want = F.log_softmax(model(ids).logits.float(), -1).reshape(-1, 97)
    assert (got - want).abs().max() < 1e-4


def test_ffn_with_zero_output_gives_zero_row() -> None:
    model = tiny_model("llama", seed=1)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.zero_()
    m = measure(_decilm(model), _tokens(97), set(), batch_size=2)
    assert all(v < 1e-6 for v in m.ffn[2][3:]), m.ffn[2]
    # Its own column is zero too (an FFN that writes nothing has not changed), and nothing else is.
    assert all(m.ffn[i][2] < 1e-6 for i in range(2))
    assert min(m.ffn[i][j] for i in (0, 1, 3) for j in range(i + 1, 6) if j != 2) > 1e-4
    assert max(m.block[2][3:]) > 1e-3  # the layer's attention still contributes


def _subspace_model(coupled: bool) -> torch.nn.Module:
    """3 layers, hidden 48. Embeddings live in dims 0-15; FFN 0 reads 0-15 and writes 16-31 (10% of |x|).

    FFN 1 writes 32-47 and reads 0-15 (disjoint from FFN 0's output) or, when coupled, 16-31 (exactly FFN 0's output).
    """
    model = tiny_model("llama", seed=5, num_hidden_layers=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, :16] = torch.randn(97, 16, generator=gen)
        model.lm_head.weight.copy_(torch.randn(97, 48, generator=gen))

        def ffn(i: int, reads: slice, writes: slice, scale: float) -> None:
            mlp = model.model.layers[i].mlp
            mlp.gate_proj.weight[:, reads] = torch.randn(80, 16, generator=gen)
            mlp.up_proj.weight[:, reads] = torch.randn(80, 16, generator=gen)
            mlp.down_proj.weight[writes, :] = torch.randn(16, 80, generator=gen) * scale

        ffn(0, slice(0, 16), slice(16, 32), 4e-4)
        ffn(1, slice(16, 32) if coupled else slice(0, 16), slice(32, 48), 4e-4)
        ffn(2, slice(0, 16), slice(32, 48), 4e-4)
    return model.eval()


def test_disjoint_subspaces_give_near_zero_and_coupled_give_large_dependency() -> None:
    all_attention = {0, 1, 2}  # measured with every attention removed: only the FFNs interact
    disjoint = measure(_decilm(_subspace_model(False)), _tokens(97), all_attention, batch_size=5)
    coupled = measure(_decilm(_subspace_model(True)), _tokens(97), all_attention, batch_size=5)
    ffn0 = disjoint.stats[0, 1, 0].item()
    assert 0.01 < ffn0 < 0.5, "FFN 0 must write something, small next to the residual stream"
    assert disjoint.ffn[0][1] < 1e-3, disjoint.ffn
    assert coupled.ffn[0][1] > 0.5, coupled.ffn
    # FFN 2 reads dims 0-15 in both models: no dependency on FFN 0 or 1 beyond the shared RMSNorm scale.
    assert coupled.ffn[0][2] < 1e-3 and coupled.ffn[1][2] < 1e-3


def test_kl_of_unchanged_model_is_zero() -> None:
    model = tiny_model("mistral", seed=2)
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.zero_()  # this attention contributes nothing
    runner = SubBlockRunner(_decilm(model))
    result = score_attention(runner, _tokens(97, 4, 16), set(), batch_size=3)
    assert result.base_kl == 0.0
    assert result.base_lm_loss == pytest.approx(result.original_lm_loss, abs=1e-12)
    kl3, loss3 = result.scores[3]
    assert kl3 < 1e-7 and loss3 == pytest.approx(result.original_lm_loss, abs=1e-5)
    assert min(kl for i, (kl, _) in result.scores.items() if i != 3) > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cached_prefix_matrices_match_brute_force(family: str) -> None:
    """Each row recomputed from scratch on an independently fused model (remove_ffn / remove_attention plans)."""
    model = tiny_model(family, seed=8, num_hidden_layers=4)
    ids = _tokens(97, 3, 9)
    removed = {2}
    m = measure(_decilm(model), ids, removed, batch_size=2)

    def ffn_outputs(plan: Plan) -> dict[int, torch.Tensor]:
        fused = fuse_model(model, plan)
        outputs: dict[int, torch.Tensor] = {}
        # A layer left with neither attention nor FFN is dropped: map fused blocks back to original layers.
        original = [block.layers[0] for block in plan_blocks(plan, 4)]
        for index, layer in zip(original, fused.model.layers, strict=True):
            if layer.has_ffn:
                layer.mlp.register_forward_hook(lambda _m, _i, out, index=index: outputs.__setitem__(index, out))
        with torch.no_grad():
            fused(ids)
        return outputs

    base = ffn_outputs(Plan(remove_attention=sorted(removed)))
    for i in range(3):
        other = ffn_outputs(Plan(remove_attention=sorted(removed), remove_ffn=[i]))
        for j in range(i + 1, 4):
            want = (1 - F.cosine_similarity(base[j], other[j], dim=-1)).mean().item()
            assert m.ffn[i][j] == pytest.approx(want, abs=2e-5), (i, j)

    # Attention KL against the original, every attention removal recomputed with a separately fused model.
    with torch.no_grad():
        teacher = F.log_softmax(model(ids).logits.float(), -1)
        for i in (0, 1, 3):
            student = F.log_softmax(fuse_model(model, Plan(remove_attention=sorted(removed | {i})))(ids).logits, -1)
            want = F.kl_div(student, teacher, log_target=True, reduction="sum").item() / ids.numel()
            assert m.attention.scores[i][0] == pytest.approx(want, rel=1e-4, abs=1e-7), i


def test_matrices_cost_at_most_half_a_forward_per_layer() -> None:
    layers = 8
    model = tiny_model("llama", seed=3, num_hidden_layers=layers)
    removed = {3, 4}
    m = measure(_decilm(model), _tokens(97, 5, 8), removed, batch_size=2)
    batches = 3
    assert m.counter.sub_blocks == {k: v * batches for k, v in planned_evals(layers, removed).items() if v}
    per_forward = 2 * layers - len(removed)
    for part in ("ffn_dependency", "block_dependency"):
        fe = m.counter.sub_blocks[part] / (per_forward * batches)
        assert fe <= layers / 2, (part, fe)
    assert m.counter.sub_blocks["attention"] / (per_forward * batches) <= (layers + 1) / 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    save_with_tokenizer(tiny_model("llama", seed=11), root / "model")
    text_file(root / "text.txt")
    return root


def _analyze(tiny_folder: Path, out: Path, **kw):
    args = dict(data=str(tiny_folder / "text.txt"), samples=6, seq_len=24, dtype="float32", device="cpu")
    return analyze(str(tiny_folder / "model"), out, **{**args, **kw})


def test_same_seed_gives_identical_analysis_json(tiny_folder: Path, tmp_path: Path) -> None:
    a = _analyze(tiny_folder, tmp_path / "a", remove_attention="2,3", batch_size=4)
    b = _analyze(tiny_folder, tmp_path / "b", remove_attention="2,3", batch_size=4)
    c = _analyze(tiny_folder, tmp_path / "c", remove_attention="2,3", batch_size=4, seed=1)
    text = (tmp_path / "a" / "analysis.json").read_bytes()
    assert text == (tmp_path / "b" / "analysis.json").read_bytes()
    assert text != (tmp_path / "c" / "analysis.json").read_bytes()
    assert a.analysis == b.analysis
    for png in a.analysis.heatmaps.values():
        assert (tmp_path / "a" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_analysis(tmp_path / "a")
    assert loaded.settings.remove_attention == [2, 3]
    assert loaded.layers[2].attention is None and {s.layer for s in loaded.attention_importance} == {0, 1, 4, 5}
    assert loaded.base_kl > 0 and c.analysis.calibration.tokens_sha256 != loaded.calibration.tokens_sha256


def test_bad_data_is_refused_with_the_reason(tiny_folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match="contains no text"):
        _analyze(tiny_folder, tmp_path / "o1", data=str(empty))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(DataError, match="not UTF-8"):
        _analyze(tiny_folder, tmp_path / "o2", data=str(binary))
    with pytest.raises(DataError, match="not found"):
        _analyze(tiny_folder, tmp_path / "o3", data=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(DataError, match=r"enough for 0 sequences of 24 tokens, but 6 were asked"):
        _analyze(tiny_folder, tmp_path / "o4", data=str(short))
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir()), "no output may be left behind"


def test_bad_model_and_options_are_refused(tiny_folder: Path, tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(gpt2)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        analyze(str(gpt2), tmp_path / "out")
    with pytest.raises(ValueError, match="input model's folder"):
        _analyze(tiny_folder, tiny_folder / "model" / "analysis")
    with pytest.raises(ValueError, match="out of range"):
        _analyze(tiny_folder, tmp_path / "out", remove_attention="4,9")
    with pytest.raises(ValueError, match="cannot read layer list"):
        parse_layers("3,x")
    assert parse_layers("1, 4-6,2") == [1, 2, 4, 5, 6]


def test_analysis_file_of_another_schema_or_kind_is_refused(tiny_folder: Path, tmp_path: Path) -> None:
    _analyze(tiny_folder, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "analysis.json").read_text())
    for change, message in (
        ({"schema_version": 99}, "schema version 99"),
        ({"format": "something-else"}, "not an ffnfusion analysis"),
        ({"ffn_dependency": raw["ffn_dependency"][:-1]}, "must be 6 x 6"),
        ({"layers": "nope"}, "does not match the analysis schema"),
    ):
        path = tmp_path / "changed.json"
        path.write_text(json.dumps(raw | change))
        with pytest.raises(AnalysisError, match=message):
            load_analysis(path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(AnalysisError, match="not valid JSON"):
        load_analysis(tmp_path / "broken.json")
    with pytest.raises(AnalysisError, match="not found"):
        load_analysis(tmp_path / "nothing.json")
