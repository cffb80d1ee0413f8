"""Local task files -> lm-eval documents, bad input, and a quick end-to-end `ffnfusion eval` through lm-eval."""

from __future__ import annotations

import bz2
import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from conftest import ASSETS, tiny_model
from ffnfusion.cli import app
from ffnfusion.data import DataError
from ffnfusion.eval.scoring import EvalError
from ffnfusion.eval.stage import evaluate, markdown_table
from ffnfusion.eval.tasks import MMLU_SUBJECTS, load_docs
from ffnfusion.eval.zero_shot import resolve_tasks, run_tasks, task_manager

DATA = ASSETS / "data"
FOUNDRY = DATA / "llmfoundry_eval"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/assets/data not present")


def head_lines(src: Path, dst: Path, n: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open(encoding="utf-8") as f:
        dst.write_text("".join(line for _, line in zip(range(n), f)), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    """A task data folder holding the first few items of every real file, in the same layout as the originals."""
    root = tmp_path_factory.mktemp("taskdata")
    for rel in (
        "world_knowledge/arc_easy.jsonl",
        "world_knowledge/arc_challenge.jsonl",
        "commonsense_reasoning/piqa.jsonl",
        "language_understanding/winogrande.jsonl",
        "language_understanding/lambada_openai.jsonl",
    ):
        head_lines(FOUNDRY / rel, root / "llmfoundry_eval" / rel, 6)
    with bz2.open(DATA / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        text = "".join(line for _, line in zip(range(6 * 5), f))
    (root / "hellaswag").mkdir()
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        f.write(text)
    for subject in MMLU_SUBJECTS:  # header + 2 questions per subject (CSV rows may span lines, so go via csv)
        import csv

        with (DATA / "mmlu" / "test" / f"{subject}_test.csv").open(encoding="utf-8", newline="") as f:
            rows = [row for _, row in zip(range(3), csv.reader(f))]
        out = root / "mmlu" / "test" / f"{subject}_test.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(rows)
    return root


@needs_data
def test_readers_give_the_standard_schemas(sample_dir):
    arc = load_docs("arc_easy", sample_dir)
    first = json.loads((FOUNDRY / "world_knowledge/arc_easy.jsonl").open().readline())
    assert len(arc) == 6
    assert arc[0]["question"] == first["query"].removeprefix("Question: ")
    assert arc[0]["choices"]["text"] == first["choices"]
    assert arc[0]["choices"]["label"][first["gold"]] == arc[0]["answerKey"]

    piqa = load_docs("piqa", sample_dir)
    assert piqa[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?"  # trailing newline gone
    assert {d["label"] for d in piqa} <= {0, 1}

    wino = load_docs("winogrande", sample_dir)
    assert wino[0]["options"][1].endswith("so Maria") and wino[0]["target"] == "always got the easier cases."
    assert wino[0]["label"] == 1

    lam = load_docs("lambada_openai", sample_dir)
    row = json.loads((FOUNDRY / "language_understanding/lambada_openai.jsonl").open().readline())
    assert lam[0]["text"].split(" ")[-1] == row["continuation"]
    assert " ".join(lam[0]["text"].split(" ")[:-1]) == row["context"]

    hs = load_docs("hellaswag", sample_dir)
    assert len(hs) == 5
    assert hs[0] == {
        "query": "Roof shingle removal: A man is sitting on a roof. he",
        "choices": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": "3",
    }
    mmlu = load_docs("mmlu", sample_dir, "anatomy")
    assert len(mmlu) == 2 and mmlu[0]["answer"] == 0 and len(mmlu[0]["choices"]) == 4
    assert mmlu[0]["question"].startswith("A lesion causing compression of the facial nerve")


@needs_data
def test_full_real_files_parse():
    """Every item of the real files, with the counts their SOURCE.txt gives."""
    counts = {
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "piqa": 1838,
        "winogrande": 1267,
        "lambada_openai": 5153,
        "hellaswag": 10042,
    }
    for task, n in counts.items():
        assert len(load_docs(task, DATA)) == n, task
    assert sum(len(load_docs("mmlu", DATA, s)) for s in MMLU_SUBJECTS) == 14042


def _broken_dir(tmp_path: Path, rel: str, text: str) -> Path:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("task", "rel", "text", "match"),
    [
        ("arc_easy", "arc_easy.jsonl", '{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{oops\n', "arc_easy.jsonl:2"),
        ("arc_easy", "arc_easy.jsonl", '{"query": "Q", "choices": ["a", "b"], "gold": 2}\n', "gold answer 2"),
        ("piqa", "piqa.jsonl", '{"query": "Q", "choices": ["a"], "gold": 0}\n', "2 choices"),
        ("winogrande", "winogrande.jsonl", '{"context_options": ["a", "b"], "gold": 0}\n', "continuation"),
        ("lambada_openai", "lambada_openai.jsonl", '{"context": "x", "continuation": "two words"}\n', "one word"),
        ("hellaswag", "hellaswag_val_full.txt", "ctx\n3\na\nb\nc\n", "6 lines per item"),
        ("hellaswag", "hellaswag_val_full.txt", "ctx\nx\na\nb\nc\nd\n", "gold ending"),
        ("arc_challenge", "other.jsonl", "{}", "no arc_challenge.jsonl under"),
    ],
)
def test_malformed_or_missing_files_are_named(tmp_path, task, rel, text, match):
    with pytest.raises(DataError, match=match):
        load_docs(task, _broken_dir(tmp_path, rel, text))


def test_bad_mmlu_csv_is_named(tmp_path):
    _broken_dir(tmp_path, "anatomy_test.csv", "q,a,b,c,d,answer\nWhat?,1,2,3,4,0\n")
    with pytest.raises(DataError, match="expected the header"):
        load_docs("mmlu", tmp_path, "anatomy")
    _broken_dir(tmp_path, "anatomy_test.csv", "question,choice0,choice1,choice2,choice3,answer\nWhat?,1,2,3,4,E\n")
    with pytest.raises(DataError, match="anatomy_test.csv:2: answer 'E'"):
        load_docs("mmlu", tmp_path, "anatomy")


def test_task_names_are_checked(tmp_path):
    assert resolve_tasks(["HellaSwag", "lambada"], tmp_path) == [
        ("hellaswag", "local_hellaswag"),
        ("lambada_openai", "local_lambada_openai"),
    ]
    assert resolve_tasks(["hellaswag"], None) == [("hellaswag", "hellaswag")]  # lm-eval's hub task
    with pytest.raises(EvalError, match="--task-data-dir"):
        resolve_tasks(["local_piqa"], None)
    with pytest.raises(DataError, match="no piqa.jsonl under"):  # files are checked whatever the name used
        task_manager(resolve_tasks(["local_piqa"], tmp_path), tmp_path)
    with pytest.raises(EvalError, match="unknown task.*hellaswagg"):
        task_manager(resolve_tasks(["piqa", "hellaswagg"], tmp_path), tmp_path)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer of 257 tokens (no merges), so tiny test models stay tiny."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tok = byte_tokenizer()
    tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@needs_data
def test_cli_eval_end_to_end(tiny_folder, sample_dir, tmp_path):
    """Two models side by side through the CLI: perplexity, fidelity and all seven local tasks via lm-eval."""
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    tiny_model("llama", seed=7, vocab_size=257, max_position_embeddings=256).save_pretrained(other)
    text = head_lines(DATA / "wikitext2_raw_test" / "wiki.test.raw", tmp_path / "text.txt", 40)
    out = tmp_path / "res" / "eval.json"
    args = [
        "eval",
        str(tiny_folder),
        str(other),
        "--reference",
        str(tiny_folder),
        "--data",
        str(text),
        "--max-tokens",
        "600",
        "--context-len",
        "128",
        "--stride",
        "64",
        "--tasks",
        "hellaswag,arc_easy,arc_challenge,piqa,winogrande,lambada,mmlu",
        "--task-data-dir",
        str(sample_dir),
        "--limit",
        "2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["format"] == "ffnfusion-eval" and data["settings"]["limit"] == 2
    first, second = data["models"]
    assert (first["label"], second["label"]) == ("tiny", "other")
    assert first["perplexity"]["tokens"] == second["perplexity"]["tokens"] == 599
    assert first["fidelity"]["kl"] == pytest.approx(0, abs=1e-6) and first["fidelity"]["top1"] == 1.0
    assert second["fidelity"]["kl"] > 0.01 and second["fidelity"]["top1"] < 1.0
    for row in data["models"]:
        tasks = row["tasks"]
        assert set(tasks) == {"hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "mmlu"}
        assert all(t["samples"] == 2 for name, t in tasks.items() if name != "mmlu")
        assert tasks["mmlu"]["samples"] == 2 * len(MMLU_SUBJECTS)
        assert {"acc", "acc_norm"} <= set(tasks["hellaswag"]) and "acc_norm" not in tasks["winogrande"]
        assert tasks["lambada_openai"]["perplexity"] > 1
        assert all(0 <= t["acc"] <= 1 for t in tasks.values())
    table = out.with_suffix(".md").read_text()
    assert table == markdown_table(data) and "| tiny | other |" in table and "mmlu acc, n=114" in table
    assert table in result.output.replace("\r", "")


def _choice_logprob(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


@needs_data
def test_lm_eval_scores_the_in_memory_model_and_is_deterministic(sample_dir):
    """lm-eval's acc on ARC equals the argmax of the model's own choice log-likelihoods, run after run."""
    tok = byte_tokenizer()
    model = tiny_model("llama", seed=3, vocab_size=len(tok), max_position_embeddings=256)
    tasks = resolve_tasks(["arc_easy"], sample_dir)
    manager = task_manager(tasks, sample_dir)
    first = run_tasks(model, tok, tasks, manager, limit=6, batch_size=4, seed=1)["arc_easy"]
    again = run_tasks(model, tok, tasks, manager, limit=6, batch_size=3, seed=1)["arc_easy"]
    assert first == again
    correct = 0
    for doc in load_docs("arc_easy", sample_dir):
        context = f"Question: {doc['question']}\nAnswer:"
        scores = [_choice_logprob(model, tok, context, " " + c) for c in doc["choices"]["text"]]
        correct += scores.index(max(scores)) == doc["choices"]["label"].index(doc["answerKey"])
    assert first["samples"] == 6 and first["acc"] == pytest.approx(correct / 6)


def test_different_tokenizers_are_refused(tiny_folder, tmp_path):
    other = tmp_path / "smollm"
    tiny_model("llama", vocab_size=257).save_pretrained(other)
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    text = tmp_path / "t.txt"
    text.write_text("some text to score " * 20)
    with pytest.raises(EvalError, match="different tokenizers: vocabulary sizes differ"):
        evaluate([str(other)], reference=str(tiny_folder), data=str(text), device="cpu", progress=False)


def test_eval_refuses_bad_requests(tiny_folder, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    with pytest.raises(EvalError, match="nothing to evaluate"):
        evaluate([str(tiny_folder)])
    with pytest.raises(EvalError, match="inside the model folder"):
        evaluate([str(tiny_folder)], data=str(text), out=tiny_folder / "eval.json")
    with pytest.raises(DataError, match="not found"):
        evaluate([str(tiny_folder)], data=str(tmp_path / "missing.txt"), device="cpu")
    result = CliRunner().invoke(
        app, ["eval", str(tiny_folder), "--tasks", "nosuchtask", "--out", str(tmp_path / "e.json")]
    )
    assert result.exit_code == 2 and "unknown task(s): nosuchtask" in result.output


def test_reference_scores_are_reused_for_the_same_weights_text_and_settings(tiny_folder, tmp_path, monkeypatch):
    """The reference's scores come back from the cache only when nothing that decides them changed."""
    import ffnfusion.eval.stage as stage
    from ffnfusion.eval.cache import weights_digest

    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    tiny_model("llama", seed=5, vocab_size=len(byte_tokenizer()), max_position_embeddings=256).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    text, text2 = tmp_path / "t.txt", tmp_path / "t2.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    text2.write_text("a different text to score, with other words in it. " * 20)
    scored = []
    real = stage.score_windows
    monkeypatch.setattr(stage, "score_windows", lambda model, *a: scored.append(model) or real(model, *a))

    def ev(data=text, **kw):
        return evaluate([str(tiny_folder), str(other)], reference=str(tiny_folder), data=str(data), device="cpu",
                        progress=False, context_len=64, **kw)  # fmt: skip

    first = ev()
    assert len(scored) == 2 and "cached_scores" not in first["models"][0]
    again = ev()
    assert len(scored) == 3  # only `other` was scored again
    assert again["models"][0]["cached_scores"] is True and "cached_scores" not in again["models"][1]
    for key in ("perplexity", "fidelity"):
        assert again["models"][0][key] == first["models"][0][key]
    assert again["models"][1]["perplexity"] == first["models"][1]["perplexity"]
    ev(data=text2)  # another text
    ev(stride=32)  # another scoring setting
    ev(cache=False)  # asked not to
    assert len(scored) == 9
    # Any change to any weight is another key; the same weights in another module are the same.
    model = tiny_model("llama", seed=5)
    digest = weights_digest(model)
    assert weights_digest(tiny_model("llama", seed=5)) == digest
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 7] += 1e-3
    assert weights_digest(model) != digest


@needs_data
def test_prompt_templates_compile_once_and_render_as_lm_eval_does(sample_dir, monkeypatch):
    """lm-eval compiles each prompt template per document; the kept compilation must render every local task's
    requests exactly as lm-eval's own `apply_template` does."""
    from lm_eval import utils

    from ffnfusion.eval.zero_shot import _compile_templates_once

    names = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "mmlu"]
    tasks = resolve_tasks(names, sample_dir)

    def requests() -> list:
        found = []
        for task in task_manager(tasks, sample_dir).load([lm for _, lm in tasks])["tasks"].values():
            task.build_all_requests(limit=None, rank=0, world_size=1)
            found += [(task.config.task, i.doc_id, i.arguments) for i in task.instances]
        return sorted(found, key=repr)

    pristine = getattr(utils.apply_template, "original", utils.apply_template)
    monkeypatch.setattr(utils, "apply_template", pristine)
    want = requests()
    compiles = []
    real_from_string = utils.env.from_string
    monkeypatch.setattr(utils.env, "from_string", lambda t: compiles.append(t) or real_from_string(t))
    _compile_templates_once()
    assert utils.apply_template is not pristine
    got = requests()
    assert got == want and len(want) > 500  # every request of the 7 tasks (57 MMLU subjects)
    assert len(compiles) == len(set(compiles)) < 100  # each distinct template compiled once, not once a document
    _compile_templates_once()  # a second call keeps the first wrapper
    assert utils.apply_template.original is pristine


def test_batch_size_is_automatic_unless_given_and_recorded(tiny_folder, tmp_path, monkeypatch):
    """Without --batch-size eval sizes the batch once (8 on a CPU) and records the size it used; a given size is
    used as given. Scores do not depend on it."""
    import ffnfusion.eval.stage as stage

    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    used = []
    real = stage.score_windows
    monkeypatch.setattr(stage, "score_windows", lambda *a: used.append(a[5]) or real(*a))

    def ev(**kw):
        return evaluate([str(tiny_folder)], data=str(text), device="cpu", progress=False, context_len=32, **kw)

    auto, given = ev(), ev(batch_size=3)
    assert used == [8, 3]
    assert auto["settings"]["batch_size"] == 8 and given["settings"]["batch_size"] == 3
    a, g = auto["models"][0]["perplexity"], given["models"][0]["perplexity"]
    assert a["windows"] > 8 and a["tokens"] == g["tokens"]
    assert a["ppl"] == pytest.approx(g["ppl"], rel=1e-5)
    with pytest.raises(EvalError, match="--batch-size must be at least 1 .*leave it out"):
        ev(batch_size=0)
