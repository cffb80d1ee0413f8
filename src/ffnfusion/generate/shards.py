"""The generation loop: documents from the sampling engine packed into shards, diversity, model helpers."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffnfusion.formats.corpus import CorpusManifest, CorpusWriter, ModelFingerprint, open_corpus
from ffnfusion.generate.prompts import PromptSource
from ffnfusion.generate.settings import GenerateError, GenerateSettings
from ffnfusion.io.progress import progress_bar


# ------------------------------------------------------------------------------------------------------ the loop
def shard_seed(seed: int, shard: int) -> int:
    return int.from_bytes(hashlib.sha256(f"corpus:{seed}:{shard}".encode()).digest()[:6], "little")


def doc_hash(tokens: list[int]) -> int:
    digest = hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def generate_shard(
    engine: Any,
    next_prompt: Callable[[], list[int]],
    sequences: int,
    seq_len: int,
    seed: int,
    sync_every: int = 16,
    advance: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`sequences` x `seq_len` tokens of documents packed back to back, and the documents' (hash, length, stopped).

    `advance(k)` is told of every k tokens written (a progress bar)."""
    need = sequences * seq_len
    stream = np.empty(need + engine.max_len, dtype=np.int64)
    filled, docs = 0, []
    for doc in engine.documents(next_prompt, need, seed, sync_every):
        take = min(len(doc.tokens), need - filled)
        stream[filled : filled + take] = doc.tokens[:take]
        filled += take
        if advance is not None:
            advance(take)
        docs.append((doc_hash(doc.tokens), len(doc.tokens), int(doc.stopped)))
        if filled >= need:
            break
    return stream[:need].reshape(sequences, seq_len), np.asarray(docs, dtype=np.int64).reshape(-1, 3)


def diversity(corpus: Any, max_rows: int = 2048, orders: tuple[int, ...] = (1, 2, 3, 4)) -> dict[str, Any]:
    """Distinct n-grams (unique / total, over up to `max_rows` sequences spread over the corpus) and duplicates."""
    docs = corpus.documents()
    seqs = corpus.sequences()
    rows = np.unique(np.linspace(0, len(seqs) - 1, min(max_rows, len(seqs))).astype(np.int64))
    sample = seqs[rows].astype(np.uint64)
    out: dict[str, Any] = {"sample_tokens": int(sample.size), "documents": len(docs)}
    for n in orders:
        if sample.shape[1] < n:
            continue
        h = np.zeros((sample.shape[0], sample.shape[1] - n + 1), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                h = h * np.uint64(0x9E3779B97F4A7C15) + sample[:, j : j + h.shape[1]] + np.uint64(1)
        out[f"distinct_{n}"] = round(len(np.unique(h)) / h.size, 6)
    if len(docs):
        out["duplicate_documents"] = round(1 - len(np.unique(docs[:, 0])) / len(docs), 6)
        out["mean_document_tokens"] = round(float(docs[:, 1].mean()), 2)
        out["stopped_documents"] = round(float(docs[:, 2].mean()), 6)
    return out


def write_corpus(
    engine: Any,
    prompts: PromptSource,
    writer: CorpusWriter,
    total_sequences: int,
    settings: GenerateSettings,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> CorpusManifest:
    """Generate shards until the corpus holds `total_sequences`; then measure diversity and finish the manifest."""
    m = writer.manifest
    per_shard = max(1, m.settings["shard_sequences"])
    total, done = total_sequences * m.seq_len, m.sequences * m.seq_len
    with progress_bar(progress, total, "writing corpus", "tokens", completed=done) as advance:
        while m.sequences < total_sequences:
            index, n = writer.next_index, min(per_shard, total_sequences - m.sequences)
            t0 = time.perf_counter()
            tokens, docs = generate_shard(
                engine,
                prompts.for_shard(settings.seed, index),
                n,
                m.seq_len,
                shard_seed(settings.seed, index),
                settings.sync_every,
                advance,
            )
            writer.write_shard(tokens, docs)
            rate = tokens.size / (time.perf_counter() - t0)
            log(
                f"shard {index}: {n} sequences, {len(docs)} documents, {rate:,.0f} tokens/s "
                f"({m.sequences:,}/{total_sequences:,} sequences)"
            )
    return writer.finish(diversity(open_corpus(writer.folder)))


# ---------------------------------------------------------------------------------------------- model and engine
def model_fingerprint(name: str, hf_config: Any, weights: str = "") -> ModelFingerprint:
    from ffnfusion.adapters import adapter_for

    decilm = adapter_for(hf_config).decilm_config(hf_config)
    arch = {k: v for k, v in decilm.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()
    return ModelFingerprint(
        name=name,
        config_hash=digest,
        num_layers=len(decilm["block_configs"]),
        vocab_size=decilm["vocab_size"],
        weights_fingerprint=weights,
    )


def weights_fingerprint(model: torch.nn.Module) -> str:
    params = dict(model.named_parameters())
    last = len(model.model.layers) - 1
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
    ]
    digest = hashlib.sha256()
    for name in names:
        if name in params:
            digest.update(params[name].detach().flatten()[:4096].to("cpu", torch.bfloat16).view(torch.int16).numpy())
    return digest.hexdigest()


def default_batch(device: torch.device, per_slot_bytes: int) -> int:
    """Slots: as many as a share of the free memory holds KV caches for, up to 512 on a GPU and 32 on a CPU."""
    if device.type != "cuda":
        # Two CPU cores, SmolLM2-135M: 57 tokens/s with 8 slots, 105 with 32 (wider products per weight read).
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(max(1, min(32, free * 0.3 // max(1, per_slot_bytes))))
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(8, min(512, free * 0.3 // max(1, per_slot_bytes))))


def build_engine(
    model: Any, max_len: int, max_prompt: int, batch: int, stop_ids: list[int], settings: GenerateSettings
) -> Any:
    """The sampling engine over `model` (a transformers model or a DeciLM one), on the model's device and dtype."""
    from ffnfusion.engine.sampling import SamplingEngine
    from ffnfusion.formats.plan import Plan
    from ffnfusion.modeling.modeling_decilm import DeciLMForCausalLM
    from ffnfusion.surgery import fuse_model

    decilm = model if isinstance(model, DeciLMForCausalLM) else fuse_model(model, Plan())
    return SamplingEngine(
        decilm,
        batch,
        max_len,
        max_prompt=max_prompt,
        stop_ids=stop_ids,
        temperature=settings.temperature,
        top_p=settings.top_p,
    )


def stop_tokens(tokenizer: Any, model: Any) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def resolved_settings(
    settings: GenerateSettings, prompts: PromptSource, batch: int, dtype: torch.dtype, stop_ids: list[int]
) -> dict[str, Any]:
    s = settings.model_dump()
    s.update(
        prompts=prompts.kind,
        batch_size=batch,
        dtype=str(dtype).removeprefix("torch."),
        stop_ids=stop_ids,
        shard_sequences=max(1, settings.shard_tokens // settings.seq_len),
        max_document_tokens=settings.seq_len,
    )
    s.pop("tokens")
    s.pop("shard_tokens")
    return s


def check_resume(manifest: CorpusManifest, fingerprint: ModelFingerprint, tok_hash: str, folder: Path) -> None:
    """Refuse to extend a corpus made with another model or tokenizer."""
    diffs = [
        f"{key}: corpus {getattr(manifest.model, key)!r}, model {getattr(fingerprint, key)!r}"
        for key in ("config_hash", "num_layers", "vocab_size")
        if getattr(manifest.model, key) != getattr(fingerprint, key)
    ]
    if fingerprint.weights_fingerprint and manifest.model.weights_fingerprint not in (
        "",
        fingerprint.weights_fingerprint,
    ):
        diffs.append("the weights differ (another checkpoint of the same architecture)")
    if manifest.tokenizer_sha256 != tok_hash:
        diffs.append("the tokenizer differs (another vocabulary)")
    if diffs:
        raise GenerateError(
            f"{folder} was generated with another model or tokenizer ({manifest.model.name}): {'; '.join(diffs)}. "
            "Resume with the same model, or write a new corpus to another --out."
        )


def check_settings(manifest: CorpusManifest, settings: dict[str, Any], folder: Path) -> None:
    diffs = [
        f"{k}: corpus {manifest.settings.get(k)!r}, now {v!r}"
        for k, v in settings.items()
        if manifest.settings.get(k) != v
    ]
    if diffs:
        raise GenerateError(
            f"{folder} was generated with other settings ({'; '.join(diffs)}): resume with the same "
            "options, or write a new corpus to another --out."
        )


def slot_bytes(config: Any, max_len: int, itemsize: int) -> int:
    """Device memory one slot needs: its K/V cache and the sampling step's float32 rows over the vocabulary."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = config.num_hidden_layers * 2 * getattr(config, "num_key_value_heads", heads) * head_dim * max_len * itemsize
    return kv + 8 * 4 * config.vocab_size


def check_writable(out: Path) -> None:
    target = next((p for p in (out, *out.parents) if p.exists()), None)
    if target is None or not os.access(target, os.W_OK):
        raise GenerateError(f"cannot write the corpus to {out}: {target} is not writable. Choose another --out.")
