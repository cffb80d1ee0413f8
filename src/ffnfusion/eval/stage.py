"""The `eval` stage: models + text + tasks -> eval.json and eval.md, several models side by side.

Inputs: model folders/GGUF files, optionally a reference (the original model, for fidelity), text for perplexity
and task names (local files under --task-data-dir, or lm-eval hub tasks). Every input is checked before the first
model loads. Output: eval.json (format `ffnfusion-eval`) and its Markdown table eval.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ffnfusion.eval.cache import files_digest, load_scores, score_key, store_scores, stream_digest, weights_digest
from ffnfusion.eval.scoring import EvalError, score_windows, sliding_windows
from ffnfusion.eval.settings import EvalSettings
from ffnfusion.eval.zero_shot import resolve_tasks, run_tasks, task_manager
from ffnfusion.formats.eval import EVAL_FORMAT, EVAL_VERSION
from ffnfusion.formats.settings import settings_from
from ffnfusion.io.device import resolve_device
from ffnfusion.io.output import Input, check_output_file, json_format_is, write_atomic


def model_label(spec: str) -> str:
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else (path.name or spec) if path.exists() else spec


def _labels(specs: list[str], labels: list[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(specs):
            raise EvalError(f"{len(labels)} labels for {len(specs)} models: give one label per model.")
        names = list(labels)
    else:
        names = [model_label(s) for s in specs]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # two models called "model" become "model" and "model#2"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}#{seen[name]}"
    return names


def same_tokenizer(a: Any, b: Any) -> str | None:
    """None when `a` and `b` turn text into the same ids; otherwise what differs, for the error message."""
    if len(a) != len(b):
        return f"vocabulary sizes differ ({len(a)} vs {len(b)})"
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))
        return f"{len(diff)} vocabulary entries differ (e.g. {diff[0]})"
    probe = "Tokenizers agree on this text: 123, naïve café, <tags>\n\tand spaces."
    if a(probe, add_special_tokens=False)["input_ids"] != b(probe, add_special_tokens=False)["input_ids"]:
        return "the same vocabulary splits text differently (different merges or normalization)"
    return None


def check_eval_output(out: str | Path, inputs: Iterable[Input]) -> None:
    """Refuse an eval.json (or the eval.md beside it) that is an input or a file an earlier eval did not write."""
    out = Path(out)
    inputs = list(inputs)
    is_eval_json = json_format_is(EVAL_FORMAT)
    check_output_file(out, "eval", is_eval_json, inputs, error=EvalError)
    # eval.md is the table of the eval.json beside it: it is ours when that file is.
    check_output_file(out.with_suffix(".md"), "eval", lambda _md: is_eval_json(out), inputs, error=EvalError)


def evaluate(
    models: list[str],
    settings: EvalSettings | None = None,
    *,
    reference: str | None = None,
    labels: list[str] | None = None,
    progress: bool = True,
    out: Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate each model on the same text and tasks; returns (and with `out`, writes) the eval.json content.

    `settings`, or EvalSettings' fields as keyword `options`. Perplexity needs `data`; fidelity needs `data` and
    `reference`; tasks run through lm-eval. Every input is checked (models found, tokenizers consistent, tasks
    known, task files readable) before the first model loads.
    """
    from ffnfusion.io.device import parse_dtype
    from ffnfusion.io.source import load_model, resolve_model

    s = settings_from(EvalSettings, settings, options)
    data, tasks, task_data_dir, limit, max_tokens = s.data, s.tasks, s.task_data_dir, s.limit, s.max_tokens
    context_len, stride, batch_size, seed = s.context_len, s.stride, s.batch_size, s.seed
    _check_settings(models, data, tasks, reference, limit, max_tokens, context_len, stride, batch_size)
    torch_dtype = parse_dtype(s.dtype)
    device = str(resolve_device(s.device))
    names = _labels(models, labels)
    sources = [resolve_model(m) for m in models]
    ref_source = resolve_model(reference) if reference is not None else None
    if out is not None:
        check_eval_output(out, _inputs(sources, ref_source, data, task_data_dir))
    task_list = resolve_tasks(tasks or [], task_data_dir)
    manager = task_manager(task_list, task_data_dir) if task_list else None
    ref_tok, tokenizers = _tokenizers(models, sources, ref_source, reference)
    stream_for = _streams(data, s.text_field, ref_tok, max_tokens)

    scoring = _Scoring(context_len, stride, batch_size, limit, seed, progress, task_list, manager)
    recorded = _settings(
        data, context_len, stride, max_tokens, task_list, task_data_dir, limit, batch_size, torch_dtype, device, seed
    )
    ref_model = load_model(ref_source, torch_dtype, device) if ref_source is not None else None
    rows = []
    for spec, name, source, tok in zip(models, names, sources, tokenizers):
        started = time.perf_counter()
        model = ref_model if _same_model(source, ref_source) else load_model(source, torch_dtype, device)
        if scoring.batch_size is None:  # automatic: sized once, by the first models loaded, for every model
            scoring.batch_size = recorded["batch_size"] = _auto_batch(model, ref_model, device, context_len, task_list)
        torch.manual_seed(seed)
        row = _row(name, spec, model)
        # Only the reference is looked up: it is the model every run and every variant of a study scores again.
        key = _score_key(model, tok, stream_for, recorded, task_data_dir) if s.cache and model is ref_model else None
        cached = load_scores(key) if key else None
        if cached is not None:
            row.update(cached, cached_scores=True)
        else:
            _score(row, model, tok, ref_model, stream_for, scoring)
            if key:
                store_scores(key, row)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        if model is not ref_model:
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    result = _result(recorded, reference, rows)
    if out is not None:
        write_eval(result, out)
    return result


def _auto_batch(
    model: torch.nn.Module, ref_model: torch.nn.Module | None, device: str, context_len: int, task_list: list[Any]
) -> int:
    from ffnfusion.eval.batch import auto_batch_size, model_bytes

    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    loaded = model_bytes(model, ref_model)
    return auto_batch_size(device, vocab, context_len, bool(task_list), loaded)


def _score_key(
    model: torch.nn.Module,
    tok: Any,
    stream_for: Callable[[Any], torch.Tensor] | None,
    recorded: dict[str, Any],
    task_data_dir: str | Path | None,
) -> str:
    text = stream_digest(stream_for(tok)) if stream_for is not None else None
    task_files = files_digest(task_data_dir) if recorded["tasks"] else None
    return score_key(weights_digest(model), recorded, text, task_files)


def _check_settings(
    models: list[str],
    data: str | None,
    tasks: list[str] | None,
    reference: str | None,
    limit: int | None,
    max_tokens: int | None,
    context_len: int,
    stride: int | None,
    batch_size: int | None,
) -> None:
    if not models:
        raise EvalError("name at least one model to evaluate.")
    if data is None and not tasks:
        raise EvalError("nothing to evaluate: give --data TEXT (perplexity, fidelity) and/or --tasks.")
    if reference is not None and data is None:
        raise EvalError("--reference is used for fidelity on --data TEXT: give --data as well.")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be a positive number of items per task (got {limit}).")
    if max_tokens is not None and max_tokens < 2:
        raise EvalError(f"--max-tokens must be at least 2 (got {max_tokens}).")
    if batch_size is not None and batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1 (got {batch_size}); leave it out for the automatic size.")
    sliding_windows(max(context_len, 2), context_len, stride)  # validates context/stride before anything loads


def _tokenizers(models: list[str], sources: list[Any], ref_source: Any, reference: str | None) -> tuple[Any, list[Any]]:
    """(the reference's tokenizer, one per model): a model without one borrows the reference's; any other must
    equal it, since fidelity compares distributions token by token."""
    ref_tok = ref_source.tokenizer() if ref_source else None
    if ref_source is not None and ref_tok is None:
        raise EvalError(f"the reference {reference} has no tokenizer.")
    tokenizers = []
    for spec, source in zip(models, sources):
        tok = source.tokenizer()
        if tok is None:
            if ref_tok is None:
                raise EvalError(f"{spec} has no tokenizer: pass --reference with the original model to use its.")
            tok = ref_tok
        elif ref_tok is not None and (why := same_tokenizer(tok, ref_tok)):
            raise EvalError(
                f"{spec} and the reference {reference} have different tokenizers: {why}. Fidelity compares "
                "next-token distributions token by token, so both must use the same tokenizer."
            )
        tokenizers.append(tok)
    return ref_tok, tokenizers


def _streams(
    data: str | None, text_field: str, ref_tok: Any, max_tokens: int | None
) -> Callable[[Any], torch.Tensor] | None:
    """tokenizer -> the evaluation text's token stream, tokenized once per distinct tokenizer; None without text."""
    from ffnfusion.data import load_texts, tokenize_stream

    if data is None:
        return None
    texts = load_texts(data, text_field)
    streams: dict[int, torch.Tensor] = {}

    def stream_for(tok: Any) -> torch.Tensor:
        key = id(tok) if ref_tok is None else id(ref_tok)  # one stream when all tokenizers are the reference's
        if key not in streams:
            stream = tokenize_stream(tok, texts)
            streams[key] = stream[:max_tokens] if max_tokens else stream
        return streams[key]

    return stream_for


def _inputs(sources: list[Any], ref_source: Any, data: str | None, task_data_dir: str | Path | None) -> list[Input]:
    inputs = [("model", s.input_path) for s in sources] + [("data", data), ("task data", task_data_dir)]
    if ref_source is not None:
        inputs.append(("model", ref_source.input_path))
    return inputs


def _same_model(source: Any, ref_source: Any) -> bool:
    """A model that is the reference is loaded once (and scores KL 0 against itself without a second pass)."""
    return ref_source is not None and source.folder == ref_source.folder and source.gguf_file == ref_source.gguf_file


def _settings(
    data: str | None,
    context_len: int,
    stride: int | None,
    max_tokens: int | None,
    task_list: list[Any],
    task_data_dir: str | Path | None,
    limit: int | None,
    batch_size: int | None,
    torch_dtype: torch.dtype,
    device: str,
    seed: int,
) -> dict[str, Any]:
    return {
        "data": data,
        "context_len": context_len,
        "stride": context_len if stride is None else stride,
        "max_tokens": max_tokens,
        "tasks": [shown for shown, _ in task_list],
        "task_data_dir": str(task_data_dir) if task_data_dir is not None else None,
        "limit": limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": device,
        "seed": seed,
        "torch": torch.__version__,
        "lm_eval": _version("lm_eval") if task_list else None,
    }


@dataclass
class _Scoring:
    """How every model is scored: the same windows, batches, tasks and seed."""

    context_len: int
    stride: int | None
    batch_size: int | None  # None until the first model is loaded: automatic
    limit: int | None
    seed: int
    progress: bool
    task_list: list[Any]
    manager: Any


def _score(
    row: dict[str, Any],
    model: torch.nn.Module,
    tok: Any,
    ref_model: torch.nn.Module | None,
    stream_for: Callable[[Any], torch.Tensor] | None,
    sc: _Scoring,
) -> None:
    if stream_for is not None:
        # One pass: the model (and the reference, batch by batch) run once per window for both measurements.
        row["perplexity"], row["fidelity"] = score_windows(
            model, ref_model, stream_for(tok), sc.context_len, sc.stride, sc.batch_size, sc.progress
        )
    if sc.task_list:
        row["tasks"] = run_tasks(model, tok, sc.task_list, sc.manager, sc.limit, sc.batch_size, sc.seed)


def _row(name: str, spec: str, model: torch.nn.Module) -> dict[str, Any]:
    return {
        "label": name,
        "model": spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "perplexity": None,
        "fidelity": None,
        "tasks": {},
    }


def _result(settings: dict[str, Any], reference: str | None, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": EVAL_FORMAT,
        "version": EVAL_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "reference": reference,
        "models": rows,
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The models of an eval.json side by side: one column per model, one row per measurement."""
    models = result["models"]
    settings = result["settings"]
    header = "| | " + " | ".join(m["label"] for m in models) + " |"
    lines = [header, "|---|" + "---:|" * len(models)]

    def add(name: str, cells: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    if any(m["perplexity"] for m in models):
        tokens = next(m["perplexity"]["tokens"] for m in models if m["perplexity"])
        add(
            f"perplexity ({tokens:,} tokens, context {settings['context_len']}, stride {settings['stride']})",
            [_fmt(m["perplexity"] and m["perplexity"]["ppl"], 2) for m in models],
        )
    if any(m["fidelity"] for m in models):
        add("KL(reference ‖ model), nats/token", [_fmt(m["fidelity"] and m["fidelity"]["kl"], 4) for m in models])
        add("top-1 agreement with reference", [_fmt(m["fidelity"] and m["fidelity"]["top1"], 4) for m in models])
    accs: list[list[float]] = [[] for _ in models]
    for task in settings["tasks"]:
        first = next(m["tasks"][task] for m in models if task in m["tasks"])
        has_norm = "acc_norm" in first
        cells = []
        for i, m in enumerate(models):
            metrics = m["tasks"].get(task, {})
            cell = _fmt(metrics.get("acc"))
            if has_norm:
                cell += " / " + _fmt(metrics.get("acc_norm"))
            if "perplexity" in metrics:
                cell += f" (ppl {metrics['perplexity']:.2f})"
            if "acc" in metrics:
                accs[i].append(metrics["acc"])
            cells.append(cell)
        what = "acc / acc_norm" if has_norm else "acc (ppl)" if "perplexity" in first else "acc"
        add(f"{task} {what}, n={first.get('samples', '?')}", cells)
    if len(settings["tasks"]) > 1:
        add("mean acc", [_fmt(sum(a) / len(a)) if a else "–" for a in accs])
    return "\n".join(lines) + "\n"


def write_eval(result: dict[str, Any], out: Path) -> None:
    """eval.json and the Markdown table beside it (eval.md), each written to a temporary file and renamed."""
    out = Path(out).expanduser()
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown_table(result))
