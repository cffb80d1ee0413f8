"""`ffnfusion generate`: a distillation corpus written by the original model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, console, err_console, fail


def generate(
    model: Annotated[str, typer.Argument(help="teacher model: hub id, local folder or .gguf file")],
    out: Annotated[Path, typer.Option(help="corpus folder: manifest.json and token shards")],
    tokens: Annotated[str, typer.Option(help="corpus size in tokens, e.g. 50M, 200k (rounded up to sequences)")],
    seq_len: Annotated[int, typer.Option(help="tokens per stored sequence (and the longest document)")] = 512,
    temperature: Annotated[float, typer.Option(help="sampling temperature (0: greedy)")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass (1: the whole vocabulary)")] = 0.95,
    seed: Annotated[int, typer.Option(help="seeds the sampling and the prompt choice")] = 0,
    prompts: Annotated[
        str, typer.Option(help="auto (chat models: chat template + built-in instructions; else BOS), bos, chat, FILE")
    ] = "auto",
    prompt_format: Annotated[str, typer.Option(help="FILE lines are `text` or `chat` turns")] = "text",
    prompt_tokens: Annotated[int, typer.Option(help="keep at most this many tokens of each prompt")] = 64,
    batch_size: Annotated[int | None, typer.Option(help="slots (default: 512 on GPU, 8 on CPU)")] = None,
    shard_tokens: Annotated[int, typer.Option(help="tokens per shard (the unit a killed run resumes from)")] = 2**23,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    resume: Annotated[bool, typer.Option(help="continue the corpus in --out (same model, settings)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier `ffnfusion generate` output in --out")] = False,
) -> None:
    """Sample a distillation corpus from MODEL with the graph-captured engine (continuous batching, resumable)."""
    from ffnfusion.generate import GenerateSettings, parse_tokens
    from ffnfusion.generate import generate as run_generate

    try:
        settings = GenerateSettings(
            tokens=parse_tokens(tokens), seq_len=seq_len, temperature=temperature, top_p=top_p, seed=seed,
            prompts=prompts, prompt_format=prompt_format, prompt_tokens=prompt_tokens, batch_size=batch_size,
            shard_tokens=shard_tokens, dtype=dtype,
        )  # fmt: skip
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
