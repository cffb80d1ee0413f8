"""The real SmolLM2-135M (GGUF, dequantized): conversion is exact, fusion matches the reference, greedy text holds."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import SMOLLM2_GGUF
from ffnfusion.cli import app
from ffnfusion.formats.plan import Plan
from ffnfusion.io.source import export_transformers_folder, load_model, resolve_model
from ffnfusion.surgery import fuse_model
from reference import logits_without_ffnfusion, reference_logits, rel_err

PLAN = Plan(remove_attention=[14, 15, 16, 17], fuse_ffn=[[13, 14, 15, 16]])


@pytest.fixture(scope="module")
def smollm2():
    source = resolve_model(str(SMOLLM2_GGUF))
    return load_model(source), source.tokenizer()


def test_empty_plan_reproduces_real_logits(smollm2) -> None:
    model, tok = smollm2
    ids = tok(["The capital of France is", "Fusion of feed-forward networks"], return_tensors="pt", padding=True)
    fused = fuse_model(model, Plan())
    real = ids["attention_mask"].bool()  # right padding: outputs at padded positions are unspecified
    with torch.no_grad():
        assert rel_err(fused(**ids).logits[real], model(**ids).logits[real]) <= 1e-5


def test_greedy_generation_unchanged(smollm2) -> None:
    model, tok = smollm2
    fused = fuse_model(model, Plan())
    ids = tok("The capital of France is", return_tensors="pt")
    out = fused.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :]).startswith(" Paris")
    assert torch.equal(out, model.generate(**ids, max_new_tokens=3, do_sample=False))


def test_cli_fuse_then_trust_remote_code_gives_reference_logits(smollm2, tmp_path) -> None:
    """The issue's acceptance check: fuse the GGUF with the CLI, load it in a Python that never imports ffnfusion."""
    model, tok = smollm2
    plan_file = tmp_path / "plan.json"
    PLAN.save(plan_file)
    out = tmp_path / "fused"
    result = CliRunner().invoke(app, ["fuse", str(SMOLLM2_GGUF), "--plan", str(plan_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "vLLM" in result.output and "yes" in result.output
    ids = tok("Model surgery is exact when the weights are concatenated.", return_tensors="pt")["input_ids"]
    got = logits_without_ffnfusion(out, ids, tmp_path)
    want = reference_logits(model, PLAN, ids)
    assert rel_err(got, want) <= 1e-5


def test_export_transformers_folder_keeps_logits(smollm2, tmp_path) -> None:
    model, tok = smollm2
    folder = export_transformers_folder(str(SMOLLM2_GGUF), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    exported = load_model(str(folder))
    ids = tok("A plain transformers folder loads fast.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert rel_err(exported(ids).logits, model(ids).logits) <= 1e-6


def test_gguf_config_and_tokenizer_are_parsed_once_per_file(tmp_path, monkeypatch) -> None:
    """Every stage of a run opens the same GGUF; its metadata (the whole vocabulary) is parsed once per process and
    handed out as copies, and a file replaced in place is parsed afresh."""
    import os
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    import ffnfusion.io.source as source_module

    copy = tmp_path / "model.gguf"
    shutil.copy(SMOLLM2_GGUF, copy)
    source_module._parsed_from_gguf.cache_clear()
    calls = []
    for auto in (AutoConfig, AutoTokenizer):
        real = auto.from_pretrained.__func__

        def counting(cls, *args, _real=real, **kwargs):
            calls.append(cls.__name__)
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(counting))
    a, b = resolve_model(str(copy)), resolve_model(str(copy))
    first, second = a.config(), b.config()
    tok_a, tok_b = a.tokenizer(), b.tokenizer()
    assert calls == ["AutoConfig", "AutoTokenizer"]
    assert first is not second and first.to_dict() == second.to_dict() and first.num_hidden_layers == 30
    first.num_hidden_layers = 1  # a caller's change stays its own
    assert b.config().num_hidden_layers == 30
    text = "The capital of France is"
    assert tok_a is not tok_b and tok_a(text)["input_ids"] == tok_b(text)["input_ids"]
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    resolve_model(str(copy)).config()
    assert calls == ["AutoConfig", "AutoTokenizer", "AutoConfig"]
