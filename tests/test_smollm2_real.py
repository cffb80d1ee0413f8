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
