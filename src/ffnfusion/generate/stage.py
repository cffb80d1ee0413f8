"""The `generate` stage: MODEL -> corpus folder, and the `--data self` path of analyze/heal/run."""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from ffnfusion.formats.corpus import (
    CorpusManifest,
    CorpusRows,
    CorpusWriter,
    ModelFingerprint,
    is_corpus,
    open_corpus,
    read_manifest,
    token_dtype,
    tokenizer_sha256,
)
from ffnfusion.generate.prompts import PROMPT_MODES, PromptSource
from ffnfusion.generate.settings import GenerateError, GenerateSettings
from ffnfusion.generate.shards import (
    build_engine,
    check_resume,
    check_settings,
    check_writable,
    default_batch,
    model_fingerprint,
    resolved_settings,
    slot_bytes,
    stop_tokens,
    weights_fingerprint,
    write_corpus,
)


# ------------------------------------------------------------------------------------------------------ the verb
@dataclass
class GenerateSummary:
    out: Path
    sequences: int
    seq_len: int
    new_sequences: int
    seconds: float
    diversity: dict[str, Any]
    resumed_shards: int

    @property
    def tokens_per_second(self) -> float:
        return self.new_sequences * self.seq_len / self.seconds if self.seconds > 0 else 0.0


def generate(
    model: str,
    out: str | Path,
    settings: GenerateSettings,
    *,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> GenerateSummary:
    """MODEL writes `settings.tokens` tokens (rounded up to whole sequences) into the corpus folder `out`.

    Everything the user can get wrong (settings, the output folder, a corpus of another model or tokenizer or with
    other settings when resuming) is checked before the model's weights are loaded.
    """
    from ffnfusion.io.output import write_marker
    from ffnfusion.io.source import load_model

    settings.validate()
    out = Path(out).expanduser()
    job = _prepare(model, out, settings, overwrite, resume, device)
    existing = job.existing
    total = math.ceil(settings.tokens / settings.seq_len)
    if existing is not None and existing.complete and existing.sequences >= total:
        log(f"{out} already holds {existing.sequences:,} sequences of {existing.seq_len} tokens: nothing to do")
        return GenerateSummary(
            out, existing.sequences, existing.seq_len, 0, 0.0, existing.diversity, len(existing.shards)
        )

    if existing is None and out.exists():
        shutil.rmtree(out)  # empty, or an earlier `ffnfusion generate` output that --overwrite may replace
    log(f"loading {model} ({str(job.dtype).removeprefix('torch.')} on {job.dev})")
    hf = load_model(job.source, job.dtype, job.dev)
    job.fingerprint.weights_fingerprint = weights_fingerprint(hf)
    if existing is not None:
        # Again, now with the weights' fingerprint: a corpus of other weights under the same config is refused.
        check_resume(existing, job.fingerprint, job.tok_hash, out)
        existing.complete = False
    manifest = existing or CorpusManifest(
        model=job.fingerprint,
        tokenizer_sha256=job.tok_hash,
        vocab_size=job.fingerprint.vocab_size,
        dtype=token_dtype(job.fingerprint.vocab_size),
        seq_len=settings.seq_len,
        settings=job.resolved,
    )
    writer = CorpusWriter(out, manifest)
    write_marker(out, "generate")
    engine = build_engine(hf, settings.seq_len, job.prompts.max_len, job.batch, job.stop_ids, settings)
    del hf
    before, shards_before = manifest.sequences, len(manifest.shards)
    log(
        f"generating {total:,} sequences x {settings.seq_len} tokens with {job.batch} slots ({job.prompts.kind} "
        f"prompts, temperature {settings.temperature}, top-p {settings.top_p}); {before:,} already written"
    )
    t0 = time.perf_counter()
    manifest = write_corpus(engine, job.prompts, writer, total, settings, log)
    seconds = time.perf_counter() - t0
    return GenerateSummary(
        out, manifest.sequences, manifest.seq_len, manifest.sequences - before, seconds, manifest.diversity,
        shards_before,
    )  # fmt: skip


@dataclass
class _Job:
    """What `generate` knows before loading the weights: the model, the corpus it resumes, the sampling setup."""

    source: Any
    fingerprint: ModelFingerprint
    tok_hash: str
    existing: CorpusManifest | None
    dev: torch.device
    dtype: torch.dtype
    prompts: PromptSource
    batch: int
    stop_ids: list[int]
    resolved: dict[str, Any]


def _prepare(model: str, out: Path, settings: GenerateSettings, overwrite: bool, resume: bool, device: str) -> _Job:
    from ffnfusion.io.device import resolve_dtype
    from ffnfusion.io.output import check_output_dir
    from ffnfusion.io.source import resolve_model

    source = resolve_model(model)
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise GenerateError(f"{model} has no tokenizer: a corpus needs one (for prompts, stop tokens and its hash).")
    config = source.config()
    fingerprint, tok_hash = model_fingerprint(model, config), tokenizer_sha256(tokenizer)
    existing = read_manifest(out) if resume and is_corpus(out) else None
    if resume and existing is None and out.is_dir() and any(out.iterdir()):
        raise GenerateError(f"--resume: {out} is not a corpus folder (no {out / 'manifest.json'}).")
    prompt_file = settings.prompts if settings.prompts not in PROMPT_MODES else None
    inputs = [("input model", source.input_path), ("prompts file", prompt_file)]
    check_output_dir(out, "generate", inputs, overwrite=overwrite or existing is not None, error=GenerateError)
    check_writable(out)
    if existing is not None:
        check_resume(existing, fingerprint, tok_hash, out)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    dtype = resolve_dtype(settings.dtype, dev)  # auto: bf16 where the hardware computes it natively, as every stage
    prompts = PromptSource(tokenizer, settings, settings.seq_len)
    batch = settings.batch_size or (existing.settings["batch_size"] if existing else None)
    batch = batch or default_batch(dev, slot_bytes(config, settings.seq_len, dtype.itemsize))
    stop_ids = stop_tokens(tokenizer, None) + list(_config_eos(source))
    stop_ids = sorted(set(stop_ids))
    resolved = resolved_settings(settings, prompts, batch, dtype, stop_ids)
    if existing is not None:
        check_settings(existing, resolved, out)
    return _Job(source, fingerprint, tok_hash, existing, dev, dtype, prompts, batch, stop_ids, resolved)


def _config_eos(source: Any) -> list[int]:
    eos = source.generation_config().eos_token_id
    return eos if isinstance(eos, list) else [eos] if eos is not None else []


# ------------------------------------------------------------------------------------------------- --data self
def self_corpus_tokens(
    model: Any,
    tokenizer: Any,
    samples: int,
    seq_len: int,
    seed: int,
    cache_dir: Path | None = None,
    key: str = "",
    lazy: bool = False,
) -> torch.Tensor | CorpusRows | None:
    """[samples, seq_len] token ids sampled from `model` (or a loader of it) through the engine, cached as a corpus.

    Temperature 1 and no top-p (the model's own distribution); prompts `auto` (a chat model: `mix`). Returns None
    for a model the engine cannot run (spread over several devices), so the caller can fall back to eager
    `generate`. `lazy` returns the rows read on demand from the cached shards (CorpusRows) instead of one tensor in
    memory.
    """
    from ffnfusion.io.cache import default_cache_dir

    settings = GenerateSettings(tokens=samples * seq_len, seq_len=seq_len, top_p=1.0, seed=seed)
    digest = hashlib.sha256(f"{key}|{samples}|{seq_len}|{seed}|engine-v2".encode()).hexdigest()[:16]
    folder = Path(cache_dir or default_cache_dir()) / "self_corpus" / digest
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Runs sharing the cache (variants of one study side by side) wait for one writer instead of each deleting
    # and rewriting the other's half-written shards.
    with FileLock(f"{folder}.lock"):
        return _cached_self_corpus(model, tokenizer, samples, seq_len, folder, settings, key, lazy)


def _cached_self_corpus(
    model: Any,
    tokenizer: Any,
    samples: int,
    seq_len: int,
    folder: Path,
    settings: GenerateSettings,
    key: str,
    lazy: bool,
) -> torch.Tensor | CorpusRows | None:
    if is_corpus(folder) and (corpus := open_corpus(folder)).manifest.complete and len(corpus) >= samples:
        corpus.check_tokenizer(tokenizer)
        return _rows(corpus, samples, lazy)
    if not isinstance(model, torch.nn.Module):
        model = model()
    if len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
        return None
    param = next(model.parameters())
    prompts = PromptSource(tokenizer, settings, seq_len)
    stop_ids = stop_tokens(tokenizer, model)
    batch = min(samples, default_batch(param.device, slot_bytes(model.config, seq_len, param.element_size())))
    resolved = resolved_settings(settings, prompts, batch, param.dtype, stop_ids)
    manifest = read_manifest(folder) if is_corpus(folder) else None
    if manifest is None or manifest.settings != resolved or manifest.tokenizer_sha256 != tokenizer_sha256(tokenizer):
        shutil.rmtree(folder, ignore_errors=True)
        vocab = model.config.vocab_size
        fingerprint = ModelFingerprint(
            name=key,
            config_hash="",
            num_layers=model.config.num_hidden_layers,
            vocab_size=vocab,
            weights_fingerprint=weights_fingerprint(model),
        )
        manifest = CorpusManifest(
            model=fingerprint,
            tokenizer_sha256=tokenizer_sha256(tokenizer),
            vocab_size=vocab,
            dtype=token_dtype(vocab),
            seq_len=seq_len,
            settings=resolved,
        )
    engine = build_engine(model, seq_len, prompts.max_len, batch, stop_ids, settings)
    write_corpus(engine, prompts, CorpusWriter(folder, manifest), samples, settings, log=lambda _: None)
    del engine
    return _rows(open_corpus(folder), samples, lazy)


def _rows(corpus: Any, samples: int, lazy: bool) -> torch.Tensor | CorpusRows:
    rows = CorpusRows(corpus.sequences(), np.arange(samples))
    return rows if lazy else rows[:]
