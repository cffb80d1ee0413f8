"""A stage's settings given whole or as keyword options: the one rule every stage function follows.

Input: a stage's pydantic settings model and what the caller passed. Output: the validated settings.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def settings_from(model: type[M], settings: M | None, options: dict[str, Any]) -> M:
    """`settings`, or the model built from keyword `options` (Python callers' `analyze(m, out, samples=8)`)."""
    if settings is None:
        return model(**options)
    if options:
        raise TypeError(f"pass either settings or the keyword options {sorted(options)}, not both")
    return settings
