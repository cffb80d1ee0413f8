"""fuse -> save -> load (import ffnfusion, and trust_remote_code without it) -> same logits; generate; CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import ffnfusion  # noqa: F401  (registers DeciLM with the Auto classes)
from conftest import tiny_model
from ffnfusion.cli import app
from ffnfusion.formats.plan import Plan
from ffnfusion.fuse import fuse
from ffnfusion.io.checkpoint import CheckpointError
from ffnfusion.io.source import load_model
from ffnfusion.surgery import fuse_model
from reference import logits_without_ffnfusion, reference_logits, rel_err

PLAN = Plan(remove_attention=[2, 3], fuse_ffn=[[1, 2, 3]], parallel_blocks=[[4, 5]])
runner = CliRunner()


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = tiny_model("qwen3", seed=11)
    folder = tmp_path_factory.mktemp("orig") / "model"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def fused_dir(original, tmp_path_factory) -> Path:
    _, folder = original
    plan_file = tmp_path_factory.mktemp("plan") / "plan.json"
    PLAN.save(plan_file)
    out = tmp_path_factory.mktemp("fused") / "out"
    result = runner.invoke(app, ["fuse", str(folder), "--plan", str(plan_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sequential sub-blocks" in result.output and "12" in result.output and "6" in result.output
    return out


def _ids(vocab: int, batch: int = 2, seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_auto_class_load_gives_reference_logits(original, fused_dir) -> None:
    model, _ = original
    loaded = AutoModelForCausalLM.from_pretrained(fused_dir).eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, reference_logits(model, PLAN, ids)) <= 1e-5


def test_checkpoint_files_and_engine_keys(fused_dir) -> None:
    config = json.loads((fused_dir / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["num_hidden_layers"] == len(config["block_configs"]) == 3
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    for key in ("vocab_size", "rms_norm_eps", "max_position_embeddings", "rope_theta"):
        assert key in config
    fused_block = config["block_configs"][1]
    assert fused_block["attention"] == {"no_op": False, "n_heads_in_group": 2, "replace_with_linear": False}
    assert isinstance(fused_block["ffn"]["ffn_mult"], float) and fused_block["ffn"]["intermediate_size"] == 240
    assert config["block_configs"][2]["parallel_blocks"] == 2
    assert (fused_dir / "modeling_decilm.py").is_file() and (fused_dir / "ffnfusion_plan.json").is_file()
    assert Plan.load(fused_dir / "ffnfusion_plan.json") == PLAN
    assert not list(fused_dir.parent.glob(".*partial*")), "temporary folder left behind"


def test_trust_remote_code_without_ffnfusion(original, fused_dir, tmp_path) -> None:
    """A Python that never imports ffnfusion loads the checkpoint through auto_map and gets the same logits."""
    model, _ = original
    ids = _ids(model.config.vocab_size, seed=4)
    got = logits_without_ffnfusion(fused_dir, ids, tmp_path)
    assert rel_err(got, reference_logits(model, PLAN, ids)) <= 1e-5


def test_save_pretrained_round_trip(original, fused_dir, tmp_path) -> None:
    model, _ = original
    loaded = AutoModelForCausalLM.from_pretrained(fused_dir).eval()
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "modeling_decilm.py").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    ids = _ids(model.config.vocab_size, seed=9)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, loaded(ids).logits)


@torch.no_grad()
def _greedy_reference(model: torch.nn.Module, plan: Plan, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = reference_logits(model, plan, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_generate_with_kv_cache_matches_greedy_reference(family: str) -> None:
    model = tiny_model(family, seed=21)
    plan = Plan(remove_attention=[2, 3], fuse_ffn=[[1, 2, 3]], parallel_blocks=[[4, 5]])
    fused = fuse_model(model, plan)
    ids = _ids(model.config.vocab_size, batch=2, seq=6, seed=3)
    got = fused.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, _greedy_reference(model, plan, ids, 8))


def test_generate_left_padded_batch_matches_unpadded() -> None:
    model = tiny_model("llama", seed=8)
    fused = fuse_model(model, Plan(remove_attention=[3], fuse_ffn=[[2, 3]]))
    short = _ids(97, batch=1, seq=4, seed=1)
    long = _ids(97, batch=1, seq=7, seed=2)
    pad = 0
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], 1), long])
    mask = torch.cat(
        [torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(short)], 1), torch.ones_like(long)]
    )
    out = fused.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    alone_short = fused.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=6, do_sample=False)
    alone_long = fused.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=6, do_sample=False)
    assert torch.equal(out[0, 3:], alone_short[0]) and torch.equal(out[1], alone_long[0])


def test_fuse_refuses_bad_locations_and_inputs(original, fused_dir, tmp_path) -> None:
    _, folder = original
    plan_file = tmp_path / "plan.json"
    PLAN.save(plan_file)
    inside = runner.invoke(app, ["fuse", str(folder), "--plan", str(plan_file), "--out", str(folder / "fused")])
    assert inside.exit_code == 2 and "input model's folder" in inside.output
    existing = runner.invoke(app, ["fuse", str(folder), "--plan", str(plan_file), "--out", str(fused_dir)])
    assert existing.exit_code == 2 and "--overwrite" in existing.output
    missing = runner.invoke(
        app, ["fuse", str(tmp_path / "nope"), "--plan", str(plan_file), "--out", str(tmp_path / "o")]
    )
    assert missing.exit_code == 2 and "not found" in missing.output
    bad_plan = tmp_path / "bad.json"
    Plan(remove_attention=[40]).save(bad_plan)
    out_of_range = runner.invoke(app, ["fuse", str(folder), "--plan", str(bad_plan), "--out", str(tmp_path / "o")])
    assert out_of_range.exit_code == 2 and "out of range" in out_of_range.output
    again = runner.invoke(app, ["fuse", str(fused_dir), "--plan", str(plan_file), "--out", str(tmp_path / "o")])
    assert again.exit_code == 2 and "already a fused checkpoint" in again.output
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_output(original, tmp_path) -> None:
    _, folder = original
    out = tmp_path / "out"
    fuse(str(folder), Plan(remove_attention=[1]), out)
    fuse(str(folder), Plan(remove_attention=[1, 2], fuse_ffn=[[1, 2]]), out, overwrite=True)
    assert Plan.load(out / "ffnfusion_plan.json").fuse_ffn == [[1, 2]]
    assert not list(tmp_path.glob(".out.*"))


def test_checkpoint_that_does_not_match_its_config_is_refused(fused_dir, tmp_path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(fused_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["block_configs"][1]["ffn"]["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_model(str(bad))
