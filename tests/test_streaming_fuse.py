"""Shard-streamed fusion: byte-identical to the in-memory path, early clear errors on broken input, atomic output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ffnfusion.io.checkpoint as checkpoint
from conftest import tiny_model
from ffnfusion.adapters import adapter_for
from ffnfusion.formats.plan import Plan
from ffnfusion.fuse import fuse
from ffnfusion.io.checkpoint import (
    INDEX_NAME,
    CheckpointError,
    LazySafetensors,
    TensorInfo,
    stream_safetensors,
    write_safetensors,
)
from ffnfusion.surgery import fuse_state_dict

PLAN = Plan(remove_attention=[2, 3, 5], fuse_ffn=[[1, 2, 3], [4, 5]])
PARALLEL_PLAN = Plan(remove_attention=[2], fuse_ffn=[[1, 2]], parallel_blocks=[[3, 4]])
SHARD = 24_000  # bytes: the tiny models below then span several input and output shards


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, Path]:
    """The same tiny Llama saved as fp32 and bf16 checkpoints of several shards each."""
    model = tiny_model("llama", seed=5)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        folder = tmp_path_factory.mktemp(name) / "model"
        model.to(dtype).save_pretrained(folder, max_shard_size=SHARD)
        assert (folder / INDEX_NAME).is_file() and len(list(folder.glob("*.safetensors"))) >= 3
        out[name] = folder
    return out


def _in_memory(folder: Path, plan: Plan, out: Path, dtype: torch.dtype | None = None) -> None:
    """The in-memory path: the whole state dict loaded, fused with fuse_state_dict, saved with save_file per shard."""
    from transformers import AutoConfig

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    base = adapter_for(AutoConfig.from_pretrained(folder)).decilm_config(AutoConfig.from_pretrained(folder))
    _, tensors = fuse_state_dict(base, state, plan)
    out.mkdir()
    write_safetensors(out, tensors.items(), SHARD)


def _weight_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith((".safetensors", ".json"))}


@pytest.mark.parametrize(
    "source,plan,dtype",
    [("fp32", PLAN, None), ("bf16", PLAN, None), ("bf16", PARALLEL_PLAN, None), ("fp32", PLAN, "bfloat16")],
)
def test_streamed_fuse_is_byte_identical_to_in_memory(sharded, tmp_path, source, plan, dtype) -> None:
    streamed = tmp_path / "streamed"
    fuse(str(sharded[source]), plan, streamed, max_shard_bytes=SHARD, dtype=dtype)
    _in_memory(sharded[source], plan, tmp_path / "memory", dtype=torch.bfloat16 if dtype else None)
    got = {k: v for k, v in _weight_files(streamed).items() if k.startswith("model")}
    want = _weight_files(tmp_path / "memory")
    assert len([k for k in want if k.endswith(".safetensors")]) >= 3
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name
    # safetensors' own readers accept the streamed files and return the in-memory tensors.
    weight_map = json.loads((streamed / INDEX_NAME).read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        tensors = load_file(streamed / shard)
        with safe_open(streamed / shard, framework="pt") as f:
            assert sorted(f.keys()) == sorted(tensors) == sorted(n for n, s in weight_map.items() if s == shard)
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                assert torch.equal(f.get_tensor(name), tensors[name])


def test_stream_writer_matches_save_file_for_every_dtype(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int8]
    dtypes += [torch.uint8, torch.bool, torch.float8_e4m3fn, torch.int16]
    tensors: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(dtypes):
        for j, shape in enumerate([(3, 5), (), (0, 4), (7,)]):
            # Names whose numeric parts sort differently as text and as numbers, and a non-ASCII one.
            name = f"layers.{(i * 7 + j) % 13}.w{'é' if j == 3 else ''}"
            tensors[name] = (torch.randn(shape, generator=gen) * 5).to(dtype)
    items = list(tensors.items())
    infos = [TensorInfo.of(n, t) for n, t in items]
    for max_bytes in (10**9, 40):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        assert stream_safetensors(tmp_path / "a", infos, iter(items), max_bytes) == sum(
            t.numel() for t in tensors.values()
        )
        write_safetensors(tmp_path / "b", iter(items), max_bytes)
        assert _weight_files(tmp_path / "a") == _weight_files(tmp_path / "b")
        for f in (tmp_path / "a").glob("*.safetensors"):
            for name, t in load_file(f).items():
                assert torch.equal(t, tensors[name])
        os.rename(tmp_path / "a", tmp_path / f"a{max_bytes}")
        os.rename(tmp_path / "b", tmp_path / f"b{max_bytes}")
    single = tmp_path / "single.safetensors"
    save_file(tensors, single, metadata={"format": "pt"})
    assert (tmp_path / "a1000000000" / "model.safetensors").read_bytes() == single.read_bytes()


def test_stream_writer_refuses_a_stream_that_disagrees_with_its_plan(tmp_path) -> None:
    a, b = torch.zeros(2, 3), torch.ones(4)
    infos = [TensorInfo.of("a", a), TensorInfo.of("b", b)]
    with pytest.raises(RuntimeError, match="expected"):
        stream_safetensors(tmp_path, infos, iter([("a", a), ("b", torch.ones(5))]), 10**6)
    with pytest.raises(RuntimeError, match="ended before 'b'"):
        stream_safetensors(tmp_path, infos, iter([("a", a)]), 10**6)
    with pytest.raises(RuntimeError, match="after every tensor"):
        stream_safetensors(tmp_path, infos, iter([("a", a), ("b", b), ("c", b)]), 10**6)


def _broken_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _assert_refused(folder: Path, tmp_path: Path, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match):
        fuse(str(folder), PLAN, out, max_shard_bytes=SHARD)
    assert not out.exists() and not list(tmp_path.glob(".out*")), "output written for a broken input"


def test_missing_shard_is_named(sharded, tmp_path) -> None:
    bad = _broken_copy(sharded["bf16"], tmp_path / "bad")
    gone = _shards(bad)[1]
    gone.unlink()
    _assert_refused(bad, tmp_path, f"missing: {gone.name}.*complete checkpoint")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_shard_is_named(sharded, tmp_path, keep: float) -> None:
    bad = _broken_copy(sharded["bf16"], tmp_path / "bad")
    shard = _shards(bad)[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    _assert_refused(bad, tmp_path, f"{shard.name} is not a readable safetensors file.*truncated")


def test_index_naming_a_tensor_the_shards_lack(sharded, tmp_path) -> None:
    bad = _broken_copy(sharded["bf16"], tmp_path / "bad")
    index = json.loads((bad / INDEX_NAME).read_text())
    first = _shards(bad)[0].name
    index["weight_map"]["model.layers.9.mlp.gate_proj.weight"] = first
    (bad / INDEX_NAME).write_text(json.dumps(index))
    _assert_refused(bad, tmp_path, f"places 1 tensor.*in {first} that the shard does not hold.*layers.9")


def test_index_pointing_at_the_wrong_shard(sharded, tmp_path) -> None:
    bad = _broken_copy(sharded["bf16"], tmp_path / "bad")
    index = json.loads((bad / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    (bad / INDEX_NAME).write_text(json.dumps(index))
    _assert_refused(bad, tmp_path, f"in {shards[1]} that the shard does not hold \\({name}\\)")


def test_tensor_the_plan_needs_is_absent(sharded, tmp_path) -> None:
    bad = _broken_copy(sharded["bf16"], tmp_path / "bad")
    index = json.loads((bad / INDEX_NAME).read_text())
    del index["weight_map"]["model.layers.4.mlp.down_proj.weight"]
    (bad / INDEX_NAME).write_text(json.dumps(index))
    _assert_refused(bad, tmp_path, "no tensor named 'model.layers.4.mlp.down_proj.weight'")


def test_unreadable_index(sharded, tmp_path) -> None:
    bad = _broken_copy(sharded["bf16"], tmp_path / "bad")
    (bad / INDEX_NAME).write_text('{"weight_map": {"a": ')
    _assert_refused(bad, tmp_path, f"{INDEX_NAME} is not a valid index file")


def test_reads_hold_no_mapping_of_the_shards(sharded) -> None:
    lazy = LazySafetensors(sharded["bf16"])
    for name in lazy.weight_map:
        lazy.get(name).float().sum()
    maps = Path("/proc/self/maps")
    if maps.exists():
        mapped = [line for line in maps.read_text().splitlines() if str(sharded["bf16"]) in line]
        assert not mapped, "shards stay mapped: their pages would count towards RSS"


def test_exception_mid_stream_leaves_nothing(sharded, tmp_path, monkeypatch) -> None:
    calls = 0
    real = LazySafetensors.get

    def failing(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 12:
            raise OSError("disk went away")
        return real(self, name, pin_memory)

    monkeypatch.setattr(LazySafetensors, "get", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk went away"):
        fuse(str(sharded["bf16"]), PLAN, out, max_shard_bytes=SHARD)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_killed_run_leaves_no_output_and_the_next_run_cleans_up(sharded, tmp_path) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal
        import ffnfusion.io.shards as shards
        from ffnfusion.fuse import fuse
        from ffnfusion.formats.plan import Plan

        real, calls = shards._pwrite_all, 0
        def dying(fd, data, offset):
            global calls
            calls += 1
            if calls == 15:
                os.kill(os.getpid(), signal.SIGKILL)
            real(fd, data, offset)
        shards._pwrite_all = dying
        fuse({str(sharded["bf16"])!r}, Plan.model_validate_json({PLAN.model_dump_json()!r}), {str(out)!r},
             max_shard_bytes={SHARD})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()
    partial = list(tmp_path.glob(".out.partial-*"))
    assert len(partial) == 1 and list(partial[0].glob("*.safetensors")), "the run was not killed mid-write"
    fuse(str(sharded["bf16"]), PLAN, out, max_shard_bytes=SHARD)
    assert not list(tmp_path.glob(".out.*")), "the killed run's partial folder was not cleaned up"
    assert checkpoint.verify_fused_checkpoint(out) is None
