"""The `ffnfusion` command: one verb per pipeline stage, each a thin wrapper over the stage's function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="FFN Fusion for Hugging Face Llama-family models: analyze, plan, fuse, heal, evaluate, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

# Errors that mean "the user's input is wrong": print the message, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)


@app.callback()
def _root() -> None:
    """FFN Fusion for Hugging Face Llama-family models."""


def fail(error: BaseException) -> None:
    err_console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


@app.command()
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
) -> None:
    """Apply a plan: remove attention, fuse FFN runs into one wide FFN, group parallel blocks; save the checkpoint."""
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
