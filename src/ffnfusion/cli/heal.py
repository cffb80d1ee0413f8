"""`ffnfusion heal`: distil the original into the fused model under a token or time budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, console, err_console, fail
from ffnfusion.cli.options import settings_options
from ffnfusion.heal.settings import HealRun, HealSettings


@settings_options()
def heal(
    student: Annotated[str, typer.Argument(help="fused checkpoint folder (the output of `ffnfusion fuse`)")],
    teacher: Annotated[str, typer.Option(help="original model: hub id, local folder, or .gguf file")],
    out: Annotated[Path, typer.Option(help="output folder for the healed checkpoint")],
    settings: HealSettings,
    run: HealRun,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out and any earlier checkpoints")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint in --checkpoint-dir")] = False,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="where Trainer checkpoints go (default: <out>.checkpoints)")
    ] = None,
) -> None:
    """Heal a fused model by distillation from the original (KL on logits + cosine on hidden states)."""
    from ffnfusion.heal.stage import heal as run_heal

    try:
        summary = run_heal(
            student, teacher, out, settings, overwrite=overwrite, resume=resume, checkpoint_dir=checkpoint_dir, run=run
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
    table.add_row("peak learning rate", f"{summary.lr:.3g}")
    table.add_row("trainable parameters", f"{summary.trainable_parameters:,} of {summary.total_parameters:,}")
    if summary.first_loss is not None and summary.last_loss is not None:
        table.add_row("loss, first -> last log", f"{summary.first_loss:.4f} -> {summary.last_loss:.4f}")
    table.add_row("loss curve", str(summary.out / "loss_curve.png"))
    table.add_row("training time", f"{summary.train_seconds:.1f} s")
    if summary.phase_seconds:
        table.add_row("wall time", ", ".join(f"{name} {sec:.1f} s" for name, sec in summary.phase_seconds.items()))
    table.add_row(
        "throughput", f"{summary.tokens_per_second:,.0f} tokens/s ({summary.train_tflops:,.1f} model TFLOP/s)"
    )
    console.print(table)
    for warning in summary.warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(warning)}")
