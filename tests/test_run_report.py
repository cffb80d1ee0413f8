"""`ffnfusion run` end to end on a tiny model (resume, skip, config errors) and `ffnfusion report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from analysis_fakes import save_with_tokenizer, text_file
from conftest import tiny_model
from ffnfusion.cli import app
from ffnfusion.pipeline import RunConfig, RunConfigError, run
from ffnfusion.report import ReportError, write_report

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("run")
    model = save_with_tokenizer(tiny_model("llama", seed=3, num_hidden_layers=8), root / "model")
    train = text_file(root / "train.txt", words=4000, seed=1)
    held_out = text_file(root / "held_out.txt", words=1500, seed=2)
    config = root / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": str(train),
                "eval_data": str(held_out),
                "analyze": {"samples": 4, "seq_len": 32, "max_window": 4},
                "plan": {"remove_attention": 3, "max_group": 3},
                "fuse": {"allow_any_width": True},
                "heal": {"seq_len": 32, "max_sequences": 16, "batch_size": 4, "max_steps": 3, "save_steps": 2},
                "eval": {"context_len": 32, "max_tokens": 600, "batch_size": 4},
            }
        )
    )
    return model, config, root


def test_run_end_to_end_then_resume(setup) -> None:
    model, config, root = setup
    out = root / "out"
    messages: list[str] = []
    status = run(str(model), out, config=config, log=messages.append)
    assert status["analyze"] == status["plan"] == status["fuse"] == "ran"
    assert status["heal"] == status["eval"] == status["report"] == "ran"
    assert status["bench"].startswith("skipped: needs a CUDA GPU")
    first_run = messages.index("[analyze] running")
    assert any(m.startswith("[bench] will be skipped: needs a CUDA GPU") for m in messages[:first_run])
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["remove_attention"]) == 3
    eval_json = json.loads((out / "eval.json").read_text())
    assert [m["label"] for m in eval_json["models"]] == ["original", "fused", "healed"]
    assert eval_json["models"][0]["fidelity"]["kl"] < 1e-6 < eval_json["models"][1]["fidelity"]["kl"]
    report = (out / "report.md").read_text()
    for heading in ("## Model and plan", "## Dependency analysis", "## Quality", "## Speed", "## Accuracy vs latency"):
        assert heading in report
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert 'src="plan.png"' not in (out / "report.html").read_text()

    # Nothing changed: every stage that ran is up to date.
    again = run(str(model), out, config=config, log=messages.append)
    assert all(again[s] == "up to date" for s in ("analyze", "plan", "fuse", "heal", "eval", "report"))

    # A changed plan option reruns plan and everything downstream, but not analyze.
    cfg = yaml.safe_load(config.read_text())
    cfg["plan"]["remove_attention"] = 2
    changed = root / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    third = run(str(model), out, config=changed, log=messages.append, stop_after="fuse")
    assert third == {"analyze": "up to date", "plan": "ran", "fuse": "ran"}
    assert len(json.loads((out / "plan.json").read_text())["remove_attention"]) == 2


def test_skip_heal_and_cli(setup) -> None:
    model, config, root = setup
    out = root / "cli-out"
    result = runner.invoke(
        app, ["run", "--model", str(model), "--config", str(config), "--out", str(out), "--skip", "heal"]
    )
    assert result.exit_code == 0, result.output
    assert "[heal] skipped: --skip" in result.output  # the stage's name shown, not taken for rich markup
    assert "[analyze] running" in result.output
    labels = [m["label"] for m in json.loads((out / "eval.json").read_text())["models"]]
    assert labels == ["original", "fused"]
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0 and (out / "report.html").is_file()


def test_config_errors(setup, tmp_path) -> None:
    model, _, _ = setup
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"analyze": {"sample": 4}}))
    with pytest.raises(RunConfigError, match=r"analyze: unknown options \['sample'\]"):
        RunConfig.load(bad, model=str(model))
    bad.write_text(yaml.safe_dump({"analyse": {}}))
    with pytest.raises(RunConfigError, match="analyse"):
        RunConfig.load(bad, model=str(model))
    with pytest.raises(RunConfigError, match="No model given"):
        RunConfig.load(None)
    with pytest.raises(RunConfigError, match="not found"):
        RunConfig.load(tmp_path / "missing.yaml", model=str(model))
    with pytest.raises(RunConfigError, match="not a stage"):
        run(str(model), tmp_path / "o", stop_after="train")
    with pytest.raises(RunConfigError, match="leaves nothing for"):
        run(str(model), tmp_path / "o2", skip={"fuse"})


def test_report_of_empty_folder_is_refused(tmp_path) -> None:
    with pytest.raises(ReportError, match="nothing to report"):
        write_report(tmp_path)


def test_report_without_analysis_reads_layers_from_the_checkpoint(setup, tmp_path) -> None:
    import shutil

    model, config, _ = setup
    source = tmp_path / "run"
    run(str(model), source, config=config, stop_after="fuse", log=lambda _msg: None)
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(source / "plan.json", folder / "plan.json")
    shutil.copytree(source / "fused", folder / "fused")
    md, _ = write_report(folder)
    text = md.read_text()
    assert "layers: 8 -> " in text and "Not available: analysis" in text


def test_progress_lines_keep_brackets_and_long_paths_whole(monkeypatch) -> None:
    import importlib
    import io

    from rich.console import Console

    cli_app = importlib.import_module("ffnfusion.cli.app")  # the module; `ffnfusion.cli.app` the attribute is the app
    out = io.StringIO()
    monkeypatch.setattr(cli_app, "err_console", Console(file=out, width=40))
    line = "[analyze] loading /a/folder/[v2]/with/a/long/name/SmolLM2-135M-Instruct.Q4_1.gguf (bfloat16, cpu)"
    cli_app.log_dim(line)
    assert out.getvalue() == line + "\n"  # no markup eaten, no line break inside the path
