"""The fused (heterogeneous-layer) model, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from ffnfusion.modeling.modeling_decilm import DeciLMConfig, DeciLMForCausalLM, DeciLMModel

AutoConfig.register(DeciLMConfig.model_type, DeciLMConfig, exist_ok=True)
AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM, exist_ok=True)

__all__ = ["DeciLMConfig", "DeciLMForCausalLM", "DeciLMModel"]
