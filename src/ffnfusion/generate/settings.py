"""What decides a generated corpus, validated before any work."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ffnfusion.generate.prompts import PROMPT_MODES


class GenerateError(ValueError):
    """Settings or an output folder that cannot give the corpus asked for."""


class GenerateSettings(BaseModel):
    """What decides the corpus. `tokens` is the target size; everything else must match when resuming.

    The `ffnfusion generate` options (cli/generate.py) are these fields; each description is the option's help text.
    """

    model_config = ConfigDict(extra="forbid")

    tokens: int = Field(description="corpus size in tokens, e.g. 50M, 200k (rounded up to sequences)")
    seq_len: int = Field(512, description="tokens per stored sequence (and the longest document)")
    temperature: float = Field(1.0, description="sampling temperature (0: greedy)")
    top_p: float = Field(0.95, description="nucleus sampling mass (1: the whole vocabulary)")
    seed: int = Field(0, description="seeds the sampling and the prompt choice")
    prompts: str = Field(
        "auto",
        description="auto (chat models: mix; else bos), bos (free text from BOS), chat (chat template + built-in "
        "instructions), mix (half bos, half chat), FILE",
    )
    prompt_format: str = Field("text", description="FILE lines are `text` or `chat` turns")
    prompt_tokens: int = Field(64, description="keep at most this many tokens of each prompt")
    batch_size: int | None = Field(None, description="slots (default: up to 512 on GPU, 32 on CPU, as memory allows)")
    shard_tokens: int = Field(2**23, description="tokens per shard (the unit a killed run resumes from)")
    dtype: str = Field(
        "auto",
        description="auto (bf16 where the hardware computes it natively: GPUs, CPUs with AMX or AVX512-BF16; else "
        "fp32), float32, bfloat16, float16",
    )
    sync_every: int = 16  # decode steps between host syncs of the sampling engine (not an option)

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
            problems.append(f"--prompts {self.prompts!r} is neither auto, bos, chat, mix nor a readable file")
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
