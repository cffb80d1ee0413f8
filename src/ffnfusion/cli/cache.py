"""`ffnfusion cache`: what the cache folder holds, by kind, and clearing it."""

from __future__ import annotations

from typing import Annotated

import typer

from ffnfusion.cli.app import console


def cache(
    clear: Annotated[
        list[str] | None,
        typer.Option(help="delete this kind of entry (gguf_weights, self_corpus, self_text, eval_scores) or all"),
    ] = None,
) -> None:
    """List what the cache holds ($FFNFUSION_CACHE, else ~/.cache/ffnfusion), or clear kinds of it.

    Everything there is recomputed when needed. Clear nothing while another ffnfusion command is running.
    """
    from rich.table import Table

    from ffnfusion.io.cache import CACHE_KINDS, cache_usage, clear_cache, default_cache_dir

    root = default_cache_dir()
    if clear:
        kinds = list(CACHE_KINDS) if "all" in clear else clear
        freed = clear_cache(kinds, root)
        console.print(f"cleared {', '.join(kinds)} in {root}: {_size(freed)} freed")
    table = Table(title=f"cache: {root}")
    for column in ("kind", "entries", "size", "holds"):
        table.add_column(column, justify="right" if column in ("entries", "size") else "left")
    usage = cache_usage(root)
    for u in usage:
        table.add_row(u.kind, str(u.entries), _size(u.bytes), CACHE_KINDS[u.kind])
    table.add_row("total", str(sum(u.entries for u in usage)), _size(sum(u.bytes for u in usage)), "")
    console.print(table)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
