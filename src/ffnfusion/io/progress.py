"""The progress bar of long stages: `analyze` (sub-block evaluations), `eval` (tokens scored), `generate` and
`--data self` (tokens written)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Where output is not a terminal (a log file, nohup, CI) rich draws no live bar, only the finished one: a plain line
# this often says how far a long stage is.
LOG_EVERY_SECONDS = 60.0


@contextmanager
def progress_bar(
    show: bool, total: int, description: str, unit: str = "sub-blocks", completed: int = 0
) -> Iterator[Callable[[int], None] | None]:
    """A rich bar of `total` units (`completed` of them already done); yields `advance(k)`, or None when hidden.

    Not on a terminal: also a line every LOG_EVERY_SECONDS with the units done, the time taken and the time left."""
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
        if bar.console.is_terminal:
            yield lambda k: bar.advance(task, k)
            return
        last = [time.monotonic()]

        def advance(k: int) -> None:
            bar.advance(task, k)
            if (now := time.monotonic()) - last[0] < LOG_EVERY_SECONDS:
                return
            last[0] = now
            t = bar.tasks[0]
            left = f", about {t.time_remaining:.0f} s left" if t.time_remaining is not None else ""
            line = f"{description}: {int(t.completed):,}/{total:,} {unit}, {t.elapsed or 0:.0f} s{left}"
            bar.console.print(line, markup=False, highlight=False)

        yield advance
