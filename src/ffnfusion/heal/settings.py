"""What shapes a heal: HealSettings (validated before any work), HealRun, HealSummary, the files a heal writes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


# The automatic peak learning rate: 1e-3 for a model 576 wide (SmolLM2-135M) at 65,536 tokens per optimizer step,
# where it was measured: on SmolLM2-135M fused to 45 sub-blocks, 8M tokens (RESULTS.md), 1e-4 -> 3e-4 -> 1e-3 took
# WikiText-2 valid perplexity 36.8 -> 34.7 -> 33.9. Two priors scale it down from there, never up:
# - width: Adam's update of a weight matrix grows with its fan-in, so a wider model gets 576 / hidden of it (muP's
#   rule; 1.4e-4 at Llama-3.1-8B's 4096, near a third of their pre-training peaks);
# - step size: a smaller step's gradient is noisier, and Adam's rate follows the square root of the batch (the SDE
#   scaling rule): 2.5e-4 at 4,096 tokens per step (a CPU's 8 x 512).
AUTO_LR = 1e-3
AUTO_LR_WIDTH = 576
AUTO_LR_STEP_TOKENS = 65536


def default_lr(hidden_size: int, step_tokens: int = AUTO_LR_STEP_TOKENS) -> float:
    """The peak learning rate a heal uses when none is given: a model `hidden_size` wide, `step_tokens` per step."""
    width = min(1.0, AUTO_LR_WIDTH / hidden_size) if hidden_size > 0 else 1.0
    step = min(1.0, math.sqrt(max(1, step_tokens) / AUTO_LR_STEP_TOKENS))
    return AUTO_LR * width * step


class HealSettings(BaseModel):
    """Everything that shapes the training run; saved with the checkpoints so `--resume` can refuse a different run.

    The `ffnfusion heal` options (cli/heal.py) and run.yaml's `heal:` section are these fields (with HealRun's);
    each description is the option's help text.
    """

    model_config = ConfigDict(extra="forbid")

    data: list[str] = Field(
        description="training text: file, folder, .jsonl, .parquet, datasets name, or `self`; repeatable"
    )
    seq_len: int = Field(512, description="tokens per packed training sequence")
    max_sequences: int | None = Field(None, description="use at most this many sequences per --data")
    self_samples: int = Field(256, description="sequences to sample from the teacher for --data self")
    self_batch_size: int = Field(64, description="sequences sampled at once for --data self")
    text_field: str = Field("text", description="text column of .jsonl/.parquet/datasets")
    batch_size: int | None = Field(
        None, description="sequences per device per micro-batch (default: automatic, for throughput; 8 on CPU)"
    )
    grad_accum: int = Field(1, description="micro-batches per optimizer step")
    epochs: float = Field(1.0, description="passes over the data (ignored with --max-steps, --tokens or --minutes)")
    max_steps: int = Field(-1, description="optimizer steps (overrides --epochs)")
    tokens: int | None = Field(
        None, description="training-token budget (whole optimizer steps); with --minutes, first wins"
    )
    minutes: float | None = Field(None, description="training-time budget; with --tokens, first wins")
    max_epochs: int = Field(1, description="under --tokens/--minutes: no sequence is seen more often than this")
    lr: float | None = Field(
        None,
        description="peak learning rate (AdamW, cosine decay; default: automatic, 1e-3 scaled down by width and "
        "for steps under 65,536 tokens)",
    )
    weight_decay: float = 0.0
    warmup: float = Field(0.05, description="warm-up: fraction of the steps (<1) or a number of steps")
    kl_weight: float = Field(1.0, description="weight of KL(teacher || student) on next-token logits")
    cos_weight: float = Field(1.0, description="weight of the cosine distance of final hidden states")
    lm_weight: float = Field(0.0, description="weight of the language-modelling loss (off by default)")
    layer_weight: float = Field(
        0.0,
        description="weight of the cosine distance of hidden states at every inner block boundary, each student "
        "block against the teacher's layers it replaces (off by default)",
    )
    temperature: float = Field(1.0, description="softmax temperature of the KL term")
    scope: str = Field("all", description="trainable part: `all` or `changed` (fused/removed blocks)")
    neighbours: int = Field(0, description="with --scope changed, also train this many blocks each side")
    seed: int = 0
    bf16: bool | None = Field(None, description="bf16 mixed precision (default: on where the GPU has it)")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    fsdp: str = Field("", description="FSDP mode passed to Trainer, e.g. 'full_shard auto_wrap'")
    loss_impl: str = Field(
        "auto", description="auto, chunked (LM heads inside a token-chunked loss) or plain (full logits)"
    )
    compile: str = Field(
        "loss", description="torch.compile on CUDA: none, loss (the loss's chunk kernel) or all (also the models)"
    )

    @field_validator("data", mode="before")
    @classmethod
    def _one_source(cls, value: Any) -> Any:
        # run.yaml may name one text source as a string.
        return [value] if isinstance(value, str) else value

    def check(self) -> None:
        from ffnfusion.heal.budget import budget_problems  # torch and transformers: not for `--help`

        problems = []
        if self.scope not in SCOPES:
            problems.append(f"--scope must be one of {', '.join(SCOPES)} (got {self.scope!r})")
        if min(self.kl_weight, self.cos_weight, self.lm_weight, self.layer_weight) < 0:
            problems.append("loss weights must not be negative")
        if self.kl_weight == self.cos_weight == self.lm_weight == self.layer_weight == 0:
            problems.append("all loss weights are zero: nothing to train on")
        if self.lr is not None and not 0 < self.lr < 1:
            problems.append(f"--lr must be in (0, 1) (got {self.lr})")
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
        return {k: v for k, v in self.model_dump().items() if k not in skip}


class HealRun(BaseModel):
    """How the training run is checkpointed and logged: options of `heal` (and run.yaml's `heal:` section) that
    do not change what is trained, so a resumed run may change them."""

    model_config = ConfigDict(extra="forbid")

    save_steps: int = Field(500, description="checkpoint every N optimizer steps")
    logging_steps: int = Field(10, description="log the loss every N optimizer steps")
    keep_checkpoints: bool = Field(False, description="keep the checkpoints after a successful run")


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
    lr: float | None = None
    budget_tokens: int | None = None
    limited_by: str = ""
    stopped_by_time: bool = False
    train_tflops: float = math.nan  # model FLOP/s achieved (6 x student + 2 x teacher matmul params per token)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall time before and of training, by phase
    warnings: list[str] = field(default_factory=list)
