"""ffnfusion: FFN Fusion (arXiv 2503.18908) for Hugging Face Llama-family models."""

from ffnfusion.formats.plan import Plan, PlanError
from ffnfusion.modeling import DeciLMConfig, DeciLMForCausalLM

__version__ = "0.1.0"

__all__ = ["DeciLMConfig", "DeciLMForCausalLM", "Plan", "PlanError", "__version__"]
