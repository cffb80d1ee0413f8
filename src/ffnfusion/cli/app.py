"""The typer app every verb registers on: consoles, the one error handler (exit code 2, `--debug`) and `fail`."""

from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

console = Console()
err_console = Console(stderr=True)


def log_dim(message: str) -> None:
    """A stage's progress line, dimmed on stderr; escaped, so "[analyze] running" or a path with brackets is text,
    not rich markup; soft-wrapped, so a long path in a log file stays on one line that can be copied."""
    err_console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)


# Errors that mean "the user's input is wrong": print the message, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)
# Set by the root `--debug` option (or FFNFUSION_DEBUG=1): errors also print their traceback.
_debug = False

# What an operating-system error means for the user, and what to do about it.
_OS_ERROR_HINTS = {
    getattr(errno, name): hint
    for name, hint in (
        ("ENOSPC", "the disk is full: free some space or write to another disk"),
        ("EFBIG", "the file is larger than this file system allows: write to another disk"),
        ("EDQUOT", "the disk quota is used up: free some space or write to another disk"),
        ("EROFS", "the file system is read-only: choose a writable location (--out)"),
        ("EACCES", "permission denied: choose a location you can write to, or fix its permissions"),
        ("EPERM", "the operation is not permitted: choose a location you can write to, or fix its permissions"),
        ("ENOTDIR", "a part of the path is a file, not a folder: choose a location that is not below a file"),
        ("EISDIR", "the path is a folder where a file was expected"),
        ("EEXIST", "the path already exists"),
        ("ENOENT", "no such file or folder"),
        ("EIO", "the disk reported an input/output error"),
    )
    if hasattr(errno, name)
}


def describe_error(error: BaseException) -> str:
    """One paragraph for the user: the message of our own errors; path, problem and fix for operating-system ones."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
        where = " -> ".join(paths) if paths else "(the operating system did not say which file)"
        hint = _OS_ERROR_HINTS.get(error.errno)
        if error.errno in (errno.EEXIST, errno.ENOTDIR) and error.filename is not None:
            # mkdir below an existing file: name the file that is in the way.
            path = Path(os.fsdecode(error.filename))
            blocker = next((p for p in (path, *path.parents) if p.is_file()), None)
            if blocker is not None:
                hint = f"{blocker} is a file, not a folder: choose a location (--out) that is not below a file"
        problem = f"{error.strerror} [errno {errno.errorcode.get(error.errno, error.errno)}]"
        return f"{where}: {problem}" + (f"; {hint}." if hint else ".")
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    return str(error) or type(error).__name__


def check_plan_file(plan: Path | None) -> None:
    """Read --plan before the heavy imports of a verb, so a bad plan file is reported at once."""
    if plan is not None:
        from ffnfusion.formats.plan import Plan

        Plan.load(plan)


def fail(error: BaseException) -> None:
    if _debug:
        err_console.print(
            "".join(traceback.format_exception(error)), markup=False, highlight=False, soft_wrap=True, end=""
        )
    err_console.print(f"[bold red]error:[/] {escape(describe_error(error))}", soft_wrap=True)
    raise typer.Exit(code=2)


class _FriendlyErrors(TyperGroup):
    """Every verb runs inside this: user errors and operating-system errors end as one message and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            if e.errno == errno.EPIPE:  # output piped into `head`: click's own handling is right
                raise
            fail(e)
        except USER_ERRORS as e:
            fail(e)


app = typer.Typer(
    help="FFN Fusion for Hugging Face Llama-family models: analyze, plan, fuse, heal, evaluate, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_FriendlyErrors,
)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", envvar="FFNFUSION_DEBUG", help="show the traceback of an error as well")
    ] = False,
) -> None:
    """FFN Fusion for Hugging Face Llama-family models."""
    global _debug
    _debug = debug
