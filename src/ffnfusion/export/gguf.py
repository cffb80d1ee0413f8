"""`ffnfusion export --format gguf`: a fused checkpoint -> one GGUF file of llama.cpp's `deci` architecture.

The file is what llama.cpp's own DeciLM converter would write for the checkpoint, without its limits: per-layer
arrays `deci.attention.head_count` / `head_count_kv` (0 where attention is a no-op) and `deci.feed_forward_length`
(the fused widths, exact: GGUF stores widths, not `ffn_mult`), RoPE base and scaling (Llama 3 RoPE as the
`rope_freqs` tensor), q/k rows permuted from Hugging Face's rotate-half layout to GGML's interleaved one, tied
embeddings as a missing `output.weight`, and the tokenizer in either llama.cpp form (vocab.py). Blocks that are
no-ops in both halves are identities and are left out (llama.cpp mishandles one in last place).

What the `deci` graph cannot run is refused with the reason, before anything is written: block-parallel groups,
q/k norms, biases, head_dim != hidden / heads, a block with attention but no FFN, a first block without attention,
activations other than SiLU and RoPE scalings other than default / linear / llama3.

Tensors are streamed: every tensor's GGUF type and size are laid out from the safetensors headers, then each is
read, converted and written in turn, so memory holds one tensor at a time. The file is written under a temporary
name beside `--out` and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ffnfusion.export.vocab import read_vocab
from ffnfusion.io.output import check_output_file

VERB = "export"
VERSION_KEY = "ffnfusion.version"
SOURCE_KEY = "ffnfusion.source_blocks"
Q = gguf.GGMLQuantizationType
FILE_TYPES: dict[str, tuple[gguf.LlamaFileType, Q]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
T = gguf.MODEL_TENSOR


class ExportError(ValueError):
    """A checkpoint or option that cannot become a GGUF llama.cpp runs correctly; the message says why and how."""


def tensor_name(kind: gguf.MODEL_TENSOR, block: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=block) + ".weight"


@dataclass
class Layer:
    """One GGUF block: which checkpoint block it comes from and its shape (0 heads / 0 width for a no-op)."""

    source: int
    heads: int
    kv_heads: int
    ffn: int


@dataclass
class TensorPlan:
    name: str  # GGUF name
    source: str | None  # checkpoint tensor name; None for computed tensors (rope_freqs)
    shape: tuple[int, ...]
    qtype: Q
    permute_heads: int | None = None  # HF rotate-half -> GGML interleaved RoPE layout, over this many heads

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


@dataclass
class ExportSummary:
    out: Path
    source: Path
    dtype: str
    blocks_before: int
    blocks_after: int
    dropped_blocks: list[int]
    tensors: int
    bytes: int
    tokenizer: str
    pre_tokenizer: str
    pre_source: str
    kept_f16: list[str] = field(default_factory=list)  # q8_0 fallbacks: rows not a multiple of 32


def is_ffnfusion_gguf(path: Path) -> bool:
    """An earlier `ffnfusion export` output: a GGUF whose metadata carries `ffnfusion.version`."""
    try:
        return VERSION_KEY in gguf.GGUFReader(path, "r").fields
    except Exception:  # anything unreadable as GGUF is not ours
        return False


def _rope(config: dict[str, Any], where: Path) -> tuple[float, dict[str, Any]]:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ExportError(
            f"{where}: RoPE scaling {kind!r} cannot be expressed for llama.cpp's deci models by ffnfusion (default, "
            "linear and llama3 can). Serve this checkpoint with vLLM or transformers instead."
        )
    return theta, {**rope, "rope_type": kind}


def _llama3_rope_factors(rope: dict[str, Any], theta: float, dim: int) -> torch.Tensor:
    # As llama.cpp's DeciModel.generate_extra_tensors: one factor per rotary frequency.
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def deci_layers(config: dict[str, Any], where: Path) -> tuple[list[Layer], list[int]]:
    """The GGUF blocks of a fused checkpoint's config (widths from config) and the dropped identity blocks.

    Raises ExportError, naming the block and the reason, for anything llama.cpp's deci graph would run wrongly.
    """
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    refuse = []
    if head_dim * heads != hidden:
        refuse.append(
            f"head_dim {head_dim} x {heads} heads != hidden_size {hidden} (Qwen3-style; llama.cpp's deci graph "
            "derives the head size from hidden / heads)"
        )
    if config.get("qk_norm"):
        refuse.append("q/k norms (Qwen3) are an ffnfusion extension the deci graph does not apply")
    for key, what in (
        ("qkv_bias", "q/k/v bias (Qwen2)"),
        ("attention_bias", "attention bias"),
        ("mlp_bias", "MLP bias"),
    ):
        if config.get(key):
            refuse.append(f"{what}: llama.cpp's DeciLM converter writes no biases and ffnfusion does not either")
    if config.get("hidden_act", "silu") != "silu":
        refuse.append(f"activation {config['hidden_act']!r} (the deci graph's FFN is SwiGLU with SiLU)")
    from ffnfusion.modeling.modeling_decilm import block_ffn_width

    layers, dropped = [], []
    for i, block in enumerate(config["block_configs"]):
        attn, ffn = block["attention"], block["ffn"]
        has_attn = not attn.get("no_op") and attn.get("n_heads_in_group") is not None
        has_ffn = not ffn.get("no_op")
        if (block.get("parallel_blocks") or 1) > 1:
            refuse.append(f"block {i} is a block-parallel group (an ffnfusion extension; the deci graph is sequential)")
        if attn.get("replace_with_linear") or ffn.get("replace_with_linear"):
            refuse.append(f"block {i} replaces a sub-block with a linear layer (not written by ffnfusion)")
        if has_attn and not has_ffn:
            refuse.append(
                f"block {i} has attention but no FFN: llama.cpp's deci graph skips such a block's output entirely"
            )
        if not has_attn and not has_ffn:
            dropped.append(i)
            continue
        kv = heads // attn["n_heads_in_group"] if has_attn else 0
        layers.append(Layer(i, heads if has_attn else 0, kv, block_ffn_width(block, hidden) if has_ffn else 0))
    if not layers:
        refuse.append("every block is a no-op")
    elif layers[0].heads == 0:
        refuse.append(
            f"the first block (block {layers[0].source}) has no attention: llama.cpp takes the head size from the "
            "first block's head count"
        )
    if refuse:
        raise ExportError(
            f"{where} cannot be written as a llama.cpp `deci` GGUF: " + "; ".join(refuse) + ". Serve it with "
            "transformers (import ffnfusion) instead, or fuse with a plan that avoids it."
        )
    return layers, dropped


def _qtype_for(name: str, shape: tuple[int, ...], want: Q) -> Q:
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32  # llama.cpp's convention: 1-D tensors and norms stay F32
    block, _ = gguf.GGML_QUANT_SIZES[want]
    if shape[-1] % block:
        return Q.F16  # as llama.cpp's converter: rows that do not split into quant blocks fall back to F16
    return want


def plan_tensors(
    config: dict[str, Any], layers: list[Layer], meta: Callable[[str], torch.Tensor], keys: set[str], want: Q
) -> list[TensorPlan]:
    """Every GGUF tensor with its checkpoint source, checked against the checkpoint's tensor names and shapes."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    tied = bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in keys
    plans: list[TensorPlan] = []
    problems: list[str] = []
    used: set[str] = set()

    def add(
        kind: gguf.MODEL_TENSOR, block: int | None, source: str, shape: tuple[int, ...], permute: int | None = None
    ):
        name = tensor_name(kind, block)
        used.add(source)
        if source not in keys:
            problems.append(f"missing tensor {source}")
            return
        found = tuple(meta(source).shape)
        if found != shape:
            problems.append(f"{source} has shape {list(found)}, the config implies {list(shape)}")
            return
        plans.append(TensorPlan(name, source, shape, _qtype_for(name, shape, want), permute))

    add(T.TOKEN_EMBD, None, "model.embed_tokens.weight", (vocab, hidden))
    for j, layer in enumerate(layers):
        src = f"model.layers.{layer.source}."
        if layer.heads:
            q, kv = layer.heads * head_dim, layer.kv_heads * head_dim
            add(T.ATTN_NORM, j, src + "input_layernorm.weight", (hidden,))
            add(T.ATTN_Q, j, src + "self_attn.q_proj.weight", (q, hidden), layer.heads)
            add(T.ATTN_K, j, src + "self_attn.k_proj.weight", (kv, hidden), layer.kv_heads)
            add(T.ATTN_V, j, src + "self_attn.v_proj.weight", (kv, hidden))
            add(T.ATTN_OUT, j, src + "self_attn.o_proj.weight", (hidden, q))
        if layer.ffn:
            add(T.FFN_NORM, j, src + "post_attention_layernorm.weight", (hidden,))
            add(T.FFN_GATE, j, src + "mlp.gate_proj.weight", (layer.ffn, hidden))
            add(T.FFN_UP, j, src + "mlp.up_proj.weight", (layer.ffn, hidden))
            add(T.FFN_DOWN, j, src + "mlp.down_proj.weight", (hidden, layer.ffn))
    add(T.OUTPUT_NORM, None, "model.norm.weight", (hidden,))
    if not tied:
        add(T.OUTPUT, None, "lm_head.weight", (vocab, hidden))
    else:
        used.add("lm_head.weight")
    if extra := sorted(keys - used):
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        problems.append(f"tensors the deci GGUF has no place for (they would be dropped): {shown}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ExportError(
            f"The weights do not match the checkpoint's config.json ({shown}). Re-run `ffnfusion fuse` to write a "
            "consistent checkpoint."
        )
    return plans


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half row order -> GGML's interleaved RoPE pairs (llama.cpp's converter `permute`)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _convert(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, qtype)


def _write_metadata(
    writer: gguf.GGUFWriter,
    config: dict[str, Any],
    layers: list[Layer],
    ftype: gguf.LlamaFileType,
    name: str,
    theta: float,
    rope: dict[str, Any],
) -> None:
    from ffnfusion import __version__

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = hidden // heads
    writer.add_type("model")
    writer.add_name(name)
    writer.add_string(VERSION_KEY, __version__)
    writer.add_array(SOURCE_KEY, [layer.source for layer in layers])
    writer.add_block_count(len(layers))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length([layer.ffn for layer in layers])
    writer.add_head_count([layer.heads for layer in layers])
    writer.add_head_count_kv([layer.kv_heads for layer in layers])
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tensors(
    writer: gguf.GGUFWriter, plans: list[TensorPlan], tensor_of: Callable[[TensorPlan], torch.Tensor]
) -> None:
    """The tensor table first (from the plans alone), then each tensor read, converted and written in turn."""
    for plan in plans:
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for plan in plans:
        tensor = tensor_of(plan)
        writer.write_tensor_data(_convert(tensor, plan.qtype))
        del tensor


def _fused_source(fused: str | Path) -> Any:
    from ffnfusion.io.source import resolve_model

    source = resolve_model(str(fused))
    if not source.is_fused_checkpoint:
        raise ExportError(
            f"{fused} is not a fused checkpoint (it has no config.json with block_configs): `ffnfusion export` writes "
            "the output of `ffnfusion fuse` or `ffnfusion heal`. Fuse the model first; for the unmodified model (a "
            "baseline exported the same way) fuse it with an empty plan (a plan.json of `{}`), or use llama.cpp's own "
            "convert_hf_to_gguf.py."
        )
    return source


def _read_config(folder: Path) -> tuple[dict[str, Any], list[Layer], list[int], float, dict[str, Any]]:
    """config.json, its GGUF blocks and the dropped identity blocks, RoPE base and scaling: refused if unusable."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key in ("hidden_size", "num_attention_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings"):
        if key not in config:
            raise ExportError(f"{folder / 'config.json'} has no {key!r}: re-run `ffnfusion fuse` to write it again.")
    layers, dropped = deci_layers(config, folder / "config.json")
    theta, rope = _rope(config, folder / "config.json")
    return config, layers, dropped, theta, rope


def export_gguf(
    fused: str | Path,
    out: str | Path,
    dtype: str = "f16",
    overwrite: bool = False,
    tokenizer_pre: str | None = None,
    name: str | None = None,
) -> ExportSummary:
    """Write the fused checkpoint `fused` as a llama.cpp `deci` GGUF at `out` (atomically); see the module doc."""
    from ffnfusion.io.checkpoint import LazySafetensors

    if dtype not in FILE_TYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(FILE_TYPES)}.")
    source = _fused_source(fused)
    folder = source.folder
    inputs = [("fused checkpoint", source.input_path)]
    out = check_output_file(out, VERB, is_ffnfusion_gguf, inputs, replace=overwrite, error=ExportError)
    config, layers, dropped, theta, rope = _read_config(folder)
    file_type, want = FILE_TYPES[dtype]
    vocab = read_vocab(folder, int(config["vocab_size"]), tokenizer_pre)
    lazy = LazySafetensors(folder)
    plans = plan_tensors(config, layers, lazy.meta, set(lazy.keys()), want)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if rope["rope_type"] == "llama3":
        plans.insert(1, TensorPlan(tensor_name(T.ROPE_FREQS), None, (head_dim // 2,), Q.F32))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"

    def tensor_of(plan: TensorPlan) -> torch.Tensor:
        if plan.source is None:
            return _llama3_rope_factors(rope, theta, head_dim)
        tensor = lazy.get(plan.source)
        return permute_qk(tensor, plan.permute_heads) if plan.permute_heads else tensor

    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI])
        _write_metadata(writer, config, layers, file_type, name or folder.name, theta, rope)
        vocab.add_to(writer)
        _write_tensors(writer, plans, tensor_of)
        writer.close()
        # Asked again: something may have appeared under the output's name while the file was written.
        check_output_file(out, VERB, is_ffnfusion_gguf, inputs, replace=overwrite, error=ExportError)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportSummary(
        out=out,
        source=folder,
        dtype=dtype,
        blocks_before=len(config["block_configs"]),
        blocks_after=len(layers),
        dropped_blocks=dropped,
        tensors=len(plans),
        bytes=out.stat().st_size,
        tokenizer=vocab.model,
        pre_tokenizer=vocab.pre,
        pre_source=vocab.pre_source,
        kept_f16=[p.name for p in plans if p.qtype == Q.F16 and want != Q.F16],
    )
