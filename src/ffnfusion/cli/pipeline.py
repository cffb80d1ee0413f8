"""`ffnfusion run` (every stage in one folder) and `ffnfusion report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, console, fail, log_dim


def run_(
    out: Annotated[Path, typer.Option(help="run folder: every stage's files go here")],
    model: Annotated[str | None, typer.Option(help="original model: hub id, local folder or .gguf file")] = None,
    config: Annotated[Path | None, typer.Option(help="run.yaml: any option of any stage (see docs)")] = None,
    data: Annotated[str | None, typer.Option(help="calibration and healing text; `self` samples the model")] = None,
    eval_data: Annotated[str | None, typer.Option(help="perplexity text (default: held-out text)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for every stage")] = None,
    stop_after: Annotated[str | None, typer.Option(help="last stage to run")] = None,
    skip: Annotated[str, typer.Option(help="stages to skip, comma-separated, e.g. heal,bench")] = "",
) -> None:
    """Analyze -> plan -> fuse -> heal -> eval -> bench -> report in one folder; rerun to resume."""
    from ffnfusion.pipeline import run

    try:
        status = run(
            model,
            out,
            config=config,
            stop_after=stop_after,
            skip={s.strip() for s in skip.split(",") if s.strip()},
            log=log_dim,
            data=data,
            eval_data=eval_data,
            device=device,
            seed=seed,
        )
    except USER_ERRORS as e:
        fail(e)
    table = Table(title=f"ffnfusion run: {out}")
    table.add_column("stage")
    table.add_column("status")
    for stage, state in status.items():
        table.add_row(stage, state)
    console.print(table)
    if (out / "report.md").is_file():
        console.print(f"report: {out / 'report.md'} and {out / 'report.html'}")


def report(folder: Annotated[Path, typer.Argument(help="run folder holding the stage files")]) -> None:
    """Build report.md and a self-contained report.html from the stage files in FOLDER."""
    from ffnfusion.report import write_report

    try:
        md, page = write_report(folder)
    except USER_ERRORS as e:
        fail(e)
    console.print(f"wrote {md} and {page}")
