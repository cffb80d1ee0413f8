"""Every plan validation error is raised for the input that should raise it, and names the problem."""

from __future__ import annotations

import json

import pytest

from ffnfusion.formats.plan import Plan, PlanError, plan_blocks, sequential_sub_blocks, validate_plan

WIDTHS = [256] * 8


@pytest.mark.parametrize(
    "plan,message",
    [
        (Plan(remove_attention=[8]), "out of range"),
        (Plan(remove_ffn=[-1]), "out of range"),
        (Plan(remove_attention=[3, 3]), "more than once"),
        (Plan(remove_attention=[2], fuse_ffn=[[1, 2], [2, 3]]), "overlap"),
        (Plan(remove_attention=[2, 4], fuse_ffn=[[1, 2]], parallel_blocks=[[2, 3]]), "overlap"),
        (Plan(remove_attention=[3], fuse_ffn=[[1, 3]]), "consecutive"),
        (Plan(remove_attention=[2], fuse_ffn=[[2, 1]]), "consecutive"),
        (Plan(remove_attention=[2], fuse_ffn=[[1, 2, 3]]), "attention is still present in layers [3]"),
        (Plan(fuse_ffn=[[4]]), "at least 2 layers"),
        (Plan(parallel_blocks=[[5]]), "at least 2 layers"),
        (Plan(remove_attention=[2], remove_ffn=[2], fuse_ffn=[[1, 2]]), "remove_ffn"),
        (Plan(remove_attention=[6], parallel_blocks=[[5, 6]]), "whole layers"),
        (Plan(remove_attention=[6, 7], fuse_ffn=[[5, 6, 7, 8]]), "out of range"),
    ],
)
def test_invalid_plans_are_refused(plan: Plan, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_plan(plan, 8, WIDTHS)


def test_engine_width_check() -> None:
    plan = Plan(remove_attention=[2], fuse_ffn=[[1, 2]])
    validate_plan(plan, 4, [256, 256, 256, 256], require_engine_widths=True)
    with pytest.raises(PlanError, match="not a multiple of 256"):
        validate_plan(plan, 4, [200, 200, 200, 200], require_engine_widths=True)
    validate_plan(plan, 4, [200, 200, 200, 200], require_engine_widths=False)


def test_parallel_refused_with_o_bias_and_unequal_widths() -> None:
    with pytest.raises(PlanError, match="o_proj bias"):
        validate_plan(Plan(parallel_blocks=[[0, 1]]), 4, WIDTHS[:4], has_o_bias=True)
    with pytest.raises(PlanError, match="equal FFN widths"):
        validate_plan(Plan(parallel_blocks=[[0, 1]]), 4, [256, 512, 256, 256])


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(PlanError) as err:
        validate_plan(Plan(remove_attention=[9], fuse_ffn=[[3]]), 8, WIDTHS)
    assert "out of range" in str(err.value) and "at least 2 layers" in str(err.value)


def test_plan_file_errors(tmp_path) -> None:
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{remove_attention: [1]")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(bad_json)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"remove_attn": [1]}))
    with pytest.raises(PlanError, match="remove_attn"):
        Plan.load(unknown)
    wrong_type = tmp_path / "wrong.json"
    wrong_type.write_text(json.dumps({"fuse_ffn": [1, 2]}))
    with pytest.raises(PlanError, match="fuse_ffn"):
        Plan.load(wrong_type)


def test_blocks_and_depth() -> None:
    plan = Plan(remove_attention=[2, 3, 4, 6], remove_ffn=[6], fuse_ffn=[[1, 2, 3]], parallel_blocks=[[7, 8]])
    blocks = plan_blocks(plan, 10)
    # layer 6 has neither attention nor FFN left: it is dropped
    assert [b.layers for b in blocks] == [(0,), (1, 2, 3), (4,), (5,), (7, 8), (9,)]
    assert [b.kind for b in blocks] == ["layer", "fused_ffn", "layer", "layer", "parallel", "layer"]
    assert blocks[1].attention_from == 1 and blocks[2].attention_from is None
    # 2 + 2 (attn 1 + fused FFN) + 1 (FFN 4) + 2 + 2 (parallel) + 2
    assert sequential_sub_blocks(blocks) == 11


def test_plan_round_trip(tmp_path) -> None:
    plan = Plan(remove_attention=[2], fuse_ffn=[[1, 2]], info={"by": "test"})
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan
