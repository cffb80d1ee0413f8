"""`ffnfusion run`'s checks before the first stage: every input of the stages that will run, and option values.

Input: the RunConfig and the stages that will run. Output: nothing, or a RunConfigError listing every problem (or
the first stage's own error for a missing file), so a wrong eval text path, say, is not reported only after analyze,
plan, fuse and heal have run. Only cheap checks: headers of the model's weight files, existence of text and task
files, option values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ffnfusion.pipeline.config import RunConfig, RunConfigError, _positive, _type_problems


def preflight(cfg: RunConfig, stages: list[str]) -> None:
    from ffnfusion.io.device import resolve_device
    from ffnfusion.io.source import resolve_model

    problems: list[str] = []
    for stage in stages:
        if stage != "report":
            problems += _type_problems(stage, getattr(cfg, stage))
    if problems:
        raise RunConfigError("Invalid run configuration:\n  - " + "\n  - ".join(problems))
    resolve_model(cfg.model)
    if cfg.device is not None:
        resolve_device(cfg.device)
    checks = {
        "analyze": _check_analyze,
        "plan": _check_plan,
        "fuse": _check_fuse,
        "heal": _check_heal,
        "eval": _check_eval,
        "bench": _check_bench,
    }
    for stage, check in checks.items():
        if stage in stages:
            check(cfg, getattr(cfg, stage), problems)
    if problems:
        raise RunConfigError("Invalid run configuration:\n  - " + "\n  - ".join(problems))


def _check_analyze(cfg: RunConfig, a: dict[str, Any], problems: list[str]) -> None:
    from ffnfusion.data import check_text_source
    from ffnfusion.io.device import parse_dtype

    check_text_source(a.get("data", cfg.data), "data")
    _positive(problems, "analyze", a, {"samples": 1, "seq_len": 2, "max_window": 2, "batch_size": 1})
    if a.get("dtype") not in (None, "auto"):
        parse_dtype(a["dtype"])


def _check_plan(cfg: RunConfig, pl: dict[str, Any], problems: list[str]) -> None:
    if pl.get("engines"):
        from ffnfusion.plan.settings import PlanSettings

        try:  # before any stage runs, not after the analysis
            PlanSettings(**pl).check_engines()
        except ValueError as e:
            problems.append(f"plan.engines: {e}")
    if pl.get("costs"):
        costs = Path(pl["costs"]).expanduser()
        if not costs.is_file():
            what = "is a directory" if costs.is_dir() else "not found"
            problems.append(f"plan.costs: {costs} {what}; give a JSON file of measured costs")


def _check_fuse(cfg: RunConfig, f: dict[str, Any], problems: list[str]) -> None:
    from ffnfusion.io.device import parse_dtype

    if f.get("dtype"):
        parse_dtype(f["dtype"])


def _check_heal(cfg: RunConfig, h: dict[str, Any], problems: list[str]) -> None:
    from ffnfusion.data import check_text_source
    from ffnfusion.heal.settings import HealSettings

    data = h.get("data", [cfg.data])
    for spec in [data] if isinstance(data, str) else data:
        check_text_source(spec, "heal.data")
    names = set(HealSettings.model_fields)
    options = {"data": [data] if isinstance(data, str) else data, "seed": cfg.seed}
    HealSettings(**{**{k: v for k, v in h.items() if k in names}, **options}).check()


def _check_eval(cfg: RunConfig, e: dict[str, Any], problems: list[str]) -> None:
    from ffnfusion.data import check_text_source
    from ffnfusion.eval.stage import resolve_tasks
    from ffnfusion.eval.tasks import LOCAL_TASKS, check_task_files
    from ffnfusion.io.device import parse_dtype

    text = e.get("data", cfg.eval_data or (None if cfg.data == "self" else cfg.data))
    if text is not None:
        check_text_source(text, "eval.data" if "data" in e else "eval_data")
    _positive(problems, "eval", e, {"context_len": 2, "limit": 1, "max_tokens": 2, "batch_size": 1})
    parse_dtype(e.get("dtype", "float32"))
    folder = e.get("task_data_dir")
    if folder is not None and not Path(folder).expanduser().is_dir():
        what = "is a file" if Path(folder).expanduser().exists() else "not found"
        problems.append(f"eval.task_data_dir: {folder} {what}; give the folder holding the task files")
    elif e.get("tasks"):
        tasks = e["tasks"].split(",") if isinstance(e["tasks"], str) else list(e["tasks"])
        resolved = resolve_tasks(tasks, folder)
        local = {v: k for k, v in LOCAL_TASKS.items()}
        if folder is not None:
            check_task_files([local[lm] for _, lm in resolved if lm in local], Path(folder).expanduser())


def _check_bench(cfg: RunConfig, b: dict[str, Any], problems: list[str]) -> None:
    prompt = b.get("prompt_file")
    if prompt is not None and not Path(prompt).expanduser().is_file():
        problems.append(f"bench.prompt_file: {prompt} is not a file; give a text file to cut prompts from")
    _positive(problems, "bench", b, {"prompt_len": 1, "new_tokens": 1, "repeats": 1})
