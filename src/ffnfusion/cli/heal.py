"""`ffnfusion heal`: distil the original into the fused model under a token or time budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, console, err_console, fail


def heal(
    student: Annotated[str, typer.Argument(help="fused checkpoint folder (the output of `ffnfusion fuse`)")],
    teacher: Annotated[str, typer.Option(help="original model: hub id, local folder, or .gguf file")],
    data: Annotated[
        list[str],
        typer.Option(help="training text: file, folder, .jsonl, .parquet, datasets name, or `self`; repeatable"),
    ],
    out: Annotated[Path, typer.Option(help="output folder for the healed checkpoint")],
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out and any earlier checkpoints")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint in --checkpoint-dir")] = False,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="where Trainer checkpoints go (default: <out>.checkpoints)")
    ] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="keep the checkpoints after a successful run")] = False,
    seq_len: Annotated[int, typer.Option(help="tokens per packed training sequence")] = 512,
    max_sequences: Annotated[int | None, typer.Option(help="use at most this many sequences per --data")] = None,
    self_samples: Annotated[int, typer.Option(help="sequences to sample from the teacher for --data self")] = 256,
    self_batch_size: Annotated[int, typer.Option(help="sequences sampled at once for --data self")] = 64,
    text_field: Annotated[str, typer.Option(help="text column of .jsonl/.parquet/datasets")] = "text",
    batch_size: Annotated[
        int | None,
        typer.Option(help="sequences per device per micro-batch (default: automatic, for throughput; 8 on CPU)"),
    ] = None,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = 1,
    epochs: Annotated[
        float, typer.Option(help="passes over the data (ignored with --max-steps, --tokens or --minutes)")
    ] = 1.0,
    max_steps: Annotated[int, typer.Option(help="optimizer steps (overrides --epochs)")] = -1,
    tokens: Annotated[
        int | None, typer.Option(help="training-token budget (whole optimizer steps); with --minutes, first wins")
    ] = None,
    minutes: Annotated[float | None, typer.Option(help="training-time budget; with --tokens, first wins")] = None,
    max_epochs: Annotated[
        int, typer.Option(help="under --tokens/--minutes: no sequence is seen more often than this")
    ] = 1,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, cosine decay)")] = 1e-4,
    warmup: Annotated[float, typer.Option(help="warm-up: fraction of the steps (<1) or a number of steps")] = 0.05,
    weight_decay: Annotated[float, typer.Option()] = 0.0,
    kl_weight: Annotated[float, typer.Option(help="weight of KL(teacher || student) on next-token logits")] = 1.0,
    cos_weight: Annotated[float, typer.Option(help="weight of the cosine distance of final hidden states")] = 1.0,
    lm_weight: Annotated[float, typer.Option(help="weight of the language-modelling loss (off by default)")] = 0.0,
    temperature: Annotated[float, typer.Option(help="softmax temperature of the KL term")] = 1.0,
    scope: Annotated[str, typer.Option(help="trainable part: `all` or `changed` (fused/removed blocks)")] = "all",
    neighbours: Annotated[int, typer.Option(help="with --scope changed, also train this many blocks each side")] = 0,
    bf16: Annotated[bool | None, typer.Option(help="bf16 mixed precision (default: on where the GPU has it)")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="trade compute for activation memory")] = False,
    fsdp: Annotated[str, typer.Option(help="FSDP mode passed to Trainer, e.g. 'full_shard auto_wrap'")] = "",
    loss_impl: Annotated[
        str, typer.Option(help="auto, chunked (LM heads inside a token-chunked loss) or plain (full logits)")
    ] = "auto",
    compile: Annotated[
        str, typer.Option(help="torch.compile on CUDA: none, loss (the loss's chunk kernel) or all (also the models)")
    ] = "loss",
    save_steps: Annotated[int, typer.Option(help="checkpoint every N optimizer steps")] = 500,
    logging_steps: Annotated[int, typer.Option(help="log the loss every N optimizer steps")] = 10,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Heal a fused model by distillation from the original (KL on logits + cosine on hidden states)."""
    from ffnfusion.heal.settings import HealSettings
    from ffnfusion.heal.stage import heal as run_heal

    settings = HealSettings(
        data=list(data),
        seq_len=seq_len,
        max_sequences=max_sequences,
        self_samples=self_samples,
        self_batch_size=self_batch_size,
        text_field=text_field,
        batch_size=batch_size,
        grad_accum=grad_accum,
        epochs=epochs,
        max_steps=max_steps,
        tokens=tokens,
        minutes=minutes,
        max_epochs=max_epochs,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        kl_weight=kl_weight,
        cos_weight=cos_weight,
        lm_weight=lm_weight,
        temperature=temperature,
        scope=scope,
        neighbours=neighbours,
        seed=seed,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        fsdp=fsdp,
        loss_impl=loss_impl,
        compile=compile,
    )
    try:
        summary = run_heal(
            student,
            teacher,
            out,
            settings,
            overwrite=overwrite,
            resume=resume,
            checkpoint_dir=checkpoint_dir,
            save_steps=save_steps,
            logging_steps=logging_steps,
            keep_checkpoints=keep_checkpoints,
        )
    except USER_ERRORS as e:
        fail(e)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    table = Table(title=f"healed checkpoint: {summary.out}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("optimizer steps", str(summary.steps))
    table.add_row("data", f"{summary.sequences:,} sequences x {summary.seq_len} tokens")
    budget = f" of --tokens {summary.budget_tokens:,}" if summary.budget_tokens is not None else ""
    table.add_row("training tokens", f"{summary.tokens:,}{budget} (stopped by: {summary.limited_by})")
    table.add_row("micro-batch", f"{summary.batch_size} sequences")
    table.add_row("trainable parameters", f"{summary.trainable_parameters:,} of {summary.total_parameters:,}")
    if summary.first_loss is not None and summary.last_loss is not None:
        table.add_row("loss, first -> last log", f"{summary.first_loss:.4f} -> {summary.last_loss:.4f}")
    table.add_row("loss curve", str(summary.out / "loss_curve.png"))
    table.add_row("training time", f"{summary.train_seconds:.1f} s")
    table.add_row(
        "throughput", f"{summary.tokens_per_second:,.0f} tokens/s ({summary.train_tflops:,.1f} model TFLOP/s)"
    )
    console.print(table)
    for warning in summary.warnings:
        err_console.print(f"[bold yellow]warning:[/] {warning}")
