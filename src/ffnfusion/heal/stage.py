"""The `heal` stage: knowledge distillation from the original model (teacher) into the fused model (student).

Loss (Puzzle's recipe): `kl_weight * T^2 * KL(teacher_T || student_T)` on next-token distributions softened by
temperature T, plus `cos_weight * (1 - cos(h_student, h_teacher))` on the final (normed) hidden states, plus an
optional `lm_weight * cross-entropy` on the text itself (off by default: Puzzle found it hurt). Teacher outputs
are computed on the fly, so nothing is cached per token.

Training is transformers' Trainer, so the same code runs on one device, several GPUs through `torchrun` or
`accelerate launch` (DDP, or FSDP with `--fsdp`), in bf16, with gradient checkpointing, gradient accumulation,
a cosine schedule with warm-up, checkpoints every N steps and `--resume`. The teacher is a plain module on every
process (never wrapped or sharded): fine for models that fit one device, the case this project targets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from ffnfusion.data import DataError, packed_sequences
from ffnfusion.formats.plan import Plan, plan_blocks
from ffnfusion.heal.budget import (
    TimeBudgetCallback,
    TokenProgressCallback,
    auto_batch_size,
    budget_problems,
    log,
    plan_budget,
)
from ffnfusion.heal.loss import chunked_distillation_loss
from ffnfusion.io.checkpoint import LazySafetensors, atomic_output_dir, write_fused_checkpoint
from ffnfusion.io.output import Input, check_output_dir, write_marker
from ffnfusion.io.source import ModelSource, load_model, resolve_model

PLAN_FILE = "ffnfusion_plan.json"
LOG_FILE = "heal_log.jsonl"
SETTINGS_FILE = "heal_settings.json"
# The verb that marks a checkpoint folder, so --overwrite and the clean-up after a run may delete it.
CHECKPOINTS_VERB = "heal (checkpoints)"
CURVE_FILE = "loss_curve.png"
SCOPES = ("all", "changed")
LOSS_IMPLS = ("auto", "chunked", "plain")
COMPILE_MODES = ("none", "loss", "all")


class HealError(ValueError):
    """Inputs that cannot be distilled: not a fused student, mismatched vocabularies, bad settings."""


@dataclass
class HealSettings:
    """Everything that shapes the training run; saved with the checkpoints so `--resume` can refuse a different run."""

    data: list[str]
    seq_len: int = 512
    max_sequences: int | None = None
    self_samples: int = 256
    self_batch_size: int = 64
    text_field: str = "text"
    batch_size: int | None = None  # None: automatic (memory-probed on CUDA, 8 elsewhere)
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = -1
    tokens: int | None = None  # training-token budget (whole optimizer steps, rounded down)
    minutes: float | None = None  # time budget; whichever of tokens / minutes comes first
    max_epochs: int = 1  # under a budget, no sequence is seen more often than this
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    kl_weight: float = 1.0
    cos_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    scope: str = "all"
    neighbours: int = 0
    seed: int = 0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    fsdp: str = ""
    loss_impl: str = "auto"  # chunked: LM heads inside the loss, chunked over tokens; plain: full logits
    compile: str = "loss"  # torch.compile on CUDA: none, the loss's chunk kernel, or also the models

    def check(self) -> None:
        problems = []
        if self.scope not in SCOPES:
            problems.append(f"--scope must be one of {', '.join(SCOPES)} (got {self.scope!r})")
        if min(self.kl_weight, self.cos_weight, self.lm_weight) < 0:
            problems.append("loss weights must not be negative")
        if self.kl_weight == self.cos_weight == self.lm_weight == 0:
            problems.append("all loss weights are zero: nothing to train on")
        if self.temperature <= 0:
            problems.append(f"--temperature must be positive (got {self.temperature})")
        if (self.batch_size is not None and self.batch_size < 1) or self.grad_accum < 1:
            problems.append("--batch-size and --grad-accum must be at least 1")
        if self.loss_impl not in LOSS_IMPLS:
            problems.append(f"--loss-impl must be one of {', '.join(LOSS_IMPLS)} (got {self.loss_impl!r})")
        elif self.loss_impl == "chunked" and self.fsdp:
            problems.append(
                "--loss-impl chunked needs the unsharded LM head: use --loss-impl plain (or auto) with --fsdp"
            )
        if self.compile not in COMPILE_MODES:
            problems.append(f"--compile must be one of {', '.join(COMPILE_MODES)} (got {self.compile!r})")
        step_tokens = (self.batch_size or 1) * max(1, self.grad_accum) * self.seq_len
        problems += budget_problems(
            self.tokens, self.minutes, self.max_epochs, self.max_steps, self.seq_len, step_tokens
        )
        if self.neighbours < 0:
            problems.append("--neighbours must not be negative")
        if self.warmup < 0 or (self.warmup >= 1 and self.warmup != int(self.warmup)):
            problems.append("--warmup is a fraction of the steps in [0, 1) or a whole number of steps")
        if not self.data:
            problems.append("no --data given")
        if problems:
            raise HealError("Invalid heal settings:\n  - " + "\n  - ".join(problems))

    def training_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the interrupted one (bf16 None means 'auto', resolved)."""
        # Not compared: how the run is executed or how long it may take (a resumed run gets its own --minutes).
        skip = ("fsdp", "self_batch_size", "minutes", "loss_impl", "compile")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class HealSummary:
    out: Path
    steps: int
    sequences: int
    seq_len: int
    tokens: int
    train_seconds: float
    tokens_per_second: float
    trainable_parameters: int
    total_parameters: int
    trainable_blocks: list[int]
    first_loss: float | None
    last_loss: float | None
    log_history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    batch_size: int = 0
    budget_tokens: int | None = None
    limited_by: str = ""
    stopped_by_time: bool = False
    train_tflops: float = math.nan  # model FLOP/s achieved (6 x student + 2 x teacher matmul params per token)
    warnings: list[str] = field(default_factory=list)


class TokenDataset(Dataset):
    """Packed token windows [n, seq_len] as Trainer examples."""

    def __init__(self, sequences: torch.Tensor):
        self.sequences = sequences

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[i]}


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    kl_weight: float = 1.0,
    cos_weight: float = 1.0,
    lm_weight: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted KL + cosine (+ LM) loss over every position; returns (total, detached parts for logging)."""
    vocab = student_logits.shape[-1]
    # Softmax in fp32 even under bf16 autocast: low-precision logits bias the log-probabilities.
    s_logp = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    # T^2 keeps the gradient scale independent of the temperature (Hinton et al.).
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * temperature**2
    cos = 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1).mean()
    total = kl_weight * kl + cos_weight * cos
    parts = {"kl": kl.detach(), "cos": cos.detach()}
    if lm_weight > 0 or temperature == 1.0:
        # At T=1 the student's log-probabilities are already there, so the LM loss is logged for free.
        lm_logp = s_logp if temperature == 1.0 else F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
        lm_logp = lm_logp.view(*input_ids.shape, vocab)[:, :-1].reshape(-1, vocab)
        lm = F.nll_loss(lm_logp, input_ids[:, 1:].reshape(-1))
        total = total + lm_weight * lm
        parts["lm"] = lm.detach()
    return total, parts


def _final_hidden_and_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final normed hidden states, logits) of any transformers causal LM, through its own forward."""
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    # transformers' decoders (and DeciLM) put the final norm's output last in `hidden_states`.
    return out.hidden_states[-1], out.logits


def _head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The LM head's weight [vocab, hidden], or None where the chunked loss cannot use it (bias, no plain Linear)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return head.weight


def use_chunked_loss(settings: HealSettings, student: torch.nn.Module, teacher: torch.nn.Module) -> bool:
    """Whether the run computes the loss from hidden states with the heads inside it (see distill_loss.py)."""
    if settings.loss_impl == "plain" or (settings.loss_impl == "auto" and settings.fsdp):
        return False
    usable = _head_weight(student) is not None and _head_weight(teacher) is not None
    if settings.loss_impl == "chunked" and not usable:
        raise HealError("--loss-impl chunked needs LM heads that are plain Linear layers without bias.")
    return usable


def distillation_step(
    model: torch.nn.Module,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    ids: torch.Tensor,
    settings: HealSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, detached parts, outputs) of one micro-batch. `model` is the student as training calls it (maybe
    DDP-wrapped, so gradient synchronisation hooks run), `student` the same module unwrapped."""
    s = settings
    if not use_chunked_loss(s, student, teacher):
        with torch.no_grad():
            t_hidden, t_logits = _final_hidden_and_logits(teacher, ids)
        s_hidden, s_logits = _final_hidden_and_logits(model, ids)
        loss, parts = distillation_loss(
            s_logits, t_logits, s_hidden, t_hidden, ids, s.kl_weight, s.cos_weight, s.lm_weight, s.temperature
        )
        return loss, parts, {"logits": s_logits}
    with torch.inference_mode():
        base = teacher.__dict__.get("_ffnfusion_forward")
        base = base if base is not None else getattr(teacher, teacher.base_model_prefix)
        t_hidden = base(input_ids=ids, use_cache=False).last_hidden_state
    # Out of inference mode, so autograd may save it (for the cosine term's backward).
    t_hidden = t_hidden.clone()
    # The student's own forward, with the head applied to one position only: the loss applies it, in chunks.
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    s_hidden = out.hidden_states[-1]
    loss, parts = chunked_distillation_loss(
        s_hidden,
        t_hidden,
        _head_weight(student),
        _head_weight(teacher),
        ids,
        s.kl_weight,
        s.cos_weight,
        s.lm_weight,
        s.temperature,
        compile_chunks=ids.is_cuda and s.compile in ("loss", "all"),
    )
    return loss, parts, {"hidden_states": s_hidden}


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix products per token (all but the input embedding table, unless tied)."""
    total = sum(p.numel() for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and embed is not None and head.weight is not embed.weight:
        total -= embed.weight.numel()
    return total


class DistillationTrainer(Trainer):
    """Trainer whose loss is distillation from a frozen teacher; everything else is stock Trainer behaviour."""

    def __init__(self, *args: Any, teacher: torch.nn.Module, settings: HealSettings, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.settings = settings
        # The loss is a per-micro-batch mean, so Trainer must divide it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._parts: dict[str, torch.Tensor] = {}
        self._parts_count = 0

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        ids = inputs["input_ids"]
        loss, parts, outputs = distillation_step(
            model, self.accelerator.unwrap_model(model), self.teacher, ids, self.settings
        )
        for name, value in parts.items():
            self._parts[name] = self._parts.get(name, 0) + value
        self._parts_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Trainer logs only the total; add the loss components averaged since the last log, over all processes.
        if "loss" in logs and self._parts_count:
            for name, value in self._parts.items():
                mean = self.accelerator.reduce(value / self._parts_count, reduction="mean")
                logs[f"loss_{name}"] = round(float(mean), 6)
            self._parts, self._parts_count = {}, 0
        super().log(logs, *args, **kwargs)


def changed_blocks(plan: Plan, num_original_layers: int) -> list[int]:
    """Indices of the fused model's blocks that the plan changed (fused, parallel, or missing a sub-block)."""
    blocks = plan_blocks(plan, num_original_layers)
    return [i for i, b in enumerate(blocks) if b.kind != "layer" or b.attention_from is None or not b.ffn_from]


def trainable_blocks(
    scope: str, num_blocks: int, plan: Plan | None, num_original_layers: int, neighbours: int
) -> list[int]:
    if scope == "all":
        return list(range(num_blocks))
    if plan is None:
        raise HealError(
            f"--scope changed needs the plan the student was fused with ({PLAN_FILE} in the student folder); "
            "use --scope all for a student without one."
        )
    blocks = plan_blocks(plan, num_original_layers)
    if len(blocks) != num_blocks:
        raise HealError(
            f"the student has {num_blocks} blocks but its {PLAN_FILE} applied to the teacher's "
            f"{num_original_layers} layers gives {len(blocks)}: was it fused from another model?"
        )
    changed = changed_blocks(plan, num_original_layers)
    if not changed:
        raise HealError("the student's plan changes no layer: nothing to heal with --scope changed.")
    chosen = {j for i in changed for j in range(i - neighbours, i + neighbours + 1) if 0 <= j < num_blocks}
    return sorted(chosen)


def freeze_outside(model: torch.nn.Module, blocks: Sequence[int]) -> int:
    """Leave only the parameters of `blocks` trainable; returns the number of trainable parameters."""
    prefixes = tuple(f"model.layers.{i}." for i in blocks)
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        trainable += p.numel() if p.requires_grad else 0
    return trainable


def _check_student(source: ModelSource) -> dict[str, Any]:
    if not source.is_fused_checkpoint:
        raise HealError(
            f"{source.spec} is not a fused checkpoint (no DeciLM config.json with block_configs): heal trains the "
            "output of `ffnfusion fuse`; fuse the original model first."
        )
    config = json.loads((source.folder / "config.json").read_text())
    if "DeciLMForCausalLM" not in (config.get("architectures") or []):
        raise HealError(f"{source.spec}/config.json does not describe a DeciLMForCausalLM.")
    return config


def _check_vocabularies(student_config: dict[str, Any], teacher_config: Any, s_tok: Any, t_tok: Any) -> None:
    s_vocab, t_vocab = student_config.get("vocab_size"), getattr(teacher_config, "vocab_size", None)
    if s_vocab != t_vocab:
        raise HealError(
            f"student and teacher have different vocabulary sizes ({s_vocab} vs {t_vocab}): distillation "
            "compares next-token distributions, so the student must be fused from this teacher."
        )
    if s_tok is not None and t_tok is not None:
        s_v, t_v = s_tok.get_vocab(), t_tok.get_vocab()
        if s_v != t_v:
            differ = len(set(s_v.items()) ^ set(t_v.items()))
            raise HealError(
                f"student and teacher tokenizers differ ({differ} token/id pairs are not shared): the student "
                "must use the teacher's tokenizer."
            )


def _check_widths(student_config: dict[str, Any], teacher_config: Any, student: str, teacher: str) -> None:
    """The cosine term compares the final hidden states, so both models must have the same hidden size."""
    s_hidden, t_hidden = student_config.get("hidden_size"), getattr(teacher_config, "hidden_size", None)
    if s_hidden is None or t_hidden is None or s_hidden == t_hidden:
        return
    s_blocks = len(student_config.get("block_configs") or [])
    t_layers = getattr(teacher_config, "num_hidden_layers", "?")
    raise HealError(
        f"student and teacher have different hidden sizes: the student {student} has hidden_size {s_hidden} "
        f"({s_blocks} blocks), the teacher {teacher} has hidden_size {t_hidden} ({t_layers} layers). Distillation "
        "compares their final hidden states (cosine loss) and next-token distributions position by position, so "
        "the student must be fused from this teacher: pass the original model the student was fused from as "
        "--teacher."
    )


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """TrainingArguments keys for activation checkpointing, under the name this transformers version uses."""
    if not enabled:
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    # Non-reentrant checkpointing works with frozen embeddings (--scope changed) without input-grad hacks.
    return {key: True, f"{key}_kwargs": {"use_reentrant": False}}


def _resolve_bf16(bf16: bool | None) -> bool:
    if bf16 is None:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bf16


def _stored_dtypes(folder: Path) -> dict[str, torch.dtype]:
    """name -> dtype of every tensor stored in the student checkpoint, read from the safetensors headers."""
    from safetensors import safe_open

    lazy = LazySafetensors(folder)
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    out = {}
    for file in sorted(set(lazy.weight_map.values())):
        with safe_open(folder / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[name] = names.get(f.get_slice(name).get_dtype(), torch.float32)
    return out


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss (and its parts) against the step, from Trainer's log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if "loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (("loss", "total"), ("loss_kl", "KL"), ("loss_cos", "cosine"), ("loss_lm", "LM cross-entropy")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, linewidth=1.5 if key == "loss" else 1.0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or "distillation loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _unreadable_zip(path: Path) -> bool:
    """True for a torch.save file (a zip archive) that is missing or cut short (its central directory is at the end)."""
    try:
        with zipfile.ZipFile(path):
            return False
    except (OSError, zipfile.BadZipFile):
        return True


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (half-written: missing or truncated files), or None."""
    state = folder / "trainer_state.json"
    try:
        if "global_step" not in json.loads(state.read_text()):
            return f"{state.name} has no global_step"
    except (OSError, ValueError):
        return f"{state.name} is missing or not complete JSON"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weights = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{index.name} is not complete JSON"
    else:
        weights = [folder / "model.safetensors"]
    fsdp = any(folder.glob("pytorch_model_fsdp*")) or any(folder.glob("optimizer_*"))
    if not fsdp:
        if (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists():
            if _unreadable_zip(folder / "pytorch_model.bin"):
                return "pytorch_model.bin is truncated"
        else:
            from safetensors import safe_open

            for file in weights:
                try:
                    with safe_open(file, framework="pt") as f:
                        f.keys()
                except Exception:
                    return f"{file.name} is missing or truncated"
        if _unreadable_zip(folder / "optimizer.pt"):
            return "optimizer.pt is missing or truncated"
    for name in ("scheduler.pt", "rng_state.pth"):
        if (folder / name).exists() and _unreadable_zip(folder / name):
            return f"{name} is truncated"
    return None


def _resumable_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint; half-written newer ones are skipped with a warning naming them."""
    numbered = [
        (int(m.group(1)), p)
        for p in checkpoint_dir.iterdir()
        if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    skipped = []
    for _, folder in sorted(numbered, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            for bad, why in skipped:
                log.warning("--resume: skipping half-written checkpoint %s (%s); resuming from %s.", bad, why, folder)
            return str(folder)
        skipped.append((folder, problem))
    listing = "; ".join(f"{bad.name}: {why}" for bad, why in skipped)
    log.warning(
        "--resume: no complete checkpoint in %s (%s): starting from scratch (step 0). The half-written folders are "
        "replaced as training reaches their steps.",
        checkpoint_dir,
        listing,
    )
    return None


def _check_resume(checkpoint_dir: Path, settings: HealSettings, resume: bool) -> str | None:
    """The checkpoint to resume from (None for a fresh run); refuses to mix runs with different settings."""
    saved = checkpoint_dir / SETTINGS_FILE
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if not resume:
        if last is not None:
            raise HealError(
                f"{checkpoint_dir} holds checkpoints of an earlier run: pass --resume to continue it, or "
                "--overwrite to start again."
            )
        return None
    if last is None:
        raise HealError(f"--resume: no checkpoint found in {checkpoint_dir}.")
    if saved.is_file():
        before = json.loads(saved.read_text())
        if settings.batch_size is None and before.get("batch_size"):
            settings.batch_size = int(before["batch_size"])  # the automatic size the interrupted run picked
        now = json.loads(json.dumps(settings.training_key()))
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if differ:
            raise HealError(
                f"--resume: settings differ from the interrupted run ({', '.join(differ)}); resume with the same "
                "settings or start a new run."
            )
    return _resumable_checkpoint(checkpoint_dir)


def heal(
    student: str | Path,
    teacher: str | Path,
    out: str | Path,
    settings: HealSettings,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
    save_steps: int = 500,
    logging_steps: int = 10,
    keep_checkpoints: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    progress: bool = True,
) -> HealSummary:
    """Distil `teacher` into the fused checkpoint `student`; write the healed checkpoint to `out` (atomically).

    Call it in every process of a distributed launch (torchrun / accelerate launch): Trainer splits the batches,
    and only the main process writes `out`. Checkpoints for `--resume` go to `checkpoint_dir` (default: beside
    `out`, named `<out>.checkpoints`) and are deleted after a successful run unless `keep_checkpoints`.
    """
    settings.check()
    settings.bf16 = _resolve_bf16(settings.bf16)
    out = Path(out).resolve()
    s_source, t_source = resolve_model(student), resolve_model(teacher)
    student_config = _check_student(s_source)
    inputs = [("input model", s_source.input_path), ("input model", t_source.input_path)]
    inputs += [("data", spec) for spec in settings.data]
    check_output_dir(out, "heal", inputs, overwrite, error=HealError)
    checkpoint_dir = Path(checkpoint_dir).resolve() if checkpoint_dir else out.parent / f"{out.name}.checkpoints"
    # Checkpoints are removed after a run and on --overwrite: only ever a folder an earlier heal made for them.
    check_output_dir(checkpoint_dir, CHECKPOINTS_VERB, inputs, overwrite=True, error=HealError)
    if overwrite and not resume and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    resume_from = _check_resume(checkpoint_dir, settings, resume)

    t_config = t_source.config()
    s_tok, t_tok = s_source.tokenizer(), t_source.tokenizer()
    _check_vocabularies(student_config, t_config, s_tok, t_tok)
    _check_widths(student_config, t_config, str(student), str(teacher))
    tokenizer = s_tok or t_tok
    if tokenizer is None:
        raise HealError("neither the student nor the teacher folder holds a tokenizer; the text cannot be tokenized.")
    plan = Plan.load(s_source.folder / PLAN_FILE) if (s_source.folder / PLAN_FILE).is_file() else None

    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=settings.batch_size or 1,  # set below once the automatic size is known
        gradient_accumulation_steps=settings.grad_accum,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.lr,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup if settings.warmup < 1 else int(settings.warmup),
        bf16=settings.bf16,
        **_checkpointing_args(settings.gradient_checkpointing),
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=logging_steps,
        logging_first_step=True,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_drop_last=True,
        disable_tqdm=True,  # the progress bar is TokenProgressCallback's
        fsdp=settings.fsdp or None,
        use_cpu=not torch.cuda.is_available(),
        torch_compile=settings.compile == "all" and torch.cuda.is_available(),
    )
    if settings.tokens is not None and settings.batch_size is not None:
        step_tokens = settings.batch_size * settings.grad_accum * args.world_size * settings.seq_len
        if settings.tokens < step_tokens:
            raise HealError(
                f"--tokens {settings.tokens:,} is smaller than one optimizer step ({step_tokens:,} tokens over "
                f"{args.world_size} processes): raise --tokens or lower --batch-size / --seq-len."
            )
    # Every process builds the same sequences; the main process goes first so `self` text is sampled once and
    # cached, and the others read the cache.
    teacher_model = load_model(t_source, torch.bfloat16 if settings.bf16 else torch.float32, args.device)
    teacher_model.requires_grad_(False)
    if settings.compile == "all" and torch.cuda.is_available():
        # Kept out of the module tree (no state_dict entries): the compiled forward of the teacher's decoder.
        teacher_model.__dict__["_ffnfusion_forward"] = torch.compile(
            getattr(teacher_model, teacher_model.base_model_prefix)
        )
    with args.main_process_first(desc="preparing training text"):
        sequences = torch.cat(
            [
                packed_sequences(
                    spec,
                    tokenizer,
                    settings.seq_len,
                    settings.max_sequences,
                    settings.seed,
                    model=teacher_model,
                    model_key=str(t_source.folder / (t_source.gguf_file or "")),
                    self_samples=settings.self_samples,
                    text_field=settings.text_field,
                    generate_batch_size=settings.self_batch_size,
                )
                for spec in settings.data
            ]
        )
    if sequences.shape[0] < (settings.batch_size or 1) * args.world_size:
        raise DataError(
            f"the data gives {sequences.shape[0]} sequences of {settings.seq_len} tokens, fewer than one batch "
            f"({settings.batch_size or 1} per device x {args.world_size} processes): use more text, a smaller "
            "--batch-size or a shorter --seq-len."
        )

    student_model = load_model(s_source, torch.float32, "cpu")
    student_model.config.use_cache = False
    blocks = trainable_blocks(
        settings.scope, len(student_config["block_configs"]), plan, t_config.num_hidden_layers, settings.neighbours
    )
    trainable = freeze_outside(student_model, blocks) if settings.scope != "all" else student_model.num_parameters()
    total = student_model.num_parameters()
    if settings.batch_size is None:
        settings.batch_size = _auto_batch_size(student_model, teacher_model, sequences, settings, args, trainable)
    global_batch = settings.batch_size * settings.grad_accum * args.world_size
    try:
        budget = plan_budget(
            int(sequences.shape[0]),
            settings.seq_len,
            settings.batch_size,
            settings.grad_accum,
            args.world_size,
            settings.tokens,
            settings.minutes,
            settings.max_epochs,
            settings.max_steps,
            settings.epochs,
        )
    except ValueError as e:
        raise DataError(str(e)) from None
    warnings = [budget.warning] if budget.warning else []
    if budget.warning and args.process_index == 0:
        log.warning(budget.warning)
    args.per_device_train_batch_size = settings.batch_size
    if budget.limited_by != "epochs":
        args.max_steps = budget.steps
    callbacks = list(callbacks or [])
    timer = TimeBudgetCallback(settings.minutes) if settings.minutes is not None else None
    if timer is not None:
        callbacks.append(timer)
    if progress:
        callbacks.append(TokenProgressCallback(budget.tokens_per_step, settings.minutes))

    if args.process_index == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_marker(checkpoint_dir, CHECKPOINTS_VERB)
        (checkpoint_dir / SETTINGS_FILE).write_text(json.dumps(settings.training_key(), indent=2) + "\n")
    trainer = DistillationTrainer(
        model=student_model,
        args=args,
        train_dataset=TokenDataset(sequences),
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        teacher=teacher_model,
        settings=settings,
    )
    if progress:
        trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=resume_from)

    # Collective on FSDP (gathers the shards), so every process calls it; only the main one writes.
    state = trainer.accelerator.get_state_dict(trainer.model)
    history = trainer.state.log_history
    steps = trainer.state.global_step
    tokens = steps * global_batch * settings.seq_len
    seconds = float(result.metrics.get("train_runtime", float("nan")))
    losses = [r["loss"] for r in history if "loss" in r]
    tokens_per_second = tokens / seconds if seconds > 0 else math.nan
    flops_per_token = 6 * matmul_parameters(trainer.accelerator.unwrap_model(trainer.model))
    flops_per_token += 2 * matmul_parameters(teacher_model)
    stopped_by_time = bool(timer and timer.stopped_early)
    if timer is not None and not stopped_by_time and budget.limited_by == "data" and settings.tokens is None:
        warnings.append(
            f"the data ran out before --minutes {settings.minutes:g} ({budget.steps} steps at --max-epochs "
            f"{settings.max_epochs}): give more text to use the whole time budget."
        )
        if args.process_index == 0:
            log.warning(warnings[-1])
    summary = HealSummary(
        out=out,
        steps=steps,
        sequences=int(sequences.shape[0]),
        seq_len=settings.seq_len,
        tokens=tokens,
        train_seconds=seconds,
        tokens_per_second=tokens_per_second,
        trainable_parameters=trainable,
        total_parameters=total,
        trainable_blocks=blocks,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        log_history=history,
        batch_size=settings.batch_size,
        budget_tokens=settings.tokens,
        limited_by="minutes" if stopped_by_time else budget.limited_by,
        stopped_by_time=stopped_by_time,
        train_tflops=tokens_per_second * flops_per_token / 1e12,
        warnings=warnings,
    )
    if trainer.is_world_process_zero():
        _write_output(out, inputs, s_source, student_config, state, tokenizer, summary, settings, overwrite)
        if not keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return summary


def _auto_batch_size(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    sequences: torch.Tensor,
    settings: HealSettings,
    args: TrainingArguments,
    trainable: int,
) -> int:
    """The micro-batch for throughput (heal_budget.auto_batch_size), probed with real training steps on CUDA."""
    device = args.device
    upper = int(sequences.shape[0]) // args.world_size
    if settings.tokens is not None:
        upper = min(upper, settings.tokens // (settings.grad_accum * args.world_size * settings.seq_len))
    upper = max(1, upper)
    if device.type != "cuda":
        return auto_batch_size(lambda b: None, settings.seq_len, device, 0, upper)
    student.to(device)
    student.train()
    if settings.gradient_checkpointing:
        student.gradient_checkpointing_enable({"use_reentrant": False})

    def step(b: int) -> None:
        ids = sequences[:b].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(settings.bf16)):
            loss, _, _ = distillation_step(student, student, teacher, ids, settings)
        loss.backward()
        del loss
        student.zero_grad(set_to_none=False)  # keep the gradients allocated: training holds them too

    try:
        # AdamW's two fp32 moments per trainable parameter are not allocated yet; leave 1 GiB besides.
        return auto_batch_size(step, settings.seq_len, device, 8 * trainable + 2**30, upper)
    finally:
        student.zero_grad(set_to_none=True)
        if settings.gradient_checkpointing:
            student.gradient_checkpointing_disable()
        torch.cuda.empty_cache()


def _write_output(
    out: Path,
    inputs: list[Input],
    s_source: ModelSource,
    student_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    summary: HealSummary,
    settings: HealSettings,
    overwrite: bool,
) -> None:
    # Write exactly the tensors (names and dtypes) the student checkpoint holds, so the result is the same format.
    dtypes = _stored_dtypes(s_source.folder)
    missing = sorted(set(dtypes) - set(state))
    if missing:
        raise RuntimeError(f"the trained model lacks tensors of the student checkpoint: {missing[:5]}")
    tensors = ((name, state[name].detach().to("cpu", dtypes[name])) for name in sorted(dtypes))
    config_kwargs = {
        k: v for k, v in student_config.items() if k not in ("architectures", "auto_map", "transformers_version")
    }
    config_kwargs.pop("model_type", None)
    report = {k: v for k, v in asdict(summary).items() if k != "log_history"}
    report["out"] = str(out)
    extra = {
        LOG_FILE: "".join(json.dumps(r) + "\n" for r in summary.log_history),
        "heal_summary.json": json.dumps({"settings": asdict(settings), "result": report}, indent=2) + "\n",
    }
    plan_file = s_source.folder / PLAN_FILE
    if plan_file.is_file():
        extra[PLAN_FILE] = plan_file.read_text()
    with atomic_output_dir(out, "heal", inputs, overwrite) as tmp:
        write_fused_checkpoint(tmp, config_kwargs, tensors, tokenizer, extra_files=extra)
        plot_loss_curve(summary.log_history, tmp / CURVE_FILE, f"heal: {s_source.spec}")
