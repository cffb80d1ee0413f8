"""Resuming a heal: which Trainer checkpoint is complete, and refusing to mix runs with different settings."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from ffnfusion.heal.budget import (
    log,
)
from ffnfusion.heal.settings import SETTINGS_FILE, HealError, HealSettings


def _unreadable_zip(path: Path) -> bool:
    """True for a torch.save file (a zip archive) that is missing or cut short (its central directory is at the end)."""
    try:
        with zipfile.ZipFile(path):
            return False
    except (OSError, zipfile.BadZipFile):
        return True


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (half-written: missing or truncated files), or None."""
    state = folder / "trainer_state.json"
    try:
        if "global_step" not in json.loads(state.read_text()):
            return f"{state.name} has no global_step"
    except (OSError, ValueError):
        return f"{state.name} is missing or not complete JSON"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weights = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{index.name} is not complete JSON"
    else:
        weights = [folder / "model.safetensors"]
    fsdp = any(folder.glob("pytorch_model_fsdp*")) or any(folder.glob("optimizer_*"))
    if not fsdp:
        if (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists():
            if _unreadable_zip(folder / "pytorch_model.bin"):
                return "pytorch_model.bin is truncated"
        else:
            from safetensors import safe_open

            for file in weights:
                try:
                    with safe_open(file, framework="pt") as f:
                        f.keys()
                except Exception:
                    return f"{file.name} is missing or truncated"
        if _unreadable_zip(folder / "optimizer.pt"):
            return "optimizer.pt is missing or truncated"
    for name in ("scheduler.pt", "rng_state.pth"):
        if (folder / name).exists() and _unreadable_zip(folder / name):
            return f"{name} is truncated"
    return None


def _resumable_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint; half-written newer ones are skipped with a warning naming them."""
    numbered = [
        (int(m.group(1)), p)
        for p in checkpoint_dir.iterdir()
        if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    skipped = []
    for _, folder in sorted(numbered, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            for bad, why in skipped:
                log.warning("--resume: skipping half-written checkpoint %s (%s); resuming from %s.", bad, why, folder)
            return str(folder)
        skipped.append((folder, problem))
    listing = "; ".join(f"{bad.name}: {why}" for bad, why in skipped)
    log.warning(
        "--resume: no complete checkpoint in %s (%s): starting from scratch (step 0). The half-written folders are "
        "replaced as training reaches their steps.",
        checkpoint_dir,
        listing,
    )
    return None


def _check_resume(checkpoint_dir: Path, settings: HealSettings, resume: bool) -> str | None:
    """The checkpoint to resume from (None for a fresh run); refuses to mix runs with different settings."""
    saved = checkpoint_dir / SETTINGS_FILE
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if not resume:
        if last is not None:
            raise HealError(
                f"{checkpoint_dir} holds checkpoints of an earlier run: pass --resume to continue it, or "
                "--overwrite to start again."
            )
        return None
    if last is None:
        if not saved.is_file():
            raise HealError(
                f"--resume: no checkpoint found in {checkpoint_dir}: no heal was started with this --out; drop "
                "--resume to start one, or give the --out of the heal to continue."
            )
        # The interrupted heal stopped before its first save: nothing to continue, and nothing lost by starting over.
        log.warning("--resume: %s holds no checkpoint yet: starting from step 0.", checkpoint_dir)
        return None
    if saved.is_file():
        before = json.loads(saved.read_text())
        if settings.batch_size is None and before.get("batch_size"):
            settings.batch_size = int(before["batch_size"])  # the automatic size the interrupted run picked
        if settings.lr is None and before.get("lr"):
            settings.lr = float(before["lr"])  # the rate the interrupted run trained with, automatic or given
        now = json.loads(json.dumps(settings.training_key()))
        # A setting added since the interrupted run started had its default there.
        fields = HealSettings.model_fields
        before = {k: fields[k].default for k in now if k not in before and not fields[k].is_required()} | before
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if differ:
            raise HealError(
                f"--resume: settings differ from the interrupted run ({', '.join(differ)}); resume with the same "
                "settings or start a new run."
            )
    return _resumable_checkpoint(checkpoint_dir)
