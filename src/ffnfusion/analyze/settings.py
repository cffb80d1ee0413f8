"""What `analyze` measures and how: AnalyzeSettings, the one declaration of its options.

The `ffnfusion analyze` options (cli/analyze.py), run.yaml's `analyze:` section and the keyword options of
`analyze.stage.analyze` are these fields; each description is the option's help text.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class AnalyzeSettings(BaseModel):
    """Calibration text, what is measured, on which device, and how a model larger than the device is streamed."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field("self", description="calibration text: file, folder, .jsonl, .parquet, datasets name, or `self`")
    samples: int = Field(64, description="calibration sequences")
    seq_len: int = Field(512, description="tokens per sequence")
    seed: int = Field(0, description="chooses the sequences (and seeds `self` sampling)")
    text_field: str = Field("text", description="text column of .jsonl/.parquet/datasets")
    remove_attention: str | list[int] | None = Field(
        None, description="measure with these attention sub-blocks removed, e.g. 12,13,20-23"
    )
    plan: str | Path | None = Field(None, description="measure with this plan's remove_attention applied")
    max_window: int = Field(8, description="longest window (layers) of the window scores")
    device: str | None = Field(None, description="auto, cpu, cuda, cuda:1, ...")
    dtype: str | None = Field("auto", description="auto (bf16 where native), float32, bfloat16, float16")
    batch_size: int | None = Field(None, description="sequences per batch (default: 16 on GPU, 8 on CPU)")
    stream: bool = Field(
        False, description="load one layer at a time onto the device: for models larger than GPU or RAM"
    )
    activations: str = Field(
        "auto", description="with --stream: where the activations between layers live (auto, device, cpu)"
    )
    stream_samples: int | None = Field(
        None, description="with --stream: sequences per pass over the weights (default: as many as memory holds)"
    )
