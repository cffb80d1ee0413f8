"""Where a verb may write: the one rule set of `ffnfusion.io.output`, then every verb's CLI against a user's files.

Each CLI case asserts exit code 2, a message naming the problem, no traceback, every input file's bytes unchanged,
and nothing created under the output name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from analysis_fakes import save_with_tokenizer, text_file
from conftest import SMOLLM2_GGUF, tiny_model
from ffnfusion.cli import app
from ffnfusion.formats.plan import Plan
from ffnfusion.fuse import fuse
from ffnfusion.io.output import (
    MARKER,
    OutputError,
    check_output_dir,
    check_output_file,
    json_format_is,
    write_marker,
)
from ffnfusion.io.source import resolve_model

runner = CliRunner()
PLAN = Plan(remove_attention=[2, 3], fuse_ffn=[[1, 2]])


# ---- the rules, on hand-built folders ---------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, Path]:
    """model/ (a folder input), data.txt (a file input), models/x.gguf (a single-file input), a user's folder."""
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "data.txt").write_text("some text")
    (root / "models").mkdir()
    (root / "models" / "x.gguf").write_bytes(b"GGUF....")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("keep me")
    marked = root / "earlier"
    marked.mkdir()
    (marked / "config.json").write_text("{}")
    write_marker(marked, "fuse")
    return {
        "model": root / "model",
        "data": root / "data.txt",
        "gguf": root / "models" / "x.gguf",
        "mine": root / "mine",
        "earlier": marked,
    }


# (output relative to the tree root, overwrite, expected: None = allowed, else (error type, message fragment))
DIR_CASES = [
    ("new", False, None),
    ("model", True, (OutputError, "is the input model")),
    ("model/out", True, (OutputError, "input model's folder")),
    (".", True, (OutputError, "contains the input model")),
    ("data.txt", True, (OutputError, "is the data")),
    ("data.txt/out", False, (OutputError, "is a file, not a folder")),
    ("models", True, (OutputError, "contains the input model")),
    ("models/x-analysis", False, None),  # beside a single-file model is fine
    ("models/x.gguf", True, (OutputError, "is the input model")),
    ("mine", False, (FileExistsError, "--overwrite")),
    ("mine", True, (OutputError, "not an output of ffnfusion")),
    ("earlier", False, (FileExistsError, "--overwrite")),
    ("earlier", True, None),
    ("mine/notes.txt/below", False, (OutputError, "is a file, not a folder")),
]


@pytest.mark.parametrize("relative, overwrite, expected", DIR_CASES)
def test_output_folder_rules(tmp_path: Path, relative: str, overwrite: bool, expected) -> None:
    paths = _tree(tmp_path)
    inputs = [("input model", paths["model"]), ("data", paths["data"]), ("input model", paths["gguf"])]
    out = tmp_path / relative
    if expected is None:
        assert check_output_dir(out, "fuse", inputs, overwrite) == out.resolve()
    else:
        error, fragment = expected
        with pytest.raises(error, match=fragment):
            check_output_dir(out, "fuse", inputs, overwrite)


def test_marker_of_another_verb_is_not_enough(tmp_path: Path) -> None:
    paths = _tree(tmp_path)
    with pytest.raises(OutputError, match="output of `ffnfusion fuse`"):
        check_output_dir(paths["earlier"], "heal", overwrite=True)


def test_stage_error_type_is_used(tmp_path: Path) -> None:
    paths = _tree(tmp_path)
    with pytest.raises(KeyError):
        check_output_dir(paths["model"], "fuse", [("input model", paths["model"])], error=KeyError)


FILE_CASES = [
    ("new.json", True, None),
    ("ours.json", True, None),
    ("ours.json", False, (FileExistsError, "--overwrite")),
    ("theirs.json", True, (OutputError, "not an earlier output")),
    ("data.txt", True, (OutputError, "is the data")),
    ("mine", True, (OutputError, "is a folder")),
    ("model/eval.json", True, (OutputError, "input model's folder")),
]


@pytest.mark.parametrize("relative, replace, expected", FILE_CASES)
def test_output_file_rules(tmp_path: Path, relative: str, replace: bool, expected) -> None:
    paths = _tree(tmp_path)
    (tmp_path / "ours.json").write_text(json.dumps({"format": "ffnfusion-eval", "models": []}))
    (tmp_path / "theirs.json").write_text(json.dumps({"results": [1, 2, 3]}))
    inputs = [("input model", paths["model"]), ("data", paths["data"])]
    out = tmp_path / relative
    check = lambda: check_output_file(out, "eval", json_format_is("ffnfusion-eval"), inputs, replace)  # noqa: E731
    if expected is None:
        assert check() == out.resolve()
    else:
        error, fragment = expected
        with pytest.raises(error, match=fragment):
            check()




# ---- every verb against a user's files (CLI) ---------------------------------------------------------------------


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A user's folder `parent` holding a model, a plan, text, notes and a fused checkpoint."""
    parent = tmp_path_factory.mktemp("user") / "parent"
    model = save_with_tokenizer(tiny_model("llama", seed=5, num_hidden_layers=6), parent / "model")
    plan = parent / "plan.json"
    PLAN.save(plan)
    fused = parent / "fused"
    fuse(model, PLAN, fused, allow_any_width=True)
    text = text_file(parent / "text.txt", words=600, seed=3)
    (parent / "notes").mkdir()
    (parent / "notes" / "todo.md").write_text("my own notes\n")
    (parent / "report.md").write_text("# my report, not ffnfusion's\n")
    return {"parent": parent, "model": model, "plan": plan, "fused": fused, "text": text}


def _cases(w: dict[str, Path]) -> list[tuple[str, list[str], Path, str]]:
    """(name, argv, output that must not appear, message fragment)."""
    p, m, plan, fused, text = w["parent"], str(w["model"]), str(w["plan"]), str(w["fused"]), str(w["text"])
    return [
        ("fuse onto the folder holding the model", ["fuse", m, "--plan", plan, "--out", str(p), "--overwrite"],
         p / MARKER,
         "contains the input model"),
        ("fuse into the model", ["fuse", m, "--plan", plan, "--out", f"{m}/fused"], Path(m) / "fused",
         "input model's folder"),
        ("fuse over a user's folder", ["fuse", m, "--plan", plan, "--out", str(p / "notes"), "--overwrite"],
         p / "notes" / MARKER, "not an output of ffnfusion"),
        ("fuse over the plan", ["fuse", m, "--plan", plan, "--out", plan, "--overwrite"], p / ".plan.json.old",
         "is the plan"),
        ("heal onto the folder holding student and teacher",
         ["heal", fused, "--teacher", m, "--data", text, "--out", str(p), "--overwrite"], p / "model.safetensors",
         "contains the input model"),
        ("heal over the data", ["heal", fused, "--teacher", m, "--data", text, "--out", text, "--overwrite"],
         p / "loss_curve.png", "is the data"),
        ("analyze onto the folder holding the model",
         ["analyze", m, "--data", text, "--out", str(p), "--overwrite"], p / "analysis.json",
         "contains the input model"),
        ("plan over the user's text", ["plan", str(p / "analysis"), "--out", text, "--overwrite"], p / ".text.txt.tmp",
         "not an earlier output"),
        ("eval over the data", ["eval", m, "--data", text, "--out", text], p / "text.md", "is the data"),
        ("eval over a user's file", ["eval", m, "--data", text, "--out", str(p / "notes" / "todo.md")],
         p / "notes" / "todo.json", "not an earlier output"),
        ("bench over the plan", ["bench", m, "--plan", plan, "--out", plan, "--device", "cpu"], p / "plan.md",
         "is the plan"),
        ("run onto the folder holding the model", ["run", "--model", m, "--out", str(p)], p / "run.json",
         "contains the input model"),
        ("run into a user's folder", ["run", "--model", m, "--out", str(p / "notes")], p / "notes" / "run.json",
         "not an output of ffnfusion"),
        ("report over a user's report.md", ["report", str(p)], p / "report.html", "not an earlier output"),
    ]  # fmt: skip


CASE_NAMES = [c[0] for c in _cases({k: Path(k) for k in ("parent", "model", "plan", "fused", "text")})]


def test_single_file_model_protects_the_file_not_its_folder(world) -> None:
    source = resolve_model(SMOLLM2_GGUF)
    assert source.input_path == SMOLLM2_GGUF.resolve()
    assert resolve_model(world["model"]).input_path == world["model"].resolve()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_no_verb_destroys_a_users_files(world, name: str) -> None:
    case = next(c for c in _cases(world) if c[0] == name)
    _, argv, must_not_exist, fragment = case
    (world["parent"] / "analysis").mkdir(exist_ok=True)  # an analysis folder for `plan` to read (it is refused first)
    before = _hashes(world["parent"])
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert fragment in message and "Traceback" not in result.output
    assert _hashes(world["parent"]) == before
    assert not must_not_exist.exists()


def test_overwrite_replaces_an_earlier_output_of_the_same_verb(world, tmp_path: Path) -> None:
    out = tmp_path / "fused"
    argv = ["fuse", str(world["model"]), "--plan", str(world["plan"]), "--out", str(out), "--allow-any-width"]
    assert runner.invoke(app, argv).exit_code == 0
    assert json.loads((out / MARKER).read_text())["verb"] == "fuse"
    (out / "stale.txt").write_text("from the first run")
    assert runner.invoke(app, [*argv, "--overwrite"]).exit_code == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    # ...but a heal may not replace what fuse wrote.
    other = runner.invoke(
        app, ["heal", str(out), "--teacher", str(world["model"]), "--data", str(world["text"]), "--out", str(out),
              "--overwrite"],
    )  # fmt: skip
    assert other.exit_code == 2 and "is the input model" in " ".join(other.output.split())


def test_report_replaces_its_own_files(world, tmp_path: Path) -> None:
    folder = tmp_path / "r"
    folder.mkdir()
    shutil.copy(world["plan"], folder / "plan.json")
    for _ in range(2):  # the second run replaces the first one's files
        result = runner.invoke(app, ["report", str(folder)])
        assert result.exit_code == 0, result.output
    assert (folder / "report.md").is_file() and (folder / "report.html").is_file()
