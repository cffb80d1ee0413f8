"""Healing by distillation: the loss, Trainer integration, 2-process DDP, kill-and-resume, and bad input."""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_model
from ffnfusion.cli import app
from ffnfusion.data import DataError, packed_sequences, tokenize_stream
from ffnfusion.formats.plan import Plan
from ffnfusion.fuse import fuse
from ffnfusion.heal.settings import HealError, HealSettings, default_lr
from ffnfusion.heal.stage import heal
from ffnfusion.heal.trainer import (
    _final_hidden_and_logits,
    _hidden_states_and_logits,
    block_boundaries,
    boundary_cosine,
    changed_blocks,
    distillation_loss,
    distillation_step,
)
from ffnfusion.surgery import fuse_model

ROOT = Path(__file__).resolve().parents[1]
PLAN = Plan(remove_attention=[2, 3, 4], fuse_ffn=[[1, 2, 3]])
WORDS = [
    "the",
    "a",
    "river",
    "stone",
    "light",
    "wind",
    "over",
    "under",
    "quickly",
    "slowly",
    "king",
    "queen",
    "city",
    "north",
    "south",
    "bright",
    "dark",
    "song",
    "field",
    "water",
    "fire",
    "old",
    "new",
    "runs",
    "sleeps",
    "speaks",
    "dreams",
    "and",
    "but",
    "because",
    "while",
    "when",
    "then",
]


def char_tokenizer(chars: str | None = None):
    """A character-level fast tokenizer: real text in, ids below a tiny model's vocabulary out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = chars or "".join(c for c in string.printable if c not in "\x0b\x0c\r")
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def sentences(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(n)
    )


def save_teacher(folder: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    model = tiny_model("llama", seed=seed, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heal")
    tok = char_tokenizer()
    teacher = save_teacher(root / "teacher", tok)
    fuse(teacher, PLAN, root / "student")
    fuse(teacher, Plan(), root / "identical")
    text = root / "text.txt"
    text.write_text(sentences(400, seed=1))
    return {
        "root": root,
        "teacher": teacher,
        "student": root / "student",
        "identical": root / "identical",
        "text": text,
    }


def settings(setup: dict[str, Path], **kw) -> HealSettings:
    base = dict(data=[str(setup["text"])], seq_len=32, batch_size=4, max_steps=8, lr=1e-3, warmup=2, bf16=False)
    return HealSettings(**{**base, **kw})


def run(setup: dict[str, Path], out: str, student: str = "student", **kw) -> tuple:
    opts = {k: kw.pop(k) for k in ("resume", "checkpoint_dir", "save_steps", "callbacks", "overwrite") if k in kw}
    opts.setdefault("save_steps", 100)
    summary = heal(
        setup[student],
        setup["teacher"],
        setup["root"] / out,
        settings(setup, **kw),
        logging_steps=1,
        progress=False,
        **opts,
    )
    return summary, load_file(setup["root"] / out / "model.safetensors")


def losses(summary) -> list[float]:
    return [r["loss"] for r in summary.log_history if "loss" in r]


# ---- the loss --------------------------------------------------------------------------------------------------


def test_loss_is_zero_for_identical_student_and_positive_for_fused() -> None:
    teacher = tiny_model("llama", seed=4)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_hidden, t_logits = _final_hidden_and_logits(teacher, ids)
        for plan, zero in ((Plan(), True), (PLAN, False)):
            s_hidden, s_logits = _final_hidden_and_logits(fuse_model(teacher, plan), ids)
            loss, parts = distillation_loss(s_logits, t_logits, s_hidden, t_hidden, ids, temperature=2.0)
            if zero:
                assert float(loss) < 1e-6 and float(parts["kl"]) < 1e-6 and float(parts["cos"]) < 1e-6
            else:
                assert float(parts["kl"]) > 1e-3 and float(parts["cos"]) > 1e-3
    # The KL term is KL(teacher || student) at temperature T, times T^2.
    s_logits, t_logits = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    _, parts = distillation_loss(
        s_logits, t_logits, torch.randn(1, 3, 4), torch.randn(1, 3, 4), ids[:1, :3], temperature=2.0
    )
    p, q = (t_logits / 2).softmax(-1), (s_logits / 2).softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1).mean() * 4
    assert torch.allclose(parts["kl"], want, rtol=1e-5)


def test_block_boundaries_pair_each_block_with_the_layers_it_replaces() -> None:
    assert block_boundaries(Plan(), 4, 4) == block_boundaries(None, 4, 4) == [(1, 1), (2, 2), (3, 3)]
    # PLAN on 6 layers: blocks L0, FFN group 1-3 (attention of 1), L4 without attention, L5.
    assert block_boundaries(PLAN, 6, 4) == [(1, 1), (2, 4), (3, 5)]
    # A dropped layer (ShortGPT) is asked of the block before it; a parallel pair answers for both layers.
    assert block_boundaries(Plan(remove_attention=[2], remove_ffn=[2]), 5, 4) == [(1, 1), (2, 3), (3, 4)]
    assert block_boundaries(Plan(parallel_blocks=[[1, 2]]), 4, 3) == [(1, 1), (2, 3)]
    with pytest.raises(HealError, match="gives 4: was it fused from another model"):
        block_boundaries(PLAN, 6, 5)
    with pytest.raises(HealError, match="needs the plan"):
        block_boundaries(None, 6, 4)


def test_layer_term_matches_the_residual_streams_it_pairs() -> None:
    teacher = tiny_model("llama", seed=4)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    student = fuse_model(teacher, PLAN)
    pairs = block_boundaries(PLAN, 6, 4)
    with torch.no_grad():
        t_states, _ = _hidden_states_and_logits(teacher, ids)
        s_states, _ = _hidden_states_and_logits(student, ids)
        same, _ = _hidden_states_and_logits(fuse_model(teacher, Plan()), ids)
        # Block 0 is the teacher's layer 0, untouched: exact there; the fused group's output is not.
        assert float(boundary_cosine(s_states, t_states, pairs[:1])) < 1e-6
        assert float(boundary_cosine(s_states, t_states, pairs[1:2])) > 1e-3
        assert float(boundary_cosine(same, t_states, block_boundaries(Plan(), 6, 6))) < 1e-6
        # By hand at one boundary: 1 - <s, t> / (|s| |t|), averaged over positions.
        s, t = s_states[2], t_states[4]
        want = (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean()
        torch.testing.assert_close(boundary_cosine(s_states, t_states, [(2, 4)]), want, rtol=1e-5, atol=1e-6)
        total = boundary_cosine(s_states, t_states, pairs)
    # Both loss paths add the same term with its weight.
    for impl in ("plain", "chunked"):
        on = HealSettings(data=["x"], layer_weight=0.5, loss_impl=impl, compile="none")
        off = on.model_copy(update={"layer_weight": 0.0})
        loss, parts, _ = distillation_step(student, student, teacher, ids, on, pairs)
        loss_off, parts_off, _ = distillation_step(student, student, teacher, ids, off, pairs)
        assert "layer" not in parts_off
        torch.testing.assert_close(parts["layer"], total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, loss_off + 0.5 * total, rtol=1e-5, atol=1e-6)
        loss.backward()  # the term reaches the student's weights
        assert student.model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0
        student.zero_grad()


def test_identical_student_trains_at_zero_loss(setup) -> None:
    summary, _ = run(setup, "out-identical", student="identical", max_steps=2)
    assert summary.steps == 2
    assert max(losses(summary)) < 1e-5


def test_loss_falls_and_output_is_a_fused_checkpoint(setup) -> None:
    summary, weights = run(setup, "out-falls", max_steps=24)
    ls = losses(summary)
    assert sum(ls[-4:]) / 4 < 0.8 * ls[0], ls
    out = setup["root"] / "out-falls"
    config = json.loads((out / "config.json").read_text())
    student_config = json.loads((setup["student"] / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    assert config["block_configs"] == student_config["block_configs"]
    for name in ("modeling_decilm.py", "tokenizer.json", "ffnfusion_plan.json", "heal_log.jsonl", "heal_summary.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student = load_file(setup["student"] / "model.safetensors")
    assert weights.keys() == student.keys()
    assert any(not torch.equal(weights[k], student[k]) for k in weights)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "DeciLMForCausalLM"
    assert torch.equal(
        model.state_dict()["model.layers.1.mlp.gate_proj.weight"], weights["model.layers.1.mlp.gate_proj.weight"]
    )
    assert not any(setup["root"].glob("out-falls.checkpoints")), "checkpoints are removed after success"


def test_scope_changed_trains_only_changed_blocks_and_neighbours(setup) -> None:
    assert changed_blocks(PLAN, 6) == [1, 2]  # fused block 1 (layers 1-3), layer 4 without attention
    student = load_file(setup["student"] / "model.safetensors")
    for neighbours, trained in ((0, {1, 2}), (1, {0, 1, 2, 3})):
        summary, weights = run(setup, f"out-scope{neighbours}", max_steps=4, scope="changed", neighbours=neighbours)
        assert set(summary.trainable_blocks) == trained
        for name, w in weights.items():
            block = int(name.split(".")[2]) if name.startswith("model.layers.") else None
            assert torch.equal(w, student[name]) == (block not in trained), name


# ---- distribution and resume -----------------------------------------------------------------------------------


def test_two_processes_match_one(setup) -> None:
    root = setup["root"]
    args = [
        "heal",
        str(setup["student"]),
        "--teacher",
        str(setup["teacher"]),
        "--data",
        str(setup["text"]),
        "--seq-len",
        "32",
        "--max-steps",
        "5",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--no-bf16",
        "--logging-steps",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "--module",
        "ffnfusion.cli",
        *args,
        "--out",
        str(root / "ddp"),
        "--batch-size",
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = CliRunner().invoke(app, [*args, "--out", str(root / "single"), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    ddp, single = load_file(root / "ddp" / "model.safetensors"), load_file(root / "single" / "model.safetensors")
    student = load_file(setup["student"] / "model.safetensors")
    for name in single:
        assert torch.allclose(ddp[name], single[name], atol=1e-6, rtol=1e-5), name
    assert max((single[k] - student[k]).abs().max() for k in single) > 1e-3  # it trained at all
    log = [json.loads(line) for line in (root / "ddp" / "heal_log.jsonl").read_text().splitlines()]
    log_single = [json.loads(line) for line in (root / "single" / "heal_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if "loss" in r] == pytest.approx(
        [r["loss"] for r in log_single if "loss" in r], rel=1e-4
    )


KILL_SCRIPT = """
import os, signal, sys
from transformers import TrainerCallback
from ffnfusion.heal.settings import HealSettings
from ffnfusion.heal.stage import heal

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= 4:
            os.kill(os.getpid(), signal.SIGKILL)

student, teacher, text, out = sys.argv[1:5]
settings = HealSettings(data=[text], seq_len=32, batch_size=4, max_steps=8, lr=1e-3, warmup=2, bf16=False)
heal(student, teacher, out, settings, save_steps=2, progress=False, callbacks=[KillAfterSave()])
print("not killed")
"""


def test_killed_run_resumes_to_the_same_weights(setup) -> None:
    root = setup["root"]
    out = root / "resumed"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(setup["student"]), str(setup["teacher"]), str(setup["text"]), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    checkpoints = root / "resumed.checkpoints"
    assert (checkpoints / "checkpoint-4").is_dir() and not out.exists()
    with pytest.raises(HealError, match="--resume"):
        run(setup, "resumed")
    with pytest.raises(HealError, match="settings differ"):
        run(setup, "resumed", resume=True, lr=2e-3)
    # A run started before a setting existed resumes (it had the default), and without --lr it keeps its own rate.
    saved = checkpoints / "heal_settings.json"
    older = json.loads(saved.read_text())
    del older["layer_weight"]
    saved.write_text(json.dumps(older))
    resumed, weights = run(setup, "resumed", resume=True, lr=None)
    assert resumed.lr == 1e-3
    assert resumed.steps == 8
    _, reference = run(setup, "uninterrupted")
    for name in reference:
        assert torch.allclose(weights[name], reference[name], atol=1e-7, rtol=0), name


# ---- bad input --------------------------------------------------------------------------------------------------


def test_teacher_with_another_vocabulary_is_refused(setup, tmp_path: Path) -> None:
    bigger = save_teacher(tmp_path / "bigger", char_tokenizer(string.ascii_letters + " .,\n"), seed=2)
    with pytest.raises(HealError, match="vocabulary sizes"):
        heal(setup["student"], bigger, tmp_path / "out", settings(setup))
    # Same size, different token ids: caught by comparing the tokenizers themselves.
    chars = "".join(c for c in string.printable if c not in "\x0b\x0c\r")
    shuffled = save_teacher(tmp_path / "shuffled", char_tokenizer(chars[::-1]))
    with pytest.raises(HealError, match="tokenizers differ"):
        heal(setup["student"], shuffled, tmp_path / "out", settings(setup))


def test_student_that_is_not_a_fused_checkpoint_is_refused(setup, tmp_path: Path) -> None:
    with pytest.raises(HealError, match="not a fused checkpoint"):
        heal(setup["teacher"], setup["teacher"], tmp_path / "out", settings(setup))
    result = CliRunner().invoke(
        app,
        [
            "heal",
            str(setup["teacher"]),
            "--teacher",
            str(setup["teacher"]),
            "--data",
            str(setup["text"]),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2 and "not a fused checkpoint" in result.output


def test_data_too_short_for_one_sequence_is_refused(setup, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("A river runs.")
    with pytest.raises(DataError, match="too few for one sequence"):
        heal(setup["student"], setup["teacher"], tmp_path / "out", settings(setup, data=[str(short)]))
    # Enough for a sequence but not for one batch.
    short.write_text("A river runs over the old stone while the king sleeps and the north wind speaks of fire.")
    with pytest.raises(DataError, match="fewer than one batch"):
        heal(setup["student"], setup["teacher"], tmp_path / "out", settings(setup, data=[str(short)], seq_len=64))


def test_bad_settings_and_outputs_are_refused(setup, tmp_path: Path) -> None:
    with pytest.raises(HealError, match="scope"):
        heal(setup["student"], setup["teacher"], tmp_path / "o", settings(setup, scope="some"))
    with pytest.raises(HealError, match="all loss weights are zero"):
        heal(setup["student"], setup["teacher"], tmp_path / "o", settings(setup, kl_weight=0, cos_weight=0))
    with pytest.raises(HealError, match="input model's folder"):
        heal(setup["student"], setup["teacher"], setup["student"] / "healed", settings(setup))
    with pytest.raises(HealError, match="no checkpoint found"):
        heal(setup["student"], setup["teacher"], tmp_path / "o", settings(setup), resume=True)


def test_resume_before_the_first_checkpoint_starts_from_step_0(setup, tmp_path: Path, caplog) -> None:
    """A heal killed before its first save leaves its folder (marker, settings) and no checkpoint: --resume starts
    over with a warning instead of refusing."""
    out = tmp_path / "o"
    checkpoints = Path(f"{out}.checkpoints")
    killed = settings(setup)

    class Killed(Exception):
        pass

    from transformers import TrainerCallback

    class DieAtFirstStep(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            raise Killed

    with pytest.raises(Killed):
        heal(setup["student"], setup["teacher"], out, killed, callbacks=[DieAtFirstStep()])
    assert checkpoints.is_dir() and not list(checkpoints.glob("checkpoint-*")) and not out.exists()
    with caplog.at_level("WARNING", logger="ffnfusion.heal"):
        summary = heal(setup["student"], setup["teacher"], out, settings(setup), resume=True)
    assert summary.steps > 0 and (out / "model.safetensors").is_file()
    assert any("no checkpoint yet" in r.getMessage() and "step 0" in r.getMessage() for r in caplog.records)


def test_packed_sequences_are_consecutive_windows_of_the_stream(setup) -> None:
    tok = char_tokenizer()
    seqs = packed_sequences(str(setup["text"]), tok, 32)
    stream = tokenize_stream(tok, [setup["text"].read_text()])
    assert seqs.shape == (stream.numel() // 32, 32)
    assert torch.equal(seqs.flatten(), stream[: seqs.numel()])
    subset = packed_sequences(str(setup["text"]), tok, 32, max_sequences=5, seed=3)
    assert subset.shape == (5, 32)
    assert all(any(torch.equal(row, s) for s in seqs) for row in subset)


def test_automatic_learning_rate(setup) -> None:
    # The rule: 1e-3 up to 576 wide at 65,536 tokens per step (where it was measured), then inversely with width
    # and with the square root of the step's tokens below that; never above 1e-3.
    assert default_lr(576) == pytest.approx(1e-3) and default_lr(64) == pytest.approx(1e-3)
    assert default_lr(4096) == pytest.approx(1e-3 * 576 / 4096)
    assert default_lr(1152) == pytest.approx(default_lr(576) / 2)
    assert default_lr(576, 16384) == pytest.approx(5e-4) and default_lr(576, 4096) == pytest.approx(2.5e-4)
    assert default_lr(576, 10**7) == pytest.approx(1e-3)
    assert default_lr(4096, 16384) == pytest.approx(1e-3 * 576 / 4096 / 2)
    summary, _ = run(setup, "auto-lr", lr=None, max_steps=2, warmup=0)
    hidden = json.loads((setup["student"] / "config.json").read_text())["hidden_size"]
    want = default_lr(hidden, 4 * 32)  # the settings' 4 sequences of 32 tokens per step
    assert summary.lr == pytest.approx(want)
    saved = json.loads((setup["root"] / "auto-lr" / "heal_summary.json").read_text())["settings"]
    assert saved["lr"] == pytest.approx(want)  # what was trained with, not "automatic"
    first = next(r["learning_rate"] for r in summary.log_history if "learning_rate" in r)
    assert first == pytest.approx(want)  # no warm-up: the first step runs at the peak
    with pytest.raises(HealError, match="--lr must be in"):
        settings(setup, lr=0.0).check()


def test_heal_with_the_layer_term_logs_it(setup) -> None:
    summary, _ = run(setup, "layer-term", layer_weight=1.0, max_steps=2)
    logged = [r["loss_layer"] for r in summary.log_history if "loss_layer" in r]
    assert len(logged) == 2 and all(v > 0 for v in logged)
    with pytest.raises(HealError, match="loss weights must not be negative"):
        settings(setup, layer_weight=-1.0).check()


def test_heal_reports_its_wall_time_by_phase(setup) -> None:
    summary, _ = run(setup, "phases", batch_size=None, max_steps=2, warmup=0)
    assert list(summary.phase_seconds) == ["checks, models and data", "batch probe", "training"]
    assert all(v >= 0 for v in summary.phase_seconds.values())
    # Each log row says when it was written, counted from the first step, within the training phase.
    elapsed = [r["elapsed_s"] for r in summary.log_history if "loss" in r]
    assert len(elapsed) == 2 and 0 < elapsed[0] <= elapsed[1] <= summary.phase_seconds["training"]
    assert summary.phase_seconds["training"] >= summary.train_seconds * 0.5  # Trainer's runtime is inside it
    saved = json.loads((setup["root"] / "phases" / "heal_summary.json").read_text())["result"]
    assert saved["phase_seconds"] == summary.phase_seconds
