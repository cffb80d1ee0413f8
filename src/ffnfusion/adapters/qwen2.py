"""Qwen2 / Qwen2.5: q/k/v projections with bias, o_proj without."""

from ffnfusion.adapters.base import Adapter

ADAPTER = Adapter(family="qwen2", model_types=("qwen2",), qkv_bias=True)
