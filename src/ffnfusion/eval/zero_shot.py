"""The `eval` stage's zero-shot tasks: lm-eval-harness on local task files or hub datasets, with the checks
that say which task needs which download before any model loads."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ffnfusion.eval.scoring import EvalError


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


def _compile_templates_once() -> None:
    """Keep lm-eval's compiled prompt templates, one per template string.

    lm-eval 0.4 compiles a task's jinja templates again for every document it renders (lm-evaluation-harness issue
    1286). MMLU renders two per document: at 200 items a subject, building its requests took 10.4 s per model scored
    on a 2-core CPU, 0.6 s with this (benchmarks/eval_prompt_build.py), whatever the accelerator. Rendering is
    unchanged: the same Template object lm-eval would compile renders each document.
    """
    from lm_eval import utils

    original = getattr(utils, "apply_template", None)
    env = getattr(utils, "env", None)
    if original is None or env is None or getattr(original, "compiles_once", False):
        return
    compiled = functools.lru_cache(maxsize=4096)(env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        if not isinstance(template, str):
            return original(template, doc)
        return compiled(template).render(**doc)

    apply_template.compiles_once = True  # type: ignore[attr-defined]
    apply_template.original = original  # type: ignore[attr-defined]
    utils.apply_template = apply_template


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
    _compile_templates_once()

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
