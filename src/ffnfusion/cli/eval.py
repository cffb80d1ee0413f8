"""`ffnfusion eval`: perplexity, fidelity and zero-shot tasks, several models side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ffnfusion.cli.app import USER_ERRORS, console, fail
from ffnfusion.cli.options import CliForm, settings_options
from ffnfusion.eval.settings import EvalSettings


@settings_options(
    # Comma-separated on the command line, a list in Python; the folder as a path.
    tasks=CliForm(type=str | None, convert=lambda tasks: [t for t in (tasks or "").split(",") if t.strip()]),
    task_data_dir=CliForm(type=Path | None),
)
def eval_(
    models: Annotated[list[str], typer.Argument(help="models to compare: hub ids, folders, .gguf files, checkpoints")],
    out: Annotated[Path, typer.Option(help="eval.json to write (the Markdown table goes beside it as eval.md)")],
    settings: EvalSettings,
    reference: Annotated[
        str | None, typer.Option(help="original model: fidelity (KL, top-1 agreement) is measured against it")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="column name per model, in order (repeatable)")] = None,
) -> None:
    """Perplexity, fidelity to the original and zero-shot tasks (lm-eval-harness), several models side by side."""
    from ffnfusion.eval.stage import evaluate, markdown_table

    try:
        result = evaluate(models, settings, reference=reference, labels=label, out=out)
    except USER_ERRORS as e:
        fail(e)
    console.print(markdown_table(result), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out} and {out.with_suffix('.md')}")
