"""The `analyze` stage, re-run during planning: attention importance re-measured after each removal.

`plan --iterative` asks for a Rescorer: a function from the set of removed attention sub-blocks to the KL of
removing each remaining one, measured on the model itself (in memory, or one layer at a time with `stream`).
Input: an analysis (its model, data and settings by default); output: fresh KL scores, nothing written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ffnfusion.formats.analysis import Analysis
from ffnfusion.formats.plan import Plan

# Given the current removed set, the KL of removing each remaining attention as well (iterative mode).
Rescorer = Callable[[set[int]], dict[int, float]]


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

    from ffnfusion.adapters import adapter_for
    from ffnfusion.analyze.attention import score_attention
    from ffnfusion.analyze.identity import model_fingerprint, model_identity
    from ffnfusion.analyze.runner import SubBlockRunner
    from ffnfusion.data import calibration_tokens
    from ffnfusion.formats.analysis import check_same_model
    from ffnfusion.io.device import resolve_device, resolve_dtype
    from ffnfusion.io.source import ModelSourceError, load_model, resolve_model
    from ffnfusion.surgery import fuse_model

    say = log or (lambda _msg: None)
    spec = model or analysis.model.name
    source = resolve_model(spec)
    hf_config = source.config()
    decilm_config = adapter_for(hf_config).decilm_config(hf_config)
    check_same_model(analysis, model_identity(spec, decilm_config))
    cal = analysis.calibration
    dev = resolve_device(device or analysis.settings.device)
    torch_dtype = resolve_dtype(dtype or analysis.settings.dtype, dev)
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise ModelSourceError(f"{spec} has no tokenizer; iterative re-scoring needs one.")
    size = batch_size or analysis.settings.batch_size

    def calibrate(model_or_loader: Any) -> torch.Tensor:
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

    if stream:
        return _streamed_rescorer(analysis, spec, source, decilm_config, calibrate, dev, torch_dtype, size, say)
    say(f"iterative mode: loading {spec} ({str(torch_dtype).removeprefix('torch.')}, {dev})")
    hf_model = load_model(source, torch_dtype, dev)
    tokens = calibrate(hf_model)
    decilm = fuse_model(hf_model, Plan())
    del hf_model
    check_same_model(analysis, model_identity(spec, decilm_config, model_fingerprint(decilm)), compare_weights=True)
    runner = SubBlockRunner(decilm)

    def rescore(removed: set[int]) -> dict[int, float]:
        say(f"re-scoring {analysis.num_layers - len(removed)} attention sub-blocks with {sorted(removed)} removed")
        with torch.inference_mode():
            result = score_attention(runner, tokens, set(removed), size)
        return {i: kl for i, (kl, _ce) in result.scores.items()}

    return rescore
