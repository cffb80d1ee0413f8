"""Checks of `heal`'s models, run before any text is read or model loaded.

Inputs: the student's config.json (as a dict), the teacher's config and both tokenizers. Output: nothing, or a
HealError that says which model to pass instead.
"""

from __future__ import annotations

import json
from typing import Any

from ffnfusion.heal.settings import HealError
from ffnfusion.io.source import ModelSource


def check_student(source: ModelSource) -> dict[str, Any]:
    if not source.is_fused_checkpoint:
        raise HealError(
            f"{source.spec} is not a fused checkpoint (no DeciLM config.json with block_configs): heal trains the "
            "output of `ffnfusion fuse`; fuse the original model first."
        )
    config = json.loads((source.folder / "config.json").read_text())
    if "DeciLMForCausalLM" not in (config.get("architectures") or []):
        raise HealError(f"{source.spec}/config.json does not describe a DeciLMForCausalLM.")
    return config


def check_vocabularies(student_config: dict[str, Any], teacher_config: Any, s_tok: Any, t_tok: Any) -> None:
    s_vocab, t_vocab = student_config.get("vocab_size"), getattr(teacher_config, "vocab_size", None)
    if s_vocab != t_vocab:
        raise HealError(
            f"student and teacher have different vocabulary sizes ({s_vocab} vs {t_vocab}): distillation "
            "compares next-token distributions, so the student must be fused from this teacher."
        )
    if s_tok is not None and t_tok is not None:
        s_v, t_v = s_tok.get_vocab(), t_tok.get_vocab()
        if s_v != t_v:
            differ = len(set(s_v.items()) ^ set(t_v.items()))
            raise HealError(
                f"student and teacher tokenizers differ ({differ} token/id pairs are not shared): the student "
                "must use the teacher's tokenizer."
            )


def check_widths(student_config: dict[str, Any], teacher_config: Any, student: str, teacher: str) -> None:
    """The cosine term compares the final hidden states, so both models must have the same hidden size."""
    s_hidden, t_hidden = student_config.get("hidden_size"), getattr(teacher_config, "hidden_size", None)
    if s_hidden is None or t_hidden is None or s_hidden == t_hidden:
        return
    s_blocks = len(student_config.get("block_configs") or [])
    t_layers = getattr(teacher_config, "num_hidden_layers", "?")
    raise HealError(
        f"student and teacher have different hidden sizes: the student {student} has hidden_size {s_hidden} "
        f"({s_blocks} blocks), the teacher {teacher} has hidden_size {t_hidden} ({t_layers} layers). Distillation "
        "compares their final hidden states (cosine loss) and next-token distributions position by position, so "
        "the student must be fused from this teacher: pass the original model the student was fused from as "
        "--teacher."
    )
