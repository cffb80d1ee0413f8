"""Exactness: the fused model equals the plan's straightforward reference for every family and several shapes."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from ffnfusion.adapters import adapter_for
from ffnfusion.formats.plan import Plan
from ffnfusion.modeling.modeling_decilm import DeciLMConfig, DeciLMDecoderLayer, rms_normalize
from ffnfusion.surgery import fuse_model, fuse_state_dict
from reference import reference_logits, rel_err

PLANS = {
    "empty": Plan(),
    "fuse-after-kept-attention": Plan(remove_attention=[2, 3], fuse_ffn=[[1, 2, 3]]),
    "fuse-attention-free": Plan(remove_attention=[1, 2, 3, 5], fuse_ffn=[[1, 2, 3], [4, 5]]),
    "fuse-and-parallel": Plan(remove_attention=[2, 3], fuse_ffn=[[1, 2, 3]], parallel_blocks=[[4, 5]]),
    "parallel-three": Plan(parallel_blocks=[[0, 1, 2]]),
    "remove-only": Plan(remove_attention=[5, 2], remove_ffn=[0]),
}
SHAPES = [(1, 1), (2, 7), (3, 16)]


def _valid_cases() -> list[tuple[str, str]]:
    # Parallel groups are refused for models with an o_proj bias (tested in test_plan_validation).
    return [
        (family, name)
        for family in sorted(FAMILIES)
        for name in sorted(PLANS)
        if not (PLANS[name].parallel_blocks and family == "llama-bias-tied-rope3")
    ]


@pytest.mark.parametrize("family,plan_name", _valid_cases())
def test_fused_model_matches_reference(family: str, plan_name: str) -> None:
    plan = PLANS[plan_name]
    model = tiny_model(family, seed=sorted(PLANS).index(plan_name))
    fused = fuse_model(model, plan)
    gen = torch.Generator().manual_seed(1)
    for batch, seq in SHAPES:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
        with torch.no_grad():
            got = fused(ids).logits
        want = reference_logits(model, plan, ids)
        assert rel_err(got, want) <= 1e-5, (family, plan_name, batch, seq)


def test_empty_plan_reproduces_original_logits(family: str) -> None:
    model = tiny_model(family, seed=3)
    fused = fuse_model(model, Plan())
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(fused(ids).logits, model(ids).logits) <= 1e-5


@pytest.mark.parametrize("hidden,width,k", [(48, 80, 2), (64, 128, 4), (96, 256, 3)])
def test_wide_ffn_equals_parallel_form(hidden: int, width: int, k: int) -> None:
    """One fused block on random hidden states equals x + sum_k FFN_k(N_k(x)) of the original modules."""
    model = tiny_model("llama", seed=k, hidden_size=hidden, intermediate_size=width, num_hidden_layers=k + 1)
    plan = Plan(remove_attention=list(range(1, k + 1)), fuse_ffn=[list(range(1, k + 1))])
    fused = fuse_model(model, plan)
    block = fused.model.layers[1]
    assert not block.has_attention and block.mlp.intermediate_size == k * width
    gen = torch.Generator().manual_seed(k)
    for shape in [(1, 1, hidden), (2, 5, hidden), (4, 33, hidden)]:
        x = torch.randn(shape, generator=gen) * 3
        with torch.no_grad():
            want = x + sum(
                model.model.layers[i].mlp(model.model.layers[i].post_attention_layernorm(x)) for i in plan.fuse_ffn[0]
            )
            got = block(x, position_embeddings=None)
        assert rel_err(got, want) <= 1e-5


def test_fused_norm_has_unit_weight_and_original_is_folded() -> None:
    model = tiny_model("llama", seed=5)
    config = adapter_for(model.config).decilm_config(model.config)
    plan = Plan(remove_attention=[3], fuse_ffn=[[2, 3]])
    new_config, state = fuse_state_dict(config, model.state_dict(), plan)
    assert torch.equal(state["model.layers.2.post_attention_layernorm.weight"], torch.ones(48))
    g2 = model.model.layers[2].post_attention_layernorm.weight
    gate2 = model.model.layers[2].mlp.gate_proj.weight
    assert torch.allclose(state["model.layers.2.mlp.gate_proj.weight"][:80], gate2 * g2[None, :])
    assert new_config["block_configs"][2]["ffn"]["intermediate_size"] == 160
    assert len(new_config["block_configs"]) == 5


def test_parallel_block_matches_reference_in_bf16_within_bf16_rounding() -> None:
    model = tiny_model("llama", seed=7).to(torch.bfloat16)
    plan = Plan(parallel_blocks=[[2, 3]])
    fused = fuse_model(model, plan)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = fused(ids).logits.float()
    want = reference_logits(model, plan, ids).float()
    assert rel_err(got, want) < 3e-2


def test_rms_normalize_matches_definition() -> None:
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0)) * 5
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert rel_err(rms_normalize(x, 1e-6), want) < 1e-6


def test_parallel_layer_batches_members() -> None:
    """A parallel block holds one wide q/k/v projection and one wide down projection for all members."""
    model = tiny_model("qwen3", seed=2)
    fused = fuse_model(model, Plan(parallel_blocks=[[1, 2, 3]]))
    layer = fused.model.layers[1]
    assert isinstance(layer, DeciLMDecoderLayer) and layer.parallel == 3
    cfg: DeciLMConfig = fused.config
    assert layer.self_attn.q_proj.weight.shape[0] == 3 * cfg.num_attention_heads * cfg.head_dim
    assert layer.mlp.down_proj.weight.shape[1] == 3 * model.config.intermediate_size
