"""Distillation training speed: today's loss path (full fp32 logits of both models) vs the chunked loss, same run.

Random-weight models of a real shape (speed does not depend on the weights), built on the GPU: the teacher in
bf16, the student fused from it by a plan and trained in fp32 with bf16 autocast, through the project's own
DistillationTrainer (transformers Trainer), as `ffnfusion heal` runs it. Each variant trains `--warmup + --steps`
optimizer steps on random token windows; a callback synchronises CUDA at every step end, and the figures are the
median step time after warm-up: student tokens/s, model TFLOP/s (6 x student + 2 x teacher matmul parameters per
token) and MFU against `--peak-tflops` (bf16, measured on the H200 at about 790), and peak memory.

    python benchmarks/heal_speed.py --shape smollm2-135m --variants old:16,chunked:16,chunked-c:32 --out r.json
    python benchmarks/heal_speed.py --shape llama-3.1-8b --layers 4 --variants chunked-c:8,chunked-c-gc:8

A variant is NAME:BATCH with NAME one of: old (loss_impl plain, no compile), chunked (eager chunk kernel),
chunked-c (compiled chunk kernel, the default), chunked-all (also torch.compile of both models), liger
(liger-kernel's LigerFusedLinearJSDLoss, if importable), manual-c (the chunked-c step in a bare loop with fused
AdamW, no Trainer: Trainer's overhead), auto (the automatic batch size heal would pick, then chunked-c), product
(the automatic batch size and `ffnfusion heal`'s own TrainingArguments, e.g. no per-step NaN filter; BATCH is
ignored); a `-gc` suffix turns on gradient checkpointing.

`--timing step` (the default) synchronises CUDA at every step end and reports the median step; `--timing window`
synchronises only when warm-up ends and at the last step and reports the mean step of that window, so a host sync
inside the training step itself (Trainer's NaN filter) shows in the figure instead of being hidden by the timer's.
"""

from __future__ import annotations

import argparse
import gc as garbage
import itertools
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from ffnfusion.bench.shapes import random_model
from ffnfusion.formats.plan import Plan
from ffnfusion.heal import stage as heal_mod
from ffnfusion.heal import trainer as heal_trainer
from ffnfusion.heal.loss import _autocast_dtype, chunked_distillation_loss
from ffnfusion.heal.settings import HealSettings
from ffnfusion.heal.trainer import DistillationTrainer, TokenDataset, distillation_step, matmul_parameters
from ffnfusion.surgery import fuse_model

PLANS = {
    # 30 layers -> 50 sequential sub-blocks: attention removed in 16-20, FFNs 15-20 fused into one.
    "smollm2-135m": Plan(remove_attention=list(range(16, 21)), fuse_ffn=[list(range(15, 21))]),
}


def default_plan(layers: int) -> Plan:
    """Attention removed from the middle layer on, the FFNs from the one before fused (at least 2 layers)."""
    mid = max(1, layers // 2)
    return Plan(remove_attention=[mid], fuse_ffn=[[mid - 1, mid]])


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


class StepTimer(TrainerCallback):
    """Step-end times; `window_from` set: only at that step and the last (no sync in between)."""

    def __init__(self, window_from: int | None = None) -> None:
        self.times: list[float] = []
        self.window_from = window_from

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.window_from is not None and state.global_step not in (self.window_from, state.max_steps):
            return
        sync()
        self.times.append(time.perf_counter())


# liger-kernel's fused linear JSD loss, measured against ours (it lost: benchmarks/RESULTS.md); not a dependency.
def liger_available() -> bool:
    """Whether liger-kernel's fused linear JSD loss (with triton) can be imported here."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception:  # ImportError, or triton failing to initialise without a GPU
        return False
    return True


def liger_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_head: torch.Tensor,
    input_ids: torch.Tensor,
    kl_weight: float = 1.0,
    cos_weight: float = 1.0,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL + cosine through liger-kernel's LigerFusedLinearJSDLoss (beta=0 is KL(teacher || student)); no LM term.

    Used by the benchmark to compare against `chunked_distillation_loss`; liger is an optional extra.
    """
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    hidden = student_hidden.shape[-1]
    s_flat = student_hidden.reshape(-1, hidden)
    t_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    dtype = _autocast_dtype(s_flat.device, s_flat.dtype)
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=temperature, chunk_size=chunk
    )
    labels = torch.zeros(s_flat.shape[0], dtype=torch.long, device=s_flat.device)
    with torch.autocast(s_flat.device.type, enabled=False):
        kl = loss_fn(
            s_flat.to(dtype), student_head.to(dtype), t_flat.to(dtype), teacher_head.detach().to(dtype), labels
        )
    kl = kl.float() * temperature**2
    cos = 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1).mean()
    return kl_weight * kl + cos_weight * cos, {"kl": kl.detach(), "cos": cos.detach()}


def liger_step_loss(*args: Any, compile_chunks: bool = False, **kwargs: Any) -> Any:
    kwargs.pop("lm_weight", None)
    s_hidden, t_hidden, s_head, t_head, ids, kl_w, cos_w, _lm_w, temperature = args
    return liger_distillation_loss(s_hidden, t_hidden, s_head, t_head, ids, kl_w, cos_w, temperature)


def bf16_rope(enable: bool) -> None:
    """Experiment: the fused student's RoPE tables in the autocast dtype, so its attention runs in bf16 (flash).

    DeciLMRotaryEmbedding casts them to the dtype of the fp32 embeddings, which makes q and k fp32 under autocast.
    """
    from ffnfusion.modeling import modeling_decilm as m

    original = m.DeciLMRotaryEmbedding.__dict__.get("_original_forward") or m.DeciLMRotaryEmbedding.forward
    m.DeciLMRotaryEmbedding._original_forward = original
    if not enable:
        m.DeciLMRotaryEmbedding.forward = original
        return

    def forward(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> Any:
        cos, sin = original(self, x, position_ids)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    m.DeciLMRotaryEmbedding.forward = forward


def run_variant(name: str, batch: int, teacher: torch.nn.Module, make_student: Any, a: argparse.Namespace) -> dict:
    rope = name.endswith("-rope")
    name_ = name.removesuffix("-rope")
    gc = name_.endswith("-gc")
    base = name_.removesuffix("-gc")
    bf16_rope(rope)
    settings = HealSettings(
        data=["random"],
        seq_len=a.seq_len,
        batch_size=batch,
        lr=1e-4,  # as the other variants' TrainingArguments (ffnfusion heal resolves its automatic rate from the model)
        bf16=True,
        gradient_checkpointing=gc,
        loss_impl="plain" if base == "old" else "chunked",
        compile={"old": "none", "chunked": "none", "chunked-all": "all"}.get(base, "loss"),
    )
    window = a.timing == "window" and base != "manual-c"
    student = make_student()
    n_steps = a.warmup + a.steps
    gen = torch.Generator().manual_seed(0)
    vocab = teacher.config.vocab_size
    reset_peak()
    if base in ("auto", "product"):
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(), report_to="none", bf16=DEVICE == "cuda", use_cpu=DEVICE != "cuda"
        )
        seqs = torch.randint(0, vocab, (4096, a.seq_len), generator=gen)
        batch = heal_trainer.probe_batch_size(student, teacher, seqs, settings, args, student.num_parameters())
        settings.batch_size = batch
        reset_peak()
    seqs = torch.randint(0, vocab, (batch * n_steps, a.seq_len), generator=gen)
    flops_token = 6 * matmul_parameters(student) + 2 * matmul_parameters(teacher)
    if base == "chunked-all":
        teacher.__dict__["_ffnfusion_forward"] = torch.compile(teacher.model)
    else:
        teacher.__dict__.pop("_ffnfusion_forward", None)
    original_loss = heal_trainer.chunked_distillation_loss
    if base == "liger":
        heal_trainer.chunked_distillation_loss = liger_step_loss
    try:
        if base == "manual-c":
            times = manual_loop(student, teacher, seqs, settings, batch)
        else:
            timer = StepTimer(a.warmup if window else None)
            if base == "product":
                args = heal_mod._training_args(settings, Path(tempfile.mkdtemp()), save_steps=10**9, logging_steps=10)
                args.per_device_train_batch_size, args.max_steps, args.save_strategy = batch, n_steps, "no"
            else:
                args = TrainingArguments(
                    output_dir=tempfile.mkdtemp(),
                    per_device_train_batch_size=batch,
                    max_steps=n_steps,
                    learning_rate=1e-4,
                    lr_scheduler_type="cosine",
                    warmup_steps=2,
                    bf16=DEVICE == "cuda",
                    use_cpu=DEVICE != "cuda",
                    **heal_mod._checkpointing_args(gc),
                    save_strategy="no",
                    logging_steps=10,
                    report_to="none",
                    remove_unused_columns=False,
                    dataloader_drop_last=True,
                    disable_tqdm=True,
                    torch_compile=base == "chunked-all",
                )
            trainer = DistillationTrainer(
                model=student,
                args=args,
                train_dataset=TokenDataset(seqs),
                data_collator=default_data_collator,
                callbacks=[timer],
                teacher=teacher,
                settings=settings,
            )
            trainer.remove_callback(heal_mod.PrinterCallback)
            t0 = time.perf_counter()
            trainer.train()
            times = [t0, *timer.times]
    finally:
        heal_trainer.chunked_distillation_loss = original_loss
        bf16_rope(False)
    if window:
        median = (times[-1] - times[1]) / a.steps
        steps = [median]
    else:
        steps = [b - a_ for a_, b in itertools.pairwise(times)][a.warmup :]
        median = statistics.median(steps)
    tps = batch * a.seq_len / median
    result = {
        "variant": name,
        "batch": batch,
        "seq_len": a.seq_len,
        "median_step_s": median,
        "spread_s": [min(steps), max(steps)],
        "tokens_per_s": tps,
        "tflops": tps * flops_token / 1e12,
        "mfu": tps * flops_token / 1e12 / a.peak_tflops,
        "peak_mem_gib": peak_gib(),
        "first_step_s": None if window else times[1] - times[0],
        "timing": "window" if window else "step",
    }
    del student
    garbage.collect()
    return result


def manual_loop(
    student: torch.nn.Module, teacher: torch.nn.Module, seqs: torch.Tensor, settings: HealSettings, batch: int
):
    student.to(DEVICE).train()
    if settings.gradient_checkpointing:
        student.gradient_checkpointing_enable({"use_reentrant": False})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=DEVICE == "cuda")
    times = [time.perf_counter()]
    for i in range(seqs.shape[0] // batch):
        ids = seqs[i * batch : (i + 1) * batch].to(DEVICE, non_blocking=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss, _, _ = distillation_step(student, student, teacher, ids, settings)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter())
    return times


def check_losses(teacher: torch.nn.Module, student: torch.nn.Module, seq_len: int, out: dict) -> None:
    """Chunked (eager, compiled) and liger against the plain loss on one batch under bf16 autocast: loss, grads."""
    ids = torch.randint(0, teacher.config.vocab_size, (4, seq_len), device=DEVICE)
    results = {}
    for impl in ("plain", "chunked", "chunked-c", "liger"):
        if impl == "liger" and not liger_available():
            continue
        settings = HealSettings(data=["x"], loss_impl="plain" if impl == "plain" else "chunked", bf16=True)
        settings.compile = "loss" if impl == "chunked-c" else "none"
        student.zero_grad(set_to_none=True)
        fn = liger_step_loss if impl == "liger" else chunked_distillation_loss
        original, heal_trainer.chunked_distillation_loss = heal_trainer.chunked_distillation_loss, fn
        try:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss, parts, _ = distillation_step(student, student, teacher, ids, settings)
            loss.backward()
        finally:
            heal_trainer.chunked_distillation_loss = original
        grads = torch.cat([p.grad.float().flatten() for p in student.parameters() if p.grad is not None])
        results[impl] = (float(loss), float(parts["kl"]), grads)
    ref = results["plain"]
    for impl, (loss, kl, grads) in results.items():
        out[impl] = {
            "loss": loss,
            "kl": kl,
            "loss_rel_diff": abs(loss - ref[0]) / abs(ref[0]),
            "grad_rel_diff": float((grads - ref[2]).norm() / ref[2].norm()),
        }
    student.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--variants", default="old:16,chunked:16,chunked-c:16,chunked-c:32,chunked-c:64")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timing", choices=("step", "window"), default="step")
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--check", action="store_true", help="compare the losses and gradients first")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cuda (timings) or cpu (a smoke test of the script only)")
    a = p.parse_args()
    global DEVICE
    DEVICE = a.device

    teacher = random_model(a.shape, a.layers, torch.bfloat16, DEVICE).requires_grad_(False)
    plan = PLANS.get(a.shape) if a.layers is None else None
    plan = plan or default_plan(teacher.config.num_hidden_layers)

    def make_student() -> torch.nn.Module:
        student = fuse_model(teacher, plan).float().train()
        student.config.use_cache = False
        return student

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": a.shape,
        "layers": teacher.config.num_hidden_layers,
        "plan": {"remove_attention": plan.remove_attention, "fuse_ffn": plan.fuse_ffn},
        "liger": liger_available(),
        "results": [],
    }
    s = make_student()
    report["student_blocks"] = len(s.config.block_configs)
    report["student_params"] = s.num_parameters()
    if a.check:
        report["check"] = {}
        check_losses(teacher, s.to(DEVICE), a.seq_len, report["check"])
        print(json.dumps(report["check"], indent=1), flush=True)
    del s
    for spec in a.variants.split(","):
        name, batch = spec.split(":")
        if name.startswith("liger") and not report["liger"]:
            continue
        try:
            r = run_variant(name, int(batch), teacher, make_student, a)
        except Exception as e:  # one failing variant (OOM, compile) must not lose the others
            traceback.print_exc()
            r = {"variant": name, "batch": int(batch), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            reset_peak()
        report["results"].append(r)
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1)
    print(f"\n{a.shape}, {report['layers']} layers -> {report['student_blocks']} blocks, {report['device']}")
    print(f"{'variant':<16}{'batch':>6}{'tok/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'step ms':>9}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['variant']:<16}{r['batch']:>6}  {r['error'][:80]}")
            continue
        print(
            f"{r['variant']:<16}{r['batch']:>6}{r['tokens_per_s']:>12,.0f}{r['tflops']:>9.1f}{r['mfu']:>7.1%}"
            f"{r['peak_mem_gib']:>10.1f}{r['median_step_s'] * 1e3:>9.1f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
