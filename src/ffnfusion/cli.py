"""The `ffnfusion` command: one verb per pipeline stage, each a thin wrapper over the stage's function."""

from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

console = Console()
err_console = Console(stderr=True)

# Errors that mean "the user's input is wrong": print the message, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)
# Set by the root `--debug` option (or FFNFUSION_DEBUG=1): errors also print their traceback.
_debug = False

# What an operating-system error means for the user, and what to do about it.
_OS_ERROR_HINTS = {
    getattr(errno, name): hint
    for name, hint in (
        ("ENOSPC", "the disk is full: free some space or write to another disk"),
        ("EFBIG", "the file is larger than this file system allows: write to another disk"),
        ("EDQUOT", "the disk quota is used up: free some space or write to another disk"),
        ("EROFS", "the file system is read-only: choose a writable location (--out)"),
        ("EACCES", "permission denied: choose a location you can write to, or fix its permissions"),
        ("EPERM", "the operation is not permitted: choose a location you can write to, or fix its permissions"),
        ("ENOTDIR", "a part of the path is a file, not a folder: choose a location that is not below a file"),
        ("EISDIR", "the path is a folder where a file was expected"),
        ("EEXIST", "the path already exists"),
        ("ENOENT", "no such file or folder"),
        ("EIO", "the disk reported an input/output error"),
    )
    if hasattr(errno, name)
}


def describe_error(error: BaseException) -> str:
    """One paragraph for the user: the message of our own errors; path, problem and fix for operating-system ones."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
        where = " -> ".join(paths) if paths else "(the operating system did not say which file)"
        hint = _OS_ERROR_HINTS.get(error.errno)
        if error.errno in (errno.EEXIST, errno.ENOTDIR) and error.filename is not None:
            # mkdir below an existing file: name the file that is in the way.
            path = Path(os.fsdecode(error.filename))
            blocker = next((p for p in (path, *path.parents) if p.is_file()), None)
            if blocker is not None:
                hint = f"{blocker} is a file, not a folder: choose a location (--out) that is not below a file"
        problem = f"{error.strerror} [errno {errno.errorcode.get(error.errno, error.errno)}]"
        return f"{where}: {problem}" + (f"; {hint}." if hint else ".")
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    return str(error) or type(error).__name__


def check_plan_file(plan: Path | None) -> None:
    """Read --plan before the heavy imports of a verb, so a bad plan file is reported at once."""
    if plan is not None:
        from ffnfusion.formats.plan import Plan

        Plan.load(plan)


def fail(error: BaseException) -> None:
    if _debug:
        err_console.print(
            "".join(traceback.format_exception(error)), markup=False, highlight=False, soft_wrap=True, end=""
        )
    err_console.print(f"[bold red]error:[/] {escape(describe_error(error))}", soft_wrap=True)
    raise typer.Exit(code=2)


class _FriendlyErrors(TyperGroup):
    """Every verb runs inside this: user errors and operating-system errors end as one message and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            if e.errno == errno.EPIPE:  # output piped into `head`: click's own handling is right
                raise
            fail(e)
        except USER_ERRORS as e:
            fail(e)


app = typer.Typer(
    help="FFN Fusion for Hugging Face Llama-family models: analyze, plan, fuse, heal, evaluate, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_FriendlyErrors,
)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", envvar="FFNFUSION_DEBUG", help="show the traceback of an error as well")
    ] = False,
) -> None:
    """FFN Fusion for Hugging Face Llama-family models."""
    global _debug
    _debug = debug


@app.command()
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


@app.command("plan")
def plan_(
    analysis: Annotated[Path, typer.Argument(help="analysis.json (or the folder holding it) from `ffnfusion analyze`")],
    out: Annotated[Path, typer.Option(help="plan.json to write")],
    remove_attention: Annotated[
        int | None, typer.Option(help="budget: this many attention sub-blocks removed in all (lowest KL first)")
    ] = None,
    max_kl: Annotated[
        float | None, typer.Option(help="budget: remove attention while the predicted KL stays <= this")
    ] = None,
    target_depth: Annotated[
        int | None, typer.Option(help="remove attention until at most this many sub-blocks run in sequence")
    ] = None,
    max_group: Annotated[int, typer.Option(help="most FFNs in one fused group")] = 8,
    fuse_last: Annotated[bool, typer.Option(help="also fuse the last FFN of each attention-free run")] = False,
    max_dependency: Annotated[
        float | None, typer.Option(help="never fuse two FFNs whose dependency M[i][j] exceeds this")
    ] = None,
    parallel_threshold: Annotated[
        float | None, typer.Option(help="run intact layers as parallel blocks where block dependency <= this")
    ] = None,
    max_parallel: Annotated[int, typer.Option(help="most layers in one parallel block")] = 2,
    costs: Annotated[
        Path | None, typer.Option(help="measured costs, JSON: attention_ms, ffn_ms, overhead_ms, fixed_ms")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="check the analysis was made from this model (needed by --iterative if moved)")
    ] = None,
    iterative: Annotated[
        bool, typer.Option(help="re-score attention on the model after each removal (loads the model; slower)")
    ] = False,
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
    """Choose what to remove, fuse and parallelize under a budget; predict depth and latency; write plan.json."""
    if stream and not iterative:
        fail(ValueError("--stream applies to --iterative re-scoring (plan reads no weights otherwise)."))
    from ffnfusion.analyze import load_analysis
    from ffnfusion.analyze.rescore import iterative_rescorer
    from ffnfusion.plan.search import CostModel, check_model, check_plan_output, search_plan, write_plan

    try:
        inputs = [("analysis", analysis), ("costs file", costs), ("input model", model), ("data", data)]
        check_plan_output(out, inputs, overwrite=overwrite)
        a = load_analysis(analysis)
        if model is not None and not iterative:
            check_model(a, model)
        cost_model = CostModel.load(costs, a) if costs is not None else None
        rescore = None
        if iterative:
            rescore = iterative_rescorer(
                a,
                model=model,
                data=data,
                samples=samples,
                seq_len=seq_len,
                device=device,
                dtype=dtype,
                batch_size=batch_size,
                log=lambda msg: err_console.print(f"[dim]{msg}[/]"),
                stream=stream,
            )
        result = search_plan(
            a,
            remove_attention=remove_attention,
            max_kl=max_kl,
            max_group=max_group,
            target_depth=target_depth,
            fuse_last=fuse_last,
            max_dependency=max_dependency,
            parallel_threshold=parallel_threshold,
            max_parallel=max_parallel,
            costs=cost_model,
            rescore=rescore,
        )
        write_plan(result.plan, out, overwrite=overwrite)
    except USER_ERRORS as e:
        fail(e)
    p, info = result.plan, result.plan.info
    table = Table(title=f"plan for {a.model.name}: {out}")
    table.add_column("")
    table.add_column("value")
    table.add_row("remove attention", str(p.remove_attention))
    table.add_row("  chosen here, in order (KL after)", ", ".join(f"{i} ({k:.4f})" for i, k in result.removal) or "-")
    table.add_row("fuse FFN groups", str(p.fuse_ffn))
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
        err_console.print(f"[yellow]warning:[/] {warning}")


@app.command()
def fuse(
    model: Annotated[str, typer.Argument(help="original model: hub id, local folder, or .gguf file")],
    plan: Annotated[Path, typer.Option(help="plan.json (0-based layers of the original model)")],
    out: Annotated[Path, typer.Option(help="output folder for the fused checkpoint")],
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    dtype: Annotated[
        str | None, typer.Option(help="cast weights: float32, bfloat16, float16 (default: as stored)")
    ] = None,
    allow_any_width: Annotated[
        bool, typer.Option(help="allow fused FFN widths that vLLM/TensorRT-LLM/llama.cpp cannot read")
    ] = False,
    max_shard_size_gb: Annotated[float, typer.Option(help="largest safetensors shard, in GiB")] = 5.0,
    force_plan: Annotated[
        bool, typer.Option(help="apply a plan that records another model (layer count or architecture differs)")
    ] = False,
) -> None:
    """Apply a plan: remove attention, fuse FFN runs into one wide FFN, group parallel blocks; save the checkpoint."""
    check_plan_file(plan)
    from ffnfusion.fuse import fuse as run_fuse

    try:
        with console.status(f"fusing {model}"):
            summary = run_fuse(
                model,
                plan,
                out,
                overwrite=overwrite,
                dtype=dtype,
                allow_any_width=allow_any_width,
                max_shard_bytes=int(max_shard_size_gb * 2**30),
                force_plan=force_plan,
            )
    except USER_ERRORS as e:
        fail(e)
    table = Table(title=f"fused checkpoint: {summary.out}")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("fused", justify="right")
    table.add_row("layers", str(summary.layers_before), str(summary.layers_after))
    table.add_row("sequential sub-blocks", str(summary.sub_blocks_before), str(summary.sub_blocks_after))
    table.add_row("parameters", f"{summary.params_before:,}", f"{summary.params_after:,}")
    console.print(table)
    engines = Table(title="who can load it")
    engines.add_column("engine")
    engines.add_column("loads it?")
    for engine, verdict in summary.engines.items():
        engines.add_row(engine, verdict)
    console.print(engines)


@app.command()
def heal(
    student: Annotated[str, typer.Argument(help="fused checkpoint folder (the output of `ffnfusion fuse`)")],
    teacher: Annotated[str, typer.Option(help="original model: hub id, local folder, or .gguf file")],
    data: Annotated[
        list[str],
        typer.Option(help="training text: file, folder, .jsonl, .parquet, datasets name, or `self`; repeatable"),
    ],
    out: Annotated[Path, typer.Option(help="output folder for the healed checkpoint")],
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out and any earlier checkpoints")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint in --checkpoint-dir")] = False,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="where Trainer checkpoints go (default: <out>.checkpoints)")
    ] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="keep the checkpoints after a successful run")] = False,
    seq_len: Annotated[int, typer.Option(help="tokens per packed training sequence")] = 512,
    max_sequences: Annotated[int | None, typer.Option(help="use at most this many sequences per --data")] = None,
    self_samples: Annotated[int, typer.Option(help="sequences to sample from the teacher for --data self")] = 256,
    self_batch_size: Annotated[int, typer.Option(help="sequences sampled at once for --data self")] = 64,
    text_field: Annotated[str, typer.Option(help="text column of .jsonl/.parquet/datasets")] = "text",
    batch_size: Annotated[int, typer.Option(help="sequences per device per micro-batch")] = 8,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = 1,
    epochs: Annotated[float, typer.Option(help="passes over the data (ignored when --max-steps is set)")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="optimizer steps (overrides --epochs)")] = -1,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, cosine decay)")] = 1e-4,
    warmup: Annotated[float, typer.Option(help="warm-up: fraction of the steps (<1) or a number of steps")] = 0.05,
    weight_decay: Annotated[float, typer.Option()] = 0.0,
    kl_weight: Annotated[float, typer.Option(help="weight of KL(teacher || student) on next-token logits")] = 1.0,
    cos_weight: Annotated[float, typer.Option(help="weight of the cosine distance of final hidden states")] = 1.0,
    lm_weight: Annotated[float, typer.Option(help="weight of the language-modelling loss (off by default)")] = 0.0,
    temperature: Annotated[float, typer.Option(help="softmax temperature of the KL term")] = 1.0,
    scope: Annotated[str, typer.Option(help="trainable part: `all` or `changed` (fused/removed blocks)")] = "all",
    neighbours: Annotated[int, typer.Option(help="with --scope changed, also train this many blocks each side")] = 0,
    bf16: Annotated[bool | None, typer.Option(help="bf16 mixed precision (default: on where the GPU has it)")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="trade compute for activation memory")] = False,
    fsdp: Annotated[str, typer.Option(help="FSDP mode passed to Trainer, e.g. 'full_shard auto_wrap'")] = "",
    save_steps: Annotated[int, typer.Option(help="checkpoint every N optimizer steps")] = 500,
    logging_steps: Annotated[int, typer.Option(help="log the loss every N optimizer steps")] = 10,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Heal a fused model by distillation from the original (KL on logits + cosine on hidden states)."""
    from ffnfusion.heal import HealSettings
    from ffnfusion.heal import heal as run_heal

    settings = HealSettings(
        data=list(data),
        seq_len=seq_len,
        max_sequences=max_sequences,
        self_samples=self_samples,
        self_batch_size=self_batch_size,
        text_field=text_field,
        batch_size=batch_size,
        grad_accum=grad_accum,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        kl_weight=kl_weight,
        cos_weight=cos_weight,
        lm_weight=lm_weight,
        temperature=temperature,
        scope=scope,
        neighbours=neighbours,
        seed=seed,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        fsdp=fsdp,
    )
    try:
        summary = run_heal(
            student,
            teacher,
            out,
            settings,
            overwrite=overwrite,
            resume=resume,
            checkpoint_dir=checkpoint_dir,
            save_steps=save_steps,
            logging_steps=logging_steps,
            keep_checkpoints=keep_checkpoints,
        )
    except USER_ERRORS as e:
        fail(e)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    table = Table(title=f"healed checkpoint: {summary.out}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("optimizer steps", str(summary.steps))
    table.add_row("data", f"{summary.sequences:,} sequences x {summary.seq_len} tokens")
    table.add_row("training tokens", f"{summary.tokens:,}")
    table.add_row("trainable parameters", f"{summary.trainable_parameters:,} of {summary.total_parameters:,}")
    if summary.first_loss is not None and summary.last_loss is not None:
        table.add_row("loss, first -> last log", f"{summary.first_loss:.4f} -> {summary.last_loss:.4f}")
    table.add_row("loss curve", str(summary.out / "loss_curve.png"))
    table.add_row("training time", f"{summary.train_seconds:.1f} s")
    table.add_row("throughput", f"{summary.tokens_per_second:,.0f} tokens/s")
    console.print(table)


@app.command("eval")
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


@app.command()
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
    import sys

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
    from ffnfusion.bench.stage import markdown_table

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


@app.command("run")
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
            model, out, config=config, stop_after=stop_after,
            skip={s.strip() for s in skip.split(",") if s.strip()},
            log=lambda msg: err_console.print(f"[dim]{msg}[/]"),
            data=data, eval_data=eval_data, device=device, seed=seed,
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


@app.command()
def report(folder: Annotated[Path, typer.Argument(help="run folder holding the stage files")]) -> None:
    """Build report.md and a self-contained report.html from the stage files in FOLDER."""
    from ffnfusion.report import write_report

    try:
        md, page = write_report(folder)
    except USER_ERRORS as e:
        fail(e)
    console.print(f"wrote {md} and {page}")


@app.command()
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


@app.command()
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
