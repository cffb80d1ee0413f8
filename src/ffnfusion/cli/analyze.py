"""`ffnfusion analyze`: measure sub-block statistics, attention importance and dependency matrices."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ffnfusion.analyze.settings import AnalyzeSettings
from ffnfusion.cli.app import USER_ERRORS, check_plan_file, console, fail, log_dim
from ffnfusion.cli.options import CliForm, settings_options


@settings_options(
    # The command line names devices `auto` (the stage's None) and takes the layer list as text.
    device=CliForm(type=str, default="auto"),
    remove_attention=CliForm(type=str | None),
    plan=CliForm(type=Path | None),
)
def analyze(
    model: Annotated[str, typer.Argument(help="original model: hub id, local folder, or .gguf file")],
    out: Annotated[Path, typer.Option(help="output folder: analysis.json and heatmap PNGs")],
    settings: AnalyzeSettings,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
) -> None:
    """Measure sub-block statistics, attention importance (KL) and FFN/block dependency matrices; draw heatmaps.

    Under `torchrun --nproc-per-node N` the calibration batches are split over N processes (one GPU each).
    """
    check_plan_file(settings.plan)
    from ffnfusion.analyze import analyze as run_analyze

    # Under torchrun every process runs this command; only the first one reports.
    main_process = int(os.environ.get("RANK", "0")) == 0

    try:
        result = run_analyze(
            model,
            out,
            settings,
            overwrite=overwrite,
            show_progress=True,
            log=log_dim if main_process else None,
        )
    except USER_ERRORS as e:
        fail(e)
    if not main_process:
        return
    print_analysis(result)


def print_analysis(result: Any) -> None:
    """Per-layer statistics, the safest removals and windows, what the analysis cost, and where it was written."""
    a = result.analysis
    n = a.num_layers
    shape = f"{n} layers, {a.calibration.samples} x {a.calibration.seq_len} tokens"
    table = Table(title=f"analysis of {a.model.name}: {shape}")
    table.add_column("layer", justify="right")
    table.add_column("attn KL", justify="right")
    table.add_column("attn |h|/|x|", justify="right")
    table.add_column("FFN |h|/|x|", justify="right")
    table.add_column("FFN max dependency of later FFNs", justify="right")
    kl = a.kl_by_layer()
    for s in a.layers:
        row = [v for v in a.ffn_dependency[s.layer] if v is not None]
        table.add_row(
            str(s.layer),
            f"{kl[s.layer]:.4f}" if s.layer in kl else "removed",
            f"{s.attention.rel_norm:.3f}" if s.attention else "-",
            f"{s.ffn.rel_norm:.3f}",
            f"{max(row):.4f}" if row else "-",
        )
    console.print(table)
    order = sorted(kl, key=lambda i: (kl[i], i))[:8]
    console.print(f"lowest-KL attention (safest to remove first): {order}")
    best = sorted((w for w in a.ffn_windows if w.end - w.start >= 2), key=lambda w: (w.max, w.start))[:3]
    if best:
        windows = ", ".join(f"{w.start}-{w.end} (max M {w.max:.4f})" for w in best)
        console.print(f"least dependent windows of 3+ FFNs: {windows}")
    console.print(
        f"cost: {a.cost.total_forward_equivalents:.1f} full-forward equivalents in all "
        f"(FFN matrix {a.cost.parts['ffn_dependency'].forward_equivalents:.1f}, "
        f"block matrix {a.cost.parts['block_dependency'].forward_equivalents:.1f}, "
        f"attention {a.cost.parts['attention'].forward_equivalents:.1f}; "
        f"without prefix caching each matrix would cost {a.cost.naive_forward_equivalents_per_matrix})"
    )
    console.print(
        f"wrote {result.out}/analysis.json and heatmaps in {result.seconds:.1f} s "
        f"(measuring {result.measure_seconds:.1f} s) on {result.device}"
    )
