"""`ffnfusion eval`: perplexity, fidelity and zero-shot tasks, several models side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ffnfusion.cli.app import USER_ERRORS, console, fail


def eval_(
    models: Annotated[list[str], typer.Argument(help="models to compare: hub ids, folders, .gguf files, checkpoints")],
    out: Annotated[Path, typer.Option(help="eval.json to write (the Markdown table goes beside it as eval.md)")],
    reference: Annotated[
        str | None, typer.Option(help="original model: fidelity (KL, top-1 agreement) is measured against it")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="text for perplexity/fidelity: file, folder, .jsonl, .parquet or datasets name")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="comma-separated: hellaswag,arc_easy,arc_challenge,piqa,winogrande,lambada_openai,mmlu"),
    ] = None,
    task_data_dir: Annotated[
        Path | None, typer.Option(help="folder with local copies of the task files (else lm-eval uses the hub)")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="score only the first N items of each task")] = None,
    context_len: Annotated[int, typer.Option(help="perplexity window, tokens")] = 512,
    stride: Annotated[int | None, typer.Option(help="tokens between window starts (default: context length)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="use only the first N tokens of --data")] = None,
    text_field: Annotated[str, typer.Option(help="text column of .jsonl/.parquet/datasets")] = "text",
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    label: Annotated[list[str] | None, typer.Option(help="column name per model, in order (repeatable)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Perplexity, fidelity to the original and zero-shot tasks (lm-eval-harness), several models side by side."""
    from ffnfusion.eval.stage import evaluate, markdown_table

    try:
        result = evaluate(
            models,
            reference=reference,
            data=data,
            text_field=text_field,
            tasks=[t for t in (tasks or "").split(",") if t.strip()],
            task_data_dir=task_data_dir,
            limit=limit,
            context_len=context_len,
            stride=stride,
            max_tokens=max_tokens,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            seed=seed,
            labels=label,
            out=out,
        )
    except USER_ERRORS as e:
        fail(e)
    console.print(markdown_table(result), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out} and {out.with_suffix('.md')}")
