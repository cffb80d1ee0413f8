"""`ffnfusion analyze`: measure sub-block statistics, attention importance and dependency matrices."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ffnfusion.cli.app import USER_ERRORS, check_plan_file, console, err_console, fail


def analyze(
    model: Annotated[str, typer.Argument(help="original model: hub id, local folder, or .gguf file")],
    out: Annotated[Path, typer.Option(help="output folder: analysis.json and heatmap PNGs")],
    data: Annotated[
        str, typer.Option(help="calibration text: file, folder, .jsonl, .parquet, datasets name, or `self`")
    ] = "self",
    samples: Annotated[int, typer.Option(help="calibration sequences")] = 64,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 512,
    seed: Annotated[int, typer.Option(help="chooses the sequences (and seeds `self` sampling)")] = 0,
    text_field: Annotated[str, typer.Option(help="text column of .jsonl/.parquet/datasets")] = "text",
    remove_attention: Annotated[
        str | None, typer.Option(help="measure with these attention sub-blocks removed, e.g. 12,13,20-23")
    ] = None,
    plan: Annotated[Path | None, typer.Option(help="measure with this plan's remove_attention applied")] = None,
    max_window: Annotated[int, typer.Option(help="longest window (layers) of the window scores")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 where native), float32, bfloat16, float16")] = "auto",
    batch_size: Annotated[int | None, typer.Option(help="sequences per batch (default: 16 on GPU, 8 on CPU)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    stream: Annotated[
        bool, typer.Option(help="load one layer at a time onto the device: for models larger than GPU or RAM")
    ] = False,
    activations: Annotated[
        str, typer.Option(help="with --stream: where the activations between layers live (auto, device, cpu)")
    ] = "auto",
    stream_samples: Annotated[
        int | None,
        typer.Option(help="with --stream: sequences per pass over the weights (default: as many as memory holds)"),
    ] = None,
) -> None:
    """Measure sub-block statistics, attention importance (KL) and FFN/block dependency matrices; draw heatmaps.

    Under `torchrun --nproc-per-node N` the calibration batches are split over N processes (one GPU each).
    """
    check_plan_file(plan)
    from ffnfusion.analyze import analyze as run_analyze

    # Under torchrun every process runs this command; only the first one reports.
    main_process = int(os.environ.get("RANK", "0")) == 0

    try:
        result = run_analyze(
            model,
            out,
            data=data,
            samples=samples,
            seq_len=seq_len,
            seed=seed,
            text_field=text_field,
            remove_attention=remove_attention,
            plan=plan,
            max_window=max_window,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            overwrite=overwrite,
            stream=stream,
            activations=activations,
            stream_samples=stream_samples,
            show_progress=True,
            log=lambda msg: err_console.print(f"[dim]{msg}[/]") if main_process else None,
        )
    except USER_ERRORS as e:
        fail(e)
    if not main_process:
        return
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
