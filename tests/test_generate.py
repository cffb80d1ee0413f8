"""`ffnfusion generate` on tiny random models (CPU): the sampling engine, the corpus format, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from analysis_fakes import char_tokenizer, save_with_tokenizer
from conftest import tiny_model
from ffnfusion.cli import app
from ffnfusion.data import calibration_tokens, self_generated_texts, token_windows
from ffnfusion.engine.sampling import SamplingEngine, sample_from_logits
from ffnfusion.formats.corpus import CorpusError, CorpusRows, open_corpus
from ffnfusion.formats.plan import Plan
from ffnfusion.generate import GenerateSettings, PromptSource, generate
from ffnfusion.generate.prompts import PromptError
from ffnfusion.surgery import fuse_model

runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and spares a CPU shared with other jobs from oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _greedy(model, prompt: list[int], total: int) -> list[int]:
    ids = torch.tensor([prompt])
    new = total - len(prompt)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=0)  # fmt: skip
    return out[0].tolist()


def test_temperature_zero_equals_greedy_generate_with_refill() -> None:
    model = tiny_model("llama")
    prompts = [[5, 6, 7, 8, 9], [3, 4, 10], [1], [20, 21], [30, 31, 32, 33]]
    full = [_greedy(model, p, 24) for p in prompts]
    # A stop token that one greedy continuation reaches early: that slot ends and is refilled (continuous batching).
    stop = full[0][9]
    expected = []
    for p, seq in zip(prompts, full):
        cut = next((i + 1 for i in range(len(p), len(seq)) if seq[i] == stop), len(seq))
        expected.append(seq[:cut])
    engine = SamplingEngine(fuse_model(model, Plan()), 2, 24, max_prompt=5, stop_ids=[stop], temperature=0)
    queue = iter(prompts + [[1]] * 8)
    docs = list(engine.documents(lambda: next(queue), budget_tokens=sum(map(len, expected)), seed=0, sync_every=1))
    got = sorted(d.tokens for d in docs[: len(prompts)])
    assert got == sorted(expected)
    assert any(d.stopped for d in docs[: len(prompts)])


def test_seeded_sampling_is_reproducible() -> None:
    engine = SamplingEngine(fuse_model(tiny_model("llama"), Plan()), 3, 16, max_prompt=1, temperature=1.0, top_p=0.9)

    def run(seed: int) -> list[list[int]]:
        return [d.tokens for d in engine.documents(lambda: [1], 64, seed)]

    first = run(5)
    assert run(5) == first and run(6) != first


def test_fused_top_p_is_cuda_only_and_falls_back_to_the_torch_rounds() -> None:
    """Asked for on a CPU (no Triton kernel to run), the fused sampler is off and sampling is the torch path's,
    seed for seed."""
    model = fuse_model(tiny_model("llama"), Plan())
    fused = SamplingEngine(model, 3, 16, max_prompt=1, temperature=1.0, top_p=0.9, fused_top_p=True)
    plain = SamplingEngine(model, 3, 16, max_prompt=1, temperature=1.0, top_p=0.9, fused_top_p=False)
    assert not fused.fused_top_p
    docs = [[d.tokens for d in e.documents(lambda: [1], 32, 5)] for e in (fused, plain)]
    assert docs[0] == docs[1]


def test_top_p_samples_only_the_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    draws = sample_from_logits(logits, 1.0, 0.8, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] - 0.625) < 0.02  # 0.5 / (0.5 + 0.3)
    full = torch.bincount(sample_from_logits(logits, 1.0, 1.0, torch.Generator().manual_seed(0)), minlength=4)
    assert torch.allclose(full.float() / len(draws), probs, atol=0.02)
    assert torch.equal(sample_from_logits(logits, 0.0, 0.5), torch.zeros(20000, dtype=torch.long))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return str(save_with_tokenizer(tiny_model("llama"), tmp_path_factory.mktemp("gen") / "teacher"))


SMALL = dict(tokens=600, seq_len=32, shard_tokens=160, batch_size=4)


def test_generate_writes_a_corpus_and_resumes_after_a_kill(teacher, tmp_path, monkeypatch) -> None:
    full = generate(teacher, tmp_path / "full", GenerateSettings(**SMALL), log=lambda _: None)
    corpus = open_corpus(tmp_path / "full", require_complete=True)
    m = corpus.manifest
    assert m.dtype == "uint16" and m.seq_len == 32 and m.sequences == 19 == full.sequences and len(m.shards) == 4
    seqs = corpus.sequences()
    assert seqs.shape == (19, 32) and np.asarray(seqs).max() < 97 and np.array_equal(seqs[11], seqs[[11]][0])
    assert {"distinct_1", "distinct_4", "duplicate_documents"} <= set(m.diversity)
    corpus.check_tokenizer(char_tokenizer())
    assert json.loads((tmp_path / "full" / ".ffnfusion-output.json").read_text())["verb"] == "generate"

    import ffnfusion.formats.corpus as corpus_format

    real = corpus_format.CorpusWriter.write_shard
    calls = []

    def dies_on_third(self, tokens, docs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, tokens, docs)

    monkeypatch.setattr(corpus_format.CorpusWriter, "write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate(teacher, tmp_path / "killed", GenerateSettings(**SMALL), log=lambda _: None)
    monkeypatch.setattr(corpus_format.CorpusWriter, "write_shard", real)
    assert len(open_corpus(tmp_path / "killed").manifest.shards) == 2
    resumed = generate(teacher, tmp_path / "killed", GenerateSettings(**SMALL), resume=True, log=lambda _: None)
    assert resumed.resumed_shards == 2 and resumed.sequences == 19
    for i in range(4):
        name = f"tokens-{i:05d}.bin"
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_cli_and_bad_input(teacher, tmp_path, monkeypatch) -> None:
    out = tmp_path / "c"
    ok = runner.invoke(app, ["generate", teacher, "--out", str(out), "--tokens", "0.2k", "--seq-len", "16",
                             "--batch-size", "2", "--top-p", "1.0"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert open_corpus(out).manifest.sequences == 13 and "distinct 2" in ok.output

    from transformers import AutoModelForCausalLM

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    # Patched on the class (restored after the test), not on a module attribute that a module imported during
    # this test would keep for good.
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)

    def fails(args: list[str], *words: str) -> None:
        r = runner.invoke(app, ["generate", *args])
        assert r.exit_code == 2, r.output
        text = " ".join(r.output.split())
        assert "Traceback" not in text and all(w in text for w in words), text

    fails([teacher, "--out", str(tmp_path / "z"), "--tokens", "0"], "--tokens must be at least 1")
    fails([teacher, "--out", str(out), "--tokens", "1k"], "--overwrite")
    other = save_with_tokenizer(tiny_model("llama", num_hidden_layers=3), tmp_path / "other")
    fails([str(other), "--out", str(out), "--tokens", "1k", "--resume"], "another model", "num_layers")
    other_tok = tmp_path / "other_tok"
    tiny_model("llama").save_pretrained(other_tok)
    from test_heal import char_tokenizer as other_chars

    other_chars().save_pretrained(other_tok)
    fails([str(other_tok), "--out", str(out), "--tokens", "1k", "--resume", "--seq-len", "16"], "tokenizer differs")
    fails([teacher, "--out", str(out), "--tokens", "1k", "--resume", "--seq-len", "8"], "other settings", "seq_len")
    import ffnfusion.generate.shards as shards

    monkeypatch.setattr(shards.os, "access", lambda *a: False)
    fails([teacher, "--out", str(tmp_path / "ro" / "c"), "--tokens", "1k"], "not writable")


def test_reader_refuses_another_tokenizer_and_damage(teacher, tmp_path) -> None:
    generate(teacher, tmp_path / "c", GenerateSettings(tokens=64, seq_len=16, batch_size=2), log=lambda _: None)
    corpus = open_corpus(tmp_path / "c")
    from test_heal import char_tokenizer as other_chars

    with pytest.raises(CorpusError, match="another tokenizer"):
        corpus.check_tokenizer(other_chars())
    (tmp_path / "c" / "tokens-00000.bin").write_bytes(b"xx")
    with pytest.raises(CorpusError, match="damaged"):
        corpus.sequences()


def test_chat_prompts_and_prompt_file(tmp_path) -> None:
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    )
    chat = PromptSource(tok, GenerateSettings(tokens=1, prompts="chat"), max_len=512)
    assert chat.kind == "chat" and len(chat.prompts) == 1680
    # auto: a chat model writes the mix of free prose and answers; a model without a template, free prose.
    assert PromptSource(tok, GenerateSettings(tokens=1), max_len=512).kind == "mix"
    assert PromptSource(char_tokenizer(), GenerateSettings(tokens=1), max_len=512).kind == "bos"
    texts = {"".join(tok.convert_ids_to_tokens(p)) for p in chat.prompts}
    assert "<Write a poem about coffee.>:" in texts
    one, two = chat.for_shard(0, 0), chat.for_shard(0, 0)
    assert [one() for _ in range(5)] == [two() for _ in range(5)]
    f = tmp_path / "p.txt"
    f.write_text("Once upon a time\n\nThe weather today\n")
    lines = PromptSource(tok, GenerateSettings(tokens=1, prompts=str(f), prompt_tokens=6), max_len=512)
    assert ["".join(tok.convert_ids_to_tokens(p)) for p in lines.prompts] == ["<eos>Once ", "<eos>The w"]
    assert lines.kind.startswith("file:")
    mix = PromptSource(tok, GenerateSettings(tokens=1, prompts="mix"), max_len=512)
    draw = mix.for_shard(3, 1)
    draws = [draw() for _ in range(400)]
    bos = [d for d in draws if d == [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]]
    assert mix.kind == "mix" and 150 < len(bos) < 250  # about half the documents start from BOS alone
    assert all(d in chat.prompts for d in draws if d not in bos)
    again = mix.for_shard(3, 1)
    assert [again() for _ in range(400)] == draws
    plain = char_tokenizer()  # no chat template: mix needs one, and says so
    with pytest.raises(PromptError, match="no chat template"):
        PromptSource(plain, GenerateSettings(tokens=1, prompts="mix"), max_len=512)


def test_data_self_uses_the_engine_and_caches(tmp_path) -> None:
    model = tiny_model("llama")
    tok = char_tokenizer()
    a = calibration_tokens("self", tok, 6, 20, seed=3, model=model, model_key="k", cache_dir=tmp_path)
    assert a.shape == (6, 20) and a.dtype == torch.long and int(a.max()) < 97

    def never():
        raise AssertionError("cached: the model must not be loaded")

    b = calibration_tokens("self", tok, 6, 20, seed=3, model=never, model_key="k", cache_dir=tmp_path)
    assert torch.equal(a, b)
    lazy = calibration_tokens("self", tok, 6, 20, seed=3, model=never, model_key="k", cache_dir=tmp_path, lazy=True)
    assert isinstance(lazy, CorpusRows) and torch.equal(lazy[:], a)


def test_runs_sharing_the_cache_wait_for_one_writer(tmp_path) -> None:
    """A second run asking for the same self-written corpus waits for the lock instead of rewriting the shards."""
    import threading

    from filelock import FileLock

    model, tok = tiny_model("llama"), char_tokenizer()
    loaded = threading.Event()

    def loader():
        loaded.set()
        return model

    a = calibration_tokens("self", tok, 4, 16, seed=1, model=model, model_key="k", cache_dir=tmp_path)
    (lock_path,) = (tmp_path / "self_corpus").glob("*.lock")
    result: dict = {}

    def other_run():
        result["b"] = calibration_tokens("self", tok, 4, 16, seed=2, model=loader, model_key="k", cache_dir=tmp_path)

    # Seed 2 is another corpus (another folder and lock): it proceeds while seed 1's lock is held.
    with FileLock(str(lock_path)):
        thread = threading.Thread(target=other_run)
        thread.start()
        assert loaded.wait(30), "a different corpus must not wait for another corpus' lock"
        thread.join(60)
    loaded.clear()
    with FileLock(str(lock_path)):
        thread = threading.Thread(
            target=lambda: result.update(
                c=calibration_tokens("self", tok, 4, 16, seed=1, model=loader, model_key="k", cache_dir=tmp_path)
            )
        )
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the same corpus must wait while another run holds its lock"
    thread.join(60)
    assert not loaded.is_set() and torch.equal(result["c"], a)  # read from the finished cache, never regenerated
    assert result["b"].shape == (4, 16) and not torch.equal(result["b"], a)


def test_a_corpus_folder_is_training_and_calibration_data(teacher, tmp_path) -> None:
    """heal/analyze/run take a generated corpus as --data: its token ids, cut at any length, never re-tokenised."""
    from transformers import AutoTokenizer

    from ffnfusion.data import check_text_source, packed_sequences
    from ffnfusion.formats.corpus import is_corpus

    out = tmp_path / "corpus"
    generate(teacher, out, GenerateSettings(**SMALL), log=lambda _: None)
    assert is_corpus(out)
    check_text_source(str(out))  # no text files in it, and still accepted
    tok = AutoTokenizer.from_pretrained(teacher)
    stream = np.asarray(open_corpus(out).sequences()).reshape(-1)
    for seq_len in (32, 16, 48):  # the corpus' own length, and cut again shorter and longer
        rows = packed_sequences(str(out), tok, seq_len)
        # At the corpus' own length nothing is copied: rows are read from the shards as they are indexed.
        assert isinstance(rows, CorpusRows) == (seq_len == 32)
        rows = rows[:]
        assert rows.shape == (len(stream) // seq_len, seq_len)
        assert torch.equal(rows.reshape(-1), torch.from_numpy(stream[: rows.numel()].astype(np.int64)))
    # A subset read lazily is the subset cut from the stream, and indexes like the tensor.
    lazy = packed_sequences(str(out), tok, 32, max_sequences=5, seed=3)
    cut = token_windows(torch.from_numpy(stream.astype(np.int64)), 5, 32, seed=3)
    assert isinstance(lazy, CorpusRows) and lazy.shape == cut.shape == (5, 32) and len(lazy) == 5
    assert torch.equal(lazy[:], cut) and torch.equal(lazy[3], cut[3]) and torch.equal(lazy[1:4], cut[1:4])
    assert torch.equal(lazy[np.array([4, 0])], cut[[4, 0]]) and lazy[0].dtype == torch.long
    picked = calibration_tokens(str(out), tok, 5, 16, seed=3)
    windows = torch.from_numpy(stream[: len(stream) // 16 * 16].astype(np.int64)).view(-1, 16)
    assert all(any(torch.equal(p, w) for w in windows) for p in picked)
    from test_heal import char_tokenizer as other_chars

    with pytest.raises(CorpusError, match="another tokenizer"):
        packed_sequences(str(out), other_chars(), 32)


def test_heal_reads_a_corpus_from_its_shards_with_the_same_result(teacher, tmp_path, monkeypatch) -> None:
    """heal on a corpus at its own length trains on rows read from the shards batch by batch, and ends at the very
    weights the copied-into-memory path reaches: same rows, same order, same steps."""
    from safetensors.torch import load_file

    import ffnfusion.data as data
    import ffnfusion.heal.stage as heal_stage
    from ffnfusion.fuse import fuse
    from ffnfusion.heal.settings import HealSettings
    from ffnfusion.heal.stage import heal

    corpus = tmp_path / "corpus"
    generate(teacher, corpus, GenerateSettings(**SMALL), log=lambda _: None)
    fuse(teacher, Plan(remove_attention=[1], fuse_ffn=[[0, 1]]), tmp_path / "student")
    settings = dict(data=[str(corpus)], seq_len=32, batch_size=2, max_steps=3, lr=1e-3, warmup=0, bf16=False)
    seen = []
    real = heal_stage._training_sequences

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(heal_stage, "_training_sequences", spy)
    heal(tmp_path / "student", teacher, tmp_path / "lazy", HealSettings(**settings), progress=False)
    monkeypatch.setattr(data, "corpus_rows", lambda *a: None)  # the stream cut and copied, as before
    heal(tmp_path / "student", teacher, tmp_path / "copied", HealSettings(**settings), progress=False)
    assert isinstance(seen[0], CorpusRows) and isinstance(seen[1], torch.Tensor)
    lazy, copied = (load_file(tmp_path / name / "model.safetensors") for name in ("lazy", "copied"))
    before = load_file(tmp_path / "student" / "model.safetensors")
    assert lazy.keys() == copied.keys()
    assert all(torch.equal(lazy[k], copied[k]) for k in lazy)
    assert any(not torch.equal(lazy[k], before[k]) for k in lazy)  # it trained


def test_held_out_text_starts_from_its_openers(tmp_path) -> None:
    """`run`'s held-out text: each sample continues an opener (openers of two lengths share a left-padded batch),
    keeps it as its start, and is cached apart from the text sampled from BOS alone."""
    model, tok = tiny_model("llama"), char_tokenizer()
    openers = ["The river", "In 1887, the village council"]
    texts = self_generated_texts(model, tok, 5, 12, seed=3, cache_dir=tmp_path, key="k", batch_size=4, openers=openers)
    assert len(texts) == 5
    for i, text in enumerate(texts):
        assert text.startswith(openers[i % 2]) and len(text) > len(openers[i % 2]), (i, text)
    never = lambda: pytest.fail("the cached text was sampled again")  # noqa: E731
    assert self_generated_texts(never, tok, 5, 12, 3, tmp_path, "k", 4, openers=openers) == texts
    plain = self_generated_texts(model, tok, 5, 12, 3, tmp_path, "k", 4)
    assert len(plain) == 5 and not any(t.startswith(o) for t in plain for o in openers)


def test_self_text_without_a_start_token_is_refused_clearly() -> None:
    from ffnfusion.data import DataError

    tok = char_tokenizer()
    tok.eos_token = None  # neither BOS nor EOS: nothing to start sampling from
    with pytest.raises(DataError, match="neither a BOS nor an EOS token"):
        self_generated_texts(tiny_model("llama"), tok, 2, 8, seed=0, cache_dir=None, key="no-start")
