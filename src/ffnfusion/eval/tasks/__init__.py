"""lm-eval-harness task definitions that read local copies of seven standard benchmarks.

Each reader turns a local file into the SAME document schema as the Hugging Face dataset behind lm-eval's
standard task (ARC: question/choices/answerKey, PIQA: goal/sol1/sol2/label, LAMBADA: text, MMLU:
question/choices/answer, ...), and each YAML in this folder repeats the standard task's prompt, choices and
metrics, so a local task scores exactly like the standard one would on the same items. The files are found by
name anywhere under the `task_data_dir` that lm-eval passes in as task metadata:

    hellaswag       hellaswag_val_full.txt[.bz2]  llama.cpp layout: 6 lines per item (context, gold 0-3, 4 endings)
    arc_easy        arc_easy.jsonl                 llm-foundry: {"query": "Question: ...", "choices", "gold"}
    arc_challenge   arc_challenge.jsonl            same
    piqa            piqa.jsonl                     same (two choices)
    winogrande      winogrande.jsonl               llm-foundry: {"context_options": [2], "continuation", "gold"}
    lambada_openai  lambada_openai.jsonl           llm-foundry: {"context", "continuation"}
    mmlu            <subject>_test.csv (+ _dev)    header question,choice0..choice3,answer (answer 0-3)
"""

from __future__ import annotations

import bz2
import csv
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ffnfusion.data import DataError, read_jsonl

TASKS_DIR = Path(__file__).resolve().parent

# Standard lm-eval name -> the local task (or group) defined in this folder.
LOCAL_TASKS = {
    "hellaswag": "local_hellaswag",
    "arc_easy": "local_arc_easy",
    "arc_challenge": "local_arc_challenge",
    "piqa": "local_piqa",
    "winogrande": "local_winogrande",
    "lambada_openai": "local_lambada_openai",
    "mmlu": "local_mmlu",
}
# "lambada" alone means lambada_openai here, the variant the local file holds.
ALIASES = {"lambada": "lambada_openai", "arc_e": "arc_easy", "arc_c": "arc_challenge"}

MMLU_SUBJECTS = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)

FILE_NAMES = {
    "hellaswag": ("hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt"),
    "arc_easy": ("arc_easy.jsonl",),
    "arc_challenge": ("arc_challenge.jsonl",),
    "piqa": ("piqa.jsonl",),
    "winogrande": ("winogrande.jsonl",),
    "lambada_openai": ("lambada_openai.jsonl",),
}


# What to put under --task-data-dir for each standard task (said when its hub download is impossible).
FILE_HELP = {
    "hellaswag": "hellaswag_val_full.txt (or .txt.bz2; llama.cpp's file: 6 lines per item)",
    "arc_easy": 'arc_easy.jsonl (llm-foundry: {"query", "choices", "gold"} per line)',
    "arc_challenge": 'arc_challenge.jsonl (llm-foundry: {"query", "choices", "gold"} per line)',
    "piqa": 'piqa.jsonl (llm-foundry: {"query", "choices" (2), "gold"} per line)',
    "winogrande": 'winogrande.jsonl (llm-foundry: {"context_options", "continuation", "gold"} per line)',
    "lambada_openai": 'lambada_openai.jsonl (llm-foundry: {"context", "continuation"} per line)',
    "mmlu": "<subject>_test.csv for each of the 57 subjects (header question,choice0..choice3,answer)",
}
# The hub dataset behind lm-eval's standard task of the same name (what it would download).
HUB_DATASETS = {
    "hellaswag": ("Rowan/hellaswag",),
    "arc_easy": ("allenai/ai2_arc",),
    "arc_challenge": ("allenai/ai2_arc",),
    "piqa": ("baber/piqa",),
    "winogrande": ("allenai/winogrande",),
    "lambada_openai": ("EleutherAI/lambada_openai",),
    "mmlu": ("cais/mmlu",),
}


def task_data_dir(metadata: dict[str, Any]) -> Path:
    """The folder of local task files, from the task metadata lm-eval passes to a custom dataset."""
    value = metadata.get("task_data_dir")
    if not value:
        raise DataError(
            "local tasks read files from a folder: pass --task-data-dir DIR (lm_eval: --metadata "
            '\'{"task_data_dir": "DIR"}\').'
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"task data folder not found: {path}")
    return path


def find_file(data_dir: Path, names: tuple[str, ...], task: str) -> Path:
    """The one file under `data_dir` named one of `names` (earlier names preferred), or an error naming it."""
    for name in names:
        found = sorted(p for p in data_dir.rglob(name) if p.is_file())
        if len(found) > 1:
            listing = ", ".join(str(p) for p in found)
            raise DataError(f"{task}: several files named {name} under {data_dir} ({listing}); keep one.")
        if found:
            return found[0]
    raise DataError(f"{task}: no {' or '.join(names)} under {data_dir}.")


def _jsonl(path: Path, fields: dict[str, type]) -> list[dict[str, Any]]:
    rows = []
    for n, row in read_jsonl(path):
        for key, kind in fields.items():
            if not isinstance(row.get(key), kind):
                raise DataError(f"{path}:{n} needs a field {key!r} of type {kind.__name__}.")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no items.")
    return rows


def _check_gold(path: Path, n: int, gold: Any, choices: int) -> int:
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < choices:
        raise DataError(f"{path}:{n}: gold answer {gold!r} is not an index into its {choices} choices.")
    return gold


def _strip_question(query: str) -> str:
    query = query.rstrip("\n")
    return query[len("Question: ") :] if query.startswith("Question: ") else query


def read_arc(path: Path) -> list[dict[str, Any]]:
    """llm-foundry ARC -> allenai/ai2_arc schema (question, choices.text/label, answerKey)."""
    docs = []
    for n, row in enumerate(_jsonl(path, {"query": str, "choices": list, "gold": int}), 1):
        labels = [chr(ord("A") + i) for i in range(len(row["choices"]))]
        gold = _check_gold(path, n, row["gold"], len(labels))
        docs.append(
            {
                "id": f"{path.stem}-{n}",
                "question": _strip_question(row["query"]),
                "choices": {"text": [str(c) for c in row["choices"]], "label": labels},
                "answerKey": labels[gold],
            }
        )
    return docs


def read_piqa(path: Path) -> list[dict[str, Any]]:
    """llm-foundry PIQA -> the piqa schema (goal, sol1, sol2, label)."""
    docs = []
    for n, row in enumerate(_jsonl(path, {"query": str, "choices": list, "gold": int}), 1):
        if len(row["choices"]) != 2:
            raise DataError(f"{path}:{n}: PIQA items have 2 choices, this one has {len(row['choices'])}.")
        gold = _check_gold(path, n, row["gold"], 2)
        docs.append(
            {"goal": _strip_question(row["query"]), "sol1": row["choices"][0], "sol2": row["choices"][1], "label": gold}
        )
    return docs


def read_winogrande(path: Path) -> list[dict[str, Any]]:
    """llm-foundry WinoGrande: the two sentence prefixes (blank filled) and the shared continuation.

    lm-eval scores WinoGrande "partially": the continuation's likelihood after each filled-in prefix; these
    fields are exactly its doc_to_choice and doc_to_target, so no reconstruction of the "_" sentence is needed.
    """
    docs = []
    for n, row in enumerate(_jsonl(path, {"context_options": list, "continuation": str, "gold": int}), 1):
        if len(row["context_options"]) != 2:
            raise DataError(f"{path}:{n}: WinoGrande items have 2 context options.")
        gold = _check_gold(path, n, row["gold"], 2)
        docs.append(
            {"options": [str(o) for o in row["context_options"]], "target": row["continuation"].strip(), "label": gold}
        )
    return docs


def read_lambada(path: Path) -> list[dict[str, Any]]:
    """llm-foundry LAMBADA -> the lambada_openai schema: `text` whose last space-separated word is the target."""
    docs = []
    for n, row in enumerate(_jsonl(path, {"context": str, "continuation": str}), 1):
        word = row["continuation"].strip()
        if not word or " " in word:
            raise DataError(f"{path}:{n}: the LAMBADA continuation must be one word (got {row['continuation']!r}).")
        docs.append({"text": row["context"].rstrip(" ") + " " + word})
    return docs


def _hellaswag_clean(text: str) -> str:
    # lm-eval's HellaSwag preprocessing (WikiHow bracket artefacts); a no-op on llama.cpp's already-cleaned file.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[dict[str, Any]]:
    """llama.cpp's HellaSwag text (6 lines per item) -> lm-eval's processed docs (query, choices, label)."""
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline=None) as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not readable HellaSwag text ({e}).") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or len(lines) % 6:
        raise DataError(f"{path}: HellaSwag text has 6 lines per item, but the file has {len(lines)} lines.")
    docs = []
    for first in range(0, len(lines), 6):
        ctx, gold, *endings = lines[first : first + 6]
        if gold.strip() not in {"0", "1", "2", "3"}:
            raise DataError(f"{path}:{first + 2}: expected the gold ending 0-3, got {gold!r}.")
        docs.append(
            {"query": _hellaswag_clean(ctx), "choices": [_hellaswag_clean(e) for e in endings], "label": gold.strip()}
        )
    return docs


def read_mmlu(path: Path) -> list[dict[str, Any]]:
    """MMLU CSV with a header row (question, choice0..choice3, answer 0-3) -> the cais/mmlu schema."""
    header = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != header:
                raise DataError(f"{path}: expected the header {','.join(header)}, got {reader.fieldnames}.")
            docs = []
            for row in reader:
                answer = (row["answer"] or "").strip()
                if answer not in {"0", "1", "2", "3"}:
                    raise DataError(f"{path}:{reader.line_num}: answer {answer!r} is not 0-3.")
                choices = [row[f"choice{i}"] for i in range(4)]
                if row["question"] is None or any(c is None for c in choices):
                    raise DataError(f"{path}:{reader.line_num}: the row has fewer than 6 columns.")
                docs.append(
                    {
                        "question": row["question"],
                        "subject": path.stem.rsplit("_", 1)[0],
                        "choices": choices,
                        "answer": int(answer),
                    }
                )
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text.") from None
    if not docs:
        raise DataError(f"{path} holds no questions.")
    return docs


READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    "hellaswag": read_hellaswag,
    "arc_easy": read_arc,
    "arc_challenge": read_arc,
    "piqa": read_piqa,
    "winogrande": read_winogrande,
    "lambada_openai": read_lambada,
}


def task_files(task: str, data_dir: Path) -> list[Path]:
    """The local files a standard task name reads (all 57 subjects' test files for mmlu)."""
    if task == "mmlu":
        return [find_file(data_dir, (f"{s}_test.csv",), f"mmlu ({s})") for s in MMLU_SUBJECTS]
    return [find_file(data_dir, FILE_NAMES[task], task)]


def load_docs(task: str, data_dir: Path, subject: str | None = None, split: str = "test") -> list[dict[str, Any]]:
    """The documents of one local task, parsed and checked (MMLU: one subject and split)."""
    if task == "mmlu":
        if subject not in MMLU_SUBJECTS:
            raise DataError(f"unknown MMLU subject {subject!r}.")
        return read_mmlu(find_file(data_dir, (f"{subject}_{split}.csv",), f"mmlu ({subject})"))
    return READERS[task](find_file(data_dir, FILE_NAMES[task], task))


def check_task_files(tasks: list[str], data_dir: Path) -> None:
    """Parse every local file the tasks need, so a bad file is reported before any model is loaded."""
    for task in tasks:
        if task == "mmlu":
            for subject in MMLU_SUBJECTS:
                load_docs(task, data_dir, subject)
        else:
            load_docs(task, data_dir)
