"""What decides a generated corpus, validated before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ffnfusion.generate.prompts import PROMPT_MODES


class GenerateError(ValueError):
    """Settings or an output folder that cannot give the corpus asked for."""


@dataclass
class GenerateSettings:
    """What decides the corpus. `tokens` is the target size; everything else must match when resuming."""

    tokens: int
    seq_len: int = 512
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    prompts: str = "auto"  # auto | bos | chat | a text file (one prompt per line)
    prompt_format: str = "text"  # for a prompts file: text (a continuation) or chat (an instruction)
    prompt_tokens: int = 64
    batch_size: int | None = None  # default: 512 on CUDA (less if memory is short), 8 on CPU
    shard_tokens: int = 2**23
    dtype: str = "auto"
    sync_every: int = 16

    def validate(self) -> None:
        problems = []
        if self.tokens < 1:
            problems.append(f"--tokens must be at least 1 (got {self.tokens})")
        if self.seq_len < 2:
            problems.append(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.prompt_tokens < 1 or (self.batch_size is not None and self.batch_size < 1):
            problems.append("--prompt-tokens and --batch-size must be at least 1")
        if self.prompt_format not in ("text", "chat"):
            problems.append(f"--prompt-format {self.prompt_format!r}: use text or chat")
        if self.prompts not in PROMPT_MODES and not Path(self.prompts).expanduser().is_file():
            problems.append(f"--prompts {self.prompts!r} is neither auto, bos, chat nor a readable file")
        if problems:
            raise GenerateError("; ".join(problems) + ".")


def parse_tokens(text: str | int) -> int:
    """'50M', '1.5k', '2G' or a plain number -> tokens."""
    s = str(text).strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if scale > 1 else s) * scale)
    except ValueError:
        raise GenerateError(f"--tokens {text!r} is not a number (e.g. 50M, 200k, 1000000).") from None
