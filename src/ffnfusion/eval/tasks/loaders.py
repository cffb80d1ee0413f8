"""`custom_dataset` entry points named by the task YAMLs in this folder (lm-eval calls them with the task metadata).

lm-eval imports this file by path (`!function loaders.NAME`), so it only uses absolute imports.
"""

from __future__ import annotations

from typing import Any

import datasets

from ffnfusion.eval.tasks import load_docs, task_data_dir


def _split(task: str, split: str, **metadata: Any) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(load_docs(task, task_data_dir(metadata)))})


def hellaswag(**metadata: Any) -> datasets.DatasetDict:
    return _split("hellaswag", "validation", **metadata)


def arc_easy(**metadata: Any) -> datasets.DatasetDict:
    return _split("arc_easy", "test", **metadata)


def arc_challenge(**metadata: Any) -> datasets.DatasetDict:
    return _split("arc_challenge", "test", **metadata)


def piqa(**metadata: Any) -> datasets.DatasetDict:
    return _split("piqa", "validation", **metadata)


def winogrande(**metadata: Any) -> datasets.DatasetDict:
    return _split("winogrande", "validation", **metadata)


def lambada_openai(**metadata: Any) -> datasets.DatasetDict:
    return _split("lambada_openai", "test", **metadata)


def mmlu(subject: str, **metadata: Any) -> datasets.DatasetDict:
    data_dir = task_data_dir(metadata)
    test = datasets.Dataset.from_list(load_docs("mmlu", data_dir, subject, "test"))
    # The dev split only serves few-shot examples; lm-eval opens it even for zero-shot runs, so a folder without
    # dev files gets an empty one (asking for few-shot examples then fails inside lm-eval's sampler).
    if any(data_dir.rglob(f"{subject}_dev.csv")):
        dev = datasets.Dataset.from_list(load_docs("mmlu", data_dir, subject, "dev"))
    else:
        dev = test.select([])
    return datasets.DatasetDict({"test": test, "dev": dev})
