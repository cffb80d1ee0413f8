"""The tokenizer of a checkpoint folder as GGUF metadata, written the way llama.cpp's own converter writes it.

Two kinds are understood:
- byte-level BPE (GPT-2 style: SmolLM, Llama 3, Qwen, ...): `tokenizer.ggml.model = "gpt2"`, tokens, token types,
  merges, and `tokenizer.ggml.pre` named from llama.cpp's table of known pre-tokenizers (pretokenizers.py);
- SentencePiece (Llama 2, TinyLlama, Mistral v0.1-0.3): `"llama"` with scores, from `tokenizer.model` when present,
  else from the byte-fallback BPE in `tokenizer.json` that transformers writes for those models.
Special token ids, add-BOS/EOS flags and the chat template come from gguf's SpecialVocab in both cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ffnfusion.export.pretokenizers import KNOWN_PRE_TOKENIZERS, tokenizer_hash


class VocabError(ValueError):
    """A tokenizer that cannot be written for llama.cpp."""


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str | bytes]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab
    pre_source: str  # how `pre` was chosen, for the summary

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        self.special.add_to_gguf(writer, quiet=True)


def _looks_special(token: str) -> bool:
    # llama.cpp's converter (does_token_look_special): added tokens some models forget to mark as special.
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _tokenizer_json(folder: Path) -> dict[str, Any] | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VocabError(
            f"{path} is not valid JSON ({e}): copy the tokenizer files into the checkpoint again."
        ) from None


def _is_sentencepiece_bpe(tok: dict[str, Any]) -> bool:
    model = tok.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and not model.get("ignore_merges")


def _is_byte_level_bpe(tok: dict[str, Any]) -> bool:
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return False

    def has_byte_level(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return True
            return any(has_byte_level(v) for v in node.values())
        if isinstance(node, list):
            return any(has_byte_level(v) for v in node)
        return False

    return has_byte_level(tok.get("pre_tokenizer")) or has_byte_level(tok.get("decoder"))


def _bpe_vocab(folder: Path, vocab_size: int, pre: str | None) -> Vocab:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.get_vocab()
    if ids and max(ids.values()) >= vocab_size:
        raise VocabError(
            f"{folder}: the tokenizer has token id {max(ids.values())}, but the model's vocab_size is {vocab_size}: "
            "the tokenizer belongs to another model. Copy the original model's tokenizer files into the checkpoint."
        )
    if pre is not None:
        names = sorted({"default", *KNOWN_PRE_TOKENIZERS.values()})
        if pre not in names:
            raise VocabError(
                f"--tokenizer-pre {pre!r} is not a pre-tokenizer llama.cpp knows (it would refuse to load the file); "
                f"choose one of: {', '.join(names)}."
            )
        pre_source = "given (--tokenizer-pre)"
    else:
        digest = tokenizer_hash(tokenizer)
        pre = KNOWN_PRE_TOKENIZERS.get(digest)
        if pre is None:
            raise VocabError(
                f"{folder}: llama.cpp does not know this byte-level BPE pre-tokenizer (hash {digest} of its output on "
                "llama.cpp's check text is not in its table), so it would split text differently from the model. "
                "Pass --tokenizer-pre NAME with the llama.cpp pre-tokenizer that matches (e.g. llama-bpe, qwen2, "
                "smollm), or --tokenizer-pre gpt-2 to accept GPT-2's splitting."
            )
        pre_source = f"llama.cpp's table (hash {digest[:12]}...)"
    reverse = {i: t for t, i in ids.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str | bytes] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise VocabError(f"{folder}: the BPE tokenizer has no merges (tokenizer.json or merges.txt): copy it again.")
    return Vocab("gpt2", pre, tokens, types, None, special, pre_source)


def _sentencepiece_vocab(folder: Path, vocab_size: int) -> Vocab:
    vocab: Any = None
    if (folder / "tokenizer.model").is_file():
        try:
            vocab = gguf.SentencePieceVocab(folder)
        except ImportError:
            vocab = None  # the sentencepiece package is missing: tokenizer.json says the same
    if vocab is None:
        try:
            vocab = gguf.LlamaHfVocab(folder)
        except (FileNotFoundError, TypeError) as e:
            raise VocabError(f"{folder}: cannot read the SentencePiece tokenizer ({e}).") from None
    tokens: list[str | bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise VocabError(
            f"{folder}: the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}: the "
            "tokenizer belongs to another model. Copy the original model's tokenizer files into the checkpoint."
        )
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    return Vocab("llama", "default", tokens, types, scores, special, "SentencePiece (no pre-tokenizer)")


def read_vocab(folder: str | Path, vocab_size: int, pre: str | None = None) -> Vocab:
    """The checkpoint's tokenizer as llama.cpp expects it; `pre` overrides the byte-level BPE pre-tokenizer name."""
    folder = Path(folder)
    tok = _tokenizer_json(folder)
    if tok is not None and _is_byte_level_bpe(tok):
        return _bpe_vocab(folder, vocab_size, pre)
    if (folder / "tokenizer.model").is_file() or (tok is not None and _is_sentencepiece_bpe(tok)):
        return _sentencepiece_vocab(folder, vocab_size)
    if tok is None:
        raise VocabError(
            f"{folder} has no tokenizer (no tokenizer.json or tokenizer.model); a GGUF needs one. Copy the original "
            "model's tokenizer files into the checkpoint folder (`ffnfusion fuse` does when the model has them)."
        )
    kind = (tok.get("model") or {}).get("type")
    raise VocabError(
        f"{folder / 'tokenizer.json'}: a {kind} tokenizer without byte-level or byte-fallback BPE; llama.cpp's deci "
        "models read only byte-level BPE (gpt2) and SentencePiece (llama) vocabularies."
    )
