"""`ffnfusion run`'s healing budget: sized to the model when the configuration names none, said up front, skipped
with the reason on a CPU, and honoured to the token when given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis_fakes import save_with_tokenizer, text_file
from conftest import tiny_model
from ffnfusion.heal.settings import CHECKPOINTS_VERB
from ffnfusion.io.output import write_marker
from ffnfusion.pipeline import HEAL_TOKENS_MIN, Run, RunConfig, run


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("budget")
    model = save_with_tokenizer(tiny_model("llama", seed=4, num_hidden_layers=6), root / "model")
    return model, text_file(root / "train.txt", words=4000, seed=1)


def _run(model: Path, tmp_path: Path, **sections) -> Run:
    return Run(RunConfig.load(None, model=str(model), **sections), tmp_path / "out", log=lambda _m: None)


def _cpu_sections(text: Path, heal_tokens: int) -> dict:
    """A run small enough for the CPU: a few calibration windows, two attentions removed, a heal of `heal_tokens`."""
    return {
        "data": str(text),
        "device": "cpu",
        "analyze": {"samples": 4, "seq_len": 32, "max_window": 4},
        "plan": {"remove_attention": 2},
        "fuse": {"allow_any_width": True},
        "heal": {"tokens": heal_tokens, "seq_len": 32, "batch_size": 4},
    }


def test_default_budget_is_sized_to_the_model_and_writes_a_corpus_of_that_size(setup, tmp_path) -> None:
    model, _ = setup
    r = _run(model, tmp_path)  # data: self
    options = r.heal_options()
    assert options["tokens"] == r.default_heal_tokens() == HEAL_TOKENS_MIN  # a tiny model gets the floor
    assert options["self_samples"] * 512 >= options["tokens"] > (options["self_samples"] - 1) * 512
    given = _run(model, tmp_path, heal={"tokens": 4096, "seq_len": 32})
    assert given.heal_options()["tokens"] == 4096 and given.heal_options()["self_samples"] == 128
    twice = _run(model, tmp_path, heal={"tokens": 4096, "seq_len": 32, "max_epochs": 2})
    assert twice.heal_options()["self_samples"] == 64  # half the corpus, seen twice
    capped = _run(model, tmp_path, heal={"minutes": 2})  # a time cap keeps the sized budget
    assert capped.heal_options()["tokens"] == HEAL_TOKENS_MIN and capped.heal_options()["minutes"] == 2
    from_file = _run(model, tmp_path, data="train.txt", heal={"tokens": 4096})
    assert "self_samples" not in from_file.heal_options()


def test_cpu_skips_the_default_heal_with_the_reason(setup, tmp_path) -> None:
    model, _ = setup
    reason = _run(model, tmp_path, device="cpu")._skip_reason("heal", set())
    assert reason is not None and f"{HEAL_TOKENS_MIN:,} tokens" in reason and "heal: {tokens: N}" in reason
    assert _run(model, tmp_path, device="cpu", heal={"max_steps": 2})._skip_reason("heal", set()) is None


def test_cpu_says_up_front_which_stages_it_will_skip(setup, tmp_path, monkeypatch) -> None:
    """The reasons come before the first stage runs, not after the analysis has taken its minutes."""
    model, text = setup
    messages: list[str] = []

    def stop(_self) -> None:
        raise RuntimeError("stopped at the first stage")

    monkeypatch.setattr(Run, "_analyze", stop)
    cfg = RunConfig.load(None, model=str(model), data=str(text), device="cpu")
    with pytest.raises(RuntimeError, match="stopped at the first stage"):
        Run(cfg, tmp_path / "out", log=messages.append).execute()
    assert messages[-1] == "[analyze] running"
    assert any(m.startswith("[heal] will be skipped: no CUDA GPU") and "heal: {tokens: N}" in m for m in messages)
    assert any(m.startswith("[bench] will be skipped: needs a CUDA GPU") for m in messages)


def test_a_given_token_budget_is_honoured(setup, tmp_path) -> None:
    model, text = setup
    sections = _cpu_sections(text, heal_tokens=4 * 32 * 3)
    messages: list[str] = []
    status = run(str(model), tmp_path / "out", stop_after="heal", log=messages.append, **sections)
    assert status["heal"] == "ran"
    summary = json.loads((tmp_path / "out" / "healed" / "heal_summary.json").read_text())["result"]
    assert summary["tokens"] == 4 * 32 * 3 and summary["steps"] == 3


def test_a_heal_killed_before_its_first_checkpoint_starts_again(setup, tmp_path) -> None:
    """Re-running after a heal died before saving any checkpoint (e.g. out of memory) heals from step 0."""
    model, text = setup
    sections = _cpu_sections(text, heal_tokens=4 * 32 * 2)
    out = tmp_path / "out"
    assert run(str(model), out, stop_after="fuse", log=lambda _m: None, **sections)["fuse"] == "ran"
    # What a heal leaves when it dies during its first steps: its settings, no checkpoint-N folder.
    checkpoints = out / "healed.checkpoints"
    checkpoints.mkdir()
    write_marker(checkpoints, CHECKPOINTS_VERB)
    (checkpoints / "heal_settings.json").write_text(json.dumps({"batch_size": 4}))
    messages: list[str] = []
    status = run(str(model), out, stop_after="heal", log=messages.append, **sections)
    assert status["heal"] == "ran"
    summary = json.loads((out / "healed" / "heal_summary.json").read_text())["result"]
    assert summary["steps"] == 2
    assert any("no checkpoint" in m and "step 0" in m for m in messages)
