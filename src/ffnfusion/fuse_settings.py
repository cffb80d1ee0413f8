"""How `fuse` writes the fused checkpoint: FuseSettings, the one declaration of its options.

The `ffnfusion fuse` options (cli/fuse.py), run.yaml's `fuse:` section and the keyword options of `fuse.fuse` are
these fields; each description is the option's help text. A module of its own (not in fuse.py) so that the command
line reads it without loading torch.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FuseSettings(BaseModel):
    """The dtype, width checks and shard size of the fused checkpoint."""

    model_config = ConfigDict(extra="forbid")

    dtype: str | None = Field(None, description="cast weights: float32, bfloat16, float16 (default: as stored)")
    allow_any_width: bool = Field(
        False, description="allow fused FFN widths that vLLM/TensorRT-LLM/llama.cpp cannot read"
    )
    max_shard_bytes: int = Field(5 * 2**30, description="largest safetensors shard, in bytes")
