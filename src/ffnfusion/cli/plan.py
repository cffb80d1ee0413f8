"""`ffnfusion plan`: choose what to remove, fuse and parallelize under a budget; write plan.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, console, err_console, fail, log_dim
from ffnfusion.cli.options import CliForm, settings_options
from ffnfusion.plan.settings import PlanSettings


@settings_options(
    costs=CliForm(type=Path | None),
    engines=CliForm(type=str | None),  # comma-separated; PlanSettings splits it
)
def plan_(
    analysis: Annotated[Path, typer.Argument(help="analysis.json (or the folder holding it) from `ffnfusion analyze`")],
    out: Annotated[Path, typer.Option(help="plan.json to write")],
    settings: PlanSettings,
    model: Annotated[
        str | None, typer.Option(help="check the analysis was made from this model (needed by --iterative if moved)")
    ] = None,
    data: Annotated[str | None, typer.Option(help="--iterative: calibration text (default: the analysis')")] = None,
    samples: Annotated[int | None, typer.Option(help="--iterative: sequences (default: the analysis')")] = None,
    seq_len: Annotated[int | None, typer.Option(help="--iterative: tokens per sequence")] = None,
    device: Annotated[str | None, typer.Option(help="--iterative: cpu or cuda (default: the analysis')")] = None,
    dtype: Annotated[str | None, typer.Option(help="--iterative: dtype (default: the analysis')")] = None,
    batch_size: Annotated[int | None, typer.Option(help="--iterative: sequences per batch")] = None,
    stream: Annotated[
        bool, typer.Option(help="--iterative: load one layer at a time onto the device (models larger than it)")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Choose what to remove, fuse and parallelize under a budget; predict depth and latency; write plan.json.

    With --target-depth alone, the recipes (attention removal, + FFN fusion, + parallel pairs, plain layer
    dropping) are compared at that depth and the one with the lowest predicted KL is written.
    """
    if stream and not settings.iterative:
        fail(ValueError("--stream applies to --iterative re-scoring (plan reads no weights otherwise)."))
    from ffnfusion.analyze import load_analysis
    from ffnfusion.analyze.rescore import iterative_rescorer, recipe_measurer
    from ffnfusion.plan.costs import CostModel
    from ffnfusion.plan.search import check_model, check_plan_output, write_plan
    from ffnfusion.plan.stage import choose_plan

    try:
        settings.check_recipes()
        inputs = [("analysis", analysis), ("costs file", settings.costs), ("input model", model), ("data", data)]
        check_plan_output(out, inputs, overwrite=overwrite)
        a = load_analysis(analysis)
        if model is not None and not settings.iterative:
            check_model(a, model)
        cost_model = CostModel.load(settings.costs, a) if settings.costs is not None else None
        # What re-measuring on the model needs (--iterative, --measure-recipes): the analysis' settings by default.
        on_model = dict(
            model=model, data=data, samples=samples, seq_len=seq_len, device=device, dtype=dtype,
            batch_size=batch_size, log=log_dim,
        )  # fmt: skip
        rescore = iterative_rescorer(a, stream=stream, **on_model) if settings.iterative else None
        measure = recipe_measurer(a, **on_model) if settings.measure_recipes else None
        result, comparison = choose_plan(a, settings, cost_model, rescore, measure)
        write_plan(result.plan, out, overwrite=overwrite)
    except USER_ERRORS as e:
        fail(e)
    if comparison is not None:
        console.print(recipe_table(comparison, settings.target_depth))
        for r in comparison.recipes:
            if r.note:
                console.print(f"  {r.name}: {escape(r.note)}", highlight=False)
    print_plan(result, a.model.name, out)


def print_plan(result: Any, model_name: str, out: Path) -> None:
    """The plan, its predicted KL, depth and latency, and the budgets it could not meet."""
    p, info = result.plan, result.plan.info
    table = Table(title=f"plan for {model_name}: {out}")
    table.add_column("")
    table.add_column("value")
    table.add_row("remove attention", str(p.remove_attention))
    table.add_row("  chosen here, in order (KL after)", ", ".join(f"{i} ({k:.4f})" for i, k in result.removal) or "-")
    table.add_row("fuse FFN groups", str(p.fuse_ffn))
    if p.remove_ffn:
        table.add_row("remove FFN", str(p.remove_ffn))
    if p.parallel_blocks:
        table.add_row("parallel blocks", str(p.parallel_blocks))
    table.add_row(f"predicted KL ({info['predicted_kl_is']})", f"{info['predicted_kl']:.4f}")
    table.add_row("sequential sub-blocks", f"{result.depth_before} -> {result.depth_after}")
    latency = info["predicted"]["latency"]
    table.add_row(
        "predicted latency (ms/token)",
        f"{result.latency_before:.4f} -> {result.latency_after:.4f} ({latency['speedup']:.3f}x)",
    )
    table.add_row("cost model", latency["cost_model"]["source"])
    console.print(table)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


def recipe_table(comparison: Any, target_depth: int) -> Table:
    """The recipes compared by `plan --target-depth`, the chosen one marked; notes in the caption."""
    chosen = comparison.chosen
    table = Table(title=f"recipes at depth {target_depth}", caption=f"chosen: {chosen.name} ({comparison.why})")
    for name in ("recipe", "sub-blocks", "KL", "KL is", "ms/token"):
        table.add_column(name, justify="left" if name in ("recipe", "KL is") else "right")
    for r in comparison.recipes:
        kl = "-" if r.kl == float("inf") else f"{r.kl:.4f}"
        latency = f"{r.latency_ms:.4f}" if r.latency_ms else "-"
        table.add_row(("* " if r is chosen else "  ") + r.name, str(r.depth), kl, r.kl_is, latency)
    return table
