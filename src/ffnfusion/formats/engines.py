"""Which serving engines load which fused layouts, and how that is known.

The checkpoint's model-level features (biases, q/k norms, head_dim) are judged by `fuse.engine_support` on the
written config. What a plan itself decides is judged here, before anything is fused, so that `plan` can leave out
the recipes a user's engine cannot run.
"""

from __future__ import annotations

from collections.abc import Iterable

from ffnfusion.formats.plan import Plan

ENGINES = ("transformers", "llama.cpp", "vLLM", "SGLang", "TensorRT-LLM")
EXTERNAL = ENGINES[1:]

# How each engine's verdict is known. "verified": the checkpoint was run in the engine and compared with the
# reference; "inferred": read in the engine's DeciLM / nemotron-nas model code, never run by this project.
ENGINE_EVIDENCE = {
    "transformers": "verified: ffnfusion's tests generate with dynamic and static caches, compiled, eager and sdpa",
    "llama.cpp": "verified end to end for no-op attention + wide FFNs: converted with its own converter, reference"
    " perplexity",
    "vLLM": "inferred from vllm/model_executor/models/nemotron_nas.py, not run; needs --trust-remote-code",
    "SGLang": "inferred from sglang/srt/models/nemotron_nas.py, not run; needs --trust-remote-code",
    "TensorRT-LLM": "inferred from tensorrt_llm/_torch/models/modeling_nemotron_nas.py, not run",
}

PARALLEL_GROUPS = "block-parallel groups are an ffnfusion extension"
ATTENTION_WITHOUT_FFN = "a block with attention but no FFN loses its attention output there"


def engine_names(names: Iterable[str]) -> list[str]:
    """User-written engine names (any case; `all` for every engine) -> ENGINES' spelling, in ENGINES' order."""
    by_key = {e.lower(): e for e in ENGINES} | {"trt-llm": "TensorRT-LLM", "tensorrt_llm": "TensorRT-LLM"}
    chosen: set[str] = set()
    unknown = []
    for name in names:
        key = name.strip().lower()
        if key == "all":
            chosen |= set(ENGINES)
        elif key in by_key:
            chosen.add(by_key[key])
        elif key:
            unknown.append(name.strip())
    if unknown:
        raise ValueError(f"unknown engine(s) {', '.join(unknown)}: choose from {', '.join(ENGINES)} or all.")
    return [e for e in ENGINES if e in chosen]


def plan_limits(plan: Plan) -> dict[str, list[str]]:
    """The engines that cannot run what this plan writes, with the reasons (empty: every engine can)."""
    limits: dict[str, list[str]] = {}
    if plan.parallel_blocks:
        for engine in EXTERNAL:
            limits.setdefault(engine, []).append(PARALLEL_GROUPS)
    if set(plan.remove_ffn) - set(plan.remove_attention):
        limits.setdefault("llama.cpp", []).append(ATTENTION_WITHOUT_FFN)
    return limits
