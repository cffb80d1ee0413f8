"""What `bench` measures and how: BenchSettings, the one declaration of its options.

The `ffnfusion bench` options (cli/bench.py), run.yaml's `bench:` section and the keyword options of
`bench.stage.bench` are these fields; each description is the option's help text.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class BenchSettings(BaseModel):
    """The batches, prompts and timing every model is measured with, and the random-weights shapes."""

    model_config = ConfigDict(extra="forbid")

    batch_sizes: tuple[int, ...] | list[int] = Field((1, 8, 32), description="comma-separated batch sizes")
    prompt_len: int = Field(512, description="prompt tokens per sequence")
    new_tokens: int = Field(128, description="tokens generated per sequence")
    dtype: str = Field("bfloat16", description="bfloat16, float16 or float32")
    device: str | None = Field(None, description="auto, cpu, cuda, cuda:1, ...")
    random_weights: bool = Field(
        False, description="time a randomly initialised model of --shape (speed does not depend on weights)"
    )
    shape: str | None = Field(None, description="smollm2-135m, llama-3.2-1b, llama-3.1-8b or llama-3.1-70b")
    layers: int | None = Field(None, description="keep only the first N layers of --shape")
    reference_tokens: int = Field(
        32, description="tokens of eager `generate` to time and to compare with the engine (0: skip)"
    )
    repeats: int = Field(3, description="timed generations per batch size")
    kernels: str = Field("auto", description="auto, triton or torch")
    graphs: bool | None = Field(None, description="capture prefill and decode as CUDA graphs (CUDA only)")
    ffn_probe: int = Field(
        0, description="also time N FFNs of the model's shape in sequence vs fused into one (0: skip)"
    )
    prompt_file: str | Path | None = Field(None, description="text to cut prompts from (default: random token ids)")
    seed: int = 0
