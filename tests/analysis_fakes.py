"""Helpers for the analysis/plan tests: a character tokenizer for tiny models and synthetic analyses."""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ffnfusion.analyze.dependency import window_scores
from ffnfusion.formats.analysis import (
    Analysis,
    AttentionScore,
    Calibration,
    Cost,
    CostPart,
    LayerStats,
    ModelIdentity,
    Settings,
    SubBlockStats,
    Window,
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 2..96), <unk> 0, <eos> 1: 97 ids, the tiny models' vocab."""
    vocab = {"<unk>": 0, "<eos>": 1} | {chr(c): c - 30 for c in range(32, 127)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_with_tokenizer(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def text_file(path: Path, words: int = 3000, seed: int = 0) -> Path:
    """Pseudo-English text with some structure (repeated phrases), deterministic."""
    rng = random.Random(seed)
    vocab = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by"]
    vocab += ["on", "not", "he", "this", "are", "or", "his", "from", "at", "which"]
    phrases = [" ".join(rng.choice(vocab) for _ in range(5)) for _ in range(30)]
    lines = [
        " ".join(rng.choice(phrases) for _ in range(rng.randint(2, 6))).capitalize() + "." for _ in range(words // 15)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fake_analysis(
    num_layers: int,
    kl: list[float],
    matrix: list[list[float]] | None = None,
    widths: list[int] | None = None,
    removed: list[int] | None = None,
    has_o_bias: bool = False,
    base_kl: float = 0.0,
    block: list[list[float]] | None = None,
) -> Analysis:
    """A structurally valid analysis with the given scores (nothing measured): for planner tests."""
    n = num_layers
    removed = sorted(removed or [])
    widths = widths or [1536] * n
    matrix = matrix or [[0.1] * n for _ in range(n)]
    block = block or matrix
    upper = [[matrix[i][j] if j > i else None for j in range(n)] for i in range(n)]
    upper_block = [[block[i][j] if j > i else None for j in range(n)] for i in range(n)]
    stats = SubBlockStats(rel_norm=0.5, cos_distance=0.1)
    part = CostPart(sub_block_evals=1, lm_head_evals=0, forward_equivalents=1.0)
    return Analysis(
        model=ModelIdentity(
            name="fake",
            model_type="llama",
            num_layers=n,
            hidden_size=576,
            num_attention_heads=9,
            num_key_value_heads=3,
            ffn_widths=widths,
            has_o_bias=has_o_bias,
            config_hash="0" * 64,
            weights_fingerprint="0" * 64,
        ),
        calibration=Calibration(data="x", samples=1, seq_len=2, seed=0, text_field="text", tokens_sha256="0" * 64),
        settings=Settings(dtype="float32", device="cpu", batch_size=1, max_window=8, remove_attention=removed),
        original_lm_loss=3.0,
        base_lm_loss=3.0 + base_kl,
        base_kl=base_kl,
        layers=[
            LayerStats(layer=i, attention=None if i in removed else stats, ffn=stats, block=stats) for i in range(n)
        ],
        attention_importance=[
            AttentionScore(layer=i, kl=kl[i], lm_loss=3.0 + kl[i], lm_loss_delta=kl[i])
            for i in range(n)
            if i not in removed
        ],
        ffn_dependency=upper,
        block_dependency=upper_block,
        ffn_windows=[Window(**w) for w in window_scores(upper, 8)],
        block_windows=[Window(**w) for w in window_scores(upper_block, 8)],
        cost=Cost(
            sub_blocks_per_forward=2 * n - len(removed),
            batches=1,
            parts={"baseline": part},
            total_forward_equivalents=1.0,
            naive_forward_equivalents_per_matrix=n,
        ),
    )


def analysed_tiny_model(root: Path) -> Path:
    """`root`/model (a tiny Llama with a tokenizer), `root`/text.txt and `root`/analysis from a real `analyze` run."""
    from conftest import tiny_model
    from ffnfusion.analyze import analyze

    save_with_tokenizer(tiny_model("llama", seed=21), root / "model")
    text_file(root / "text.txt")
    analyze(str(root / "model"), root / "analysis", data=str(root / "text.txt"), samples=4, seq_len=20, dtype="float32")
    return root
