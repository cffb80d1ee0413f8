"""`ffnfusion bench`: latency and throughput of the original and fused models in one engine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ffnfusion.bench.settings import BenchSettings
from ffnfusion.cli.app import USER_ERRORS, check_plan_file, console, err_console, fail
from ffnfusion.cli.options import CliForm, settings_options


@settings_options(
    # Comma-separated sizes; devices named `auto` (the stage's None); --graphs on means "on CUDA" (the stage's None).
    batch_sizes=CliForm(
        type=str, default="1,8,32", convert=lambda text: [int(b) for b in text.split(",") if b.strip()]
    ),
    device=CliForm(type=str, default="auto", convert=lambda device: None if device == "auto" else device),
    graphs=CliForm(type=bool, default=True, convert=lambda on: None if on else False),
    prompt_file=CliForm(type=Path | None),
)
def bench(
    settings: BenchSettings,
    model: Annotated[
        str | None, typer.Argument(help="original model: hub id, folder, .gguf (omit with --random-weights)")
    ] = None,
    compare: Annotated[
        list[str] | None, typer.Option(help="another model to time side by side, e.g. a fused checkpoint (repeatable)")
    ] = None,
    plan: Annotated[
        Path | None, typer.Option(help="plan.json: also time MODEL fused in memory under this plan")
    ] = None,
    force_plan: Annotated[
        bool, typer.Option(help="use a --plan that records another model (layer count or architecture differs)")
    ] = False,
    out: Annotated[Path, typer.Option(help="bench.json to write")] = Path("bench.json"),
    tp: Annotated[
        int,
        typer.Option(
            help="tensor-parallel ranks (random weights only): launch as `torchrun --nproc-per-node N -m "
            "ffnfusion.cli bench --tp N ...`; shards with torch.distributed.tensor.parallel"
        ),
    ] = 1,
) -> None:
    """Latency and throughput of the original and fused models in one graph-captured static-cache engine."""

    check_plan_file(plan)
    command = "ffnfusion " + " ".join(sys.argv[1:])
    if tp != 1:
        _bench_tp(tp, model, compare, plan, settings, out, command)
        return

    from ffnfusion.bench.stage import bench as run_bench
    from ffnfusion.bench.table import markdown_table

    try:
        result = run_bench(
            model,
            settings,
            compare=compare or [],
            plan=plan,
            force_plan=force_plan,
            out=out,
            command=command,
            log=lambda msg: err_console.print(msg, markup=False, highlight=False),
        )
    except USER_ERRORS as e:
        fail(e)
    console.print(markdown_table(result), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out}")


def _bench_tp(
    tp: int,
    model: str | None,
    compare: list[str] | None,
    plan: Path | None,
    settings: BenchSettings,
    out: Path,
    command: str,
) -> None:
    """`--tp N`: the tensor-parallel path (random weights of a real shape, one process per rank)."""
    from ffnfusion.bench.tensor_parallel import bench_tp_stage
    from ffnfusion.bench.tensor_parallel import markdown_table as tp_table

    try:
        report = bench_tp_stage(
            tp=tp,
            model=model,
            compare=compare or [],
            plan=plan,
            random_weights=settings.random_weights,
            shape=settings.shape,
            layers=settings.layers,
            batch_sizes=settings.batch_sizes,
            prompt_len=settings.prompt_len,
            new_tokens=settings.new_tokens,
            repeats=settings.repeats,
            dtype=settings.dtype,
            device=settings.device,
            graphs=settings.graphs,
            out=out,
            command=command,
            seed=settings.seed,
        )
    except USER_ERRORS as e:
        fail(e)
    if report is not None:
        console.print(tp_table(report), markup=False, highlight=False, soft_wrap=True)
        console.print(f"wrote {out}")
