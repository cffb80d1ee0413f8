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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer_callback import PrinterCallback

from ffnfusion.data import DataError, packed_sequences
from ffnfusion.formats.plan import Plan
from ffnfusion.heal.budget import (
    TimeBudgetCallback,
    TokenProgressCallback,
    auto_batch_size,
    log,
    plan_budget,
)
from ffnfusion.heal.resume import _check_resume
from ffnfusion.heal.settings import (
    CHECKPOINTS_VERB,
    CURVE_FILE,
    LOG_FILE,
    PLAN_FILE,
    SETTINGS_FILE,
    HealError,
    HealSettings,
    HealSummary,
)
from ffnfusion.heal.trainer import (
    DistillationTrainer,
    TokenDataset,
    distillation_step,
    freeze_outside,
    matmul_parameters,
    trainable_blocks,
)
from ffnfusion.io.checkpoint import LazySafetensors, atomic_output_dir, write_fused_checkpoint
from ffnfusion.io.output import Input, check_output_dir, write_marker
from ffnfusion.io.source import ModelSource, load_model, resolve_model


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
