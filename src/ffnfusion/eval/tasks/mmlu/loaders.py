"""lm-eval resolves `!function loaders.mmlu` beside the YAML that names it; the loader itself lives one folder up."""

from ffnfusion.eval.tasks.loaders import mmlu

__all__ = ["mmlu"]
