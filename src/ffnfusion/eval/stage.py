"""The `eval` stage: perplexity, fidelity to the original model, and zero-shot tasks through lm-eval-harness.

Perplexity and fidelity share one sliding-window scheme over a token stream (the usual Hugging Face recipe):
windows of `context_len` tokens start every `stride` tokens, and each window scores only the tokens no earlier
window scored, each with at least `context_len - stride` tokens of context (all of them when one window covers
the stream). A window's first token has no context inside it and is never scored, so with `stride <
context_len` every token after the stream's first is scored exactly once, and with non-overlapping windows
(`stride == context_len`) one token per window is skipped. The last window is moved back to end at the
stream's end, so all windows have the same length and batch without padding.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ffnfusion.io.device import resolve_device
from ffnfusion.io.output import Input, check_output_file, json_format_is


class EvalError(ValueError):
    """Evaluation input that cannot be used: bad settings, mismatched tokenizers, unknown tasks."""


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    score_from: int  # first token (stream index) whose prediction is scored in this window


def sliding_windows(n_tokens: int, context_len: int, stride: int | None = None) -> list[Window]:
    """The windows covering a stream of `n_tokens`; no target is scored twice (see the module docstring)."""
    stride = context_len if stride is None else stride
    if context_len < 2:
        raise EvalError(f"context length must be at least 2 tokens (got {context_len}).")
    if not 1 <= stride <= context_len:
        raise EvalError(f"stride must be between 1 and the context length {context_len} (got {stride}).")
    if n_tokens < 2:
        raise EvalError(f"the text has {n_tokens} token(s); at least 2 are needed to score a prediction.")
    windows, scored_to, begin = [], 1, 0
    while scored_to < n_tokens:
        end = min(begin + context_len, n_tokens)
        start = max(0, end - context_len)
        windows.append(Window(start, end, max(scored_to, start + 1)))
        scored_to = end
        begin += stride
    return windows


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _batches(
    stream: torch.Tensor, windows: list[Window], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(input ids [B, L], target ids [B, L-1], score mask [B, L-1], scored tokens) per batch of windows."""
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        ids = torch.stack([stream[w.begin : w.end] for w in chunk])
        length = ids.shape[1]
        # Logit at window position p predicts stream token begin + p + 1.
        target_pos = torch.stack([torch.arange(w.begin + 1, w.begin + length) for w in chunk])
        mask = target_pos >= torch.tensor([w.score_from for w in chunk])[:, None]
        yield ids, ids[:, 1:], mask, int(mask.sum())


def _check_stream(token_stream: torch.Tensor) -> torch.Tensor:
    if not isinstance(token_stream, torch.Tensor) or token_stream.dtype != torch.long or token_stream.ndim != 1:
        raise EvalError("token_stream must be a 1-D LongTensor of token ids.")
    return token_stream.cpu()


def _check_vocab(model: torch.nn.Module, token_stream: torch.Tensor, name: str = "model") -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and token_stream.numel() and int(token_stream.max()) >= vocab:
        raise EvalError(
            f"the text holds token id {int(token_stream.max())} but the {name}'s vocabulary has {vocab} entries: "
            "was it tokenized with another model's tokenizer?"
        )


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", disable=not enabled, dynamic_ncols=True)


# Elements of one [tokens, vocab] temporary: a batch's scored positions are reduced this many logits at a time
# (2**23 fp32 values = 32 MiB, a handful of them alive at once; 55 tokens at a 152k vocabulary, 170 at 49k), so
# memory depends neither on the number of windows nor on the batch size.
_CHUNK_ELEMENTS = 2**23


def _head_split(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, LM head) of a causal LM whose logits are exactly `lm_head(decoder(ids).last_hidden_state)`.

    Only the classes known to compute their logits that way (the supported families and DeciLM, exact types: a
    subclass may change its forward); None for any other module, which is then run whole.
    """
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    from ffnfusion.modeling.modeling_decilm import DeciLMForCausalLM

    known = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, DeciLMForCausalLM)
    if type(model) not in known:
        return None
    body, head = getattr(model, "model", None), model.get_output_embeddings()
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


class _NextTokenLogits:
    """Next-token logits of one batch of windows [B, L], computed for a few positions at a time.

    Models with a known LM head run only their decoder here, and the head is applied to the positions asked for,
    so a batch never holds its [B, L-1, V] logits (2.5 GB in fp32 for 8 x 512 tokens at a 152k vocabulary). Any
    other module (whose forward takes `input_ids` and returns logits) is run whole and its logits indexed.
    """

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor):
        ids = ids.to(_device_of(model))
        split = _head_split(model)
        if split is None:
            out = model(input_ids=ids, use_cache=False)
            self._head = None
            self._states = (out.logits if hasattr(out, "logits") else out[0])[:, :-1]
            self.vocab = self._states.shape[-1]
        else:
            body, self._head = split
            self._states = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            self.vocab = self._head.out_features

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, V] at (window `rows[i]`, position `cols[i]`); position p predicts token p + 1."""
        device = self._states.device
        x = self._states[rows.to(device), cols.to(device)]
        # fp32 at least: low-precision logits would bias the log-softmax.
        return (x if self._head is None else self._head(x)).float()


def _normalize(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u = logits - row max, exp(u), s = sum of exp(u) in float64) for fp32 logits [n, V].

    Log-probabilities over the last (vocabulary) dimension are u - log s. The sum is torch's `sum`, which adds
    pairwise (cascade summation): on SmolLM2's 49k vocabulary it is within 1e-8 of float64 per token, where the
    fused fp32 log_softmax kernel, which adds each vector lane sequentially, reads 3e-6 low (and the former
    cross-entropy over a non-last dimension 4e-5 low). The elementwise work stays in fp32, about the cost of one
    log_softmax.
    """
    u = logits - logits.amax(-1, keepdim=True)
    e = u.exp()
    return u, e, e.sum(-1).double()


@torch.inference_mode()
def _score(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    token_stream: torch.Tensor,
    context_len: int,
    stride: int | None,
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(perplexity of `model`, its fidelity to `reference` or None) in one pass over the windows.

    Each batch of windows is reduced to per-token sums as soon as it is computed: the reference and the model run
    on the same batch, their logits are taken `_CHUNK_ELEMENTS` at a time and normalized over the vocabulary (last)
    dimension (`_normalize`), per-token values are formed in float64 and summed in float64. Memory is flat in the
    number of windows and in the batch size; a model that is its own reference runs once.
    """
    stream = _check_stream(token_stream)
    _check_vocab(model, stream, "model")
    if reference is not None:
        _check_vocab(reference, stream, "reference")
    stride = context_len if stride is None else stride
    windows = sliding_windows(stream.numel(), context_len, stride)
    device = _device_of(reference if reference is not None else model)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, KL(reference || model), top-1 agreements
    total_tokens = 0
    desc = "perplexity" if reference is None else "perplexity, fidelity"
    with _progress(stream.numel() - 1, desc, progress) as bar:
        for ids, targets, mask, n in _batches(stream, windows, batch_size):
            logits = _NextTokenLogits(model, ids)
            ref = None
            if reference is not None:
                ref = logits if reference is model else _NextTokenLogits(reference, ids)
                if ref.vocab != logits.vocab:
                    raise EvalError(
                        f"model and reference have different vocabulary sizes ({logits.vocab} vs {ref.vocab}): "
                        "fidelity needs the same tokenizer."
                    )
            where = mask.nonzero()  # (window, position) of each scored prediction, in the order of targets[mask]
            scored_targets = targets[mask].to(device)
            step = max(1, _CHUNK_ELEMENTS // logits.vocab)
            for first in range(0, n, step):
                rows, cols = where[first : first + step].unbind(1)
                u, e, s = _normalize(logits(rows, cols).to(device))
                del e
                log_s = s.log()
                # -log q(target) = log s - u[target]
                sums[0] += (log_s - u.gather(1, scored_targets[first : first + step, None])[:, 0].double()).sum()
                if ref is None:
                    continue
                if ref is logits:
                    sums[2] += len(rows)  # KL 0, every top-1 agrees
                    continue
                ref_u, ref_e, ref_s = _normalize(ref(rows, cols))
                sums[2] += (ref_u.argmax(-1) == u.argmax(-1)).sum()
                # KL(p || q) = sum_v p_v (log p_v - log q_v) = E_p[ref_u - u] - log s_p + log s_q, p = ref_e / s_p.
                # The shifted logits are small where p is large; terms with p_v = 0 add nothing (even where
                # log q_v = -inf, which would make 0 * inf = nan).
                weighted = ref_u.sub_(u).masked_fill_(ref_e == 0, 0.0).mul_(ref_e)
                sums[1] += (weighted.sum(-1).double() / ref_s - ref_s.log() + log_s).sum()
                del weighted, ref_u, ref_e
            del u
            total_tokens += n
            bar.update(n)
            del logits, ref
    nll, kl, agree = sums.tolist()
    common = {"tokens": total_tokens, "windows": len(windows), "context_len": context_len, "stride": stride}
    ppl = {"ppl": math.exp(nll / total_tokens), "nll": nll / total_tokens, **common}
    if reference is None:
        return ppl, None
    return ppl, {"kl": kl / total_tokens, "top1": agree / total_tokens, **common}


def perplexity(
    model: torch.nn.Module,
    token_stream: torch.Tensor,
    context_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-weighted sliding-window perplexity of `model` on `token_stream` (1-D LongTensor).

    Returns {"ppl", "nll" (mean per scored token, nats), "tokens" (scored), "windows", "context_len", "stride"}.
    `stride` defaults to `context_len` (non-overlapping windows); a smaller stride gives each token more context.
    Works for any module whose forward takes `input_ids` and returns logits (transformers models, DeciLM).
    Log-probabilities are taken in float64 over the vocabulary, a bounded number of positions at a time.
    """
    return _score(model, None, token_stream, context_len, stride, batch_size, progress)[0]


def fidelity(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    token_stream: torch.Tensor,
    context_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """How closely `model` follows `reference` on `token_stream`, over the same windows as `perplexity`.

    Returns {"kl": mean KL(reference || model) of next-token distributions (nats per token),
    "top1": fraction of positions where both models' most likely next token is the same, "tokens", ...}.
    Both models run on one batch of windows at a time; memory does not grow with the number of windows.
    """
    fid = _score(model, reference, token_stream, context_len, stride, batch_size, progress)[1]
    assert fid is not None
    return fid


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot tasks through lm-eval-harness


def resolve_tasks(names: list[str], task_data_dir: str | Path | None) -> list[tuple[str, str]]:
    """(name shown in results, lm-eval task or group name) per requested task.

    With `task_data_dir`, the seven standard names (hellaswag, arc_easy, arc_challenge, piqa, winogrande,
    lambada_openai, mmlu) run ffnfusion's local definitions on the files found there; every other name, and the
    standard names without a data folder, must be an lm-eval task (which downloads its dataset from the hub).
    """
    from ffnfusion.eval.tasks import ALIASES, LOCAL_TASKS

    resolved, local_names = [], set(LOCAL_TASKS.values())
    for raw in names:
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name in local_names and task_data_dir is None:
            raise EvalError(f"task {raw!r} reads local files: pass --task-data-dir.")
        if task_data_dir is not None and name in LOCAL_TASKS:
            resolved.append((name, LOCAL_TASKS[name]))
        else:
            resolved.append((name, name))
    if len({lm for _, lm in resolved}) != len(resolved):
        raise EvalError(f"a task is named twice in {names}.")
    return resolved


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used for downloads (offline mode, no connection), or None.

    A connection is tried only without a proxy (through a proxy, the download itself has to tell).
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={os.environ[var]} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e})"
    return None


def _hub_cached(dataset: str) -> bool:
    """Whether a hub dataset is in the local caches (then `datasets` can use it without the hub), or a local path."""
    if Path(dataset).expanduser().exists():
        return True
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    prepared = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser() / dataset.replace("/", "___")
    return hub.is_dir() or prepared.is_dir()


def _hub_datasets(lm_name: str, manager: Any, depth: int = 0) -> list[str]:
    """The hub datasets an lm-eval task (or group: its members') loads, from its config (best effort)."""
    from ffnfusion.eval.tasks import HUB_DATASETS

    if lm_name in HUB_DATASETS:
        return list(HUB_DATASETS[lm_name])
    entry = getattr(manager, "task_index", {}).get(lm_name) if manager is not None else None
    config = getattr(entry, "cfg", None) or (entry.get("cfg") if isinstance(entry, dict) else None) or {}
    if not isinstance(config, dict):
        return []
    if isinstance(config.get("dataset_path"), str):
        return [config["dataset_path"]]
    found: list[str] = []
    members = config.get("task")
    if depth < 3 and isinstance(members, list):
        for member in members:
            if isinstance(member, str):
                found += [d for d in _hub_datasets(member, manager, depth + 1) if d not in found]
    return found


def check_task_downloads(tasks: list[tuple[str, str]], manager: Any = None) -> None:
    """Refuse, before any model loads, tasks whose dataset must come from an unreachable hub; say what to do instead.

    Without `manager`, only the standard task names are checked (their datasets are known without indexing lm-eval's
    tasks, which takes a while); with it, every lm-eval task whose config names a dataset.
    """
    from ffnfusion.eval.tasks import FILE_HELP, LOCAL_TASKS

    local = set(LOCAL_TASKS.values())
    needs = {}
    for shown, lm in tasks:
        if lm in local:
            continue
        missing = [d for d in _hub_datasets(lm, manager) if not _hub_cached(d)]
        if missing:
            needs[shown] = missing
    if not needs:
        return
    why = _hub_unreachable()
    if why is None:
        return
    lines = [f"  - {task}: the dataset {', '.join(ds)}" for task, ds in needs.items()]
    fixes = [f"  - {task}: {FILE_HELP[task]}" for task in needs if task in FILE_HELP]
    message = (
        f"the Hugging Face hub cannot be used ({why}), and these tasks need a download that is not in the local "
        "cache:\n" + "\n".join(lines)
    )
    if fixes:
        message += (
            "\nRun them from local files instead: put these files in a folder (any sub-folder will do) and pass "
            "--task-data-dir FOLDER:\n" + "\n".join(fixes)
        )
    others = [task for task in needs if task not in FILE_HELP]
    if others:
        message += (
            f"\n{', '.join(others)} cannot read local files: download the dataset once where the hub is reachable "
            "(it is kept in the Hugging Face cache), or leave the task out of --tasks."
        )
    raise EvalError(message)


def task_manager(tasks: list[tuple[str, str]], task_data_dir: str | Path | None) -> Any:
    """An lm-eval TaskManager that knows the local tasks, and lm-eval's own ones when any are asked for.

    Unknown names are reported here, before any model is loaded.
    """
    from lm_eval.tasks import TaskManager

    from ffnfusion.eval.tasks import LOCAL_TASKS, TASKS_DIR, check_task_files

    local = set(LOCAL_TASKS.values())
    needs_hub = any(lm not in local for _, lm in tasks)
    if needs_hub:
        check_task_downloads(tasks)  # the standard names, before lm-eval indexes its tasks


    metadata = {"task_data_dir": str(Path(task_data_dir).expanduser())} if task_data_dir is not None else {}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_hub, metadata=metadata)
    unknown = [shown for shown, lm in tasks if lm not in manager.all_tasks]
    if unknown:
        raise EvalError(
            f"unknown task(s): {', '.join(unknown)}. Local tasks (with --task-data-dir): {', '.join(LOCAL_TASKS)}; "
            "other names must be lm-eval tasks (`lm_eval ls tasks` lists them)."
        )
    if needs_hub:
        check_task_downloads(tasks, manager)
    if task_data_dir is not None:
        standard = {v: k for k, v in LOCAL_TASKS.items()}
        check_task_files([standard[lm] for _, lm in tasks if lm in local], Path(task_data_dir).expanduser())
    return manager


def _task_metrics(results: dict[str, Any], lm_name: str) -> dict[str, Any]:
    """lm-eval's "metric,filter" keys of one task or group -> {metric: value, metric_stderr: value, samples: n}."""
    row = results["results"].get(lm_name) or results.get("groups", {}).get(lm_name, {})
    metrics: dict[str, Any] = {}
    for key, value in row.items():
        metric, sep, filt = key.partition(",")
        if sep and filt == "none" and isinstance(value, int | float):
            metrics[metric] = float(value)
    members = results.get("group_subtasks", {}).get(lm_name) or [lm_name]
    metrics["samples"] = sum(int(results["n-samples"].get(m, {}).get("effective", 0)) for m in members)
    return metrics


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _quiet_custom_dataset_notice() -> None:
    """lm-eval warns once per task that reads a custom dataset (57 times for MMLU); the notice is not for our users."""
    logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropNotice) for f in logger.filters):
        logger.addFilter(_DropNotice())


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[tuple[str, str]],
    manager: Any,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    bootstrap_iters: int = 1000,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of an in-memory model on lm-eval tasks, scored by lm-eval itself (its HFLM wrapper).

    Returns {task: {"acc", "acc_norm" (where defined), "perplexity" (LAMBADA), "*_stderr", "samples"}}.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    _quiet_custom_dataset_notice()

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise EvalError("the tokenizer has neither a BOS nor an EOS token; lm-eval needs one to start a context.")
    # softmax in fp32: bf16 log-probabilities round differently per batch and would make acc depend on batch size.
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        softmax_dtype=torch.float32,
        prefix_token_id=prefix,
    )
    results = simple_evaluate(
        lm,
        tasks=[lm_name for _, lm_name in tasks],
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return {shown: _task_metrics(results, lm_name) for shown, lm_name in tasks}


# ---------------------------------------------------------------------------------------------------------------
# The eval stage: several models side by side


EVAL_FORMAT = "ffnfusion-eval"
EVAL_VERSION = 1


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
    *,
    reference: str | None = None,
    data: str | None = None,
    text_field: str = "text",
    tasks: list[str] | None = None,
    task_data_dir: str | Path | None = None,
    limit: int | None = None,
    context_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "auto",
    seed: int = 0,
    labels: list[str] | None = None,
    progress: bool = True,
    out: Path | None = None,
) -> dict[str, Any]:
    """Evaluate each model on the same text and tasks; returns (and with `out`, writes) the eval.json content.

    Perplexity needs `data`; fidelity needs `data` and `reference`; tasks run through lm-eval. Every input is
    checked (models found, tokenizers consistent, tasks known, task files readable) before the first model loads.
    """
    from ffnfusion.data import load_texts, tokenize_stream
    from ffnfusion.io.device import parse_dtype
    from ffnfusion.io.source import load_model, resolve_model

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
    sliding_windows(max(context_len, 2), context_len, stride)  # validates context/stride before anything loads
    torch_dtype = parse_dtype(dtype)
    device = str(resolve_device(device))
    names = _labels(models, labels)
    sources = [resolve_model(m) for m in models]
    ref_source = resolve_model(reference) if reference is not None else None
    if out is not None:
        inputs = [("model", s.input_path) for s in sources] + [("data", data), ("task data", task_data_dir)]
        if ref_source is not None:
            inputs.append(("model", ref_source.input_path))
        check_eval_output(out, inputs)
    task_list = resolve_tasks(tasks or [], task_data_dir)
    manager = task_manager(task_list, task_data_dir) if task_list else None

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

    texts = load_texts(data, text_field) if data is not None else None
    streams: dict[int, torch.Tensor] = {}

    def stream_for(tok: Any) -> torch.Tensor:
        key = id(tok) if ref_tok is None else id(ref_tok)  # one stream when all tokenizers are the reference's
        if key not in streams:
            stream = tokenize_stream(tok, texts)
            streams[key] = stream[:max_tokens] if max_tokens else stream
        return streams[key]

    ref_model = load_model(ref_source, torch_dtype, device) if ref_source is not None else None
    rows = []
    for spec, name, source, tok in zip(models, names, sources, tokenizers):
        started = time.perf_counter()
        same_as_ref = (
            ref_source is not None and source.folder == ref_source.folder and (source.gguf_file == ref_source.gguf_file)
        )
        model = ref_model if same_as_ref else load_model(source, torch_dtype, device)
        torch.manual_seed(seed)
        row: dict[str, Any] = {
            "label": name,
            "model": spec,
            "parameters": sum(p.numel() for p in model.parameters()),
            "perplexity": None,
            "fidelity": None,
            "tasks": {},
        }
        if texts is not None:
            stream = stream_for(tok)
            # One pass: the model (and the reference, batch by batch) run once per window for both measurements.
            row["perplexity"], row["fidelity"] = _score(
                model, ref_model, stream, context_len, stride, batch_size, progress
            )
        if task_list:
            row["tasks"] = run_tasks(model, tok, task_list, manager, limit, batch_size, seed)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        if model is not ref_model:
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    result = {
        "format": EVAL_FORMAT,
        "version": EVAL_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
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
        },
        "reference": reference,
        "models": rows,
    }
    if out is not None:
        write_eval(result, out)
    return result


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
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(result, indent=2) + "\n"), (out.with_suffix(".md"), markdown_table(result))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
