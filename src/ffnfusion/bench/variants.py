"""The models `bench` compares: the original, its fused version under a plan, --compare models, random shapes.

Input: MODEL / --compare specs / --random-weights --shape, and a plan. Output: builders of Variants (the DeciLM
model the engine runs and what eager `generate` runs for reference), one model on the device at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ffnfusion.formats.plan import Plan


@dataclass
class Variant:
    """A model to benchmark: the DeciLM model the engine runs, and what eager `generate` runs for reference."""

    name: str
    source: str
    engine_model: torch.nn.Module
    reference_model: torch.nn.Module
    tokenizer: Any = None


def _decilm(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    from ffnfusion.modeling.modeling_decilm import DeciLMForCausalLM
    from ffnfusion.surgery import fuse_model

    if isinstance(model, DeciLMForCausalLM):
        if not plan.is_empty:
            raise ValueError("the model is already fused; plans index the ORIGINAL model's layers")
        return model
    return fuse_model(model, plan)


def check_model_and_plan(model: str, compare: Sequence[str], plan: Plan | None, where: str, force: bool) -> None:
    """Before any model is loaded: every model readable, and a plan that fits MODEL (unless `force`)."""
    from ffnfusion.adapters import adapter_for
    from ffnfusion.formats.analysis import config_hash
    from ffnfusion.formats.plan import check_plan_model, validate_plan
    from ffnfusion.io.source import resolve_model

    for other in compare:
        resolve_model(other)
    source = resolve_model(model)
    if plan is None or plan.is_empty or source.is_fused_checkpoint:
        return
    hf_config = source.config()
    base = adapter_for(hf_config).decilm_config(hf_config)
    num_layers = len(base["block_configs"])
    if not force:
        check_plan_model(plan, model, num_layers, config_hash(base), where)
    validate_plan(plan, num_layers)


def variants(
    model: str | None,
    compare: list[str],
    plan: Plan | None,
    random_weights: bool,
    shape: str | None,
    layers: int | None,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> Iterator[Callable[[], Variant]]:
    """Builders, so that only one model (plus its reference) is on the device at a time."""
    if random_weights:
        yield from _random_variants(plan, shape, layers, dtype, device, seed)
    elif model is not None:
        yield from _model_variants(model, plan, dtype, device)
    elif plan is not None and not plan.is_empty:
        raise ValueError("--plan needs MODEL or --random-weights --shape NAME")
    for other in compare:

        def build_other(other: str = other) -> Variant:
            from ffnfusion.io.source import load_model, resolve_model

            src = resolve_model(other)
            m = load_model(src, dtype, device)
            return Variant(other, other, _decilm(m, Plan()), m, src.tokenizer())

        yield build_other


def _random_variants(
    plan: Plan | None, shape: str | None, layers: int | None, dtype: torch.dtype, device: torch.device, seed: int
) -> Iterator[Callable[[], Variant]]:
    """A random model of a named shape and, under a plan, its fused version (built again from the same seed)."""
    from ffnfusion.bench.shapes import random_model

    if not shape:
        raise ValueError("--random-weights needs --shape NAME")
    label = shape + (f" ({layers} layers)" if layers else "")

    def build_random(p: Plan, name: str) -> Variant:
        hf = random_model(shape, layers, dtype, device, seed)
        m = _decilm(hf, p)
        del hf
        return Variant(name, f"random {label}", m, m)

    yield lambda: build_random(Plan(), "original")
    if plan is not None and not plan.is_empty:
        yield lambda: build_random(plan, "fused")


def _model_variants(
    model: str, plan: Plan | None, dtype: torch.dtype, device: torch.device
) -> Iterator[Callable[[], Variant]]:
    """MODEL and, under a plan, its fused version: loaded once, the original is the fused one's reference too."""
    from ffnfusion.io.source import load_model, resolve_model

    source = resolve_model(model)
    loaded: dict[str, Any] = {}

    def original() -> torch.nn.Module:
        if "model" not in loaded:
            loaded["model"] = load_model(source, dtype, device)
            loaded["tokenizer"] = source.tokenizer()
        return loaded["model"]

    yield lambda: Variant("original", model, _decilm(original(), Plan()), original(), loaded.get("tokenizer"))
    if plan is not None and not plan.is_empty:

        def fused() -> Variant:
            m = _decilm(original(), plan)
            return Variant("fused", f"{model} + plan", m, m, loaded.get("tokenizer"))

        yield fused
    loaded.clear()
