"""Tensor parallelism on CPU: 2 processes over gloo must reproduce the single-process model, collectives counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

from conftest import tiny_model
from ffnfusion.bench.sharding import TensorParallelError, tp_problems
from ffnfusion.cli import app
from ffnfusion.formats.plan import Plan, plan_blocks, sequential_sub_blocks
from ffnfusion.surgery import fuse_model

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
PLANS = {
    "original": Plan(),
    # Blocks of every kind: attention only (0), a fused FFN group behind kept attention (1-3), attention + FFN (4),
    # FFN only (5).
    "fused": Plan(remove_attention=[2, 3, 5], remove_ffn=[0], fuse_ffn=[[1, 2, 3]]),
}
# What each family exercises under sharding: an uneven vocabulary (97) and GQA; o/mlp biases, tied embeddings
# and llama3 RoPE; q/k/v biases; q/k norms with head_dim != hidden / heads.
FAMILIES = ["llama", "llama-bias-tied-rope3", "qwen2", "qwen3"]


def _run_cases(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.cache_utils import DynamicCache

    from ffnfusion.bench.sharding import count_collectives, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, dict] = {}
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for family in FAMILIES:
            for plan_name, plan in PLANS.items():
                model = fuse_model(tiny_model(family, seed=5), plan)
                ref_logits = model(ids).logits
                cache = DynamicCache()
                model(ids[:, :-1], past_key_values=cache, use_cache=True)
                ref_step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
                ref_generated = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)

                shard_model(model, mesh)
                logits = model(ids).logits
                cache = DynamicCache()
                model(ids[:, :-1], past_key_values=cache, use_cache=True)
                step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
                generated = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
                cache = DynamicCache()
                model(ids[:, :-1], past_key_values=cache, use_cache=True)
                counts = count_collectives(lambda m=model, c=cache: m(ids[:, -1:], past_key_values=c, use_cache=True))
                q_proj = model.model.layers[-1].self_attn.q_proj if model.model.layers[-1].has_attention else None
                results[f"{family}/{plan_name}"] = {
                    "logits_err": (logits - ref_logits).abs().max().item(),
                    "step_err": (step - ref_step).abs().max().item(),
                    "scale": ref_logits.abs().max().item(),
                    "generate_equal": torch.equal(generated, ref_generated),
                    "counts": counts,
                    "local_q_rows": None if q_proj is None else q_proj.weight.to_local().shape[0],
                    "full_q_rows": None if q_proj is None else q_proj.weight.shape[0],
                }
        refused = fuse_model(tiny_model("llama"), Plan(parallel_blocks=[[4, 5]]))
        try:
            shard_model(refused, mesh)
            results["parallel_refused"] = {"message": None}
        except TensorParallelError as e:
            results["parallel_refused"] = {"message": str(e)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory) -> list[dict[str, dict]]:
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_run_cases, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_sharded_model_equals_single_process(tp_results, family: str, plan_name: str) -> None:
    for rank, results in enumerate(tp_results):
        r = results[f"{family}/{plan_name}"]
        tolerance = 1e-5 * max(1.0, r["scale"])
        assert r["logits_err"] < tolerance, (rank, r)
        assert r["step_err"] < tolerance, (rank, r)
        assert r["generate_equal"], (rank, r)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_all_reduces_equal_sequential_sub_blocks(tp_results, family: str, plan_name: str) -> None:
    expected = sequential_sub_blocks(plan_blocks(PLANS[plan_name], 6))
    for results in tp_results:
        counts = results[f"{family}/{plan_name}"]["counts"]
        # One all-reduce per attention/FFN sub-block; the LM head's all-gather is the only other collective.
        assert counts == {"all_reduce": expected, "all_gather_into_tensor": 1}


def test_heads_are_split_across_ranks(tp_results) -> None:
    r = tp_results[0]["llama/original"]
    assert r["local_q_rows"] * WORLD == r["full_q_rows"]


def test_parallel_blocks_are_refused(tp_results) -> None:
    message = tp_results[0]["parallel_refused"]["message"]
    assert message is not None and "layer 4 is a block-parallel group" in message


def test_tp_problems_names_indivisible_sizes() -> None:
    model = fuse_model(tiny_model("llama"), Plan(remove_attention=[2], fuse_ffn=[[1, 2]]))
    assert tp_problems(model, 2) == []
    four = tp_problems(model, 4)  # 4 query heads, 2 KV heads
    assert any("2 KV heads must both be divisible by the tensor-parallel size 4" in p for p in four)
    three = tp_problems(model, 3)  # widths 80 and the fused 160
    assert any("FFN width 160 is not divisible by 3" in p for p in three)
    assert any("FFN width 80 is not divisible by 3" in p for p in three)


def test_tp_bench_script_on_gloo(tmp_path) -> None:
    plan_file = tmp_path / "plan.json"
    Plan(remove_attention=[4, 5, 6], fuse_ffn=[[3, 4, 5]]).save(plan_file)
    out = tmp_path / "tp.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
        str(ROOT / "benchmarks" / "tp_bench.py"), "--shape", "tiny", "--plan", str(plan_file), "--device", "cpu",
        "--batch-sizes", "1,3", "--prompt-len", "8", "--new-tokens", "4", "--decode-steps", "2",
        "--prefill-reps", "1", "--check", "--out", str(out),
    ]  # fmt: skip
    # The environment is passed on whole: the launcher must see whatever communication settings the caller has.
    proc = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["tp"] == WORLD and report["backend"] == "gloo"
    original, fused = report["models"]
    assert (original["sequential_sub_blocks"], fused["sequential_sub_blocks"]) == (16, 11)
    for model in (original, fused):
        assert model["check_max_abs_diff"] < 1e-5
        assert model["expected_all_reduces_per_step"] == model["sequential_sub_blocks"]
        assert [r["batch"] for r in model["runs"]] == [1, 3]
        for run in model["runs"]:
            assert run["all_reduces_per_decode_step"] == model["sequential_sub_blocks"]
            assert run["other_collectives_per_decode_step"] == {"all_gather_into_tensor": 1}
            assert run["decode_ms_per_token"] > 0 and run["prefill_ms"] > 0
    assert [c["batch"] for c in report["comparison"]] == [1, 3]
    assert report["comparison"][0]["sub_block_ratio"] == pytest.approx(16 / 11)


def test_bench_cli_tp_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan_file = tmp_path / "plan.json"
    Plan().save(plan_file)
    base = ["bench", "--tp", "2", "--device", "cpu", "--out", str(tmp_path / "x.json")]
    result = CliRunner().invoke(app, [*base, "--random-weights", "--shape", "llama-3.2-1b", "--plan", str(plan_file)])
    assert result.exit_code == 2 and "torchrun --nproc-per-node 2" in result.output
    result = CliRunner().invoke(app, [*base, "some/model", "--plan", str(plan_file)])
    assert result.exit_code == 2 and "random-weight models only" in result.output
    result = CliRunner().invoke(app, [*base, "--random-weights", "--shape", "llama-3.2-1b"])
    assert result.exit_code == 2 and "--tp needs --plan" in result.output
