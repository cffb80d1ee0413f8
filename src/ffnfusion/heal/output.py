"""`heal`'s output: the healed checkpoint in the student's format, the training log and the loss curve.

Inputs: the trained state dict, the student checkpoint it started from, the HealSummary. Output: the folder `out`,
written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ffnfusion.heal.settings import CURVE_FILE, LOG_FILE, PLAN_FILE, HealSettings, HealSummary
from ffnfusion.io.checkpoint import LazySafetensors, atomic_output_dir, write_fused_checkpoint
from ffnfusion.io.output import Input
from ffnfusion.io.source import ModelSource


def _stored_dtypes(folder: Path) -> dict[str, torch.dtype]:
    """name -> dtype of every tensor stored in the student checkpoint, read from the safetensors headers."""
    from safetensors import safe_open

    lazy = LazySafetensors(folder)
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    out = {}
    for file in sorted(set(lazy.weight_map.values())):
        with safe_open(folder / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[name] = names.get(f.get_slice(name).get_dtype(), torch.float32)
    return out


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss (and its parts) against the step, from Trainer's log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if "loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (("loss", "total"), ("loss_kl", "KL"), ("loss_cos", "cosine"), ("loss_lm", "LM cross-entropy")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, linewidth=1.5 if key == "loss" else 1.0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or "distillation loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_output(
    out: Path,
    inputs: list[Input],
    s_source: ModelSource,
    student_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    summary: HealSummary,
    settings: HealSettings,
    overwrite: bool,
) -> None:
    # Write exactly the tensors (names and dtypes) the student checkpoint holds, so the result is the same format.
    dtypes = _stored_dtypes(s_source.folder)
    missing = sorted(set(dtypes) - set(state))
    if missing:
        raise RuntimeError(f"the trained model lacks tensors of the student checkpoint: {missing[:5]}")
    tensors = ((name, state[name].detach().to("cpu", dtypes[name])) for name in sorted(dtypes))
    config_kwargs = {
        k: v for k, v in student_config.items() if k not in ("architectures", "auto_map", "transformers_version")
    }
    config_kwargs.pop("model_type", None)
    report = {k: v for k, v in asdict(summary).items() if k != "log_history"}
    report["out"] = str(out)
    extra = {
        LOG_FILE: "".join(json.dumps(r) + "\n" for r in summary.log_history),
        "heal_summary.json": json.dumps({"settings": settings.model_dump(), "result": report}, indent=2) + "\n",
    }
    plan_file = s_source.folder / PLAN_FILE
    if plan_file.is_file():
        extra[PLAN_FILE] = plan_file.read_text()
    with atomic_output_dir(out, "heal", inputs, overwrite) as tmp:
        write_fused_checkpoint(tmp, config_kwargs, tensors, tokenizer, extra_files=extra)
        plot_loss_curve(summary.log_history, tmp / CURVE_FILE, f"heal: {s_source.spec}")
