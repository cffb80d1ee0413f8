"""The `fuse` stage: original model + plan -> fused checkpoint in the DeciLM / nemotron-nas format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffnfusion.adapters import adapter_for
from ffnfusion.formats.engines import ATTENTION_WITHOUT_FFN, ENGINE_EVIDENCE, EXTERNAL, PARALLEL_GROUPS
from ffnfusion.formats.plan import ENGINE_WIDTH_MULTIPLE, Plan, check_plan_model, plan_blocks, sequential_sub_blocks
from ffnfusion.formats.settings import settings_from
from ffnfusion.fuse_settings import FuseSettings
from ffnfusion.io.checkpoint import TensorInfo, atomic_output_dir, write_fused_checkpoint
from ffnfusion.io.device import parse_dtype
from ffnfusion.io.output import check_output_dir
from ffnfusion.io.source import ModelSource, ModelSourceError, resolve_model
from ffnfusion.modeling.modeling_decilm import block_ffn_width
from ffnfusion.surgery import fused_config, fused_tensors


@dataclass
class FuseSummary:
    out: Path
    layers_before: int
    layers_after: int
    sub_blocks_before: int
    sub_blocks_after: int
    params_before: int
    params_after: int
    engines: dict[str, str] = field(default_factory=dict)  # engine -> "yes" or the reason it cannot load the model


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the DeciLM model that `config` describes (what the checkpoint holds)."""
    hidden, hd, vocab = config["hidden_size"], config["head_dim"], config["vocab_size"]
    heads = config["num_attention_heads"]
    qkv_bias = config.get("attention_bias") or config.get("qkv_bias")
    total = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2) + hidden
    for block in config["block_configs"]:
        p = block.get("parallel_blocks", 1) or 1
        attn = block["attention"]
        if not attn["no_op"]:
            kv = heads // attn["n_heads_in_group"]
            q_out, kv_out = p * heads * hd, p * kv * hd
            total += hidden + hidden * (q_out + 2 * kv_out) + q_out * hidden
            total += (q_out + 2 * kv_out) * bool(qkv_bias) + hidden * bool(config.get("attention_bias"))
            total += 2 * p * hd * bool(config.get("qk_norm"))
        if not block["ffn"]["no_op"]:
            width = block_ffn_width(block, hidden)
            total += hidden + 3 * hidden * width + (2 * width + hidden) * bool(config.get("mlp_bias"))
    return total


def engine_support(config: dict[str, Any]) -> dict[str, str]:
    """Which engines can load a checkpoint with this config: "yes (how we know)" or "no: the reasons (how we know)".

    Every external engine reads the FFN width from `ffn_mult` (rounded up to 256) and knows neither block-parallel
    groups nor q/k norms. Biases: vLLM reads attention_bias, qkv_bias and mlp_bias; SGLang only qkv_bias (and passes
    it to the whole attention); TensorRT-LLM builds its DeciLM layers without biases; llama.cpp was verified without.
    """
    hidden = config["hidden_size"]
    blocks = config["block_configs"]
    reasons: dict[str, list[str]] = {e: [] for e in EXTERNAL}

    def add(engines: tuple[str, ...], reason: str) -> None:
        for e in engines:
            reasons[e].append(reason)

    if any((b.get("parallel_blocks") or 1) > 1 for b in blocks):
        add(EXTERNAL, PARALLEL_GROUPS)
    if config.get("qk_norm"):
        add(EXTERNAL, "q/k norms (Qwen3) are an ffnfusion extension")
    widths = {block_ffn_width(b, hidden) for b in blocks if not b["ffn"]["no_op"]}
    if bad := sorted(w for w in widths if w % ENGINE_WIDTH_MULTIPLE):
        add(EXTERNAL, f"FFN widths {bad} are not multiples of {ENGINE_WIDTH_MULTIPLE} (ffn_mult cannot say them)")
    if config.get("attention_bias"):
        add(("llama.cpp", "SGLang", "TensorRT-LLM"), "q/k/v/o biases are not loaded by its DeciLM model")
    elif config.get("qkv_bias"):
        add(("llama.cpp", "SGLang", "TensorRT-LLM"), "q/k/v biases (Qwen2) are not loaded as such by its DeciLM model")
    if config.get("mlp_bias"):
        add(("llama.cpp", "SGLang", "TensorRT-LLM"), "MLP biases are not loaded by its DeciLM model")
    if any(not b["attention"]["no_op"] and b["ffn"]["no_op"] for b in blocks):
        add(("llama.cpp",), ATTENTION_WITHOUT_FFN)
    if config["head_dim"] * config["num_attention_heads"] != hidden:
        add(("llama.cpp",), "head_dim != hidden_size / num_attention_heads")
    out = {"transformers": f"yes: import ffnfusion, or trust_remote_code=True ({ENGINE_EVIDENCE['transformers']})"}
    for engine, why in reasons.items():
        verdict = "no: " + "; ".join(why) if why else "yes"
        out[engine] = f"{verdict} ({ENGINE_EVIDENCE[engine]})"
    return out


def _fused_layout(
    source: ModelSource, model: str, plan: Plan | str | Path, force_plan: bool, allow_any_width: bool
) -> tuple[Plan, dict[str, Any], dict[str, Any]]:
    """(the plan, the original's DeciLM config, the fused config): the plan checked against the model."""
    from ffnfusion.formats.analysis import config_hash

    plan_arg = plan
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    hf_config = source.config()
    base = adapter_for(hf_config).decilm_config(hf_config)
    if not force_plan:
        where = "the plan" if isinstance(plan_arg, Plan) else f"plan file {plan_arg}"
        check_plan_model(plan, model, len(base["block_configs"]), config_hash(base), where)
    widths_ok = all(block_ffn_width(b, base["hidden_size"]) % ENGINE_WIDTH_MULTIPLE == 0 for b in base["block_configs"])
    # Only insist on engine-readable fused widths when the original model itself is engine-readable.
    new_config = fused_config(base, plan, require_engine_widths=widths_ok and not allow_any_width)
    return plan, base, new_config


def fuse(
    model: str,
    plan: Plan | str | Path,
    out: str | Path,
    settings: FuseSettings | None = None,
    *,
    overwrite: bool = False,
    force_plan: bool = False,
    **options: Any,
) -> FuseSummary:
    """Apply `plan` to `model` and write the fused checkpoint to `out` (atomically).

    `settings`, or FuseSettings' fields as keyword `options`. A plan that records another model (info.model: layer
    count and architecture hash) is refused unless `force_plan`. Every check that reads no weights runs before the
    first tensor is read.
    """
    settings = settings_from(FuseSettings, settings, options)
    source = resolve_model(model)
    if source.is_fused_checkpoint:
        raise ModelSourceError(
            f"{model} is already a fused checkpoint; plans index the ORIGINAL model's layers, so fuse the original."
        )
    inputs = [("input model", source.input_path), ("plan", None if isinstance(plan, Plan) else plan)]
    out = Path(out)
    check_output_dir(out, "fuse", inputs, overwrite)
    plan, base, new_config = _fused_layout(source, model, plan, force_plan, settings.allow_any_width)
    cast = parse_dtype(settings.dtype) if settings.dtype else None
    # Every output tensor's name, shape and dtype, from the surgery itself run on meta tensors: only shard headers
    # are read, a missing or mis-shaped tensor fails here before anything is written, and the writer can lay out
    # each shard up front and stream one tensor at a time.
    infos = [TensorInfo.of(name, t) for name, t in fused_tensors(base, plan, source.tensor_getter(cast, meta=True))]
    get = source.tensor_getter(cast)
    tokenizer = source.tokenizer()
    with atomic_output_dir(out, "fuse", inputs, overwrite) as tmp:
        params = write_fused_checkpoint(
            tmp,
            new_config,
            fused_tensors(base, plan, get),
            tokenizer,
            generation_config=source.generation_config(),
            max_shard_bytes=settings.max_shard_bytes,
            extra_files={"ffnfusion_plan.json": plan.model_dump_json(indent=2) + "\n"},
            infos=infos,
        )
    num_layers = len(base["block_configs"])
    return FuseSummary(
        out=out,
        layers_before=num_layers,
        layers_after=len(new_config["block_configs"]),
        sub_blocks_before=2 * num_layers,
        sub_blocks_after=sequential_sub_blocks(plan_blocks(plan, num_layers)),
        params_before=count_parameters(base),
        params_after=params,
        engines=engine_support(new_config),
    )
