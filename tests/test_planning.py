"""`plan`: window splitting, budgets, the last-FFN rule, cost model, iterative mode, and validity of every plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from analysis_fakes import analysed_tiny_model, fake_analysis, save_with_tokenizer
from conftest import tiny_model
from ffnfusion.analyze import AnalysisError, load_analysis
from ffnfusion.analyze.rescore import iterative_rescorer
from ffnfusion.cli import app
from ffnfusion.data import calibration_tokens
from ffnfusion.formats.plan import Plan, validate_plan
from ffnfusion.plan.costs import CostModel
from ffnfusion.plan.search import (
    attention_free_runs,
    check_model,
    search_plan,
    split_windows,
    write_plan,
)
from ffnfusion.surgery import fuse_model


def _matrix(n: int, value: float = 0.01, high: dict[tuple[int, int], float] | None = None) -> list[list[float]]:
    m = [[value] * n for _ in range(n)]
    for (i, j), v in (high or {}).items():
        m[i][j] = v
    return m


def test_attention_free_runs() -> None:
    assert attention_free_runs(8, {2, 3, 6}) == [[1, 2, 3], [5, 6]]
    assert attention_free_runs(4, {0, 1}) == [[0, 1]]
    assert attention_free_runs(4, set()) == []


def test_split_puts_the_cut_through_the_most_dependent_pair() -> None:
    layers = [0, 1, 2, 3, 4]
    # Two groups of <= 3 are needed; the split avoids putting the dependent pair in one group.
    assert split_windows(layers, _matrix(5, high={(1, 2): 1.0}), 3) == [[0, 1], [2, 3, 4]]
    assert split_windows(layers, _matrix(5, high={(2, 3): 1.0}), 3) == [[0, 1, 2], [3, 4]]
    # A greedy left-to-right fill would give [0, 1, 2], [3, 4] in both cases.
    assert split_windows(layers, _matrix(5), 8) == [layers]
    # max_dependency forbids a group holding the pair, even at the cost of more groups.
    split = split_windows(layers, _matrix(5, high={(0, 4): 0.9}), 8, max_dependency=0.5)
    assert len(split) == 2 and not any({0, 4} <= set(g) for g in split)
    assert split_windows([3, 4], _matrix(5, 0.9), 8, max_dependency=0.5) == [[3], [4]]


def test_lowest_kl_first_and_last_ffn_left_out() -> None:
    kl = [0.9, 0.5, 0.01, 0.02, 0.03, 0.4, 0.8, 0.7]
    a = fake_analysis(8, kl)
    result = search_plan(a, remove_attention=3)
    assert result.plan.remove_attention == [2, 3, 4]
    assert [layer for layer, _ in result.removal] == [2, 3, 4]
    assert result.plan.fuse_ffn == [[1, 2, 3]]  # run 1..4, its last FFN (4) left out
    assert result.removal[-1][1] == pytest.approx(0.06)  # additive estimate
    assert result.depth_after == 16 - 3 - 2
    fused_last = search_plan(a, remove_attention=3, fuse_last=True)
    assert fused_last.plan.fuse_ffn == [[1, 2, 3, 4]] and fused_last.depth_after == 16 - 3 - 3
    assert result.latency_after < result.latency_before


def test_budgets() -> None:
    kl = [0.95, 0.55, 0.06, 0.07, 0.08, 0.45, 0.85, 0.75]  # single-removal KLs include the base's 0.05
    a = fake_analysis(8, kl, removed=[6], base_kl=0.05)
    # The analysis' own removal counts towards N and stays in the plan.
    assert search_plan(a, remove_attention=2).plan.remove_attention == [2, 6]
    by_kl = search_plan(a, max_kl=0.05 + 0.01 + 0.02 + 0.001)
    assert by_kl.plan.remove_attention == [2, 3, 6]
    assert by_kl.plan.info["predicted_kl"] == pytest.approx(0.08)
    deep = search_plan(a, target_depth=11)
    assert deep.depth_after <= 11 and not deep.warnings
    capped = search_plan(a, target_depth=4, max_kl=0.2)
    assert capped.depth_after > 4 and "not reached" in capped.warnings[0]
    small_groups = search_plan(a, remove_attention=6, max_group=2)
    assert all(len(g) <= 2 for g in small_groups.plan.fuse_ffn)
    assert search_plan(a).plan.remove_attention == [6]
    with pytest.raises(ValueError, match="not both"):
        search_plan(a, remove_attention=2, max_kl=1.0)
    with pytest.raises(ValueError, match="max-group"):
        search_plan(a, remove_attention=2, max_group=1)


def test_parallel_blocks_where_block_dependency_is_low() -> None:
    n = 6
    block = _matrix(n, 0.5, high={(0, 1): 0.01, (4, 5): 0.02})
    a = fake_analysis(n, [0.5] * n, block=block)
    result = search_plan(a, parallel_threshold=0.05)
    assert result.plan.parallel_blocks == [[0, 1], [4, 5]]
    assert result.depth_after == 2 * n - 2 * 2
    with_bias = fake_analysis(n, [0.5] * n, block=block, has_o_bias=True)
    assert search_plan(with_bias, parallel_threshold=0.05).plan.parallel_blocks == []


def test_cost_model_measured_numbers_replace_the_defaults(tmp_path: Path) -> None:
    a = fake_analysis(8, [0.1 * i for i in range(8)])
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"attention_ms": 1.0, "ffn_ms": 2.0, "overhead_ms": 0.5, "fixed_ms": 3.0}))
    model = CostModel.load(costs, a)
    result = search_plan(a, remove_attention=3, costs=model)
    # 8 layers: 3 + 8 * (1 + 2 + 2 * 0.5). Plan: attention 0-2 removed, FFNs [0, 1] fused: 5 attentions,
    # the same FFN width in all, 5 + 7 sub-blocks in sequence.
    assert result.plan.fuse_ffn == [[0, 1]] and result.depth_after == 12
    assert result.latency_before == pytest.approx(3 + 8 * 4)
    assert result.latency_after == pytest.approx(3 + 5 * 1 + 8 * 2 + 12 * 0.5)
    assert result.plan.info["predicted"]["latency"]["cost_model"]["source"] == "measured: costs.json"
    costs.write_text(json.dumps({"ffn_ms": -1}))
    with pytest.raises(ValueError, match="ffn_ms"):
        CostModel.load(costs, a)
    costs.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        CostModel.load(costs, a)


def test_iterative_mode_rescores_after_each_removal() -> None:
    kl = [0.1, 0.2, 0.3, 0.01, 0.4, 0.5]
    a = fake_analysis(6, kl)
    seen: list[set[int]] = []

    def rescore(removed: set[int]) -> dict[int, float]:
        seen.append(set(removed))
        # Once 3 is gone, 5 becomes harmless: static scores would never pick it second.
        return {i: (0.05 if i == 5 and 3 in removed else kl[i]) for i in range(6) if i not in removed}

    assert [layer for layer, _ in search_plan(a, remove_attention=2).removal] == [3, 0]
    result = search_plan(a, remove_attention=2, rescore=rescore)
    assert seen == [set(), {3}]
    assert [layer for layer, _ in result.removal] == [3, 5]
    assert result.plan.info["predicted_kl"] == pytest.approx(0.05)
    assert result.plan.info["predicted_kl_is"] == "measured on the calibration data"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_emitted_plan_passes_validation(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 14), label="layers")
    unit = data.draw(st.sampled_from([256, 80, 1536]))
    widths = data.draw(st.lists(st.sampled_from([unit, 2 * unit]), min_size=n, max_size=n))
    floats = st.floats(0.0, 2.0, allow_nan=False)
    kl = data.draw(st.lists(floats, min_size=n, max_size=n))
    matrix = [data.draw(st.lists(floats, min_size=n, max_size=n)) for _ in range(n)]
    block = [data.draw(st.lists(floats, min_size=n, max_size=n)) for _ in range(n)]
    removed = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    has_o_bias = data.draw(st.booleans())
    a = fake_analysis(n, kl, matrix, widths, removed, has_o_bias, base_kl=data.draw(floats), block=block)
    budget = data.draw(st.sampled_from(["none", "count", "kl"]))
    result = search_plan(
        a,
        remove_attention=data.draw(st.integers(0, n)) if budget == "count" else None,
        max_kl=data.draw(floats) if budget == "kl" else None,
        max_group=data.draw(st.integers(2, 6)),
        target_depth=data.draw(st.none() | st.integers(1, 2 * n)),
        fuse_last=data.draw(st.booleans()),
        max_dependency=data.draw(st.none() | floats),
        parallel_threshold=data.draw(st.none() | floats),
        max_parallel=data.draw(st.integers(2, 4)),
    )
    plan = Plan.model_validate_json(result.plan.model_dump_json())
    engine = all(w % 256 == 0 for w in widths)
    validate_plan(plan, n, widths, require_engine_widths=engine, has_o_bias=has_o_bias)
    assert set(removed) <= set(plan.remove_attention)
    assert result.depth_after <= result.depth_before


def test_write_plan_refuses_to_overwrite(tmp_path: Path) -> None:
    plan = Plan(remove_attention=[1])
    out = write_plan(plan, tmp_path / "plan.json")
    assert Plan.load(out) == plan
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_plan(plan, out)
    with pytest.raises(FileExistsError, match="folder"):
        write_plan(plan, tmp_path)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return analysed_tiny_model(tmp_path_factory.mktemp("planned"))


def test_cli_analyze_plan_fuse_round_trip(analysed: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "a"
    args = ["analyze", str(analysed / "model"), "--data", str(analysed / "text.txt"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--samples", "3", "--seq-len", "16", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "lowest-KL attention" in result.output and "full-forward equivalents" in result.output
    plan_args = ["plan", str(out), "--out", str(tmp_path / "plan.json"), "--remove-attention", "3"]
    result = runner.invoke(app, [*plan_args, "--model", str(analysed / "model")])
    assert result.exit_code == 0, result.output
    assert "sequential sub-blocks" in result.output
    plan = Plan.load(tmp_path / "plan.json")
    assert len(plan.remove_attention) == 3 and plan.fuse_ffn
    fused = fuse_model(tiny_model("llama", seed=21), plan)
    assert len(fused.model.layers) < 6
    again = runner.invoke(app, plan_args)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_plan_refuses_an_analysis_of_another_model(analysed: Path, tmp_path: Path) -> None:
    other = save_with_tokenizer(tiny_model("llama", seed=21, num_hidden_layers=4), tmp_path / "other")
    a = load_analysis(analysed / "analysis")
    with pytest.raises(AnalysisError, match="another model.*num_layers: analysis has 6, model has 4"):
        check_model(a, str(other))
    result = CliRunner().invoke(
        app, ["plan", str(analysed / "analysis"), "--out", str(tmp_path / "p.json"), "--model", str(other)]
    )
    assert result.exit_code == 2 and "another model" in result.output
    assert not (tmp_path / "p.json").exists()
    same_shape = save_with_tokenizer(tiny_model("llama", seed=99), tmp_path / "retrained")
    with pytest.raises(AnalysisError, match="weights differ"):
        iterative_rescorer(a, model=str(same_shape), device="cpu")


def test_iterative_kl_is_the_measured_kl_of_the_plan(analysed: Path, tmp_path: Path) -> None:
    args = ["plan", str(analysed / "analysis"), "--out", str(tmp_path / "p.json"), "--remove-attention", "2"]
    result = CliRunner().invoke(app, [*args, "--iterative"])
    assert result.exit_code == 0, result.output
    plan = Plan.load(tmp_path / "p.json")
    assert plan.info["attention_selection"].startswith("iterative")
    # Recompute the KL of the chosen removals independently, on the analysis' own calibration tokens.
    a = load_analysis(analysed / "analysis")
    model = tiny_model("llama", seed=21)
    from transformers import AutoTokenizer

    tokens = calibration_tokens(
        a.calibration.data,
        AutoTokenizer.from_pretrained(analysed / "model"),
        a.calibration.samples,
        a.calibration.seq_len,
        a.calibration.seed,
    )
    with torch.no_grad():
        teacher = F.log_softmax(model(tokens).logits.float(), -1)
        student = F.log_softmax(fuse_model(model, Plan(remove_attention=plan.remove_attention))(tokens).logits, -1)
    want = F.kl_div(student, teacher, log_target=True, reduction="sum").item() / tokens.numel()
    assert plan.info["predicted_kl"] == pytest.approx(want, rel=1e-3, abs=1e-6)


def test_streamed_iterative_rescoring_equals_in_memory(analysed: Path, tmp_path: Path) -> None:
    a = load_analysis(analysed / "analysis")
    in_memory = iterative_rescorer(a, device="cpu")
    streamed = iterative_rescorer(a, device="cpu", stream=True)
    for removed in (set(), {2}, {1, 4}):
        assert streamed(removed) == in_memory(removed)
    args = ["plan", str(analysed / "analysis"), "--out", str(tmp_path / "p.json"), "--remove-attention", "2"]
    result = CliRunner().invoke(app, [*args, "--stream"])
    assert result.exit_code == 2 and "--stream applies to --iterative" in result.output
    result = CliRunner().invoke(app, [*args, "--iterative", "--stream"])
    assert result.exit_code == 0, result.output
    assert "streaming" in result.output
