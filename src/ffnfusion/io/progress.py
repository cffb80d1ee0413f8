"""The progress bar of long stages: `analyze` (sub-block evaluations), `eval` (tokens scored), `generate` and
`--data self` (tokens written)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(
    show: bool, total: int, description: str, unit: str = "sub-blocks", completed: int = 0
) -> Iterator[Callable[[int], None] | None]:
    """A rich bar of `total` units (`completed` of them already done); yields `advance(k)`, or None when hidden."""
    if not show:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, completed=completed)
        yield lambda k: bar.advance(task, k)
