"""The `heal` stage's training step: the distillation loss and the Trainer that runs it.

Loss (Puzzle's recipe): `kl_weight * T^2 * KL(teacher_T || student_T)` on next-token distributions softened by
temperature T, plus `cos_weight * (1 - cos(h_student, h_teacher))` on the final (normed) hidden states, plus an
optional `lm_weight * cross-entropy` on the text itself (off by default: Puzzle found it hurt), plus an optional
`layer_weight * mean (1 - cos)` of the residual streams at every inner block boundary (block_boundaries: each
student block against the teacher's input to the next block's first layer; off by default, not yet measured at
scale). Teacher outputs are computed on the fly, so nothing is cached per token.

Training is transformers' Trainer, so the same code runs on one device, several GPUs through `torchrun` or
`accelerate launch` (DDP, or FSDP with `--fsdp`), in bf16, with gradient checkpointing, gradient accumulation,
a cosine schedule with warm-up, checkpoints every N steps and `--resume`. The teacher is a plain module on every
process (never wrapped or sharded): fine for models that fit one device, the case this project targets.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from ffnfusion.formats.plan import Plan, plan_blocks
from ffnfusion.heal.budget import auto_batch_size
from ffnfusion.heal.loss import chunked_distillation_loss
from ffnfusion.heal.settings import PLAN_FILE, HealError, HealSettings


class TokenDataset(Dataset):
    """Packed token windows [n, seq_len] as Trainer examples."""

    def __init__(self, sequences: torch.Tensor):
        self.sequences = sequences

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[i]}


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    kl_weight: float = 1.0,
    cos_weight: float = 1.0,
    lm_weight: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted KL + cosine (+ LM) loss over every position; returns (total, detached parts for logging)."""
    vocab = student_logits.shape[-1]
    # Softmax in fp32 even under bf16 autocast: low-precision logits bias the log-probabilities.
    s_logp = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    # T^2 keeps the gradient scale independent of the temperature (Hinton et al.).
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * temperature**2
    cos = 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1).mean()
    total = kl_weight * kl + cos_weight * cos
    parts = {"kl": kl.detach(), "cos": cos.detach()}
    if lm_weight > 0 or temperature == 1.0:
        # At T=1 the student's log-probabilities are already there, so the LM loss is logged for free.
        lm_logp = s_logp if temperature == 1.0 else F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
        lm_logp = lm_logp.view(*input_ids.shape, vocab)[:, :-1].reshape(-1, vocab)
        lm = F.nll_loss(lm_logp, input_ids[:, 1:].reshape(-1))
        total = total + lm_weight * lm
        parts["lm"] = lm.detach()
    return total, parts


def _final_hidden_and_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final normed hidden states, logits) of any transformers causal LM, through its own forward."""
    states, logits = _hidden_states_and_logits(model, input_ids)
    return states[-1], logits


def _hidden_states_and_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    # transformers' decoders (and DeciLM) give [embeddings, output of block 0, ..., of block n-2, final normed].
    return out.hidden_states, out.logits


def block_boundaries(plan: Plan | None, num_original_layers: int, num_blocks: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` where both models' residual streams should agree: the output
    of each student block but the last, against the teacher's input to the first original layer of the next block.
    A block thus answers for every original layer up to the next block, dropped layers included. The last boundary
    is the final hidden state, which the cosine term already matches."""
    if plan is None:
        if num_blocks != num_original_layers:
            raise HealError(
                f"--layer-weight needs the plan the student was fused with ({PLAN_FILE} in the student folder): "
                f"the student has {num_blocks} blocks, the teacher {num_original_layers} layers."
            )
        firsts = list(range(num_blocks))
    else:
        blocks = plan_blocks(plan, num_original_layers)
        if len(blocks) != num_blocks:
            raise HealError(
                f"the student has {num_blocks} blocks but its {PLAN_FILE} applied to the teacher's "
                f"{num_original_layers} layers gives {len(blocks)}: was it fused from another model?"
            )
        firsts = [b.layers[0] for b in blocks]
    return [(j + 1, firsts[j + 1]) for j in range(num_blocks - 1)]


def boundary_cosine(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
    boundaries: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Mean over the boundaries of (1 - cosine similarity) of the two residual streams, averaged over positions.
    `teacher_states` may hold only the indices the boundaries name."""
    distances = [
        1 - F.cosine_similarity(student_states[s].float(), teacher_states[t].float(), dim=-1).mean()
        for s, t in boundaries
    ]
    return torch.stack(distances).mean()


def _head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The LM head's weight [vocab, hidden], or None where the chunked loss cannot use it (bias, no plain Linear)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return head.weight


def use_chunked_loss(settings: HealSettings, student: torch.nn.Module, teacher: torch.nn.Module) -> bool:
    """Whether the run computes the loss from hidden states with the heads inside it (see distill_loss.py)."""
    if settings.loss_impl == "plain" or (settings.loss_impl == "auto" and settings.fsdp):
        return False
    usable = _head_weight(student) is not None and _head_weight(teacher) is not None
    if settings.loss_impl == "chunked" and not usable:
        raise HealError("--loss-impl chunked needs LM heads that are plain Linear layers without bias.")
    return usable


def distillation_step(
    model: torch.nn.Module,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    ids: torch.Tensor,
    settings: HealSettings,
    boundaries: Sequence[tuple[int, int]] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, detached parts, outputs) of one micro-batch. `model` is the student as training calls it (maybe
    DDP-wrapped, so gradient synchronisation hooks run), `student` the same module unwrapped. `boundaries`
    (block_boundaries) are matched when settings.layer_weight > 0."""
    s = settings
    layers = s.layer_weight > 0 and len(boundaries) > 0
    if not use_chunked_loss(s, student, teacher):
        with torch.no_grad():
            t_states, t_logits = _hidden_states_and_logits(teacher, ids)
        s_states, s_logits = _hidden_states_and_logits(model, ids)
        loss, parts = distillation_loss(
            s_logits, t_logits, s_states[-1], t_states[-1], ids, s.kl_weight, s.cos_weight, s.lm_weight, s.temperature
        )
        if layers:
            layer = boundary_cosine(s_states, t_states, boundaries)
            loss, parts["layer"] = loss + s.layer_weight * layer, layer.detach()
        return loss, parts, {"logits": s_logits}
    with torch.inference_mode():
        base = teacher.__dict__.get("_ffnfusion_forward")
        base = base if base is not None else getattr(teacher, teacher.base_model_prefix)
        t_out = base(input_ids=ids, use_cache=False, output_hidden_states=layers)
    # Out of inference mode, so autograd may save them (for the cosine terms' backward).
    t_hidden = t_out.last_hidden_state.clone()
    t_states = {t: t_out.hidden_states[t].clone() for _, t in boundaries} if layers else {}
    # The student's own forward, with the head applied to one position only: the loss applies it, in chunks.
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    s_hidden = out.hidden_states[-1]
    loss, parts = chunked_distillation_loss(
        s_hidden,
        t_hidden,
        _head_weight(student),
        _head_weight(teacher),
        ids,
        s.kl_weight,
        s.cos_weight,
        s.lm_weight,
        s.temperature,
        compile_chunks=ids.is_cuda and s.compile in ("loss", "all"),
    )
    if layers:
        layer = boundary_cosine(out.hidden_states, t_states, boundaries)
        loss, parts["layer"] = loss + s.layer_weight * layer, layer.detach()
    return loss, parts, {"hidden_states": s_hidden}


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix products per token (all but the input embedding table, unless tied)."""
    total = sum(p.numel() for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and embed is not None and head.weight is not embed.weight:
        total -= embed.weight.numel()
    return total


class DistillationTrainer(Trainer):
    """Trainer whose loss is distillation from a frozen teacher; everything else is stock Trainer behaviour."""

    def __init__(
        self,
        *args: Any,
        teacher: torch.nn.Module,
        settings: HealSettings,
        boundaries: Sequence[tuple[int, int]] = (),
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.settings = settings
        self.boundaries = list(boundaries)
        # The loss is a per-micro-batch mean, so Trainer must divide it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._parts: dict[str, torch.Tensor] = {}
        self._parts_count = 0
        self._first_step_began: float | None = None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        ids = inputs["input_ids"]
        if self._first_step_began is None:
            self._first_step_began = time.monotonic()
        # Accelerate puts only the student's forward under autocast (and returns its outputs in fp32). The teacher
        # forward and the loss run here, outside it: without this context the chunked loss's four head products
        # ran in full fp32, about 40% of each step's time on an H200.
        with self.accelerator.autocast():
            loss, parts, outputs = distillation_step(
                model, self.accelerator.unwrap_model(model), self.teacher, ids, self.settings, self.boundaries
            )
        for name, value in parts.items():
            self._parts[name] = self._parts.get(name, 0) + value
        self._parts_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Trainer logs only the total; add the loss components averaged since the last log, over all processes.
        if "loss" in logs and self._parts_count:
            for name, value in self._parts.items():
                mean = self.accelerator.reduce(value / self._parts_count, reduction="mean")
                logs[f"loss_{name}"] = round(float(mean), 6)
            self._parts, self._parts_count = {}, 0
        # Seconds since the first step began, in every row: the log then shows where a short heal's time goes
        # (the first steps' compilation against the steady rate).
        if self._first_step_began is not None:
            logs["elapsed_s"] = round(time.monotonic() - self._first_step_began, 2)
        super().log(logs, *args, **kwargs)


def changed_blocks(plan: Plan, num_original_layers: int) -> list[int]:
    """Indices of the fused model's blocks that the plan changed (fused, parallel, or missing a sub-block)."""
    blocks = plan_blocks(plan, num_original_layers)
    return [i for i, b in enumerate(blocks) if b.kind != "layer" or b.attention_from is None or not b.ffn_from]


def trainable_blocks(
    scope: str, num_blocks: int, plan: Plan | None, num_original_layers: int, neighbours: int
) -> list[int]:
    if scope == "all":
        return list(range(num_blocks))
    if plan is None:
        raise HealError(
            f"--scope changed needs the plan the student was fused with ({PLAN_FILE} in the student folder); "
            "use --scope all for a student without one."
        )
    blocks = plan_blocks(plan, num_original_layers)
    if len(blocks) != num_blocks:
        raise HealError(
            f"the student has {num_blocks} blocks but its {PLAN_FILE} applied to the teacher's "
            f"{num_original_layers} layers gives {len(blocks)}: was it fused from another model?"
        )
    changed = changed_blocks(plan, num_original_layers)
    if not changed:
        raise HealError("the student's plan changes no layer: nothing to heal with --scope changed.")
    chosen = {j for i in changed for j in range(i - neighbours, i + neighbours + 1) if 0 <= j < num_blocks}
    return sorted(chosen)


def freeze_outside(model: torch.nn.Module, blocks: Sequence[int]) -> int:
    """Leave only the parameters of `blocks` trainable; returns the number of trainable parameters."""
    prefixes = tuple(f"model.layers.{i}." for i in blocks)
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        trainable += p.numel() if p.requires_grad else 0
    return trainable


def probe_batch_size(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    sequences: torch.Tensor,
    settings: HealSettings,
    args: TrainingArguments,
    trainable: int,
    boundaries: Sequence[tuple[int, int]] = (),
) -> int:
    """The micro-batch for throughput (auto_batch_size), probed with real training steps on CUDA."""
    device = args.device
    upper = int(sequences.shape[0]) // args.world_size
    if settings.tokens is not None:
        upper = min(upper, settings.tokens // (settings.grad_accum * args.world_size * settings.seq_len))
    upper = max(1, upper)
    if device.type != "cuda":
        return auto_batch_size(lambda b: None, settings.seq_len, device, 0, upper)
    student.to(device)
    student.train()
    if settings.gradient_checkpointing:
        student.gradient_checkpointing_enable({"use_reentrant": False})

    def step(b: int) -> None:
        ids = sequences[:b].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(settings.bf16)):
            loss, _, _ = distillation_step(student, student, teacher, ids, settings, boundaries)
        loss.backward()
        del loss
        student.zero_grad(set_to_none=False)  # keep the gradients allocated: training holds them too

    try:
        # AdamW's two fp32 moments per trainable parameter are not allocated yet; leave 1 GiB besides.
        return auto_batch_size(step, settings.seq_len, device, 8 * trainable + 2**30, upper)
    except ValueError as e:  # not even one sequence fits: say what to change, not where torch stopped
        raise HealError(str(e)) from None
    finally:
        student.zero_grad(set_to_none=True)
        if settings.gradient_checkpointing:
            student.gradient_checkpointing_disable()
        torch.cuda.empty_cache()
