"""A token corpus on disk: fixed-length sequences in raw shards plus a manifest, read back memory-mapped.

Layout of a corpus folder:

    manifest.json        CorpusManifest below: model, tokenizer hash, dtype, seq_len, shards, settings, diversity
    tokens-00000.bin     raw little-endian uint16 (vocab <= 65535) or uint32, shape [sequences, seq_len]
    docs-00000.npy       int64 [documents, 3] of the shard: (hash, length, ended by a stop token) per document
    ...

Shards are written under a temporary name and renamed, and the manifest is rewritten after each shard, so a killed
writer leaves complete shards that a resumed run keeps. Readers need only `open_corpus`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "ffnfusion-corpus"
VERSION = 1
MANIFEST = "manifest.json"


class CorpusError(ValueError):
    """A corpus folder that is missing, damaged, of another version, or made with another model or tokenizer."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelFingerprint(_Strict):
    name: str = Field(description="MODEL as given (hub id, folder or .gguf file)")
    config_hash: str = Field(description="sha256 of the architecture config, as ffnfusion translates it")
    num_layers: int
    vocab_size: int
    weights_fingerprint: str = Field(default="", description="sha256 of fixed slices of three weight tensors")


class Shard(_Strict):
    file: str
    sequences: int
    documents: int = 0


class CorpusManifest(_Strict):
    format: Literal["ffnfusion-corpus"] = FORMAT
    version: int = VERSION
    model: ModelFingerprint
    tokenizer_sha256: str
    vocab_size: int
    dtype: Literal["uint16", "uint32"]
    seq_len: int
    sequences: int = 0
    shards: list[Shard] = Field(default_factory=list)
    complete: bool = False
    settings: dict[str, Any] = Field(default_factory=dict)
    diversity: dict[str, Any] = Field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the id <-> token mapping (added tokens included): what decides whether stored ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def shard_name(index: int) -> str:
    return f"tokens-{index:05d}.bin"


def docs_name(index: int) -> str:
    return f"docs-{index:05d}.npy"


def is_corpus(path: str | Path) -> bool:
    path = Path(path).expanduser()
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(folder: str | Path) -> CorpusManifest:
    path = Path(folder).expanduser() / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise CorpusError(f"{path} cannot be read ({e.strerror or e}): is {folder} a corpus folder?") from None
    except ValueError as e:
        raise CorpusError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CorpusError(f"{path} is not an ffnfusion corpus manifest (format {FORMAT!r}).")
    if raw.get("version") != VERSION:
        raise CorpusError(f"{path} is corpus format version {raw.get('version')}; this ffnfusion reads {VERSION}.")
    try:
        return CorpusManifest.model_validate(raw)
    except ValidationError as e:
        raise CorpusError(f"{path} is damaged: {e}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CorpusWriter:
    """Appends shards to a corpus folder; `manifest.shards` lists the complete ones (a resumed run starts after)."""

    def __init__(self, folder: str | Path, manifest: CorpusManifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self.folder.mkdir(parents=True, exist_ok=True)
        for stray in self.folder.glob("*.tmp"):
            stray.unlink()

    @property
    def next_index(self) -> int:
        return len(self.manifest.shards)

    def write_shard(self, tokens: np.ndarray, docs: np.ndarray) -> Shard:
        """Write one shard ([n, seq_len] token ids, [documents, 3] int64 document records), then the manifest."""
        m = self.manifest
        if tokens.ndim != 2 or tokens.shape[1] != m.seq_len:
            raise ValueError(f"a shard must be [n, {m.seq_len}], got {list(tokens.shape)}")
        index = self.next_index
        _atomic_write(self.folder / docs_name(index), _npy_bytes(np.asarray(docs, dtype=np.int64)))
        little = np.dtype(m.dtype).newbyteorder("<")
        _atomic_write(self.folder / shard_name(index), np.ascontiguousarray(tokens, dtype=little).tobytes())
        shard = Shard(file=shard_name(index), sequences=int(tokens.shape[0]), documents=len(docs))
        m.shards.append(shard)
        m.sequences += shard.sequences
        self.write_manifest()
        return shard

    def write_manifest(self) -> None:
        _atomic_write(self.folder / MANIFEST, (self.manifest.model_dump_json(indent=2) + "\n").encode())

    def finish(self, diversity: dict[str, Any]) -> CorpusManifest:
        self.manifest.diversity = diversity
        self.manifest.complete = True
        self.write_manifest()
        return self.manifest


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


class CorpusRows:
    """Rows `index` of a corpus as int64 token tensors, read from the memory-mapped shards only when asked for.

    Stands in for the [len(index), seq_len] tensor a heal would otherwise build in memory (2 GB per process for a
    268M-token corpus): `rows[i]`, `rows[a:b]`, `rows[array]`, `len(rows)` and `rows.shape` behave like that tensor's.
    """

    def __init__(self, sequences: Sequences, index: np.ndarray):
        self.sequences = sequences
        self.index = np.asarray(index, dtype=np.int64)
        self.shape = (len(self.index), sequences.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> Any:
        import torch  # the corpus format itself loads no torch (`ffnfusion --help` stays light)

        return torch.from_numpy(np.asarray(self.sequences[self.index[key]], dtype=np.int64))


class Sequences:
    """The corpus' [n, seq_len] token ids over memory-mapped shards, concatenated lazily (index like an array)."""

    def __init__(self, shards: list[np.memmap]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        seq_len = shards[0].shape[1] if shards else 0
        self.shape = (int(self.starts[-1]), seq_len)
        self.dtype = shards[0].dtype if shards else np.dtype("uint16")

    def __len__(self) -> int:
        return self.shape[0]

    def _row(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range ({len(self)} sequences)")
        i %= len(self)
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[s][i - self.starts[s]]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return np.asarray(self._row(int(key)))
        if isinstance(key, slice):
            key = np.arange(len(self))[key]
        idx = np.asarray(key, dtype=np.int64)
        out = np.empty((len(idx), self.shape[1]), dtype=self.dtype)
        for n, i in enumerate(idx):
            out[n] = self._row(int(i))
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if not self.shards:
            return np.empty(self.shape, dtype or self.dtype)
        whole = np.concatenate([np.asarray(s) for s in self.shards])
        return whole if dtype is None else whole.astype(dtype)


class Corpus:
    """A corpus folder opened for reading; the shards are memory-mapped, never loaded whole."""

    def __init__(self, folder: Path, manifest: CorpusManifest):
        self.folder = folder
        self.manifest = manifest

    def __len__(self) -> int:
        return self.manifest.sequences

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    def shard(self, index: int) -> np.memmap:
        entry = self.manifest.shards[index]
        path = self.folder / entry.file
        dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
        expected = entry.sequences * self.manifest.seq_len * dtype.itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            raise CorpusError(f"{path} holds {size} bytes, the manifest says {expected}: the corpus is damaged.")
        return np.memmap(path, dtype=dtype, mode="r", shape=(entry.sequences, self.manifest.seq_len))

    def sequences(self) -> Sequences:
        """[n, seq_len] token ids, memory-mapped shard by shard (np.asarray(...) makes one array of them)."""
        return Sequences([self.shard(i) for i in range(len(self.manifest.shards))])

    def documents(self) -> np.ndarray:
        """int64 [documents, 3]: (hash, length, ended by a stop token) of every document, shard order."""
        parts = [np.load(self.folder / docs_name(i)) for i in range(len(self.manifest.shards))]
        return np.concatenate(parts) if parts else np.empty((0, 3), np.int64)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise CorpusError when `tokenizer` maps ids to tokens differently from the one the corpus was made with."""
        theirs = tokenizer_sha256(tokenizer)
        if theirs != self.manifest.tokenizer_sha256:
            raise CorpusError(
                f"the corpus {self.folder} was written with another tokenizer (sha256 "
                f"{self.manifest.tokenizer_sha256[:12]}..., this one {theirs[:12]}...): its token ids would mean "
                f"other tokens. Use a corpus made with this model's tokenizer (`ffnfusion generate`)."
            )


def open_corpus(path: str | Path, require_complete: bool = False) -> Corpus:
    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    if require_complete and not manifest.complete:
        raise CorpusError(
            f"{folder} is an unfinished corpus ({manifest.sequences} sequences so far): rerun the same "
            "`ffnfusion generate` command with --resume to finish it."
        )
    return Corpus(folder, manifest)
