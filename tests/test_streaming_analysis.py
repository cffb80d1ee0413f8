"""Layer-streamed `analyze`: the same analysis as the in-memory path, one layer resident at a time, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analysis_fakes import save_with_tokenizer, text_file
from conftest import tiny_model
from ffnfusion.analyze import analyze
from ffnfusion.analyze.streamed import LayerLoader, plan_streaming, streams_per_sequence
from ffnfusion.io.checkpoint import INDEX_NAME, CheckpointError

SHARD = 30_000  # bytes: every tiny model below spans several shards


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Multi-shard tiny checkpoints: a plain Llama, a tied/biased/llama3-RoPE Llama, and a Qwen3 (q/k norms)."""
    root = tmp_path_factory.mktemp("streamed")
    text_file(root / "text.txt", words=4000)
    out = {"text": root / "text.txt"}
    for family, seed in (("llama", 3), ("llama-bias-tied-rope3", 4), ("qwen3", 5)):
        folder = root / family
        model = tiny_model(family, seed=seed)
        model.save_pretrained(folder, max_shard_size=SHARD)
        save_with_tokenizer(model, folder.with_name(family + "-tok"))  # tokenizer files only are taken from it
        for f in folder.with_name(family + "-tok").glob("*token*"):
            (folder / f.name).write_bytes(f.read_bytes())
        assert (folder / INDEX_NAME).is_file() and len(list(folder.glob("*.safetensors"))) >= 3
        out[family] = folder
    return out


def _analyze(models: dict[str, Path], family: str, out: Path, **kw):
    args = dict(data=str(models["text"]), samples=7, seq_len=20, device="cpu", dtype="float32", batch_size=3)
    return analyze(str(models[family]), out, **{**args, **kw})


def _json(folder: Path) -> dict:
    return json.loads((folder / "analysis.json").read_text())


@pytest.mark.parametrize(
    ("family", "dtype", "removed", "stream_samples"),
    [
        ("llama", "float32", None, None),  # one pass over the weights
        ("llama", "bfloat16", "1,4", 3),  # three passes of one batch each; teacher run kept beside the base run
        ("llama-bias-tied-rope3", "float32", "0", 6),  # tied lm_head read from the embeddings
        ("qwen3", "bfloat16", None, 3),
    ],
)
def test_streamed_analysis_equals_in_memory(
    models: dict[str, Path], tmp_path: Path, family: str, dtype: str, removed: str | None, stream_samples: int | None
) -> None:
    memory = _analyze(models, family, tmp_path / "memory", dtype=dtype, remove_attention=removed)
    options = dict(dtype=dtype, remove_attention=removed, stream=True, stream_samples=stream_samples)
    streamed = _analyze(models, family, tmp_path / "streamed", **options)
    # Same tensors into every sub-block and the same summation order: equal, not just close (CPU kernels are
    # deterministic), including the identity, the calibration tokens and the evaluation counts of the cost figure.
    assert streamed.analysis == memory.analysis
    written = [(tmp_path / run / "analysis.json").read_bytes() for run in ("streamed", "memory")]
    assert written[0] == written[1]
    a = streamed.analysis
    assert a.base_kl > 0 if removed else a.base_kl == 0
    assert min(v for row in a.ffn_dependency for v in row if v is not None) > 0


def test_only_one_layer_is_resident_at_a_time(models: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    resident: list[int] = []
    real_load = LayerLoader.load_layer

    def load_layer(self: LayerLoader, j: int) -> None:
        real_load(self, j)
        layers = [i for i, layer in enumerate(self.model.model.layers) if not next(layer.parameters()).is_meta]
        assert layers == [j], f"layers {layers} hold weights while layer {j} runs"
        for module in (self.model.model.embed_tokens, self.model.lm_head):
            assert module.weight.is_meta, "embeddings and head are loaded only in their own phase"
        resident.append(j)

    monkeypatch.setattr(LayerLoader, "load_layer", load_layer)
    _analyze(models, "llama", tmp_path / "out", stream=True, stream_samples=6)
    assert resident == [*range(6), *range(6)]  # two passes (7 sequences, 6 per pass), each layer loaded once per pass


def test_pass_size_follows_the_memory_budget(models: dict[str, Path], monkeypatch) -> None:
    import ffnfusion.analyze.streamed as streamed
    from ffnfusion.adapters import adapter_for
    from ffnfusion.io.source import resolve_model

    source = resolve_model(str(models["llama"]))
    config = adapter_for(source.config()).decilm_config(source.config())
    loader = LayerLoader(config, source.tensor_getter(), torch.float32, torch.device("cpu"))
    per_sequence = streams_per_sequence(6, {2}) * 20 * 48 * 4
    assert streams_per_sequence(6, {2}) == 1 + 1 + 10 + 5
    layer = loader.layer_bytes(0)
    assert layer == (4 * 48 * 12 + 48 * 48 * 2 + 3 * 48 * 80 + 2 * 48) * 4  # q,o + k,v (2 kv heads) + FFN + norms
    # On a CPU the activations may take half the available host memory.
    monkeypatch.setattr(streamed, "host_available_bytes", lambda: 2 * (10 * per_sequence + 100))
    plan = plan_streaming(loader, 64, 20, 4, {2})
    assert (plan.samples_per_pass, plan.passes) == (8, 8)  # 10 sequences fit; rounded down to whole batches
    assert plan.activation_bytes == 8 * per_sequence
    monkeypatch.setattr(streamed, "host_available_bytes", lambda: per_sequence)
    assert plan_streaming(loader, 64, 20, 4, {2}).samples_per_pass == 4  # never less than one batch
    assert plan_streaming(loader, 5, 20, 4, {2}, samples_per_pass=100).passes == 1
    with pytest.raises(ValueError, match="not a multiple of --batch-size 4"):
        plan_streaming(loader, 64, 20, 4, {2}, samples_per_pass=6)


def test_bad_streaming_options_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="add --stream"):
        _analyze(models, "llama", tmp_path / "a", stream_samples=3)
    with pytest.raises(ValueError, match="use auto, device or cpu"):
        _analyze(models, "llama", tmp_path / "b", stream=True, activations="gpu")
    with pytest.raises(ValueError, match="--stream-samples must be at least 1"):
        _analyze(models, "llama", tmp_path / "c", stream=True, stream_samples=0)
    with pytest.raises(ValueError, match="not a multiple of --batch-size 3"):
        _analyze(models, "llama", tmp_path / "d", stream=True, stream_samples=4)
    assert not list(tmp_path.iterdir()), "nothing may be written for refused options"


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_broken_checkpoints_are_refused_before_any_work(models: dict[str, Path], tmp_path: Path) -> None:
    missing = _copy(models["llama"], tmp_path / "missing")
    shard = sorted(missing.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shards named in {INDEX_NAME} are missing: {shard.name}"):
        analyze(str(missing), tmp_path / "o1", data=str(models["text"]), samples=4, seq_len=20, stream=True)
    truncated = _copy(models["llama"], tmp_path / "truncated")
    shard = sorted(truncated.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        analyze(str(truncated), tmp_path / "o2", data=str(models["text"]), samples=4, seq_len=20, stream=True)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_run_that_dies_midway_leaves_no_output(models: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    real_load = LayerLoader.load_layer

    def dying(self: LayerLoader, j: int) -> None:
        if j == 3:
            raise MemoryError("simulated: the host ran out of memory at layer 3")
        real_load(self, j)

    monkeypatch.setattr(LayerLoader, "load_layer", dying)
    with pytest.raises(MemoryError, match="layer 3"):
        _analyze(models, "llama", tmp_path / "out", stream=True)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_a_killed_multi_pass_run_resumes_at_the_next_pass(
    models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    whole = _analyze(models, "llama", tmp_path / "whole", stream=True, stream_samples=3, remove_attention="2")
    real_load = LayerLoader.load_layer
    loads: list[int] = []

    kill_at: list[int] = [6 * 2 + 4]  # two passes done, the third dies at layer 4

    def dying(self: LayerLoader, j: int) -> None:
        if len(loads) in kill_at:
            raise RuntimeError("simulated kill in pass 3")
        loads.append(j)
        real_load(self, j)

    monkeypatch.setattr(LayerLoader, "load_layer", dying)
    with pytest.raises(RuntimeError, match="simulated kill"):
        _analyze(models, "llama", tmp_path / "out", stream=True, stream_samples=3, remove_attention="2")
    assert not (tmp_path / "out").exists()
    progress = tmp_path / ".out.stream-progress.pt"
    saved = progress.read_bytes()
    # A run with other settings into the same folder does not resume from it (here it dies in its first pass).
    messages: list[str] = []
    kill_at[:] = [len(loads) + 3]
    with pytest.raises(RuntimeError, match="simulated kill"):
        _analyze(models, "llama", tmp_path / "out", stream=True, stream_samples=3, log=messages.append)
    assert not any("resuming" in m for m in messages) and progress.read_bytes() == saved
    kill_at.clear()

    loads.clear()
    resumed = _analyze(
        models, "llama", tmp_path / "out", stream=True, stream_samples=3, remove_attention="2", log=messages.append
    )
    assert loads == list(range(6)), "only the third pass (of 7 sequences, 3 per pass) runs again"
    assert any("resuming the streamed analysis after pass 2 of 3" in m for m in messages)
    assert resumed.analysis == whole.analysis
    assert not progress.exists(), "the saved sums go once the analysis is written"


@pytest.mark.parametrize("stream", [False, True])
def test_two_processes_split_the_batches_and_agree_with_one(
    models: dict[str, Path], tmp_path: Path, stream: bool
) -> None:
    """torchrun with 2 CPU processes (gloo): each measures every other batch; the summed analysis is the same."""
    import os
    import subprocess
    import sys

    options = ["--samples", "7", "--seq-len", "20", "--device", "cpu", "--dtype", "float32", "--batch-size", "2"]
    options += ["--data", str(models["text"]), "--remove-attention", "3"] + (["--stream"] if stream else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "ffnfusion.cli", "analyze", str(models["qwen3"]), "--out", str(tmp_path / "dp"), *options]
    proc = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "data parallel: 2 processes" in proc.stderr
    assert proc.stdout.count("cost:") == 1, "only the first process reports"
    single = _analyze(
        models, "qwen3", tmp_path / "single", samples=7, seq_len=20, batch_size=2, remove_attention="3", stream=stream
    )
    both = json.loads((tmp_path / "dp" / "analysis.json").read_text())
    one = single.analysis.model_dump(mode="json")
    assert json.loads((tmp_path / "dp" / "run.json").read_text())["processes"] == 2
    # The same batches, only the final additions differ in order: equal to float64 rounding.
    for key in ("ffn_dependency", "block_dependency"):
        pairs = [(a, b) for ra, rb in zip(both[key], one[key]) for a, b in zip(ra, rb) if a is not None]
        assert max(abs(a - b) / max(abs(b), 1e-30) for a, b in pairs) < 1e-12
    for a, b in zip(both["attention_importance"], one["attention_importance"]):
        assert a["layer"] == b["layer"] and a["kl"] == pytest.approx(b["kl"], rel=1e-12, abs=1e-15)
    assert both["base_kl"] == pytest.approx(one["base_kl"], rel=1e-12)
    assert both["cost"] == one["cost"], "every sub-block evaluation is counted once, over both processes"
    assert not list(tmp_path.glob(".dp*")), "no partial output or saved sums left behind"


def test_self_generated_calibration_text_with_streaming(
    models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """--data self samples text through an accelerate-dispatched model; the same text as the in-memory path."""
    import ffnfusion.io.source as source

    loads: list[dict] = []
    real = source.AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(source.AutoModelForCausalLM, "from_pretrained", counting)
    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path / "cache-streamed"))
    streamed = _analyze(models, "llama", tmp_path / "s", data="self", samples=4, seq_len=16, stream=True)
    assert [kw.get("device_map") for kw in loads] == ["auto"], "the only whole-model load is the dispatched one"
    monkeypatch.setenv("FFNFUSION_CACHE", str(tmp_path / "cache-memory"))
    memory = _analyze(models, "llama", tmp_path / "m", data="self", samples=4, seq_len=16)
    assert streamed.analysis == memory.analysis
    loads.clear()
    _analyze(models, "llama", tmp_path / "again", data="self", samples=4, seq_len=16, stream=True)
    assert loads == [], "cached text: no model is loaded at all"
