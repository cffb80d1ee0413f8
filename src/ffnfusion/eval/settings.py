"""What `eval` measures and how: EvalSettings, the one declaration of its options.

The `ffnfusion eval` options (cli/eval.py), run.yaml's `eval:` section and the keyword options of
`eval.stage.evaluate` are these fields; each description is the option's help text.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class EvalSettings(BaseModel):
    """The text and tasks every model is scored on, and how."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(
        None, description="text for perplexity/fidelity: file, folder, .jsonl, .parquet or datasets name"
    )
    text_field: str = Field("text", description="text column of .jsonl/.parquet/datasets")
    tasks: list[str] | None = Field(
        None, description="comma-separated: hellaswag,arc_easy,arc_challenge,piqa,winogrande,lambada_openai,mmlu"
    )
    task_data_dir: str | Path | None = Field(
        None, description="folder with local copies of the task files (else lm-eval uses the hub)"
    )
    limit: int | None = Field(None, description="score only the first N items of each task")
    context_len: int = Field(512, description="perplexity window, tokens")
    stride: int | None = Field(None, description="tokens between window starts (default: context length)")
    max_tokens: int | None = Field(None, description="use only the first N tokens of --data")
    batch_size: int | None = Field(
        None,
        description="sequences per forward pass (default: automatic; 8 on CPU, on a GPU up to 64 as its memory "
        "allows for the logits)",
    )
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    seed: int = 0
    cache: bool = Field(
        True, description="reuse the reference model's scores from an earlier eval of the same weights, text and tasks"
    )
