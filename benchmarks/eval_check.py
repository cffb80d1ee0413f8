"""Check ffnfusion's local task definitions against lm-eval's own bundled task configs, item for item.

For each task, the local file is rewritten in the schema of the Hugging Face dataset that lm-eval's standard
task reads (ai2_arc, piqa, winogrande, lambada_openai, hellaswag's raw fields, cais/mmlu), and lm-eval's own
YAML for that task is run on it unchanged except for where the documents come from (`dataset_path: json`).
The same model is then scored by ffnfusion's local task on the same first N items. Identical prompts and
scoring give identical accuracies; any difference is printed with the per-task figures.

    python benchmarks/eval_check.py MODEL --task-data-dir DIR --limit 200 [--out check.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lm_eval
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from ffnfusion.eval.tasks import load_docs
from ffnfusion.eval.zero_shot import resolve_tasks, run_tasks, task_manager
from ffnfusion.io.source import load_model, resolve_model

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
STANDARD_YAML = {
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
}
MMLU_SAMPLE = ("abstract_algebra", "anatomy", "high_school_us_history", "professional_law", "world_religions")


def hub_schema(task: str, data_dir: Path) -> list[dict]:
    """The local items in the schema lm-eval's standard task expects from the hub."""
    docs = load_docs(task, data_dir)
    if task == "winogrande":
        rows = []
        for d in docs:
            a, b = d["options"]
            cut = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            # Any cut inside the shared prefix rebuilds the same two choice strings (prefix + option).
            rows.append(
                {
                    "sentence": a[:cut] + "_ " + d["target"],
                    "option1": a[cut:],
                    "option2": b[cut:],
                    "answer": str(d["label"] + 1),
                }
            )
        return rows
    if task == "hellaswag":
        rows = []
        for d in docs:
            label, _, ctx = d["query"].partition(": ")
            rows.append(
                {"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": d["choices"], "label": d["label"]}
            )
        return rows
    return docs


def standard_config(task: str, data_file: Path, split: str) -> dict:
    """lm-eval's bundled YAML for `task`, unchanged except that its documents come from a local JSON file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    full = load_yaml(LM_EVAL_TASKS / STANDARD_YAML[task][0], resolve_func=True)  # includes and functions resolved
    full.pop("include", None)
    full.update(
        task=f"std_{task}",
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(data_file)}},
        tag=[],
    )
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        full.pop(key, None)
    full["test_split" if split == "test" else "validation_split"] = split
    return full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--task-data-dir", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,piqa,winogrande,lambada_openai,hellaswag,mmlu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    names = args.tasks.split(",")
    source = resolve_model(args.model)
    model = load_model(source, torch.float32, args.device)
    tok = source.tokenizer()
    started = time.perf_counter()
    local = run_tasks(
        model,
        tok,
        resolve_tasks(names, args.task_data_dir),
        task_manager(resolve_tasks(names, args.task_data_dir), args.task_data_dir),
        args.limit,
        args.batch_size,
    )

    configs, groups = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in names:
            if task == "mmlu":
                members = []
                for subject in MMLU_SAMPLE:
                    file = Path(tmp) / f"mmlu_{subject}.jsonl"
                    file.write_text(
                        "".join(json.dumps(d) + "\n" for d in load_docs("mmlu", args.task_data_dir, subject))
                    )
                    cfg = load_yaml_mmlu(subject)
                    cfg.update(
                        task=f"std_mmlu_{subject}",
                        dataset_path="json",
                        dataset_name=None,
                        dataset_kwargs={"data_files": {"test": str(file)}},
                        tag=[],
                    )
                    cfg.pop("fewshot_split", None)
                    configs.append(cfg)
                    members.append(cfg["task"])
                groups["mmlu"] = members
                continue
            file = Path(tmp) / f"{task}.jsonl"
            file.write_text("".join(json.dumps(d) + "\n" for d in hub_schema(task, args.task_data_dir)))
            configs.append(standard_config(task, file, STANDARD_YAML[task][1]))
        lm = HFLM(
            pretrained=model,
            tokenizer=tok,
            backend="causal",
            batch_size=args.batch_size,
            softmax_dtype=torch.float32,
            prefix_token_id=tok.bos_token_id,
        )
        std = simple_evaluate(
            lm, tasks=configs, task_manager=TaskManager(), limit=args.limit, log_samples=False, bootstrap_iters=1000
        )["results"]
        # The local MMLU group covers 57 subjects; compare it subject by subject on the sample instead.
        mmlu_local = {}
        if "mmlu" in names:
            subjects = resolve_tasks(["mmlu"], args.task_data_dir)
            manager = task_manager(subjects, args.task_data_dir)
            per = [(s, f"local_mmlu_{s}") for s in MMLU_SAMPLE]
            mmlu_local = run_tasks(model, tok, per, manager, args.limit, args.batch_size)

    rows = []
    for task in names:
        if task == "mmlu":
            for subject in MMLU_SAMPLE:
                rows.append((f"mmlu/{subject}", mmlu_local[subject], std[f"std_mmlu_{subject}"]))
        else:
            rows.append((task, local[task], std[f"std_{task}"]))
    report = []
    print(f"{'task':32} {'metric':9} {'ffnfusion':>10} {'lm-eval':>10}")
    for name, ours, theirs in rows:
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in ours:
                t = theirs.get(f"{metric},none")
                # Accuracies are counts and must match exactly; a perplexity sums fp32 log-likelihoods computed in
                # batches that lm-eval composes differently for different task sets, so it may move in the 7th digit.
                same = t == ours[metric] if metric != "perplexity" else abs(t / ours[metric] - 1) < 1e-6
                print(f"{name:32} {metric:9} {ours[metric]:10.4f} {t:10.4f} {'' if same else 'DIFF'}")
                report.append(
                    {
                        "task": name,
                        "metric": metric,
                        "ffnfusion": ours[metric],
                        "lm_eval": t,
                        "samples": ours["samples"],
                    }
                )
    print(f"{time.perf_counter() - started:.1f} s")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "limit": args.limit, "rows": report}, indent=2))


def load_yaml_mmlu(subject: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(LM_EVAL_TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml", resolve_func=True)
    cfg.pop("include", None)
    return cfg


if __name__ == "__main__":
    main()
