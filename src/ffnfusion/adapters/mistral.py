"""Mistral: Llama's layout; sliding-window variants are refused by Adapter.check."""

from ffnfusion.adapters.base import Adapter

ADAPTER = Adapter(family="mistral", model_types=("mistral",))
