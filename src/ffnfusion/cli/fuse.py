"""`ffnfusion fuse`: apply a plan and write the fused checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, check_plan_file, console, fail
from ffnfusion.cli.options import CliForm, settings_options
from ffnfusion.fuse_settings import FuseSettings


@settings_options(
    # GiB on the command line, bytes in Python.
    max_shard_bytes=CliForm(
        name="max_shard_size_gb",
        type=float,
        default=5.0,
        help="largest safetensors shard, in GiB",
        convert=lambda gb: int(gb * 2**30),
    ),
)
def fuse(
    model: Annotated[str, typer.Argument(help="original model: hub id, local folder, or .gguf file")],
    plan: Annotated[Path, typer.Option(help="plan.json (0-based layers of the original model)")],
    out: Annotated[Path, typer.Option(help="output folder for the fused checkpoint")],
    settings: FuseSettings,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    force_plan: Annotated[
        bool, typer.Option(help="apply a plan that records another model (layer count or architecture differs)")
    ] = False,
) -> None:
    """Apply a plan: remove attention, fuse FFN runs into one wide FFN, group parallel blocks; save the checkpoint."""
    check_plan_file(plan)
    from ffnfusion.fuse import fuse as run_fuse

    try:
        with console.status(f"fusing {model}"):
            summary = run_fuse(model, plan, out, settings, overwrite=overwrite, force_plan=force_plan)
    except USER_ERRORS as e:
        fail(e)
    table = Table(title=f"fused checkpoint: {summary.out}")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("fused", justify="right")
    table.add_row("layers", str(summary.layers_before), str(summary.layers_after))
    table.add_row("sequential sub-blocks", str(summary.sub_blocks_before), str(summary.sub_blocks_after))
    table.add_row("parameters", f"{summary.params_before:,}", f"{summary.params_after:,}")
    console.print(table)
    engines = Table(title="who can load it")
    engines.add_column("engine")
    engines.add_column("loads it?")
    for engine, verdict in summary.engines.items():
        engines.add_row(engine, verdict)
    console.print(engines)
