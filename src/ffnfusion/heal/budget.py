"""Budgets for `heal`: train for N tokens or M minutes (whichever comes first), never past --max-epochs of the data.

The optimizer steps are fixed before training starts, so the learning-rate schedule and `--resume` know them:
a token budget becomes `tokens // tokens_per_step` steps (it stops exactly there: whole optimizer steps only),
capped by the steps the data allows at `--max-epochs` passes (each sequence is seen at most that many times);
a time budget stops training at the first step end past M minutes (the schedule then ends early). Also here: the
progress bar (tokens done / budget, tokens/s, ETA, KL and cosine loss) and the automatic micro-batch size.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

log = logging.getLogger("ffnfusion.heal")

# Tokens per micro-batch the automatic batch size aims at (memory permitting): enough to fill an H100/H200 with
# a ~100M-parameter model (SmolLM2-135M on an H200: 128,446 tokens/s at 32k tokens, 138,553 at 64k, RESULTS.md);
# larger models reach their memory limit first.
AUTO_TARGET_TOKENS = 65536
CPU_BATCH_SIZE = 8


@dataclass
class Budget:
    """What a run will do: optimizer steps, tokens per step, and why it stops where it does."""

    steps: int
    tokens_per_step: int
    steps_per_epoch: int
    limited_by: str  # "tokens", "data", "max-steps", "epochs"
    warning: str | None = None

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def budget_problems(
    tokens: int | None, minutes: float | None, max_epochs: int, max_steps: int, seq_len: int, batch_tokens: int
) -> list[str]:
    """Setting errors, found before any work. batch_tokens: tokens of one optimizer step (one process)."""
    problems = []
    if tokens is not None and tokens < 1:
        problems.append(f"--tokens must be a positive number of tokens (got {tokens})")
    if minutes is not None and not minutes > 0:
        problems.append(f"--minutes must be positive (got {minutes})")
    if max_epochs < 1:
        problems.append(f"--max-epochs must be at least 1 (got {max_epochs})")
    if seq_len < 2:
        problems.append(f"--seq-len must be at least 2 (got {seq_len})")
    if (tokens is not None or minutes is not None) and max_steps > 0:
        problems.append("--max-steps cannot be combined with --tokens or --minutes: give one budget")
    if tokens is not None and 0 < tokens < batch_tokens:
        problems.append(
            f"--tokens {tokens:,} is smaller than one optimizer step ({batch_tokens:,} tokens = batch size x "
            "--grad-accum x --seq-len): raise --tokens or lower --batch-size / --seq-len"
        )
    return problems


def plan_budget(
    sequences: int,
    seq_len: int,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    tokens: int | None,
    minutes: float | None,
    max_epochs: int,
    max_steps: int,
    epochs: float,
) -> Budget:
    """The optimizer steps of a run (Trainer's `max_steps`), from the budget and the data."""
    batches_per_epoch = sequences // (micro_batch * world_size)  # drop_last, per process
    steps_per_epoch = batches_per_epoch // grad_accum
    tokens_per_step = micro_batch * grad_accum * world_size * seq_len
    if steps_per_epoch < 1:
        raise ValueError(
            f"the data gives {sequences} sequences of {seq_len} tokens, fewer than one optimizer step "
            f"({micro_batch} per device x {grad_accum} accumulation x {world_size} processes): use more text, a "
            "smaller --batch-size or --grad-accum, or a shorter --seq-len."
        )
    if tokens is None and minutes is None:
        if max_steps > 0:
            return Budget(max_steps, tokens_per_step, steps_per_epoch, "max-steps")
        return Budget(max(1, math.ceil(steps_per_epoch * epochs)), tokens_per_step, steps_per_epoch, "epochs")
    data_steps = steps_per_epoch * max_epochs
    if tokens is None:
        return Budget(data_steps, tokens_per_step, steps_per_epoch, "data")
    if tokens < tokens_per_step:
        raise ValueError(
            f"--tokens {tokens:,} is smaller than one optimizer step ({tokens_per_step:,} tokens): raise --tokens "
            "or lower --batch-size / --seq-len."
        )
    wanted = tokens // tokens_per_step
    if wanted <= data_steps:
        return Budget(wanted, tokens_per_step, steps_per_epoch, "tokens")
    warning = (
        f"the data is too small for --tokens {tokens:,}: {sequences:,} sequences x {seq_len} tokens at "
        f"--max-epochs {max_epochs} give {data_steps * tokens_per_step:,} training tokens ({data_steps} steps); "
        "training stops there. Give more text (or raise --max-epochs to repeat it)."
    )
    return Budget(data_steps, tokens_per_step, steps_per_epoch, "data", warning)


class TimeBudgetCallback(TrainerCallback):
    """Stops training at the first optimizer step that ends past `minutes` after training began."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60.0
        self.start: float | None = None
        self.stopped_early = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.start is not None and time.monotonic() - self.start >= self.seconds:
            self.stopped_early = state.global_step < state.max_steps
            control.should_training_stop = True
            control.should_save = True


class TokenProgressCallback(TrainerCallback):
    """A rich progress bar in tokens: done / budget, tokens/s, ETA (time budget included), KL and cosine loss."""

    def __init__(self, tokens_per_step: int, minutes: float | None = None, console: Any = None):
        self.tokens_per_step = tokens_per_step
        self.minutes = minutes
        self.console = console
        self.progress: Any = None
        self.task: Any = None
        self.start = 0.0
        self.first_step = 0
        self.loss_text = ""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("[bold]heal"),
            BarColumn(),
            TextColumn("{task.fields[done]} / {task.fields[budget]} tokens"),
            TextColumn("{task.fields[speed]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[losses]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        total = state.max_steps * self.tokens_per_step
        self.first_step = state.global_step
        self.task = self.progress.add_task(
            "heal",
            total=total,
            completed=state.global_step * self.tokens_per_step,
            done=_short(state.global_step * self.tokens_per_step),
            budget=_short(total),
            speed="- tok/s",
            eta="-",
            losses="",
        )
        self.start = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is None:
            return
        done = state.global_step * self.tokens_per_step
        elapsed = time.monotonic() - self.start
        rate = (state.global_step - self.first_step) * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        remaining = (state.max_steps - state.global_step) * self.tokens_per_step / rate if rate > 0 else math.inf
        if self.minutes is not None:
            remaining = min(remaining, max(0.0, self.minutes * 60 - elapsed))
        self.progress.update(
            self.task,
            completed=done,
            done=_short(done),
            speed=f"{rate:,.0f} tok/s",
            eta=_clock(remaining),
            losses=self.loss_text,
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.progress is None or not logs:
            return
        shown = (("loss_kl", "KL"), ("loss_cos", "cos"), ("loss_layer", "layer"))
        parts = [f"{label} {logs[key]:.4f}" for key, label in shown if key in logs]
        if parts:
            self.loss_text = "  ".join(parts)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _short(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def auto_batch_size(
    step: Callable[[int], None],
    seq_len: int,
    device: torch.device,
    fixed_bytes: int,
    upper: int,
    target_tokens: int = AUTO_TARGET_TOKENS,
) -> int:
    """Sequences per micro-batch for throughput: `target_tokens` worth, as far as the device memory allows.

    On CUDA, `step(b)` (a training forward + backward at micro-batch b) runs at b=1 and b=2; the growth of peak
    memory between them estimates the activation memory per sequence, which sizes the batch for 90% of the device's
    memory, less `fixed_bytes` (optimizer state not yet allocated). The estimate errs high (parts of a step stop
    growing with the batch, like the loss's capped logit chunks), so each doubling up to the target is then run
    and kept while its measured peak stays inside the same 90%. Elsewhere: CPU_BATCH_SIZE. A power of two, at
    most `upper` (the sequences available, or the token budget).
    """
    want = max(1, target_tokens // seq_len)
    if device.type != "cuda":
        return max(1, min(CPU_BATCH_SIZE, upper))
    peaks = [_peak_bytes(step, b, device) for b in (1, 2)]
    if None in peaks:
        raise ValueError(_TOO_BIG.format(seq_len=seq_len))
    per_sequence = max(1, peaks[1] - peaks[0])
    base = peaks[0] - per_sequence
    limit = int(0.9 * torch.cuda.get_device_properties(device).total_memory) - fixed_bytes
    fits = (limit - base) // per_sequence
    if fits < 1:
        raise ValueError(_TOO_BIG.format(seq_len=seq_len))
    ceiling = max(1, min(want, upper))
    chosen = 1 << (min(fits, ceiling).bit_length() - 1)
    while chosen * 2 <= ceiling:
        peak = _peak_bytes(step, chosen * 2, device)
        if peak is None or peak > limit:
            break
        chosen *= 2
    log.info("auto batch size: %d sequences (%.1f MiB activations per sequence)", chosen, per_sequence / 2**20)
    return chosen


_TOO_BIG = (
    "one sequence of {seq_len} tokens does not fit the device memory for training: use --gradient-checkpointing, a "
    "shorter --seq-len, or --scope changed."
)


def _peak_bytes(step: Callable[[int], None], batch: int, device: torch.device) -> int | None:
    """Peak CUDA bytes allocated while `step(batch)` runs; None when it runs out of memory."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step(batch)
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return torch.cuda.max_memory_allocated(device)
