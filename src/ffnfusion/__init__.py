"""ffnfusion: FFN Fusion (arXiv 2503.18908) for Hugging Face Llama-family models.

`import ffnfusion` is light (no torch, no transformers), so the command line answers `--help` and reports bad
arguments at once. The package still keeps its promise to Python users: DeciLMConfig / DeciLMForCausalLM / Plan
load on first use (`from ffnfusion import DeciLMForCausalLM` works), and DeciLM is registered with transformers'
Auto classes as soon as transformers is imported (or at once, if it already is), so
`AutoModelForCausalLM.from_pretrained(fused_folder)` works after `import ffnfusion`.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

__version__ = "0.1.0"

__all__ = ["DeciLMConfig", "DeciLMForCausalLM", "Plan", "PlanError", "__version__"]

_LAZY = {
    "DeciLMConfig": "ffnfusion.modeling",
    "DeciLMForCausalLM": "ffnfusion.modeling",
    "Plan": "ffnfusion.formats.plan",
    "PlanError": "ffnfusion.formats.plan",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ffnfusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _register_auto_classes() -> None:
    """Register DeciLM with transformers' Auto classes (importing ffnfusion.modeling does it)."""
    try:
        importlib.import_module("ffnfusion.modeling")
    except Exception as e:  # never break `import transformers` for the user
        warnings.warn(f"ffnfusion could not register DeciLM with transformers' Auto classes: {e}", stacklevel=2)


class _RegisterWhenTransformersLoads:
    """A one-shot import hook: once `transformers` has been imported, register DeciLM with its Auto classes."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None) if spec is not None else None
        run = getattr(loader, "exec_module", None)
        if run is None:
            return spec

        def exec_module(module: Any) -> None:
            run(module)
            _register_auto_classes()

        loader.exec_module = exec_module  # this loader instance serves only the `transformers` module
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
