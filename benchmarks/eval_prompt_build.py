"""CPU time lm-eval spends turning documents into requests, with its per-document template compilation (baseline)
and with ffnfusion's kept compilation (`eval.zero_shot._compile_templates_once`), side by side in one process.

    python benchmarks/eval_prompt_build.py --task-data-dir DATA --tasks mmlu --limit 200 --repeats 3

This cost does not depend on the model or the accelerator: it is Python on the host, paid once per model scored.
"""

from __future__ import annotations

import argparse
import statistics
import time

from lm_eval import utils

from ffnfusion.eval.zero_shot import _compile_templates_once, resolve_tasks, task_manager


def build_seconds(tasks: list[tuple[str, str]], data: str, limit: int | None) -> tuple[float, int]:
    """Seconds to build every request of `tasks` (task loading excluded), and how many requests."""
    loaded = task_manager(tasks, data).load([lm for _, lm in tasks])["tasks"].values()
    start, n = time.perf_counter(), 0
    for task in loaded:
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        n += len(task.instances)
    return time.perf_counter() - start, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task-data-dir", required=True)
    p.add_argument("--tasks", default="hellaswag,arc_easy,arc_challenge,piqa,winogrande,lambada_openai,mmlu")
    p.add_argument("--limit", type=int, default=200, help="items per task (per MMLU subject)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tasks = resolve_tasks(args.tasks.split(","), args.task_data_dir)
    _compile_templates_once()
    kept = utils.apply_template
    per_document = kept.original
    times: dict[str, list[float]] = {"per document (lm-eval)": [], "kept (ffnfusion)": []}
    for _ in range(args.repeats):  # alternate, so drift in the machine hits both alike
        for label, apply in zip(times, (per_document, kept), strict=True):
            utils.apply_template = apply
            seconds, n = build_seconds(tasks, args.task_data_dir, args.limit)
            times[label].append(seconds)
    base = statistics.median(times["per document (lm-eval)"])
    print(f"{args.tasks} at limit {args.limit}: {n:,} requests, median of {args.repeats}")
    for label, values in times.items():
        med = statistics.median(values)
        print(f"  {label:24s} {med:6.2f} s  ({base / med:.1f}x)")


if __name__ == "__main__":
    main()
