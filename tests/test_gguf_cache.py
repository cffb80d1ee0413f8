"""A GGUF's dequantised weights are kept as safetensors in the cache: the copy loads the same values without parsing
the GGUF again, a replaced file gets a new copy, and a failed copy leaves nothing behind."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import ffnfusion.io.gguf_cache as gguf_cache
from conftest import SMOLLM2_GGUF
from ffnfusion.io.source import load_model, resolve_model


@pytest.fixture(scope="module")
def direct():
    """The model read straight from the GGUF, the reference every cached load must equal."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FFNFUSION_GGUF_CACHE", "0")
        return load_model(str(SMOLLM2_GGUF))


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FFNFUSION_GGUF_CACHE", raising=False)
    copy = tmp_path / "model.gguf"
    shutil.copy(SMOLLM2_GGUF, copy)
    return copy


def copies(tmp_path) -> list[str]:
    root = tmp_path / "cache" / "gguf_weights"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_the_cached_copy_loads_the_same_model_without_the_gguf(gguf, tmp_path, direct, monkeypatch) -> None:
    load_model(str(gguf))  # makes the copy
    assert len(copies(tmp_path)) == 1

    def no_parse(*args, **kwargs):
        raise AssertionError("the GGUF was dequantised again")

    monkeypatch.setattr(gguf_cache, "dequantised_model", no_parse)
    cached = load_model(str(gguf))
    want, got = direct.state_dict(), cached.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 7), (3, 33)):
        ids = torch.randint(0, direct.config.vocab_size, shape, generator=gen)
        with torch.no_grad():
            assert torch.equal(cached(ids).logits, direct(ids).logits)
    get = resolve_model(str(gguf)).tensor_getter()
    for name in ("model.layers.3.mlp.down_proj.weight", "model.layers.29.self_attn.q_proj.weight"):
        assert torch.equal(get(name), want[name])


def test_a_replaced_file_gets_a_new_copy(gguf, tmp_path) -> None:
    load_model(str(gguf))
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_model(str(gguf))
    assert len(copies(tmp_path)) == 2


def test_no_copy_when_turned_off_or_too_large(gguf, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FFNFUSION_GGUF_CACHE", "0")
    assert resolve_model(str(gguf)).weights_folder() is None
    monkeypatch.delenv("FFNFUSION_GGUF_CACHE")
    monkeypatch.setattr(gguf_cache, "GGUF_CACHE_MAX_BYTES", 4 * 134_000_000)  # just under SmolLM2-135M in fp32
    assert resolve_model(str(gguf)).weights_folder() is None
    assert copies(tmp_path) == []


def test_a_failed_copy_leaves_nothing(gguf, tmp_path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-copy")

    monkeypatch.setattr(gguf_cache, "dequantised_model", crash)
    with pytest.raises(RuntimeError, match="killed mid-copy"):
        load_model(str(gguf))
    root = tmp_path / "cache" / "gguf_weights"
    assert list(root.iterdir()) == []  # neither the key's folder nor the staging folder


def test_config_and_tokenizer_come_from_the_copy_as_parsed(gguf, monkeypatch) -> None:
    """A later process reads the GGUF's config and tokenizer from the copy, without parsing the file: the same
    config (so every hash of it agrees with or without the cache) and a tokenizer that encodes alike."""
    from transformers import AutoConfig, AutoTokenizer

    import ffnfusion.io.source as source_module

    source_module._parsed_from_gguf.cache_clear()
    parsed = resolve_model(str(gguf))
    want_config, want_tok = parsed.config(), parsed.tokenizer()
    load_model(str(gguf))  # makes the copy
    source_module._parsed_from_gguf.cache_clear()  # as in a new process
    for auto in (AutoConfig, AutoTokenizer):
        real = auto.from_pretrained.__func__

        def no_gguf(cls, *args, _real=real, **kwargs):
            assert "gguf_file" not in kwargs, "the GGUF was parsed again"
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(no_gguf))
    again = resolve_model(str(gguf))
    config, tok = again.config(), again.tokenizer()
    assert config.to_dict() == want_config.to_dict()
    texts = ["The capital of France is", "tabs\tand ünïcode\n\n<|im_start|>user"]
    assert tok(texts)["input_ids"] == want_tok(texts)["input_ids"]
    chat = [{"role": "user", "content": "Name a prime."}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == want_tok.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        want_tok.bos_token_id,
        want_tok.eos_token_id,
        want_tok.pad_token_id,
    )
