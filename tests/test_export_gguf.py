"""`ffnfusion export --format gguf`: the llama.cpp `deci` GGUF, read back with gguf.GGUFReader.

Tiny fused models are made in-process. Every tensor is compared with the checkpoint (q/k through llama.cpp's RoPE
permutation), every metadata key llama.cpp's deci loader reads is checked, and a NumPy forward pass that follows
llama.cpp's deci graph on the GGUF alone reproduces the fused model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from conftest import SMOLLM2_GGUF, tiny_model
from ffnfusion.cli import app
from ffnfusion.export import ExportError, export_gguf
from ffnfusion.export.gguf import is_ffnfusion_gguf, permute_qk
from ffnfusion.export.pretokenizers import KNOWN_PRE_TOKENIZERS, tokenizer_hash
from ffnfusion.formats.plan import Plan
from ffnfusion.fuse import fuse
from ffnfusion.io.checkpoint import LazySafetensors

VOCAB = 320
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6)
PLAN = Plan(remove_attention=[2, 3, 4], fuse_ffn=[[1, 2, 3]])  # 6 layers -> 4 blocks: 0, fused 1-3, 4 (no attn), 5
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Fused feed-forward networks run in parallel; attention was removed.",
    "llama.cpp reads GGUF files: 3 + 4 = 7, and emojis too.",
] * 20


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer.json: BPE with byte fallback over '▁'-joined text (what transformers writes)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "th", "▁th", "he", "▁the"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("t", "h"), ("▁t", "h"), ("h", "e"), ("▁th", "e")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def export(fused: Path, out: Path, **kwargs):
    return export_gguf(fused, out, **{"tokenizer_pre": "gpt-2", **kwargs})


def make_fused(tmp: Path, family: str = "llama", plan: Plan = PLAN, tokenizer=None, **overrides) -> Path:
    """A tiny model of `family`, fused by `plan`; its byte-level BPE tokenizer is unknown to llama.cpp (pre gpt-2)."""
    model = tiny_model(family, **{**SHAPE, **overrides})
    original = tmp / f"{family}-original"
    model.save_pretrained(original)
    (tokenizer or byte_level_tokenizer()).save_pretrained(original)
    out = tmp / f"{family}-fused"
    fuse(str(original), plan, out)
    return out


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> Path:
    return make_fused(tmp_path_factory.mktemp("gguf"))


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def dense(tensor) -> np.ndarray:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def deci_forward(path: Path, ids: list[int]) -> np.ndarray:
    """Logits of the GGUF as llama.cpp's deci graph computes them (interleaved RoPE), from the file alone."""
    reader = gguf.GGUFReader(path)
    w = {t.name: dense(t).astype(np.float64) for t in reader.tensors}
    heads, kvs = field(reader, "deci.attention.head_count"), field(reader, "deci.attention.head_count_kv")
    ffs = field(reader, "deci.feed_forward_length")
    eps, base = field(reader, "deci.attention.layer_norm_rms_epsilon"), field(reader, "deci.rope.freq_base")
    hd = field(reader, "deci.rope.dimension_count")
    factors = w.get("rope_freqs.weight", np.ones(hd // 2))
    n = len(ids)
    theta = np.arange(n)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :] / factors[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def rope(x):  # (n, heads, hd), GGML "normal" mode: rotate adjacent pairs
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    x = w["token_embd.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(field(reader, "deci.block_count")):
        if heads[i]:
            h = rms(x, w[f"blk.{i}.attn_norm.weight"], eps)
            q = rope((h @ w[f"blk.{i}.attn_q.weight"].T).reshape(n, heads[i], hd))
            k = rope((h @ w[f"blk.{i}.attn_k.weight"].T).reshape(n, kvs[i], hd))
            v = (h @ w[f"blk.{i}.attn_v.weight"].T).reshape(n, kvs[i], hd)
            k, v = (np.repeat(t, heads[i] // kvs[i], axis=1) for t in (k, v))
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x = x + np.einsum("hqk,khd->qhd", p, v).reshape(n, -1) @ w[f"blk.{i}.attn_output.weight"].T
        if ffs[i]:
            h = rms(x, w[f"blk.{i}.ffn_norm.weight"], eps)
            g, u = h @ w[f"blk.{i}.ffn_gate.weight"].T, h @ w[f"blk.{i}.ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ w[f"blk.{i}.ffn_down.weight"].T
    x = rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def fused_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import ffnfusion  # noqa: F401  (registers DeciLM with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def test_tensors_and_metadata_match_the_checkpoint(fused, tmp_path):
    out = export(fused, tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(out.out)
    config = json.loads((fused / "config.json").read_text())
    blocks = config["block_configs"]
    assert len(blocks) == 4 and out.blocks_after == 4 and out.dropped_blocks == []
    # Every key llama.cpp's deci loader (and its generic hparams loader) reads.
    assert field(reader, "general.architecture") == "deci"
    assert field(reader, "deci.block_count") == 4
    assert field(reader, "deci.context_length") == config["max_position_embeddings"]
    assert field(reader, "deci.embedding_length") == 64
    assert field(reader, "deci.attention.head_count") == [4, 4, 0, 4]
    assert field(reader, "deci.attention.head_count_kv") == [2, 2, 0, 2]
    assert field(reader, "deci.feed_forward_length") == [96, 288, 96, 96]
    assert field(reader, "deci.attention.key_length") == field(reader, "deci.attention.value_length") == 16
    assert field(reader, "deci.rope.dimension_count") == 16
    assert field(reader, "deci.rope.freq_base") == pytest.approx(config["rope_theta"])
    assert field(reader, "deci.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(reader, "deci.vocab_size") == VOCAB
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field(reader, "ffnfusion.source_blocks") == [0, 1, 2, 3]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and len(field(reader, "tokenizer.ggml.token_type")) == VOCAB
    assert tokens[-1] == f"[PAD{VOCAB - 1}]"  # the trained tokenizer has fewer ids than the embedding rows
    assert field(reader, "tokenizer.ggml.merges")
    assert field(reader, "tokenizer.ggml.eos_token_id") == 0
    assert is_ffnfusion_gguf(out.out)
    # Every tensor equals the checkpoint's (q/k through llama.cpp's RoPE permutation); nothing else is in the file.
    lazy = LazySafetensors(fused)
    keys = set(lazy.keys())
    tensors = {t.name: t for t in reader.tensors}
    expected = {
        "token_embd.weight": lazy.get("model.embed_tokens.weight"),
        "output_norm.weight": lazy.get("model.norm.weight"),
    }
    expected["output.weight"] = lazy.get("lm_head.weight")
    names = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    for i in range(4):
        for short, hf in names.items():
            key = f"model.layers.{i}.{hf}.weight"
            if key in keys:
                tensor = lazy.get(key)
                if short in ("attn_q", "attn_k"):
                    tensor = permute_qk(tensor, 4 if short == "attn_q" else 2)
                expected[f"blk.{i}.{short}.weight"] = tensor
    assert set(tensors) == set(expected)
    for name, tensor in expected.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(dense(tensors[name]), tensor.float().numpy(), err_msg=name)


def test_gguf_forward_reproduces_the_fused_model(fused, tmp_path):
    out = export(fused, tmp_path / "m.gguf", dtype="f32").out
    ids = [5, 17, 200, 3, 99, 42, 7, 250, 11]
    np.testing.assert_allclose(deci_forward(out, ids), fused_logits(fused, ids), atol=1e-4, rtol=1e-4)


def test_llama3_rope_tied_embeddings_and_dropped_noop_block(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
    fused = make_fused(tmp_path, tie_word_embeddings=True, rope_parameters=rope)
    # A dummy block (neither half) last, as Ultra-253B-style checkpoints may have: llama.cpp mishandles it there.
    config = json.loads((fused / "config.json").read_text())
    dummy = {"attention": {"no_op": True, "n_heads_in_group": None, "replace_with_linear": False},
             "ffn": {"no_op": True, "ffn_mult": None, "replace_with_linear": False}}  # fmt: skip
    config["block_configs"].append(dummy)
    config["num_hidden_layers"] += 1
    (fused / "config.json").write_text(json.dumps(config))
    s = export(fused, tmp_path / "m.gguf", dtype="f32")
    assert s.dropped_blocks == [4] and s.blocks_after == 4
    reader = gguf.GGUFReader(s.out)
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "rope_freqs.weight" in names
    assert field(reader, "ffnfusion.source_blocks") == [0, 1, 2, 3]
    assert field(reader, "deci.rope.freq_base") == pytest.approx(500000.0)
    ids = list(range(3, 40, 3))
    np.testing.assert_allclose(deci_forward(s.out, ids), fused_logits(fused, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,qtype,tol", [("f16", "F16", 2e-3), ("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 1e-2)])
def test_dtypes(fused, tmp_path, dtype, qtype, tol):
    s = export(fused, tmp_path / f"{dtype}.gguf", dtype=dtype)
    reader = gguf.GGUFReader(s.out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == qtype and types["token_embd.weight"] == qtype
    ref = LazySafetensors(fused).get("model.layers.1.mlp.down_proj.weight").numpy()
    got = dense(next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight"))
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    ids = [5, 17, 200, 3, 99]
    logits, ref_logits = deci_forward(s.out, ids), fused_logits(fused, ids)
    assert np.abs(logits - ref_logits).max() <= 20 * tol * np.abs(ref_logits).max()


def test_q8_0_keeps_rows_that_do_not_split_into_blocks_in_f16(tmp_path):
    plan = Plan(remove_attention=[2, 3, 4], fuse_ffn=[[1, 2]])
    fused = make_fused(tmp_path, plan=plan, intermediate_size=80)  # down_proj rows: 80 = 2.5 x 32, fused 160 = 5 x 32
    s = export(fused, tmp_path / "m.gguf", dtype="q8_0")
    assert "blk.0.ffn_down.weight" in s.kept_f16 and "blk.1.ffn_down.weight" not in s.kept_f16
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(s.out).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_gate.weight"] == "Q8_0"


def test_sentencepiece_tokenizer(tmp_path):
    fused = make_fused(tmp_path, tokenizer=sentencepiece_tokenizer())
    reader = gguf.GGUFReader(export_gguf(fused, tmp_path / "m.gguf").out)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == VOCAB and len(field(reader, "tokenizer.ggml.scores")) == VOCAB
    assert tokens[3] == "<0x00>" and types[3] == gguf.TokenType.BYTE and tokens[2] == "</s>"
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1 and field(reader, "tokenizer.ggml.eos_token_id") == 2


def test_pre_tokenizer_is_named_as_llama_cpp_names_it(fused, tmp_path):
    from transformers import AutoTokenizer

    if (SMOLLM2_GGUF.parent / "derived_hf" / "tokenizer.json").is_file():  # the real SmolLM2 tokenizer, when present
        smollm = AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent / "derived_hf")
        assert KNOWN_PRE_TOKENIZERS[tokenizer_hash(smollm)] == "smollm"
    # The tiny trained tokenizer is unknown to llama.cpp: named by the user, or refused with the way out.
    s = export_gguf(fused, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert s.pre_tokenizer == "gpt-2" and field(gguf.GGUFReader(s.out), "tokenizer.ggml.pre") == "gpt-2"


@pytest.mark.parametrize(
    "family,plan,overrides,reason",
    [
        ("qwen3", PLAN, {"hidden_size": 48}, "head_dim 16 x 4 heads != hidden_size 48"),
        ("qwen2", PLAN, {}, "q/k/v bias"),
        ("llama", Plan(parallel_blocks=[[2, 3]]), {}, "block 2 is a block-parallel group"),
        ("llama", Plan(remove_ffn=[3]), {}, "block 3 has attention but no FFN"),
        ("llama", Plan(remove_attention=[0]), {}, "the first block (block 0) has no attention"),
    ],
)
def test_refusals_name_the_reason(tmp_path, family, plan, overrides, reason):
    fused = make_fused(tmp_path, family, plan, **overrides)
    with pytest.raises(ExportError, match="cannot be written as a llama.cpp `deci` GGUF") as e:
        export_gguf(fused, tmp_path / "m.gguf")
    assert reason in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_cli_output_rules_and_errors(fused, tmp_path):
    runner = CliRunner()
    out = tmp_path / "model.gguf"

    def to(path: Path) -> list[str]:
        return ["export", str(fused), "--format", "gguf", "--out", str(path), "--tokenizer-pre", "gpt-2"]

    args = to(out)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert is_ffnfusion_gguf(out)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--overwrite", "--dtype", "q8_0"]).exit_code == 0
    other = tmp_path / "notes.gguf"
    other.write_text("my own file")
    refused = runner.invoke(app, [*to(other), "--overwrite"])
    assert refused.exit_code == 2 and "not an earlier output of `ffnfusion export`" in refused.output
    assert other.read_text() == "my own file"
    inside = runner.invoke(app, to(fused / "m.gguf"))
    assert inside.exit_code == 2 and "never writes into its inputs" in inside.output
    unfused = tmp_path / "plain"
    tiny_model("llama").save_pretrained(unfused)
    plain = runner.invoke(app, ["export", str(unfused), "--out", str(tmp_path / "p.gguf")])
    assert plain.exit_code == 2 and "is not a fused checkpoint" in plain.output and "Traceback" not in plain.output
    assert "empty plan" in " ".join(plain.output.split())  # the way to a same-format baseline
    bad = runner.invoke(app, [*args, "--dtype", "q4_k"])
    assert bad.exit_code == 2 and "--dtype 'q4_k'" in bad.output
    unknown = runner.invoke(app, ["export", str(fused), "--out", str(tmp_path / "u.gguf")])
    assert unknown.exit_code == 2 and "--tokenizer-pre" in unknown.output
    assert not list(tmp_path.glob(".*partial*"))
