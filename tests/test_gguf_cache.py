"""A GGUF's dequantised weights are kept as safetensors in the cache: the copy loads the same values and the same
config and tokenizer without parsing the GGUF again, a replaced file gets a new copy, an unwritable cache falls back
to the GGUF, and a failed copy leaves nothing behind."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ffnfusion.io.gguf_cache as gguf_cache
import ffnfusion.io.source as source_module
from conftest import SMOLLM2_GGUF
from ffnfusion.io.source import load_model, resolve_model


@dataclass
class World:
    gguf: Path  # a copy of the real GGUF, so its cache key is this module's own
    cache: Path  # holds the copy's dequantised weights once the fixture has loaded it
    direct: torch.nn.Module  # read from the GGUF (the cache unwritable): the reference
    config: Any  # the GGUF's config and tokenizer as transformers parses them from the file
    tokenizer: Any


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("gguf_cache")
    gguf = root / "model.gguf"
    shutil.copy(SMOLLM2_GGUF, gguf)
    blocker = root / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    with pytest.MonkeyPatch.context() as mp:
        source_module._parsed_from_gguf.cache_clear()
        mp.setenv("FFNFUSION_CACHE", str(blocker))
        source = resolve_model(str(gguf))
        assert source.weights_folder() is None  # an unwritable cache only costs speed
        direct = load_model(source)
        config, tokenizer = source.config(), source.tokenizer()
        mp.setenv("FFNFUSION_CACHE", str(root / "cache"))
        load_model(str(gguf))  # makes the copy
    return World(gguf, root / "cache", direct, config, tokenizer)


def copies(cache: Path) -> list[str]:
    root = cache / "gguf_weights"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def refuse(*args, **kwargs):
    raise AssertionError("the GGUF was dequantised again")


def test_the_cached_copy_loads_the_same_model_without_the_gguf(world, monkeypatch) -> None:
    monkeypatch.setenv("FFNFUSION_CACHE", str(world.cache))
    monkeypatch.setattr(gguf_cache, "dequantised_model", refuse)
    assert len(copies(world.cache)) == 1
    cached = load_model(str(world.gguf))
    want, got = world.direct.state_dict(), cached.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 7), (3, 33)):
        ids = torch.randint(0, world.direct.config.vocab_size, shape, generator=gen)
        with torch.no_grad():
            assert torch.equal(cached(ids).logits, world.direct(ids).logits)
    get = resolve_model(str(world.gguf)).tensor_getter()
    for name in ("model.layers.3.mlp.down_proj.weight", "model.layers.29.self_attn.q_proj.weight"):
        assert torch.equal(get(name), want[name])


def test_config_and_tokenizer_come_from_the_copy_as_parsed(world, monkeypatch) -> None:
    """A later process reads the GGUF's config and tokenizer from the copy, without parsing the file: the same
    config (so every hash of it agrees with or without the cache) and a tokenizer that encodes alike."""
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("FFNFUSION_CACHE", str(world.cache))
    source_module._parsed_from_gguf.cache_clear()  # as in a new process
    for auto in (AutoConfig, AutoTokenizer):
        real = auto.from_pretrained.__func__

        def no_gguf(cls, *args, _real=real, **kwargs):
            assert "gguf_file" not in kwargs, "the GGUF was parsed again"
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(no_gguf))
    source = resolve_model(str(world.gguf))
    config, tok, want_tok = source.config(), source.tokenizer(), world.tokenizer
    assert config.to_dict() == world.config.to_dict()
    texts = ["The capital of France is", "tabs\tand ünïcode\n\n<|im_start|>user"]
    assert tok(texts)["input_ids"] == want_tok(texts)["input_ids"]
    chat = [{"role": "user", "content": "Name a prime."}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == want_tok.apply_chat_template(
        chat, add_generation_prompt=True
    )
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert ids == (want_tok.bos_token_id, want_tok.eos_token_id, want_tok.pad_token_id)


def test_a_replaced_file_is_not_served_the_old_copy(world, monkeypatch) -> None:
    monkeypatch.setenv("FFNFUSION_CACHE", str(world.cache))
    stat = world.gguf.stat()
    try:
        os.utime(world.gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        monkeypatch.setattr(gguf_cache, "dequantised_model", refuse)
        with pytest.raises(AssertionError, match="dequantised again"):  # it makes a new copy
            load_model(str(world.gguf))
    finally:
        os.utime(world.gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(copies(world.cache)) == 1  # and the failed one left nothing


def test_no_copy_when_turned_off_or_too_large(world, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path))
    monkeypatch.setenv("FFNFUSION_GGUF_CACHE", "0")
    assert resolve_model(str(world.gguf)).weights_folder() is None
    monkeypatch.delenv("FFNFUSION_GGUF_CACHE")
    monkeypatch.setattr(gguf_cache, "GGUF_CACHE_MAX_BYTES", 4 * 134_000_000)  # just under SmolLM2-135M in fp32
    assert resolve_model(str(world.gguf)).weights_folder() is None
    assert copies(tmp_path) == []


def test_a_failed_copy_leaves_nothing(world, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path))

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-copy")

    monkeypatch.setattr(gguf_cache, "dequantised_model", crash)
    with pytest.raises(RuntimeError, match="killed mid-copy"):
        load_model(str(world.gguf))
    assert list((tmp_path / "gguf_weights").iterdir()) == []  # neither the key's folder nor the staging folder
