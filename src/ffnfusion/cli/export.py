"""`ffnfusion export`: a fused checkpoint as one GGUF file for llama.cpp (its `deci` architecture)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, console, fail


def export(
    fused: Annotated[str, typer.Argument(help="fused checkpoint folder (the output of `ffnfusion fuse` or `heal`)")],
    out: Annotated[Path, typer.Option(help="output file, e.g. model.gguf")],
    format: Annotated[
        str, typer.Option("--format", help="output format: gguf (llama.cpp's deci architecture)")
    ] = "gguf",
    dtype: Annotated[str, typer.Option(help="weight type: f16, bf16, f32 or q8_0 (norms stay f32)")] = "f16",
    tokenizer_pre: Annotated[
        str | None,
        typer.Option(help="llama.cpp pre-tokenizer name for a byte-level BPE tokenizer it does not recognise"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="general.name in the file (default: the folder name)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier `ffnfusion export` output at --out")] = False,
) -> None:
    """Write a fused checkpoint as one GGUF file that llama.cpp runs (its `deci` architecture), no converter needed."""
    from ffnfusion.export import FORMATS, ExportError, export_gguf

    try:
        if format not in FORMATS:
            raise ExportError(f"--format {format!r} is not supported; choose one of: {', '.join(FORMATS)}.")
        with console.status(f"exporting {fused}"):
            s = export_gguf(fused, out, dtype=dtype, overwrite=overwrite, tokenizer_pre=tokenizer_pre, name=name)
    except USER_ERRORS as e:
        fail(e)
    table = Table(title=f"GGUF (llama.cpp deci): {s.out}")
    table.add_column("")
    table.add_column("value")
    dropped = f" ({len(s.dropped_blocks)} no-op blocks left out: {s.dropped_blocks})" if s.dropped_blocks else ""
    table.add_row("blocks", f"{s.blocks_before} -> {s.blocks_after}{dropped}")
    table.add_row("tensors", f"{s.tensors} ({s.dtype}; norms f32)")
    if s.kept_f16:
        table.add_row("kept f16", f"{len(s.kept_f16)} tensors whose rows do not split into 32-value blocks")
    table.add_row("tokenizer", f"{s.tokenizer}, pre-tokenizer {s.pre_tokenizer!r} from {s.pre_source}")
    table.add_row("size", f"{s.bytes / 2**20:,.1f} MiB")
    console.print(table)
    console.print(f"run it: llama-cli -m {s.out}  (or llama-perplexity / llama-bench / llama-server)")
