"""The `analyze` stage, re-run during planning: attention importance re-measured after each removal, and the KL
of whole candidate plans.

`plan --iterative` asks for a Rescorer: a function from the set of removed attention sub-blocks to the KL of
removing each remaining one, measured on the model itself (in memory, or one layer at a time with `stream`).
`plan --measure-recipes` asks for a Measurer: a function from a plan to the KL of the model that plan makes
(`fuse_model`), measured against the original on the analysis' calibration tokens.
Input: an analysis (its model, data and settings by default); output: fresh KL figures, nothing written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ffnfusion.formats.analysis import Analysis
from ffnfusion.formats.plan import Plan

# Given the current removed set, the KL of removing each remaining attention as well (iterative mode).
Rescorer = Callable[[set[int]], dict[int, float]]
# The mean KL(original || model made by the plan) of the next-token distributions over the calibration tokens.
Measurer = Callable[[Plan], float]


@dataclass
class _OnModel:
    """The analysis' model opened for re-measuring: checked against the analysis, on its device and dtype."""

    spec: str
    source: Any
    decilm_config: dict[str, Any]
    tokenizer: Any
    device: Any
    dtype: Any
    batch_size: int
    calibrate: Callable[[Any], Any]  # model (or loader) -> [samples, seq_len] calibration tokens


def _open_model(
    analysis: Analysis,
    model: str | None,
    data: str | None,
    samples: int | None,
    seq_len: int | None,
    device: str | None,
    dtype: str | None,
    batch_size: int | None,
    why: str,
) -> _OnModel:
    """The analysis' model (or `model`, which must match it) and calibration text (by default the analysis')."""
    from ffnfusion.adapters import adapter_for
    from ffnfusion.analyze.identity import model_identity
    from ffnfusion.data import calibration_tokens
    from ffnfusion.formats.analysis import check_same_model
    from ffnfusion.io.device import resolve_device, resolve_dtype
    from ffnfusion.io.source import ModelSourceError, resolve_model

    spec = model or analysis.model.name
    source = resolve_model(spec)
    hf_config = source.config()
    decilm_config = adapter_for(hf_config).decilm_config(hf_config)
    check_same_model(analysis, model_identity(spec, decilm_config))
    cal = analysis.calibration
    dev = resolve_device(device or analysis.settings.device)
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise ModelSourceError(f"{spec} has no tokenizer; {why} needs one.")

    def calibrate(model_or_loader: Any) -> Any:
        return calibration_tokens(
            data or cal.data,
            tokenizer,
            samples or cal.samples,
            seq_len or cal.seq_len,
            cal.seed,
            model=model_or_loader,
            model_key=analysis.model.config_hash,
            text_field=cal.text_field,
        )

    return _OnModel(
        spec, source, decilm_config, tokenizer, dev, resolve_dtype(dtype or analysis.settings.dtype, dev),
        batch_size or analysis.settings.batch_size, calibrate,
    )  # fmt: skip


def _check_weights(analysis: Analysis, on: _OnModel, hf_model: Any) -> Any:
    """The model as DeciLM (empty plan), after checking its weights are the analysed ones."""
    from ffnfusion.analyze.identity import model_fingerprint, model_identity
    from ffnfusion.formats.analysis import check_same_model
    from ffnfusion.surgery import fuse_model

    decilm = fuse_model(hf_model, Plan())
    identity = model_identity(on.spec, on.decilm_config, model_fingerprint(decilm))
    check_same_model(analysis, identity, compare_weights=True)
    return decilm


def _streamed_rescorer(
    analysis: Analysis,
    spec: str,
    source: Any,
    decilm_config: dict[str, Any],
    calibrate: Callable[[Any], Any],
    dev: Any,
    torch_dtype: Any,
    batch_size: int,
    say: Callable[[str], None],
) -> Rescorer:
    """`iterative_rescorer` with one layer on the device at a time (each re-scoring is one pass over the weights)."""
    from ffnfusion.analyze.identity import getter_fingerprint, model_identity
    from ffnfusion.analyze.streamed import LayerLoader, measure_streamed, plan_streaming
    from ffnfusion.formats.analysis import check_same_model
    from ffnfusion.io.source import dispatched_loader

    get = source.tensor_getter(pin_memory=dev.type == "cuda")
    fingerprint = getter_fingerprint(get, len(decilm_config["block_configs"]), torch_dtype)
    check_same_model(analysis, model_identity(spec, decilm_config, fingerprint), compare_weights=True)
    with dispatched_loader(source, torch_dtype, say) as load:
        tokens = calibrate(load)
    say(f"iterative mode: streaming {spec} one layer at a time ({str(torch_dtype).removeprefix('torch.')}, {dev})")

    def rescore(removed: set[int]) -> dict[int, float]:
        say(f"re-scoring {analysis.num_layers - len(removed)} attention sub-blocks with {sorted(removed)} removed")
        loader = LayerLoader(decilm_config, get, torch_dtype, dev)
        samples, seq_len = tokens.shape
        plan = plan_streaming(loader, samples, seq_len, batch_size, set(removed), matrices=False)
        m = measure_streamed(loader, tokens, set(removed), batch_size, plan, matrices=False)
        return {i: kl for i, (kl, _ce) in m.attention.scores.items()}

    return rescore


def iterative_rescorer(
    analysis: Analysis,
    model: str | None = None,
    data: str | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    log: Callable[[str], None] | None = None,
    stream: bool = False,
) -> Rescorer:
    """A Rescorer that re-measures attention KL on the model itself (the model and data of the analysis by default).

    stream=True loads one layer at a time onto the device, as `analyze --stream` does, for models that do not fit.

    Each call costs about (L+1)/2 full forward passes over the calibration tokens plus one per batch, so N removals
    cost about N times the attention part of `analyze`; fewer --samples make it proportionally cheaper.
    """
    import torch

    from ffnfusion.analyze.attention import score_attention
    from ffnfusion.analyze.runner import SubBlockRunner
    from ffnfusion.io.source import load_model

    say = log or (lambda _msg: None)
    on = _open_model(analysis, model, data, samples, seq_len, device, dtype, batch_size, "iterative re-scoring")
    size = on.batch_size
    if stream:
        return _streamed_rescorer(
            analysis, on.spec, on.source, on.decilm_config, on.calibrate, on.device, on.dtype, size, say
        )
    say(f"iterative mode: loading {on.spec} ({str(on.dtype).removeprefix('torch.')}, {on.device})")
    hf_model = load_model(on.source, on.dtype, on.device)
    tokens = on.calibrate(hf_model)
    decilm = _check_weights(analysis, on, hf_model)
    del hf_model
    runner = SubBlockRunner(decilm)

    def rescore(removed: set[int]) -> dict[int, float]:
        say(f"re-scoring {analysis.num_layers - len(removed)} attention sub-blocks with {sorted(removed)} removed")
        with torch.inference_mode():
            result = score_attention(runner, tokens, set(removed), size)
        return {i: kl for i, (kl, _ce) in result.scores.items()}

    return rescore


def plan_kl_sum(original: Any, fused: Any, ids: Any) -> Any:
    """Sum over the tokens of `ids` of KL(original || fused) of the next-token distributions (float64 0-d tensor).

    The logits are made from the final hidden states a few thousand rows at a time, so a large vocabulary never
    needs a [tokens, vocab] float32 tensor per model at once.
    """
    import torch
    import torch.nn.functional as F

    from ffnfusion.analyze.runner import _LOGIT_ELEMENTS

    h_p = original.model(input_ids=ids, use_cache=False).last_hidden_state
    h_q = fused.model(input_ids=ids, use_cache=False).last_hidden_state
    h_p, h_q = h_p.reshape(-1, h_p.shape[-1]), h_q.reshape(-1, h_q.shape[-1])
    rows = max(1, _LOGIT_ELEMENTS // original.config.vocab_size)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for r in range(0, h_p.shape[0], rows):
        log_p = F.log_softmax(original.lm_head(h_p[r : r + rows]).float(), -1)
        log_q = F.log_softmax(fused.lm_head(h_q[r : r + rows]).float(), -1)
        total += (log_p.exp() * (log_p - log_q)).sum(dtype=torch.float64)
    return total


def recipe_measurer(
    analysis: Analysis,
    model: str | None = None,
    data: str | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Measurer:
    """A Measurer on the model of the analysis (loaded once) and the analysis' calibration tokens by default.

    Each call fuses the model by the plan in memory (a second copy of the weights while it runs) and costs two
    forward passes over the calibration tokens: the original's and the fused model's.
    """
    import torch

    from ffnfusion.io.source import load_model
    from ffnfusion.surgery import fuse_model

    say = log or (lambda _msg: None)
    on = _open_model(analysis, model, data, samples, seq_len, device, dtype, batch_size, "measuring plans")
    size, dev = on.batch_size, on.device
    say(f"measuring recipes: loading {on.spec} ({str(on.dtype).removeprefix('torch.')}, {dev})")
    hf_model = load_model(on.source, on.dtype, dev)
    tokens = on.calibrate(hf_model)
    _check_weights(analysis, on, hf_model)  # only the check: each measurement fuses from hf_model itself

    def measure(plan: Plan) -> float:
        fused = fuse_model(hf_model, plan)
        total = torch.zeros((), dtype=torch.float64)
        with torch.inference_mode():
            for first in range(0, tokens.shape[0], size):
                ids = tokens[first : first + size].to(dev)
                total += plan_kl_sum(hf_model, fused, ids).cpu()
        del fused
        return max(total.item() / tokens.numel(), 0.0)

    return measure
