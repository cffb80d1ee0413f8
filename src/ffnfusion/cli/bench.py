"""`ffnfusion bench`: latency and throughput of the original and fused models in one engine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ffnfusion.cli.app import USER_ERRORS, check_plan_file, console, err_console, fail


def bench(
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
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8,32",
    prompt_len: Annotated[int, typer.Option(help="prompt tokens per sequence")] = 512,
    new_tokens: Annotated[int, typer.Option(help="tokens generated per sequence")] = 128,
    out: Annotated[Path, typer.Option(help="bench.json to write")] = Path("bench.json"),
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    random_weights: Annotated[
        bool, typer.Option(help="time a randomly initialised model of --shape (speed does not depend on weights)")
    ] = False,
    shape: Annotated[str | None, typer.Option(help="smollm2-135m, llama-3.2-1b, llama-3.1-8b or llama-3.1-70b")] = None,
    layers: Annotated[int | None, typer.Option(help="keep only the first N layers of --shape")] = None,
    reference_tokens: Annotated[
        int, typer.Option(help="tokens of eager `generate` to time and to compare with the engine (0: skip)")
    ] = 32,
    repeats: Annotated[int, typer.Option(help="timed generations per batch size")] = 3,
    kernels: Annotated[str, typer.Option(help="auto, triton or torch")] = "auto",
    graphs: Annotated[bool, typer.Option(help="capture prefill and decode as CUDA graphs (CUDA only)")] = True,
    ffn_probe: Annotated[
        int, typer.Option(help="also time N FFNs of the model's shape in sequence vs fused into one (0: skip)")
    ] = 0,
    prompt_file: Annotated[
        Path | None, typer.Option(help="text to cut prompts from (default: random token ids)")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
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
    if tp != 1:
        from ffnfusion.bench.tensor_parallel import bench_tp_stage
        from ffnfusion.bench.tensor_parallel import markdown_table as tp_table

        try:
            report = bench_tp_stage(
                tp=tp,
                model=model,
                compare=compare or [],
                plan=plan,
                random_weights=random_weights,
                shape=shape,
                layers=layers,
                batch_sizes=[int(b) for b in batch_sizes.split(",") if b.strip()],
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                repeats=repeats,
                dtype=dtype,
                device=None if device == "auto" else device,
                graphs=None if graphs else False,
                out=out,
                command="ffnfusion " + " ".join(sys.argv[1:]),
                seed=seed,
            )
        except USER_ERRORS as e:
            fail(e)
        if report is not None:
            console.print(tp_table(report), markup=False, highlight=False, soft_wrap=True)
            console.print(f"wrote {out}")
        return

    from ffnfusion.bench.stage import bench as run_bench
    from ffnfusion.bench.table import markdown_table

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
        dev = None if device == "auto" else device
        result = run_bench(
            model,
            compare=compare or [],
            plan=plan,
            force_plan=force_plan,
            batch_sizes=sizes,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            out=out,
            dtype=dtype,
            device=dev,
            random_weights=random_weights,
            shape=shape,
            layers=layers,
            reference_tokens=reference_tokens,
            repeats=repeats,
            kernels=kernels,
            graphs=None if graphs and (dev is None or dev.startswith("cuda")) else False,
            ffn_probe=ffn_probe,
            prompt_file=prompt_file,
            seed=seed,
            command="ffnfusion " + " ".join(sys.argv[1:]),
            log=lambda msg: err_console.print(msg, markup=False, highlight=False),
        )
    except USER_ERRORS as e:
        fail(e)
    console.print(markdown_table(result), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out}")
