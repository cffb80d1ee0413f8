"""The `heal` stage: fused checkpoint (student) + original (teacher) + text -> healed checkpoint.

Every input is checked before training (student is a fused checkpoint, same vocabulary and hidden size as the
teacher, output location, budget); then the text is packed, the models are loaded, Trainer runs
`heal.trainer.DistillationTrainer` under the budget, and the healed checkpoint is written atomically in the
student's format with the training log and loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer_callback import PrinterCallback

from ffnfusion.data import DataError, packed_sequences
from ffnfusion.formats.corpus import CorpusRows
from ffnfusion.formats.plan import Plan
from ffnfusion.formats.settings import settings_from
from ffnfusion.heal.budget import (
    TimeBudgetCallback,
    TokenProgressCallback,
    log,
    plan_budget,
)
from ffnfusion.heal.checks import check_student, check_vocabularies, check_widths
from ffnfusion.heal.output import write_output
from ffnfusion.heal.resume import _check_resume
from ffnfusion.heal.settings import (
    CHECKPOINTS_VERB,
    PLAN_FILE,
    SETTINGS_FILE,
    HealError,
    HealRun,
    HealSettings,
    HealSummary,
    default_lr,
)
from ffnfusion.heal.trainer import (
    DistillationTrainer,
    TokenDataset,
    block_boundaries,
    freeze_outside,
    matmul_parameters,
    probe_batch_size,
    trainable_blocks,
)
from ffnfusion.io.output import Input, check_output_dir, write_marker
from ffnfusion.io.source import ModelSource, load_model, resolve_model


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


def heal(
    student: str | Path,
    teacher: str | Path,
    out: str | Path,
    settings: HealSettings,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
    callbacks: list[TrainerCallback] | None = None,
    progress: bool = True,
    run: HealRun | None = None,
    **run_options: Any,
) -> HealSummary:
    """Distil `teacher` into the fused checkpoint `student`; write the healed checkpoint to `out` (atomically).

    Call it in every process of a distributed launch (torchrun / accelerate launch): Trainer splits the batches,
    and only the main process writes `out`. Checkpoints for `--resume` go to `checkpoint_dir` (default: beside
    `out`, named `<out>.checkpoints`) and are deleted after a successful run unless `keep_checkpoints`. How the run
    is checkpointed and logged: `run`, or HealRun's fields as keyword `run_options` (save_steps=...).
    """
    run = settings_from(HealRun, run, run_options)
    settings.check()
    settings.bf16 = _resolve_bf16(settings.bf16)
    # Wall time of each phase, in heal_summary.json: a short heal can spend much of its time outside training.
    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 2)
        mark = now

    job = _prepare(student, teacher, out, settings, overwrite, resume, checkpoint_dir)
    args = _training_args(settings, job.checkpoint_dir, run.save_steps, run.logging_steps)
    _check_token_budget(settings, args)
    teacher_model = _load_teacher(job.t_source, settings, args)
    sequences = _training_sequences(job, settings, args, teacher_model)
    student_model, blocks, trainable, total = _load_student(job, settings)
    phase("checks, models and data")
    if settings.batch_size is None:
        settings.batch_size = probe_batch_size(
            student_model, teacher_model, sequences, settings, args, trainable, job.boundaries
        )
        phase("batch probe")
    budget, warnings = _budget(int(sequences.shape[0]), settings, args)
    if settings.lr is None:  # automatic: it depends on the width and on the tokens per step, known only now
        settings.lr = default_lr(int(job.student_config.get("hidden_size") or 0), budget.tokens_per_step)
    args.learning_rate = settings.lr
    callbacks, timer = _callbacks(callbacks, settings, budget.tokens_per_step, progress)
    if args.process_index == 0:
        _start_checkpoints(job.checkpoint_dir, settings)
    trainer = DistillationTrainer(
        model=student_model,
        args=args,
        train_dataset=TokenDataset(sequences),
        data_collator=default_data_collator,
        processing_class=job.tokenizer,
        callbacks=callbacks,
        teacher=teacher_model,
        settings=settings,
        boundaries=job.boundaries,
    )
    if progress:  # the progress bar replaces Trainer's printed log lines
        trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=job.resume_from)
    phase("training")

    # Collective on FSDP (gathers the shards), so every process calls it; only the main one writes.
    state = trainer.accelerator.get_state_dict(trainer.model)
    trained = _Trained(trainer, result, teacher_model, sequences, blocks, trainable, total)
    summary = _summary(job.out, trained, settings, args, budget, timer, warnings)
    summary.phase_seconds = phases
    if trainer.is_world_process_zero():
        write_output(
            job.out, job.inputs, job.s_source, job.student_config, state, job.tokenizer, summary, settings, overwrite
        )
        if not run.keep_checkpoints:
            shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return summary


@dataclass
class _Job:
    """What `heal` knows after its input checks: the two models, the output places, the tokenizer."""

    out: Path
    s_source: ModelSource
    t_source: ModelSource
    student_config: dict[str, Any]
    t_config: Any
    inputs: list[Input]
    checkpoint_dir: Path
    resume_from: Any
    tokenizer: Any
    plan: Plan | None
    boundaries: list[tuple[int, int]]  # hidden-state pairs the layer term matches (empty when it is off)


def _prepare(
    student: str | Path,
    teacher: str | Path,
    out: str | Path,
    settings: HealSettings,
    overwrite: bool,
    resume: bool,
    checkpoint_dir: str | Path | None,
) -> _Job:
    out = Path(out).resolve()
    s_source, t_source = resolve_model(student), resolve_model(teacher)
    student_config = check_student(s_source)
    inputs = [("input model", s_source.input_path), ("input model", t_source.input_path)]
    inputs += [("data", spec) for spec in settings.data]
    check_output_dir(out, "heal", inputs, overwrite, error=HealError)
    checkpoint_dir = Path(checkpoint_dir).resolve() if checkpoint_dir else out.parent / f"{out.name}.checkpoints"
    # Checkpoints are removed after a run and on --overwrite: only ever a folder an earlier heal made for them.
    check_output_dir(checkpoint_dir, CHECKPOINTS_VERB, inputs, overwrite=True, error=HealError)
    if overwrite and not resume and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    resume_from = _check_resume(checkpoint_dir, settings, resume)  # a resumed run takes the rate it trained with

    t_config = t_source.config()
    s_tok, t_tok = s_source.tokenizer(), t_source.tokenizer()
    check_vocabularies(student_config, t_config, s_tok, t_tok)
    check_widths(student_config, t_config, str(student), str(teacher))
    tokenizer = s_tok or t_tok
    if tokenizer is None:
        raise HealError("neither the student nor the teacher folder holds a tokenizer; the text cannot be tokenized.")
    plan = Plan.load(s_source.folder / PLAN_FILE) if (s_source.folder / PLAN_FILE).is_file() else None
    boundaries = []
    if settings.layer_weight > 0:
        boundaries = block_boundaries(plan, t_config.num_hidden_layers, len(student_config["block_configs"]))
    return _Job(
        out,
        s_source,
        t_source,
        student_config,
        t_config,
        inputs,
        checkpoint_dir,
        resume_from,
        tokenizer,
        plan,
        boundaries,
    )


def _training_args(
    settings: HealSettings, checkpoint_dir: Path, save_steps: int, logging_steps: int
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=settings.batch_size or 1,  # set in _budget once the automatic size is known
        gradient_accumulation_steps=settings.grad_accum,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.lr or 0.0,  # an automatic rate is set once the batch size is known
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup if settings.warmup < 1 else int(settings.warmup),
        bf16=settings.bf16,
        **_checkpointing_args(settings.gradient_checkpointing),
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=logging_steps,
        logging_first_step=True,
        # Trainer's NaN filter reads every micro-batch's loss on the host: a device sync per step that stops the
        # host queueing the next step's kernels while the GPU trains (a NaN still shows in the logged loss).
        logging_nan_inf_filter=False,
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


def _check_token_budget(settings: HealSettings, args: TrainingArguments) -> None:
    if settings.tokens is None or settings.batch_size is None:
        return
    step_tokens = settings.batch_size * settings.grad_accum * args.world_size * settings.seq_len
    if settings.tokens < step_tokens:
        raise HealError(
            f"--tokens {settings.tokens:,} is smaller than one optimizer step ({step_tokens:,} tokens over "
            f"{args.world_size} processes): raise --tokens or lower --batch-size / --seq-len."
        )


def _load_teacher(t_source: ModelSource, settings: HealSettings, args: TrainingArguments) -> torch.nn.Module:
    teacher_model = load_model(t_source, torch.bfloat16 if settings.bf16 else torch.float32, args.device)
    teacher_model.requires_grad_(False)
    if settings.compile == "all" and torch.cuda.is_available():
        # Kept out of the module tree (no state_dict entries): the compiled forward of the teacher's decoder.
        teacher_model.__dict__["_ffnfusion_forward"] = torch.compile(
            getattr(teacher_model, teacher_model.base_model_prefix)
        )
    return teacher_model


def _training_sequences(
    job: _Job, settings: HealSettings, args: TrainingArguments, teacher_model: torch.nn.Module
) -> torch.Tensor | CorpusRows:
    # Every process builds the same sequences; the main process goes first so `self` text is sampled once and
    # cached, and the others read the cache.
    with args.main_process_first(desc="preparing training text"):
        parts = [
            packed_sequences(
                spec,
                job.tokenizer,
                settings.seq_len,
                settings.max_sequences,
                settings.seed,
                model=teacher_model,
                model_key=str(job.t_source.folder / (job.t_source.gguf_file or "")),
                self_samples=settings.self_samples,
                text_field=settings.text_field,
                generate_batch_size=settings.self_batch_size,
            )
            for spec in settings.data
        ]
        # One source stays as it is: a corpus (or the self-written one) is read from its shards batch by batch.
        sequences = parts[0] if len(parts) == 1 else torch.cat([p[:] for p in parts])
    if sequences.shape[0] < (settings.batch_size or 1) * args.world_size:
        raise DataError(
            f"the data gives {sequences.shape[0]} sequences of {settings.seq_len} tokens, fewer than one batch "
            f"({settings.batch_size or 1} per device x {args.world_size} processes): use more text, a smaller "
            "--batch-size or a shorter --seq-len."
        )
    return sequences


def _load_student(job: _Job, settings: HealSettings) -> tuple[torch.nn.Module, list[int], int, int]:
    """The student in fp32 on the CPU (Trainer moves it), frozen outside --scope; its trainable blocks, trainable
    and total parameter counts (counted before Trainer wraps or shards it)."""
    student_model = load_model(job.s_source, torch.float32, "cpu")
    student_model.config.use_cache = False
    blocks = trainable_blocks(
        settings.scope,
        len(job.student_config["block_configs"]),
        job.plan,
        job.t_config.num_hidden_layers,
        settings.neighbours,
    )
    trainable = freeze_outside(student_model, blocks) if settings.scope != "all" else student_model.num_parameters()
    return student_model, blocks, trainable, student_model.num_parameters()


def _budget(sequences: int, settings: HealSettings, args: TrainingArguments) -> tuple[Any, list[str]]:
    """The step budget (and its warning) for the chosen batch size; `args` get the batch size and step count."""
    try:
        budget = plan_budget(
            sequences,
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
    return budget, warnings


def _callbacks(
    given: list[TrainerCallback] | None, settings: HealSettings, tokens_per_step: int, progress: bool
) -> tuple[list[TrainerCallback], TimeBudgetCallback | None]:
    """The caller's callbacks plus the --minutes timer (kept: the summary asks it whether it stopped the run)."""
    timer = TimeBudgetCallback(settings.minutes) if settings.minutes is not None else None
    callbacks = list(given or []) + ([timer] if timer is not None else [])
    if progress:
        callbacks.append(TokenProgressCallback(tokens_per_step, settings.minutes))
    return callbacks, timer


def _start_checkpoints(checkpoint_dir: Path, settings: HealSettings) -> None:
    """Mark the checkpoint folder and record the settings `--resume` must match."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_marker(checkpoint_dir, CHECKPOINTS_VERB)
    (checkpoint_dir / SETTINGS_FILE).write_text(json.dumps(settings.training_key(), indent=2) + "\n")


@dataclass
class _Trained:
    """What the finished Trainer run leaves for the summary."""

    trainer: DistillationTrainer
    result: Any
    teacher_model: torch.nn.Module
    sequences: torch.Tensor
    blocks: list[int]
    trainable: int
    total: int


def _summary(
    out: Path,
    run: _Trained,
    settings: HealSettings,
    args: TrainingArguments,
    budget: Any,
    timer: TimeBudgetCallback | None,
    warnings: list[str],
) -> HealSummary:
    trainer = run.trainer
    history = trainer.state.log_history
    steps = trainer.state.global_step
    global_batch = settings.batch_size * settings.grad_accum * args.world_size
    tokens = steps * global_batch * settings.seq_len
    seconds = float(run.result.metrics.get("train_runtime", float("nan")))
    losses = [r["loss"] for r in history if "loss" in r]
    tokens_per_second = tokens / seconds if seconds > 0 else math.nan
    flops_per_token = 6 * matmul_parameters(trainer.accelerator.unwrap_model(trainer.model))
    flops_per_token += 2 * matmul_parameters(run.teacher_model)
    stopped_by_time = bool(timer and timer.stopped_early)
    if timer is not None and not stopped_by_time and budget.limited_by == "data" and settings.tokens is None:
        warnings.append(
            f"the data ran out before --minutes {settings.minutes:g} ({budget.steps} steps at --max-epochs "
            f"{settings.max_epochs}): give more text to use the whole time budget."
        )
        if args.process_index == 0:
            log.warning(warnings[-1])
    return HealSummary(
        out=out,
        steps=steps,
        sequences=int(run.sequences.shape[0]),
        seq_len=settings.seq_len,
        tokens=tokens,
        train_seconds=seconds,
        tokens_per_second=tokens_per_second,
        trainable_parameters=run.trainable,
        total_parameters=run.total,
        trainable_blocks=run.blocks,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        log_history=history,
        batch_size=settings.batch_size,
        lr=settings.lr,
        budget_tokens=settings.tokens,
        limited_by="minutes" if stopped_by_time else budget.limited_by,
        stopped_by_time=stopped_by_time,
        train_tflops=tokens_per_second * flops_per_token / 1e12,
        warnings=warnings,
    )
