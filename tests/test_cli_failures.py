"""Failures the command line must report as one clean message with exit code 2 (issue 13), and its import cost.

Each case runs a verb through typer's CliRunner and checks: exit code 2, the message names the path/problem/fix,
no traceback, the inputs are byte-identical afterwards and no final output exists. Operating-system errors are
simulated with monkeypatch (tests run as root, so chmod cannot deny anything).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import ffnfusion.fuse
from ffnfusion.cli import app
from ffnfusion.formats.plan import Plan
from ffnfusion.fuse import fuse
from ffnfusion.heal.resume import _check_resume
from ffnfusion.heal.settings import HealSettings
from test_heal import char_tokenizer, save_teacher, sentences

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_failures")
    tok = char_tokenizer()
    teacher = save_teacher(root / "teacher", tok)
    wide = save_teacher(root / "wide_teacher", tok, hidden_size=64)
    plan = root / "plan.json"
    Plan(remove_attention=[2, 3], fuse_ffn=[[1, 2, 3]]).save(plan)
    fuse(teacher, plan, root / "student")
    text = root / "text.txt"
    text.write_text(sentences(200, seed=1))
    bad_plan = root / "bad_plan.json"
    bad_plan.write_text('{"remove_attention": [1], "fuse_everything": true}')
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    return {
        "root": root,
        "teacher": teacher,
        "wide": wide,
        "student": root / "student",
        "plan": plan,
        "bad_plan": bad_plan,
        "text": text,
        "a_file": a_file,
    }


def digests(files: dict[str, Path]) -> dict[str, str]:
    out = {}
    for key, path in files.items():
        if key == "root":
            continue
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def raise_os_error(code: int) -> Callable:
    def write(folder: Path, *args, **kwargs):
        target = Path(folder) / "model.safetensors"
        raise OSError(code, os.strerror(code), str(target))

    return write


@dataclass
class Case:
    name: str
    args: Callable[[dict[str, Path], Path], list[str]]
    expect: list[str]  # fragments of the message ({out}, {parent}, {root} are filled in)
    patch: Callable[[pytest.MonkeyPatch, dict[str, Path]], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def fuse_args(f: dict[str, Path], out: Path) -> list[str]:
    return ["fuse", str(f["teacher"]), "--plan", str(f["plan"]), "--out", str(out)]


def patch_write(code: int) -> Callable:
    return lambda mp, f: mp.setattr(ffnfusion.fuse, "write_fused_checkpoint", raise_os_error(code))


def offline_hub(mp: pytest.MonkeyPatch, f: dict[str, Path]) -> None:
    from huggingface_hub import constants

    # Nothing cached: an empty hub cache and datasets cache.
    mp.setattr(constants, "HF_HUB_CACHE", str(f["root"] / "empty_hub_cache"))
    mp.setenv("HF_HOME", str(f["root"] / "empty_hf_home"))
    mp.delenv("HF_DATASETS_CACHE", raising=False)


CASES = [
    Case(
        "disk full",
        fuse_args,
        ["{parent}", "model.safetensors", "No space left", "disk is full"],
        patch_write(errno.ENOSPC),
    ),
    Case("file too large", fuse_args, ["{parent}", "File too large", "another disk"], patch_write(errno.EFBIG)),
    Case("read-only", fuse_args, ["{parent}", "Read-only file system", "writable location"], patch_write(errno.EROFS)),
    Case(
        "permission denied",
        fuse_args,
        ["{parent}", "Permission denied", "fix its permissions"],
        patch_write(errno.EACCES),
    ),
    Case(
        "out below a file",
        lambda f, out: fuse_args(f, f["a_file"] / "sub" / "fused"),
        ["a_file", "is a file, not a folder", "--out"],
    ),
    Case(
        "bad plan file",
        lambda f, out: ["fuse", str(f["teacher"]), "--plan", str(f["bad_plan"]), "--out", str(out)],
        ["bad_plan.json", "fuse_everything", "Extra inputs"],
    ),
    Case(
        "teacher of other width",
        lambda f, out: [
            "heal",
            str(f["student"]),
            "--teacher",
            str(f["wide"]),
            "--data",
            str(f["text"]),
            "--out",
            str(out),
            "--seq-len",
            "32",
            "--max-steps",
            "1",
            "--no-bf16",
        ],
        ["hidden sizes", "hidden_size 48", "hidden_size 64", "student", "wide_teacher", "--teacher"],
    ),
    Case(
        "task needs the unreachable hub",
        lambda f, out: ["eval", str(f["teacher"]), "--tasks", "arc_easy,piqa", "--out", str(out / "eval.json")],
        [
            "HF_HUB_OFFLINE=1",
            "arc_easy",
            "allenai/ai2_arc",
            "piqa",
            "baber/piqa",
            "--task-data-dir",
            "arc_easy.jsonl",
            "piqa.jsonl",
        ],
        offline_hub,
        {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_failure_is_one_clean_message(case: Case, files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.patch:
        case.patch(monkeypatch, files)
    before = digests(files)
    result = CliRunner().invoke(app, case.args(files, out))
    text = " ".join(result.output.split())  # messages may wrap at the terminal width
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert "error:" in text
    for fragment in case.expect:
        assert fragment.format(out=out, parent=out.parent, root=files["root"]) in text, (fragment, result.output)
    assert digests(files) == before
    assert not out.exists()
    assert not (files["a_file"] / "sub").exists()


@pytest.mark.parametrize("how", ["--debug", "FFNFUSION_DEBUG"])
def test_debug_shows_the_traceback(how: str, files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patch_write(errno.ENOSPC)(monkeypatch, files)
    args = fuse_args(files, tmp_path / "out")
    if how == "--debug":
        result = CliRunner().invoke(app, ["--debug", *args])
    else:
        result = CliRunner().invoke(app, args, env={"FFNFUSION_DEBUG": "1"})
    assert result.exit_code == 2
    assert "Traceback" in result.output and "No space left on device" in result.output
    assert not (tmp_path / "out").exists()
    # Without it: no traceback (the table above); the flag does not stick to the next invocation.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "Traceback" not in again.output


def fake_checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, folder / "model.safetensors")
    torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: (c / "optimizer.pt").unlink(),
        lambda c: truncate(c / "optimizer.pt"),
        lambda c: truncate(c / "model.safetensors"),
        lambda c: (c / "trainer_state.json").unlink(),
        lambda c: truncate(c / "trainer_state.json"),
    ],
    ids=["optimizer missing", "optimizer truncated", "model truncated", "state missing", "state truncated"],
)
def test_resume_skips_a_half_written_checkpoint(damage, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = HealSettings(data=["x"])
    good = fake_checkpoint(tmp_path / "checkpoint-2", 2)
    newest = fake_checkpoint(tmp_path / "checkpoint-4", 4)
    assert _check_resume(tmp_path, settings, resume=True) == str(newest)
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="ffnfusion.heal"):
        assert _check_resume(tmp_path, settings, resume=True) == str(good)
    assert "checkpoint-4" in caplog.text and "resuming from" in caplog.text
    # Nothing complete: a fresh start, said in the warning.
    damage(good)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ffnfusion.heal"):
        assert _check_resume(tmp_path, settings, resume=True) is None
    assert "starting from scratch" in caplog.text and "checkpoint-2" in caplog.text


def test_cli_import_loads_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, ffnfusion.cli, ffnfusion\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        # The README's promise: after `import ffnfusion`, transformers' Auto classes know DeciLM.
        "from transformers import AutoConfig\n"
        "assert AutoConfig.for_model('nemotron-nas').__class__.__name__ == 'DeciLMConfig'\n"
        "from ffnfusion import DeciLMForCausalLM, Plan\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
