"""Every bad input is refused by the CLI with one clear paragraph: exit code 2, the file and the problem named, no
traceback, the inputs untouched and nothing written under the output's name (issue 13).

Each case builds its bad input in tmp_path from one tiny model; the truncated GGUFs are cut from the real SmolLM2
GGUF that CI has under shared/assets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import ffnfusion.cli as cli
from analysis_fakes import fake_analysis, save_with_tokenizer, text_file
from conftest import SMOLLM2_GGUF, tiny_model
from ffnfusion.adapters import adapter_for
from ffnfusion.formats.analysis import config_hash
from ffnfusion.io.source import ModelSource

runner = CliRunner()
LAYERS = 6


@dataclass
class Case:
    args: list[str]
    expect: list[str]  # substrings of the message (whitespace-normalised)
    inputs: list[Path]  # files and folders whose bytes must not change
    outputs: list[Path]  # final output names that must not appear
    before: Callable[[pytest.MonkeyPatch], None] | None = None
    keep: list[Path] = field(default_factory=list)  # outputs that exist already and must stay as they are


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = tiny_model("llama", seed=13)
    folder = save_with_tokenizer(model, root / "model")
    sharded = root / "sharded"
    model.save_pretrained(sharded, max_shard_size=24_000)
    return {"model": folder, "sharded": sharded, "text": text_file(root / "text.txt", words=300)}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_weights(base, tmp: Path) -> Path:
    folder = tmp / "no-weights"
    folder.mkdir()
    shutil.copy(base["model"] / "config.json", folder / "config.json")
    return folder


def _truncated_gguf(tmp: Path, keep: int | None) -> Path:
    """The real GGUF cut short: inside its header (`keep` bytes) or halfway through its tensor data (None)."""
    folder = tmp / "gguf"
    folder.mkdir()
    data = SMOLLM2_GGUF.read_bytes()
    path = folder / "cut.gguf"
    path.write_bytes(data[: keep if keep is not None else len(data) // 2])
    return path


def _plan(path: Path, info_model: dict | None = None) -> Path:
    plan = {"remove_attention": [2, 3], "fuse_ffn": [[1, 2, 3]]}
    if info_model is not None:
        plan["info"] = {"created_by": "ffnfusion plan", "model": info_model}
    path.write_text(json.dumps(plan))
    return path


def _hash_of(base, name: str = "model") -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base[name])
    return config_hash(adapter_for(config).decilm_config(config))


def _other_model_plan(tmp: Path, layers: int = LAYERS) -> Path:
    recorded = {"name": "org/other-model", "model_type": "llama", "num_layers": layers, "config_hash": "0" * 64}
    return _plan(tmp / "plan.json", recorded)


def _weights_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were read before a cheap check refused the command")

    monkeypatch.setattr(ModelSource, "tensor_getter", refuse)


def _run_config(tmp: Path, base, **changes) -> Path:
    config = {
        "data": str(base["text"]),
        "analyze": {"samples": 2, "seq_len": 16},
        "heal": {"seq_len": 16, "max_steps": 1},
        "eval": {"context_len": 16, "max_tokens": 64},
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cases() -> dict[str, Callable[[dict[str, Path], Path], Case]]:
    """name -> a builder of the case in a fresh folder."""
    cases: dict[str, Callable[[dict[str, Path], Path], Case]] = {}

    # 1. config.json but no weights, for every verb that reads a model.
    def no_weights(verb: str) -> Callable[[dict[str, Path], Path], Case]:
        def build(base, tmp: Path) -> Case:
            bad = _no_weights(base, tmp)
            out = tmp / "out"
            args = {
                "analyze": ["analyze", str(bad), "--out", str(out), "--samples", "2", "--seq-len", "16"],
                "fuse": ["fuse", str(bad), "--plan", str(_plan(tmp / "plan.json")), "--out", str(out)],
                "heal": ["heal", str(bad), "--teacher", str(base["model"]), "--data", "self", "--out", str(out)],
                "eval": ["eval", str(bad), "--data", str(base["text"]), "--out", str(out / "eval.json")],
                "bench": ["bench", str(bad), "--device", "cpu", "--dtype", "float32", "--out", str(out / "b.json")],
            }[verb]
            return Case(args, [str(bad), "no weights", "Copy the weight files"], [bad], [out])

        return build

    for verb in ("analyze", "fuse", "heal", "eval", "bench"):
        cases[f"{verb}-no-weights"] = no_weights(verb)

    def config_not_json(base, tmp: Path) -> Case:
        bad = _copy(base["model"], tmp / "bad-config")
        (bad / "config.json").write_text('{"model_type": "llama",')
        out = tmp / "out"
        args = ["fuse", str(bad), "--plan", str(_plan(tmp / "plan.json")), "--out", str(out)]
        return Case(args, [str(bad / "config.json"), "is not valid JSON"], [bad], [out])

    cases["fuse-config-not-json"] = config_not_json

    # 2. a truncated safetensors file in analyze: the message fuse gives.
    def truncated_safetensors(base, tmp: Path) -> Case:
        bad = _copy(base["model"], tmp / "cut")
        weights = bad / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
        out = tmp / "out"
        return Case(
            ["analyze", str(bad), "--out", str(out), "--samples", "2", "--seq-len", "16"],
            [str(weights), "is not a readable safetensors file", "truncated"],
            [bad],
            [out],
        )

    cases["analyze-truncated-safetensors"] = truncated_safetensors

    # 3. a missing shard: analyze and fuse say the same.
    def missing_shard(verb: str) -> Callable[[dict[str, Path], Path], Case]:
        def build(base, tmp: Path) -> Case:
            bad = _copy(base["sharded"], tmp / "sharded")
            gone = sorted(bad.glob("*.safetensors"))[1]
            gone.unlink()
            out = tmp / "out"
            args = (
                ["analyze", str(bad), "--out", str(out), "--samples", "2"]
                if verb == "analyze"
                else ["fuse", str(bad), "--plan", str(_plan(tmp / "plan.json")), "--out", str(out)]
            )
            return Case(args, [f"missing: {gone.name}", "Download or copy the complete checkpoint"], [bad], [out])

        return build

    cases["analyze-missing-shard"] = missing_shard("analyze")
    cases["fuse-missing-shard"] = missing_shard("fuse")

    # 4. a corrupt or truncated GGUF, for every verb that reads a model.
    def gguf(verb: str, keep: int | None) -> Callable[[dict[str, Path], Path], Case]:
        def build(base, tmp: Path) -> Case:
            bad = _truncated_gguf(tmp, keep)
            out = tmp / "out"
            args = {
                "analyze": ["analyze", str(bad), "--out", str(out)],
                "fuse": ["fuse", str(bad), "--plan", str(_plan(tmp / "plan.json")), "--out", str(out)],
                "heal": ["heal", str(base["model"]), "--teacher", str(bad), "--data", "self", "--out", str(out)],
                "eval": ["eval", str(bad), "--data", str(base["text"]), "--out", str(out / "eval.json")],
                "bench": ["bench", str(bad), "--device", "cpu", "--out", str(out / "b.json")],
            }[verb]
            return Case(args, [str(bad), "truncated", "download or copy the .gguf again"], [bad], [out])

        return build

    for verb in ("analyze", "fuse", "heal", "eval", "bench"):
        cases[f"{verb}-gguf-cut-in-header"] = gguf(verb, 100_000)
    cases["fuse-gguf-cut-in-data"] = gguf("fuse", None)

    def not_gguf(base, tmp: Path) -> Case:
        bad = tmp / "fake.gguf"
        bad.write_bytes(b"this is not a gguf file at all" * 10)
        out = tmp / "out"
        return Case(["analyze", str(bad), "--out", str(out)], [str(bad), "is not a GGUF file"], [bad], [out])

    cases["analyze-not-a-gguf"] = not_gguf

    # 5. a directory where a file is expected.
    def plan_is_dir(verb: str) -> Callable[[dict[str, Path], Path], Case]:
        def build(base, tmp: Path) -> Case:
            folder = tmp / "run-folder"
            folder.mkdir()
            _plan(folder / "plan.json")
            out = tmp / "out"
            args = {
                "fuse": ["fuse", str(base["model"]), "--plan", str(folder), "--out", str(out)],
                "bench": ["bench", str(base["model"]), "--plan", str(folder), "--device", "cpu", "--out", str(out)],
                "analyze": ["analyze", str(base["model"]), "--plan", str(folder), "--out", str(out)],
            }[verb]
            return Case(args, [str(folder), "is a directory", "plan.json"], [folder, base["model"]], [out])

        return build

    for verb in ("fuse", "bench", "analyze"):
        cases[f"{verb}-plan-is-a-directory"] = plan_is_dir(verb)

    def costs_is_dir(base, tmp: Path) -> Case:
        analysis = tmp / "analysis.json"
        fake_analysis(LAYERS, [0.1 * i for i in range(LAYERS)]).save(analysis)
        costs = tmp / "costs"
        costs.mkdir()
        out = tmp / "plan.json"
        args = ["plan", str(analysis), "--out", str(out), "--remove-attention", "2", "--costs", str(costs)]
        return Case(args, [str(costs), "is a directory", "JSON file"], [analysis, costs], [out])

    cases["plan-costs-is-a-directory"] = costs_is_dir

    # 6. a plan made for another model.
    def other_model(verb: str, layers: int) -> Callable[[dict[str, Path], Path], Case]:
        def build(base, tmp: Path) -> Case:
            plan = _other_model_plan(tmp, layers)
            out = tmp / "out"
            args = {
                "fuse": ["fuse", str(base["model"]), "--plan", str(plan), "--out", str(out)],
                "bench": ["bench", str(base["model"]), "--plan", str(plan), "--device", "cpu", "--out", str(out)],
            }[verb]
            expect = [str(plan), "made for another model", "org/other-model", str(base["model"]), "--force-plan"]
            return Case(args, expect, [plan, base["model"]], [out], before=_weights_never_read)

        return build

    cases["fuse-plan-of-another-architecture"] = other_model("fuse", LAYERS)
    cases["fuse-plan-of-a-deeper-model"] = other_model("fuse", 32)
    cases["bench-plan-of-another-model"] = other_model("bench", 32)

    # 7. run: a bad input of a late stage is reported before the first stage starts.
    def run_case(changes: dict, expect: Callable[[Path], list[str]]) -> Callable[[dict[str, Path], Path], Case]:
        def build(base, tmp: Path) -> Case:
            config = _run_config(tmp, base, **changes)
            out = tmp / "run"
            args = ["run", "--model", str(base["model"]), "--config", str(config), "--out", str(out)]
            return Case(args, expect(tmp), [config, base["model"]], [out], before=_weights_never_read)

        return build

    missing = "/nonexistent/held_out.txt"
    cases["run-eval-data-missing"] = run_case({"eval_data": missing}, lambda _: [missing, "not found"])
    cases["run-heal-data-missing"] = run_case(
        {"heal": {"data": ["/nonexistent/train.jsonl"]}}, lambda _: ["/nonexistent/train.jsonl", "not found"]
    )
    cases["run-task-data-dir-missing"] = run_case(
        {"eval": {"tasks": ["arc_easy"], "task_data_dir": "/nonexistent/tasks"}},
        lambda _: ["eval.task_data_dir", "/nonexistent/tasks", "not found"],
    )
    cases["run-option-of-the-wrong-type"] = run_case(
        {"analyze": {"samples": "many"}}, lambda _: ["analyze.samples", "'many'", "int"]
    )
    cases["run-eval-tasks-not-a-list"] = run_case({"eval": {"tasks": 3}}, lambda _: ["eval.tasks", "list"])
    cases["run-heal-setting-out-of-range"] = run_case({"heal": {"temperature": 0}}, lambda _: ["--temperature"])
    cases["run-config-is-a-directory"] = lambda base, tmp: Case(
        ["run", "--model", str(base["model"]), "--config", str(tmp), "--out", str(tmp / "run")],
        [str(tmp), "is a directory", "run.yaml"],
        [base["model"]],
        [tmp / "run"],
    )

    # 8. fuse --out non-empty is refused before any weights are read.
    def out_not_empty(base, tmp: Path) -> Case:
        out = tmp / "out"
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        plan = _plan(tmp / "plan.json")
        return Case(
            ["fuse", str(base["model"]), "--plan", str(plan), "--out", str(out)],
            [str(out), "not empty", "--overwrite"],
            [plan, base["model"], out],
            [],
            before=_weights_never_read,
        )

    cases["fuse-out-not-empty"] = out_not_empty
    return cases


CASES = _cases()


def _digest(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_clearly(name: str, base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name](base, tmp_path)
    monkeypatch.setattr(cli.err_console, "width", 10_000)  # one line per message: substrings are not wrapped
    if case.before is not None:
        case.before(monkeypatch)
    before = {str(p): _digest(p) for p in case.inputs}
    result = runner.invoke(cli.app, case.args)
    output = result.output
    assert result.exit_code == 2, f"{name}: exit {result.exit_code}\n{output}\n{result.exception!r}"
    assert "Traceback" not in output
    assert output.lstrip().startswith("error:"), output
    flat = " ".join(output.split())
    for part in case.expect:
        assert part in flat, f"{name}: {part!r} not in the message:\n{output}"
    assert {str(p): _digest(p) for p in case.inputs} == before, f"{name}: an input changed"
    for out in case.outputs:
        assert not out.exists(), f"{name}: {out} was written"
        assert not list(out.parent.glob(f".{out.name}*")), f"{name}: a partial output beside {out}"


def test_a_plan_of_this_model_or_forced_or_hand_written_is_applied(base, tmp_path: Path) -> None:
    """The other side of the plan check: the recorded model matches, --force-plan, or no model recorded."""
    recorded = {"name": "elsewhere/model", "num_layers": LAYERS, "config_hash": _hash_of(base)}
    for name, plan, extra in (
        ("same", _plan(tmp_path / "same.json", recorded), []),
        ("forced", _other_model_plan(tmp_path), ["--force-plan"]),
        ("hand-written", _plan(tmp_path / "hand.json"), []),
    ):
        out = tmp_path / name
        args = ["fuse", str(base["model"]), "--plan", str(plan), "--out", str(out), "--allow-any-width", *extra]
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, f"{name}: {result.output}"
        assert (out / "config.json").is_file()
