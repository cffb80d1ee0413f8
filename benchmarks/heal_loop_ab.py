"""Why `ffnfusion heal` trains slower than `heal_speed.py`: the product's own `heal()` on a real student, teacher and
corpus, with one difference at a time turned off, all in one process on one GPU.

On the H200, `ffnfusion heal` ran at 96,100 tokens/s steady (0.682 s per 128 x 512 step, from heal_log.jsonl's
elapsed_s), while `heal_speed.py --variants product` ran at 146,315 at the same micro-batch. On an H100 this script
measured product 88,323, no-progress 88,205, in-memory 88,562 and serial-student 86,232 tokens/s: none of these was
the cause. The cause was the loss running outside autocast, its head products in fp32 (fixed in
`DistillationTrainer.compute_loss`; benchmarks/RESULTS.md, "Healing at 1.75x"). The script stays as the way to
compare the product loop against one change at a time. The variants:

- product: `heal()` as `ffnfusion heal` calls it (rich progress bar, corpus rows read from the memory-mapped shards).
- no-progress: without the progress bar (its refresh thread takes the GIL 10 times a second).
- in-memory: the corpus rows copied into one tensor first, as heal_speed.py's data.
- random-tokens: random token ids of the same shape, as heal_speed.py's data.
- serial-student: the student fused from the teacher by heal_speed.py's SmolLM2 plan (attention 16-20 removed, FFNs
  15-20 fused, no parallel blocks) instead of STUDENT, whose parallel blocks run through einsums.

Each variant trains `--steps` optimizer steps at a fixed micro-batch (no probe) and is timed from the log rows'
elapsed_s after `--warmup` steps: steady tokens/s, the median of the per-interval rates.

    python benchmarks/heal_loop_ab.py --student fused --teacher MODEL.gguf --corpus corpus --out ab.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ffnfusion.fuse import fuse
from ffnfusion.heal import stage as heal_stage
from ffnfusion.heal.settings import HealSettings
from heal_speed import PLANS  # this folder's heal_speed.py: its SmolLM2 plan has no parallel blocks

VARIANTS = ("product", "no-progress", "in-memory", "random-tokens", "serial-student")


@contextmanager
def training_rows(kind: str):
    """Replace the heal's training sequences: in memory, or random ids of the same shape."""
    original = heal_stage._training_sequences

    def patched(*args: Any, **kwargs: Any) -> Any:
        rows = original(*args, **kwargs)
        whole = rows[:] if not isinstance(rows, torch.Tensor) else rows
        if kind == "random-tokens":
            gen = torch.Generator().manual_seed(0)
            return torch.randint(0, int(whole.max()) + 1, tuple(whole.shape), generator=gen)
        return whole.clone()

    heal_stage._training_sequences = patched
    try:
        yield
    finally:
        heal_stage._training_sequences = original


def serial_student(teacher: str, folder: Path) -> Path:
    """heal_speed.py's SmolLM2 student, fused from the real teacher by the product's `fuse`."""
    fuse(teacher, PLANS["smollm2-135m"], folder)
    return folder


def steady_tokens_per_second(log: list[dict], warmup: int, step_tokens: int) -> tuple[float, list[float]]:
    rows = [(r["step"], r["elapsed_s"]) for r in log if "elapsed_s" in r and "loss" in r and r["step"] >= warmup]
    rates = [(b[0] - a[0]) * step_tokens / (b[1] - a[1]) for a, b in itertools.pairwise(rows)]
    return statistics.median(rates), rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="a fused checkpoint folder")
    p.add_argument("--teacher", required=True, help="the original model")
    p.add_argument("--corpus", required=True, help="a corpus folder from `ffnfusion generate`")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--out", required=True, help="JSON results")
    a = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in a.variants.split(","):
            if name not in VARIANTS:
                raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
            student = a.student
            if name == "serial-student":
                student = str(serial_student(a.teacher, Path(scratch) / "serial"))
            settings = HealSettings(
                data=[a.corpus],
                seq_len=a.seq_len,
                batch_size=a.batch_size,
                max_steps=a.steps,
                lr=1e-3,
                warmup=0.05,
            )
            patch = training_rows(name) if name in ("in-memory", "random-tokens") else _nothing()
            with patch:
                summary = heal_stage.heal(
                    student,
                    a.teacher,
                    Path(scratch) / name,
                    settings,
                    progress=name != "no-progress",
                    logging_steps=a.log_every,
                    save_steps=10**9,
                )
            step_tokens = a.batch_size * a.seq_len
            rate, rates = steady_tokens_per_second(summary.log_history, a.warmup, step_tokens)
            results.append(
                {
                    "variant": name,
                    "steady_tokens_per_s": rate,
                    "interval_rates": rates,
                    "phase_seconds": summary.phase_seconds,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                }
            )
            print(f"{name:16s} {rate:12,.0f} tokens/s steady")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    Path(a.out).write_text(json.dumps({"device": device, "settings": vars(a), "results": results}, indent=1))


@contextmanager
def _nothing():
    yield


if __name__ == "__main__":
    main()
