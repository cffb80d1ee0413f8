"""`ffnfusion generate`: a distillation corpus written by the original model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, console, err_console, fail
from ffnfusion.cli.options import CliForm, settings_options
from ffnfusion.generate.settings import GenerateSettings, parse_tokens


@settings_options(
    exclude=("sync_every",),
    # Token counts such as 50M or 200k on the command line.
    tokens=CliForm(type=str, convert=parse_tokens),
)
def generate(
    model: Annotated[str, typer.Argument(help="teacher model: hub id, local folder or .gguf file")],
    out: Annotated[Path, typer.Option(help="corpus folder: manifest.json and token shards")],
    settings: GenerateSettings,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    resume: Annotated[bool, typer.Option(help="continue the corpus in --out (same model, settings)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier `ffnfusion generate` output in --out")] = False,
) -> None:
    """Sample a distillation corpus from MODEL with the graph-captured engine (continuous batching, resumable)."""
    from ffnfusion.generate import generate as run_generate

    try:
        s = run_generate(
            model, out, settings, overwrite=overwrite, resume=resume, device=device,
            log=lambda msg: err_console.print(msg, markup=False, highlight=False),
        )  # fmt: skip
    except USER_ERRORS as e:
        fail(e)
    table = Table(title=f"corpus: {s.out}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("sequences", f"{s.sequences:,} x {s.seq_len} tokens = {s.sequences * s.seq_len:,} tokens")
    if s.new_sequences:
        table.add_row("written now", f"{s.new_sequences * s.seq_len:,} tokens in {s.seconds:.1f} s")
        table.add_row("throughput", f"{s.tokens_per_second:,.0f} tokens/s")
    for key, value in s.diversity.items():
        table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
