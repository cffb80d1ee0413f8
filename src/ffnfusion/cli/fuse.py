"""`ffnfusion fuse`: apply a plan and write the fused checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, check_plan_file, console, fail


def fuse(
    model: Annotated[str, typer.Argument(help="original model: hub id, local folder, or .gguf file")],
    plan: Annotated[Path, typer.Option(help="plan.json (0-based layers of the original model)")],
    out: Annotated[Path, typer.Option(help="output folder for the fused checkpoint")],
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    dtype: Annotated[
        str | None, typer.Option(help="cast weights: float32, bfloat16, float16 (default: as stored)")
    ] = None,
    allow_any_width: Annotated[
        bool, typer.Option(help="allow fused FFN widths that vLLM/TensorRT-LLM/llama.cpp cannot read")
    ] = False,
    max_shard_size_gb: Annotated[float, typer.Option(help="largest safetensors shard, in GiB")] = 5.0,
    force_plan: Annotated[
        bool, typer.Option(help="apply a plan that records another model (layer count or architecture differs)")
    ] = False,
) -> None:
    """Apply a plan: remove attention, fuse FFN runs into one wide FFN, group parallel blocks; save the checkpoint."""
    check_plan_file(plan)
    from ffnfusion.fuse import fuse as run_fuse

    try:
        with console.status(f"fusing {model}"):
            summary = run_fuse(
                model,
                plan,
                out,
                overwrite=overwrite,
                dtype=dtype,
                allow_any_width=allow_any_width,
                max_shard_bytes=int(max_shard_size_gb * 2**30),
                force_plan=force_plan,
            )
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
