"""What shapes a heal: HealSettings (validated before any work), HealSummary, the files a heal writes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ffnfusion.heal.budget import (
    budget_problems,
)

PLAN_FILE = "ffnfusion_plan.json"
LOG_FILE = "heal_log.jsonl"
SETTINGS_FILE = "heal_settings.json"
# The verb that marks a checkpoint folder, so --overwrite and the clean-up after a run may delete it.
CHECKPOINTS_VERB = "heal (checkpoints)"
CURVE_FILE = "loss_curve.png"
SCOPES = ("all", "changed")
LOSS_IMPLS = ("auto", "chunked", "plain")
COMPILE_MODES = ("none", "loss", "all")


class HealError(ValueError):
    """Inputs that cannot be distilled: not a fused student, mismatched vocabularies, bad settings."""


@dataclass
class HealSettings:
    """Everything that shapes the training run; saved with the checkpoints so `--resume` can refuse a different run."""

    data: list[str]
    seq_len: int = 512
    max_sequences: int | None = None
    self_samples: int = 256
    self_batch_size: int = 64
    text_field: str = "text"
    batch_size: int | None = None  # None: automatic (memory-probed on CUDA, 8 elsewhere)
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = -1
    tokens: int | None = None  # training-token budget (whole optimizer steps, rounded down)
    minutes: float | None = None  # time budget; whichever of tokens / minutes comes first
    max_epochs: int = 1  # under a budget, no sequence is seen more often than this
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    kl_weight: float = 1.0
    cos_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    scope: str = "all"
    neighbours: int = 0
    seed: int = 0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    fsdp: str = ""
    loss_impl: str = "auto"  # chunked: LM heads inside the loss, chunked over tokens; plain: full logits
    compile: str = "loss"  # torch.compile on CUDA: none, the loss's chunk kernel, or also the models

    def check(self) -> None:
        problems = []
        if self.scope not in SCOPES:
            problems.append(f"--scope must be one of {', '.join(SCOPES)} (got {self.scope!r})")
        if min(self.kl_weight, self.cos_weight, self.lm_weight) < 0:
            problems.append("loss weights must not be negative")
        if self.kl_weight == self.cos_weight == self.lm_weight == 0:
            problems.append("all loss weights are zero: nothing to train on")
        if self.temperature <= 0:
            problems.append(f"--temperature must be positive (got {self.temperature})")
        if (self.batch_size is not None and self.batch_size < 1) or self.grad_accum < 1:
            problems.append("--batch-size and --grad-accum must be at least 1")
        if self.loss_impl not in LOSS_IMPLS:
            problems.append(f"--loss-impl must be one of {', '.join(LOSS_IMPLS)} (got {self.loss_impl!r})")
        elif self.loss_impl == "chunked" and self.fsdp:
            problems.append(
                "--loss-impl chunked needs the unsharded LM head: use --loss-impl plain (or auto) with --fsdp"
            )
        if self.compile not in COMPILE_MODES:
            problems.append(f"--compile must be one of {', '.join(COMPILE_MODES)} (got {self.compile!r})")
        step_tokens = (self.batch_size or 1) * max(1, self.grad_accum) * self.seq_len
        problems += budget_problems(
            self.tokens, self.minutes, self.max_epochs, self.max_steps, self.seq_len, step_tokens
        )
        if self.neighbours < 0:
            problems.append("--neighbours must not be negative")
        if self.warmup < 0 or (self.warmup >= 1 and self.warmup != int(self.warmup)):
            problems.append("--warmup is a fraction of the steps in [0, 1) or a whole number of steps")
        if not self.data:
            problems.append("no --data given")
        if problems:
            raise HealError("Invalid heal settings:\n  - " + "\n  - ".join(problems))

    def training_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the interrupted one (bf16 None means 'auto', resolved)."""
        # Not compared: how the run is executed or how long it may take (a resumed run gets its own --minutes).
        skip = ("fsdp", "self_batch_size", "minutes", "loss_impl", "compile")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class HealSummary:
    out: Path
    steps: int
    sequences: int
    seq_len: int
    tokens: int
    train_seconds: float
    tokens_per_second: float
    trainable_parameters: int
    total_parameters: int
    trainable_blocks: list[int]
    first_loss: float | None
    last_loss: float | None
    log_history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    batch_size: int = 0
    budget_tokens: int | None = None
    limited_by: str = ""
    stopped_by_time: bool = False
    train_tflops: float = math.nan  # model FLOP/s achieved (6 x student + 2 x teacher matmul params per token)
    warnings: list[str] = field(default_factory=list)
