"""Llama 2/3/3.1/3.2, SmolLM, TinyLlama: the reference family (RMSNorm, SwiGLU, RoPE incl. llama3 scaling)."""

from ffnfusion.adapters.base import Adapter

ADAPTER = Adapter(family="llama", model_types=("llama",))
