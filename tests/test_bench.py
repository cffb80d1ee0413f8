"""The benchmark code path on a tiny model: engine vs eager generate, the bench stage, the CLI verb.

Speed is never asserted here; the GPU-only parts (CUDA graphs, Triton kernels) are skipped without CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import save_model, tiny_model
from ffnfusion.bench.shapes import SHAPES, random_model, shape_config
from ffnfusion.bench.stage import bench
from ffnfusion.bench.table import markdown_table
from ffnfusion.bench.timing import compare_tokens, eager_generate
from ffnfusion.cli import app
from ffnfusion.engine.decode import DecodeEngine
from ffnfusion.engine.kernels import TorchOps
from ffnfusion.formats.plan import Plan
from ffnfusion.surgery import fuse_model

PLANS = {
    "original": Plan(),
    "fused": Plan(remove_attention=[2, 3], fuse_ffn=[[1, 2, 3]]),
    "parallel": Plan(parallel_blocks=[[4, 5]]),
}
CUDA = torch.cuda.is_available()


def _prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_engine_matches_eager_generate(family: str, plan_name: str) -> None:
    model = fuse_model(tiny_model(family), PLANS[plan_name])
    ids = _prompts(3, 9)
    eager = eager_generate(model, ids, 12)
    engine = DecodeEngine(model, max_batch=3, max_len=24)
    assert not engine.use_graphs and engine.ops.name == "torch"
    tokens, timing = engine.generate(ids, 12, timed=True)
    assert torch.equal(tokens, eager)
    assert len(timing.step_ms) == 11 and timing.prefill_ms > 0
    # A second prompt of another batch size reuses the same cache; eager generate still works on the packed model.
    tokens2, _ = engine.generate(ids[:2, :5], 6)
    assert torch.equal(tokens2, eager_generate(model, ids[:2, :5], 6))


def test_original_in_engine_matches_transformers_model() -> None:
    original = tiny_model("llama-bias-tied-rope3")
    ids = _prompts(2, 7)
    engine = DecodeEngine(fuse_model(original, Plan()), max_batch=2, max_len=20)
    tokens, _ = engine.generate(ids, 10)
    assert torch.equal(tokens, eager_generate(original, ids, 10))


def test_engine_counts_and_rebuild() -> None:
    model = fuse_model(tiny_model("llama"), PLANS["fused"])
    engine = DecodeEngine(model, 1, 8)
    assert engine.sequential_sub_blocks == 8  # 12 - 2 attentions - 2 FFNs
    weights = engine.weight_bytes_per_step()
    assert weights == sum(p.numel() * 4 for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert engine.kv_bytes_per_step(2, 10) == 4 * 2 * 2 * 12 * 10 * 2 * 4  # 4 attentions, K+V, 2 heads of 12
    # Building again reuses the packed weights instead of copying them.
    ptr = engine.blocks[0].ffn.gate_up_weight.data_ptr()
    assert DecodeEngine(model, 1, 8).blocks[0].ffn.gate_up_weight.data_ptr() == ptr


def test_static_decode_attention_equals_sliced() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 16, generator=gen)
    k, v = torch.randn(3, 2, 20, 16, generator=gen), torch.randn(3, 2, 20, 16, generator=gen)
    pos = torch.tensor([13])
    sliced = TorchOps(static=False).decode_attention(q, k, v, pos)
    masked = TorchOps(static=True).decode_attention(q, k, v, pos)
    torch.testing.assert_close(masked, sliced, rtol=1e-5, atol=1e-6)


def test_engine_rejects_bad_requests() -> None:
    model = fuse_model(tiny_model("llama"), Plan())
    with pytest.raises(ValueError, match="CUDA graphs"):
        DecodeEngine(model, 1, 8, use_graphs=True)
    with pytest.raises(ValueError, match="Triton"):
        DecodeEngine(model, 1, 8, kernels="triton")
    with pytest.raises(TypeError, match="DeciLM"):
        DecodeEngine(tiny_model("llama"), 1, 8)
    engine = DecodeEngine(model, 1, 8)
    with pytest.raises(ValueError, match="cache length"):
        engine.generate(_prompts(1, 6), 4)


def test_compare_tokens_reports_first_mismatch() -> None:
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    b = torch.tensor([[1, 2, 3], [4, 0, 6]])
    assert compare_tokens(a, a)["greedy_match"]
    r = compare_tokens(a, b)
    assert not r["greedy_match"] and r["first_mismatch"] == {"row": 1, "step": 1}


def test_greedy_note_says_where_tokens_part_and_why() -> None:
    from types import SimpleNamespace

    from ffnfusion.bench.stage import _greedy_note

    a, b = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 3], [4, 0, 6]])
    fp32 = SimpleNamespace(engine_model=torch.nn.Linear(2, 2))
    bf16 = SimpleNamespace(engine_model=torch.nn.Linear(2, 2).to(torch.bfloat16))
    assert _greedy_note(compare_tokens(a, a), fp32) == ", greedy tokens = eager's (6)"
    assert _greedy_note(compare_tokens(a, b), fp32) == ", greedy tokens differ from eager's from token 2"
    assert "half-precision rounding" in _greedy_note(compare_tokens(a, b), bf16)
    assert _greedy_note({"prefill_ms": 1.0}, fp32) == ""


def test_bench_stage_writes_json(tmp_path) -> None:
    folder = save_model(tiny_model("llama"), tmp_path / "tiny")
    plan_file = tmp_path / "plan.json"
    PLANS["fused"].save(plan_file)
    out = tmp_path / "bench.json"
    result = bench(
        str(folder), plan=plan_file, batch_sizes=[1, 2], prompt_len=6, new_tokens=5, out=out,
        dtype="float32", device="cpu", reference_tokens=5, repeats=2,
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = [m["name"] for m in result["models"]]
    assert names == ["original", "fused"]
    assert [m["sequential_sub_blocks"] for m in result["models"]] == [12, 8]
    for m in result["models"]:
        for run in m["runs"]:
            assert run["greedy_match"], run
            assert run["decode_ms_per_token"] > 0 and run["prefill_ms"] > 0
            assert run["cuda_graphs"] is False and run["kernels"] == "torch"
    assert [c["batch"] for c in result["comparison"]] == [1, 2]
    assert result["comparison"][0]["sub_block_ratio"] == pytest.approx(1.5)
    assert "| fused | 8 | 2 |" in markdown_table(result)


def test_bench_cli_random_weights(tmp_path) -> None:
    out = tmp_path / "b.json"
    plan_file = tmp_path / "plan.json"
    Plan(remove_attention=[1], fuse_ffn=[[0, 1]]).save(plan_file)
    args = [
        "bench", "--random-weights", "--shape", "smollm2-135m", "--layers", "2", "--plan", str(plan_file),
        "--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "3", "--dtype", "float32", "--device", "cpu",
        "--reference-tokens", "3", "--repeats", "1", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [m["sequential_sub_blocks"] for m in data["models"]] == [4, 2]
    assert all(r["greedy_match"] for m in data["models"] for r in m["runs"])


def test_bench_cli_errors(tmp_path) -> None:
    result = CliRunner().invoke(app, ["bench", "--random-weights", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "--shape" in result.output
    result = CliRunner().invoke(app, ["bench", "--random-weights", "--shape", "nope", "--device", "cpu"])
    assert result.exit_code == 2 and "unknown shape" in result.output


def test_shapes_and_random_model() -> None:
    for name in SHAPES:
        config = shape_config(name, layers=2)
        assert config.num_hidden_layers == 2 and config.eos_token_id is None
    assert shape_config("llama-3.1-70b").num_hidden_layers == 80
    model = random_model("smollm2-135m", layers=1, dtype=torch.bfloat16, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    for name, p in model.named_parameters():
        assert p.float().std() > 0.01, name  # random, never zeros or constants
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (1536, 576)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs and Triton kernels need a GPU")
def test_graph_engine_matches_eager_on_gpu() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    model = fuse_model(tiny_model("llama", head_dim=16).cuda(), PLANS["fused"])
    ids = _prompts(2, 9).cuda()
    eager = eager_generate(model, ids, 12)
    for kernels in ("triton", "torch"):
        engine = DecodeEngine(model, 2, 24, kernels=kernels)
        assert engine.use_graphs
        tokens, timing = engine.generate(ids, 12, timed=True)
        assert torch.equal(tokens, eager), kernels
        assert len(timing.step_ms) == 11


def test_table_explains_greedy_paths_that_part_in_half_precision() -> None:
    def result(dtype: str, match: bool) -> dict:
        run = {"batch": 1, "prefill_ms": 1.5, "decode_ms_per_token": 0.9, "greedy_match": match, "tokens_compared": 8}
        if not match:
            run["first_mismatch"] = {"row": 0, "step": 2}
        return {"dtype": dtype, "models": [{"name": "original", "sequential_sub_blocks": 60, "runs": [run]}]}

    parted = markdown_table(result("bfloat16", False))
    assert "differs from token 3" in parted
    assert "greedy = eager: in bfloat16" in parted and "--dtype float32" in parted
    assert "greedy = eager: in" not in markdown_table(result("float32", False))  # a real disagreement: no excuse
    assert "greedy = eager: in" not in markdown_table(result("bfloat16", True))
    assert "yes (8 tokens)" in markdown_table(result("bfloat16", True))
