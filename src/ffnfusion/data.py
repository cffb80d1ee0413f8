"""Calibration, healing and evaluation text: files, folders, jsonl, parquet, `datasets` names, corpus folders
written by `ffnfusion generate` (token ids, read without re-tokenising), or `self`.

`self` means text sampled from the model itself (cached to disk), so analysis needs no dataset at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffnfusion.formats.corpus import CorpusRows, is_corpus, open_corpus
from ffnfusion.io.cache import default_cache_dir
from ffnfusion.io.output import write_atomic

TEXT_SUFFIXES = {".txt", ".raw", ".md", ".text", ""}
TABLE_SUFFIXES = {".jsonl", ".json", ".parquet"}


class DataError(ValueError):
    """Text data that is missing, unreadable, empty, or too short for what was asked."""


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON-lines file; a clear error for anything else."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n} is not a JSON object.")
            yield n, row


def _read_table(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("Reading parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(f"{path} has no column {text_field!r} (columns: {table.column_names}); use --text-field.")
        return [t for t in table.column(text_field).to_pylist() if t]
    rows = []
    for n, row in read_jsonl(path):
        if text_field not in row:
            raise DataError(f"{path}:{n} has no field {text_field!r}; use --text-field to name the text field.")
        rows.append(str(row[text_field]))
    return rows


def _read_file(path: Path, text_field: str) -> list[str]:
    try:
        if path.suffix in TABLE_SUFFIXES:
            return _read_table(path, text_field)
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text.") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e}); check that it exists and is readable.") from None


def load_texts(spec: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a file, a folder (recursively: .txt/.raw/.md/.jsonl/.parquet), or a `datasets` name.

    A datasets name is `name[:config][@split]`, e.g. `wikitext:wikitext-2-raw-v1@train`; it needs the hub.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        texts = _read_file(path, text_field)
    elif path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and (p.suffix in TABLE_SUFFIXES or p.suffix in TEXT_SUFFIXES)
        )
        if not files:
            raise DataError(f"{path} holds no text files (.txt, .raw, .md, .jsonl, .parquet).")
        texts = [t for f in files for t in _read_file(f, text_field)]
    elif str(spec).startswith((".", "/", "~")) or Path(spec).suffix in TABLE_SUFFIXES | {".txt", ".raw"}:
        raise DataError(f"Data file not found: {spec}")
    else:
        texts = _load_dataset(str(spec), text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{spec} contains no text.")
    return texts


def corpus_stream(spec: str | Path, tokenizer: Any) -> torch.Tensor | None:
    """The token stream of a corpus folder written by `ffnfusion generate` (None when `spec` is not one).

    Its sequences are consecutive windows of packed documents, so the stream can be cut again at any length without
    re-tokenising; the corpus must be complete and made with this tokenizer.
    """
    if str(spec) == "self" or not is_corpus(spec):
        return None
    corpus = open_corpus(spec, require_complete=True)
    corpus.check_tokenizer(tokenizer)
    return torch.from_numpy(np.asarray(corpus.sequences()).reshape(-1).astype(np.int64))


def corpus_rows(
    spec: str | Path, tokenizer: Any, seq_len: int, max_sequences: int | None, seed: int
) -> CorpusRows | None:
    """The windows `packed_sequences` would cut from a corpus folder, unread (None: not a corpus of this seq_len).

    A corpus' sequences are the consecutive `seq_len` windows of its stream, so at the same length they are those
    windows: the same rows as cutting the stream, chosen the same way, without a copy.
    """
    if str(spec) == "self" or not is_corpus(spec):
        return None
    corpus = open_corpus(spec, require_complete=True)
    if corpus.manifest.seq_len != seq_len:
        return None
    corpus.check_tokenizer(tokenizer)
    available = len(corpus)
    if available == 0:
        raise DataError(f"{spec} holds no sequence: write more tokens with `ffnfusion generate`.")
    return CorpusRows(corpus.sequences(), window_index(available, min(available, max_sequences or available), seed))


def check_text_source(spec: str | Path, option: str = "--data") -> None:
    """Refuse, without reading it, a text spec that `load_texts` would refuse for its path: for up-front checks.

    `self` and names that are not paths (`datasets` names) pass; a path that does not exist, or a folder without
    text files, is refused naming the option.
    """
    if str(spec) == "self":
        return
    path = Path(spec).expanduser()
    if is_corpus(path):
        return
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise DataError(f"{option} {path} cannot be read (no read permission); check its permissions.")
        return
    if path.is_dir():
        if not any(p.is_file() and (p.suffix in TABLE_SUFFIXES or p.suffix in TEXT_SUFFIXES) for p in path.rglob("*")):
            raise DataError(f"{option} {path} holds no text files (.txt, .raw, .md, .jsonl, .parquet).")
        return
    if str(spec).startswith((".", "/", "~")) or Path(spec).suffix in TABLE_SUFFIXES | {".txt", ".raw"}:
        raise DataError(
            f"{option} {spec}: data file not found. Give a text file, a folder of them, a .jsonl or .parquet file, "
            "a datasets name, or `self`."
        )


def _load_dataset(spec: str, text_field: str) -> list[str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec!r} is not a file or folder, and the `datasets` package is not installed.") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # datasets raises many types (connection, missing config); the user needs the reason
        raise DataError(f"{spec!r} is not a file or folder, and loading it as a dataset failed: {e}") from None
    if text_field not in ds.column_names:
        raise DataError(f"dataset {spec!r} has no column {text_field!r} (columns: {ds.column_names}).")
    return [t for t in ds[text_field] if t]


def tokenize_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, separated by EOS, as a 1-D LongTensor."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(stream: torch.Tensor, samples: int, seq_len: int, seed: int, source: str = "data") -> torch.Tensor:
    """`samples` non-overlapping windows of `seq_len` tokens, chosen at random with `seed`: [samples, seq_len]."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 (got {seq_len}).")
    available = stream.numel() // seq_len
    if available < samples:
        raise DataError(
            f"{source} has {stream.numel()} tokens, enough for {available} sequences of {seq_len} tokens, but "
            f"{samples} were asked for: use more text, fewer --samples or a shorter --seq-len."
        )
    windows = stream[: available * seq_len].view(available, seq_len)
    return windows[torch.from_numpy(window_index(available, samples, seed))].clone()


def window_index(available: int, samples: int, seed: int) -> np.ndarray:
    """Which `samples` of `available` windows to use: a seeded random subset, in stream order."""
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    return order.sort().values.numpy()


@torch.no_grad()
def self_generated_texts(
    model: Any,
    tokenizer: Any,
    samples: int,
    seq_len: int,
    seed: int,
    cache_dir: Path | None = None,
    key: str = "",
    batch_size: int = 16,
    openers: list[str] | None = None,
) -> list[str]:
    """Text sampled from the model itself (temperature 1), cached on disk under a key of the settings.

    Each sample starts from BOS, followed by `openers[i % len(openers)]` when given (the opener is kept as the start
    of the text)."""
    cache_dir = Path(cache_dir or default_cache_dir()) / "self_text"
    opened = f"|{hashlib.sha256(chr(10).join(openers).encode()).hexdigest()}" if openers else ""
    digest = hashlib.sha256(f"{key}|{samples}|{seq_len}|{seed}{opened}".encode()).hexdigest()[:16]
    cache = cache_dir / f"{digest}.jsonl"
    if cache.is_file():
        return [json.loads(line)["text"] for line in cache.read_text().splitlines()]
    if not isinstance(model, torch.nn.Module):
        model = model()  # a loader: the model is only loaded when the text is not cached
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataError(
            "the tokenizer has neither a BOS nor an EOS token for the model to start writing from: give text "
            "(a file, folder or dataset) instead of `self`."
        )
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start
    opening = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in openers or [""]]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    texts: list[str] = []
    batch = max(1, batch_size)
    for first in range(0, samples, batch):
        rows = [first + i for i in range(min(batch, samples - first))]
        ids = [[start, *opening[r % len(opening)]] for r in rows]
        width = max(len(x) for x in ids)
        # Left-padded, so every row's generated tokens start at column `width`.
        prompt = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long, device=device)
        out = model.generate(
            prompt, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=seq_len, min_new_tokens=seq_len, pad_token_id=pad,
        )
        generated = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        texts.extend((openers[r % len(openers)] if openers else "") + g for r, g in zip(rows, generated, strict=True))
    write_atomic(cache, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def calibration_tokens(
    spec: str,
    tokenizer: Any,
    samples: int,
    seq_len: int,
    seed: int = 0,
    model: Any | None = None,
    model_key: str = "",
    text_field: str = "text",
    cache_dir: Path | None = None,
    generate_batch_size: int = 16,
    lazy: bool = False,
) -> torch.Tensor | CorpusRows:
    """[samples, seq_len] token ids from `spec` (a path, a datasets name, or `self`).

    For `self`, `model` is the model or a zero-argument function that loads it (called only if the text is not cached).
    `lazy`: a self-written corpus comes back as CorpusRows, read from its cached shards on demand.
    """
    if spec == "self":
        if model is None:
            raise DataError("--data self needs the model to sample text from.")
        from ffnfusion.generate import self_corpus_tokens

        # The graph-captured sampling engine, cached as a token corpus (None: a model it cannot run; sample eagerly).
        tokens = self_corpus_tokens(model, tokenizer, samples, seq_len, seed, cache_dir, model_key, lazy)
        if tokens is not None:
            return tokens
        # Sample a little more than needed: re-tokenizing decoded text rarely gives back exactly seq_len tokens.
        texts = self_generated_texts(
            model, tokenizer, samples, seq_len + seq_len // 4, seed, cache_dir, model_key, generate_batch_size
        )
        rows = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= seq_len:
                rows.append(ids[:seq_len])
        if len(rows) < samples:
            stream = tokenize_stream(tokenizer, texts)
            return token_windows(stream, samples, seq_len, seed, "self-generated text")
        return torch.tensor(rows[:samples], dtype=torch.long)
    stream = corpus_stream(spec, tokenizer)
    if stream is None:
        stream = tokenize_stream(tokenizer, load_texts(spec, text_field))
    return token_windows(stream, samples, seq_len, seed, str(spec))


def packed_sequences(
    spec: str,
    tokenizer: Any,
    seq_len: int,
    max_sequences: int | None = None,
    seed: int = 0,
    model: Any | None = None,
    model_key: str = "",
    self_samples: int = 256,
    text_field: str = "text",
    cache_dir: Path | None = None,
    generate_batch_size: int = 16,
) -> torch.Tensor | CorpusRows:
    """Training text packed into fixed-length sequences, [n, seq_len]: every whole window of the token stream.

    Documents are joined with EOS and cut into consecutive windows, so no token is padding; `max_sequences` keeps
    a random subset (chosen with `seed`). `self` samples `self_samples` sequences (or `max_sequences`) from `model`.
    A corpus written by `ffnfusion generate` (or the `self` one) at this `seq_len` is not copied into memory: its
    rows are read from the memory-mapped shards as batches ask for them (CorpusRows).
    """
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 (got {seq_len}).")
    if spec == "self":
        samples = max_sequences or self_samples
        return calibration_tokens(
            "self", tokenizer, samples, seq_len, seed, model, model_key, text_field, cache_dir, generate_batch_size,
            lazy=True,
        )
    rows = corpus_rows(spec, tokenizer, seq_len, max_sequences, seed)
    if rows is not None:
        return rows
    stream = corpus_stream(spec, tokenizer)
    if stream is None:
        stream = tokenize_stream(tokenizer, load_texts(spec, text_field))
    available = stream.numel() // seq_len
    if available == 0:
        raise DataError(
            f"{spec} has {stream.numel()} tokens, too few for one sequence of {seq_len} tokens: "
            "use more text or a shorter --seq-len."
        )
    return token_windows(stream, min(available, max_sequences or available), seq_len, seed, str(spec))
