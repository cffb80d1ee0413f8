"""`plan --target-depth`: recipes compared at the same depth, the layer-drop baseline, bench.json as a cost model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from analysis_fakes import analysed_tiny_model, fake_analysis
from conftest import tiny_model
from ffnfusion.analyze import load_analysis
from ffnfusion.analyze.rescore import iterative_rescorer, recipe_measurer
from ffnfusion.cli import app
from ffnfusion.data import calibration_tokens
from ffnfusion.formats.analysis import SubBlockStats
from ffnfusion.formats.plan import Plan, plan_blocks, validate_plan
from ffnfusion.plan.costs import CostModel
from ffnfusion.plan.recipes import RECIPES, compare_recipes
from ffnfusion.plan.search import depth
from ffnfusion.surgery import fuse_model

KL = [0.9, 0.5, 0.01, 0.02, 0.03, 0.4, 0.8, 0.7]


@pytest.mark.parametrize("target", [15, 13, 12, 11, 9])
def test_every_recipe_reaches_the_target_depth_and_auto_picks_the_lowest_kl(target: int) -> None:
    a = fake_analysis(8, KL)
    c = compare_recipes(a, target)
    assert [r.name for r in c.recipes] == list(RECIPES)
    for r in c.recipes:
        if r.name == "parallel" and target == 15:
            assert not r.reached and "saves 2" in r.note  # one pair already overshoots
            continue
        validate_plan(r.plan, 8, a.model.ffn_widths)
        assert r.depth == depth(r.plan, 8) == target, r.name
        assert r.reached
    assert c.chosen.kl == min(r.kl for r in c.recipes)
    assert c.result.plan.info["recipes"]["chosen"] == c.chosen.name
    assert c.result.depth_after == target
    # Without the model, every recipe but attention removal is partly a proxy, and the plan says so.
    assert all(r.kl_is.endswith("+ proxy") for r in c.recipes if r.name != "attention" and r.reached)
    if c.chosen.name != "attention":
        assert "proxy" in c.result.plan.info["warnings"][-1]


def test_recipes_differ_as_their_names_say() -> None:
    a = fake_analysis(8, KL)
    by = {r.name: r for r in compare_recipes(a, 11).recipes}
    assert not by["attention"].plan.fuse_ffn and not by["attention"].plan.parallel_blocks
    assert by["fusion"].plan.fuse_ffn and not by["fusion"].plan.parallel_blocks
    assert by["parallel"].plan.parallel_blocks
    drop = by["layer-drop"].plan
    assert drop.remove_ffn and set(drop.remove_ffn) <= set(drop.remove_attention) and not drop.fuse_ffn
    # A forced recipe is written even when another predicts less.
    forced = compare_recipes(a, 11, recipe="layer-drop")
    assert forced.chosen.name == "layer-drop" and forced.why == "forced by --recipe"
    with pytest.raises(ValueError, match="--recipe must be one of"):
        compare_recipes(a, 11, recipe="prune")


def test_layer_drop_follows_block_influence() -> None:
    a = fake_analysis(6, [0.5] * 6)
    for i, cos in enumerate([0.9, 0.05, 0.5, 0.01, 0.3, 0.8]):
        a.layers[i].block = SubBlockStats(rel_norm=0.5, cos_distance=cos)
    drop = {r.name: r for r in compare_recipes(a, 8).recipes}["layer-drop"]
    assert drop.plan.remove_ffn == [1, 3]  # the two lowest-influence layers
    odd = {r.name: r for r in compare_recipes(a, 7).recipes}["layer-drop"]
    assert odd.plan.remove_ffn == [1, 3] and len(odd.plan.remove_attention) == 3 and odd.depth == 7


def test_unreachable_depth_is_reported() -> None:
    a = fake_analysis(4, [0.1, 0.2, 0.3, 0.4])
    c = compare_recipes(a, 1)
    attention = next(r for r in c.recipes if r.name == "attention")
    assert not attention.reached and "not 1" in attention.note


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return analysed_tiny_model(tmp_path_factory.mktemp("recipes"))


def test_measured_recipes_on_a_tiny_model(analysed: Path, tmp_path: Path) -> None:
    a = load_analysis(analysed / "analysis")
    measure = recipe_measurer(a, device="cpu")
    c = compare_recipes(a, 8, measure=measure)
    assert all(r.kl_is == "measured" and r.depth == 8 for r in c.recipes)
    assert c.chosen.kl == min(r.kl for r in c.recipes)
    assert c.result.plan.info["predicted_kl"] == pytest.approx(c.chosen.kl, abs=1e-6)
    # The measurement is the KL of the fused model, computed here independently.
    from transformers import AutoTokenizer

    model = tiny_model("llama", seed=21)
    tokens = calibration_tokens(
        a.calibration.data,
        AutoTokenizer.from_pretrained(analysed / "model"),
        a.calibration.samples,
        a.calibration.seq_len,
        a.calibration.seed,
    )
    drop = next(r for r in c.recipes if r.name == "layer-drop")
    with torch.no_grad():
        teacher = F.log_softmax(model(tokens).logits.float(), -1)
        student = F.log_softmax(fuse_model(model, drop.plan)(tokens).logits, -1)
    want = F.kl_div(student, teacher, log_target=True, reduction="sum").item() / tokens.numel()
    assert drop.kl == pytest.approx(want, rel=1e-4, abs=1e-7)
    # Attention removal measured as a whole plan equals iterative re-scoring's KL of the same removals.
    removed = {2, 4}
    scores = iterative_rescorer(a, device="cpu")({2})
    assert measure(Plan(remove_attention=sorted(removed))) == pytest.approx(scores[4], rel=1e-4, abs=1e-7)


def test_layer_drop_checkpoint_is_valid(analysed: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ffnfusion.fuse import fuse

    a = load_analysis(analysed / "analysis")
    result = compare_recipes(a, 7, recipe="layer-drop").result
    plan = result.plan
    assert depth(plan, 6) == 7 and plan.remove_ffn
    path = tmp_path / "plan.json"
    plan.save(path)
    fuse(str(analysed / "model"), path, tmp_path / "dropped", allow_any_width=True)
    config = json.loads((tmp_path / "dropped" / "config.json").read_text())
    blocks = config["block_configs"]
    # Dropped layers leave the checkpoint entirely: no dummy block (engines refuse one as the last block).
    assert len(blocks) == config["num_hidden_layers"] == 6 - len(plan.remove_ffn) == len(plan_blocks(plan, 6))
    assert not any(b["attention"]["no_op"] and b["ffn"]["no_op"] for b in blocks)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dropped").eval()
    ids = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fuse_model(tiny_model("llama", seed=21), plan)(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-5)


def test_cli_prints_the_recipe_table(analysed: Path, tmp_path: Path) -> None:
    base = ["plan", str(analysed / "analysis"), "--out", str(tmp_path / "p.json")]
    result = CliRunner().invoke(app, [*base, "--target-depth", "9"])
    assert result.exit_code == 0, result.output
    assert "recipes at depth 9" in result.output and "layer-drop" in result.output and "chosen:" in result.output
    info = Plan.load(tmp_path / "p.json").info
    assert info["recipes"]["chosen"] in RECIPES and len(info["recipes"]["candidates"]) == 4
    assert info["predicted"]["sequential_sub_blocks"]["plan"] == 9
    forced = CliRunner().invoke(app, [*base, "--target-depth", "9", "--recipe", "attention", "--overwrite"])
    assert forced.exit_code == 0, forced.output
    assert Plan.load(tmp_path / "p.json").info["recipes"]["chosen"] == "attention"
    bad = CliRunner().invoke(app, [*base, "--recipe", "fusion", "--remove-attention", "2", "--overwrite"])
    assert bad.exit_code == 2 and "--target-depth" in bad.output
    # The other budgets keep the single-plan search.
    old = CliRunner().invoke(app, [*base, "--target-depth", "9", "--max-kl", "5", "--overwrite"])
    assert old.exit_code == 0 and "recipes at depth" not in old.output


def test_run_compares_recipes_at_a_target_depth(analysed: Path, tmp_path: Path) -> None:
    from ffnfusion.pipeline import run

    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": str(analysed / "text.txt"),
                "analyze": {"samples": 2, "seq_len": 16, "dtype": "float32"},
                "plan": {"target_depth": 9, "recipe": "layer-drop"},
            }
        )
    )
    messages: list[str] = []
    status = run(str(analysed / "model"), tmp_path / "out", config=config, log=messages.append, stop_after="plan")
    assert status["plan"] == "ran"
    plan = Plan.load(tmp_path / "out" / "plan.json")
    assert plan.info["recipes"]["chosen"] == "layer-drop" and depth(plan, 6) == 9
    assert any("recipe layer-drop" in m for m in messages)


def test_cli_and_run_take_the_engines_to_serve_with(analysed: Path, tmp_path: Path) -> None:
    from ffnfusion.pipeline import RunConfigError, run

    base = ["plan", str(analysed / "analysis"), "--out", str(tmp_path / "p.json"), "--target-depth", "9"]
    served = CliRunner().invoke(app, [*base, "--engines", "vllm,llama.cpp"])
    assert served.exit_code == 0, served.output
    plan = Plan.load(tmp_path / "p.json")
    assert not plan.parallel_blocks and plan.info["recipes"]["engines"] == ["llama.cpp", "vLLM"]
    bad = CliRunner().invoke(app, [*base, "--engines", "vlm", "--overwrite"])
    assert bad.exit_code == 2 and "unknown engine(s) vlm" in bad.output
    # run refuses an unknown engine before its first stage, not after the analysis.
    with pytest.raises(RunConfigError, match="plan.engines: unknown engine"):
        run(str(analysed / "model"), tmp_path / "out", plan={"target_depth": 9, "engines": ["vlm"]})
    assert not (tmp_path / "out").exists()


def _bench(models: list[tuple[int, float, float]], bandwidth: float | None = 1000.0) -> dict:
    """A bench.json with (sequential sub-blocks, decode ms, floor ms) per model at batch 1."""
    out: dict = {"format": "ffnfusion-bench", "version": 1, "dtype": "bfloat16", "models": []}
    if bandwidth:
        out["copy_bandwidth_GBps"] = bandwidth
    for d, ms, floor in models:
        run = {"batch": 1, "decode_ms_per_token": ms} | ({"decode_floor_ms": floor} if bandwidth else {})
        out["models"].append({"name": f"m{d}", "sequential_sub_blocks": d, "runs": [run]})
    return out


def test_bench_json_as_cost_model(tmp_path: Path) -> None:
    a = fake_analysis(8, KL)
    path = tmp_path / "bench.json"
    # Remainder after the memory floor: 0.5 + 0.02 per sub-block.
    path.write_text(json.dumps(_bench([(16, 2.0 + 0.5 + 0.02 * 16, 2.0), (12, 1.6 + 0.5 + 0.02 * 12, 1.6)])))
    costs = CostModel.load(path, a)
    assert costs.overhead_ms == pytest.approx(0.02)
    assert costs.source.startswith("measured: bench.json, batch 1")
    original = costs.latency_ms(plan_blocks(Plan(), 8), a.model.ffn_widths)
    assert original == pytest.approx(2.0 + 0.5 + 0.02 * 16)  # the original's measured decode time
    memory = CostModel.analytic(a, bytes_per_param=2.0, bandwidth=1000e9)
    assert costs.attention_ms == pytest.approx(memory.attention_ms) and costs.ffn_ms == pytest.approx(memory.ffn_ms)
    # A CPU bench (no copy bandwidth): the analytic model scaled to the measured time.
    path.write_text(json.dumps(_bench([(16, 5.0, 0.0)], bandwidth=None)))
    scaled = CostModel.load(path, a)
    assert scaled.latency_ms(plan_blocks(Plan(), 8), a.model.ffn_widths) == pytest.approx(5.0)
    assert scaled.source.startswith("analytic scaled")
    path.write_text(json.dumps({"format": "ffnfusion-bench", "models": []}))
    with pytest.raises(ValueError, match="without decode latencies"):
        CostModel.load(path, a)


def test_engines_leave_out_the_recipes_they_cannot_load() -> None:
    a = fake_analysis(8, KL)
    free = compare_recipes(a, 11)
    assert free.chosen.name == "parallel"  # lowest KL here, but only transformers loads block-parallel groups
    warning = free.result.plan.info["warnings"][0]
    portable = [r for r in free.recipes if r.name in ("attention", "fusion", "layer-drop")]
    best_portable = min(portable, key=lambda r: r.kl)
    assert "vLLM" in warning and "llama.cpp" in warning
    assert f"{best_portable.name} (KL {best_portable.kl:.4f})" in warning
    by = {r["recipe"]: r for r in free.result.plan.info["recipes"]["candidates"]}
    assert set(by["parallel"]["not_loaded_by"]) == {"llama.cpp", "vLLM", "SGLang", "TensorRT-LLM"}
    assert by["fusion"]["not_loaded_by"] == {}

    served = compare_recipes(a, 11, engines=["vLLM"])
    assert served.chosen.name == best_portable.name and served.chosen.kl == best_portable.kl
    assert not served.chosen.plan.parallel_blocks and served.result.depth_after == 11
    assert "that vLLM can load" in served.why and served.result.plan.info["recipes"]["engines"] == ["vLLM"]
    assert not any("cannot load" in w for w in served.result.warnings)
    parallel = next(r for r in served.recipes if r.name == "parallel")
    assert parallel.kl_is == "not built" and "vLLM cannot load it" in parallel.note
    # transformers alone constrains nothing.
    assert compare_recipes(a, 11, engines=["transformers"]).chosen.name == "parallel"
    with pytest.raises(ValueError, match="cannot be built here"):
        compare_recipes(a, 11, recipe="parallel", engines=["vLLM"])


def test_engine_names_and_conflicts_are_refused_with_the_choices() -> None:
    from ffnfusion.formats.engines import ENGINES, engine_names
    from ffnfusion.plan.settings import PlanSettings
    from ffnfusion.plan.stage import choose_plan

    assert engine_names(["VLLM", " llama.cpp", "trt-llm"]) == ["llama.cpp", "vLLM", "TensorRT-LLM"]
    assert engine_names(["all"]) == list(ENGINES)
    assert PlanSettings(engines="vllm, llama.cpp").engines == ["vllm", "llama.cpp"]  # run.yaml as the command line
    with pytest.raises(ValueError, match="unknown engine.*vllm2.*choose from"):
        engine_names(["vllm2"])
    a = fake_analysis(8, KL)
    with pytest.raises(ValueError, match="parallel-threshold makes block-parallel groups, which vLLM cannot load"):
        choose_plan(a, PlanSettings(remove_attention=2, parallel_threshold=0.5, engines=["vllm"]))
    chosen, comparison = choose_plan(a, PlanSettings(target_depth=11, engines=["sglang"]))
    assert comparison is not None and comparison.chosen.name != "parallel" and not chosen.plan.parallel_blocks


def test_a_layer_drop_with_attention_kept_is_not_for_llama_cpp() -> None:
    from ffnfusion.formats.engines import plan_limits

    assert plan_limits(Plan(remove_attention=[1, 2], remove_ffn=[1, 2])) == {}  # whole layers dropped
    assert set(plan_limits(Plan(remove_ffn=[3]))) == {"llama.cpp"}  # attention 3 kept without its FFN
