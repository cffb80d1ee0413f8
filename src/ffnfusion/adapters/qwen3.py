"""Qwen3 (dense): per-head RMSNorm on queries and keys, explicit head_dim."""

from ffnfusion.adapters.base import Adapter

ADAPTER = Adapter(family="qwen3", model_types=("qwen3",), qk_norm=True)
