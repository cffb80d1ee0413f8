"""Where a verb may write: one set of rules for every output folder and file of every stage.

Every verb asks `check_output_dir` (folders: analyze, fuse, heal, run) or `check_output_file` (plan.json, eval.json,
bench.json, report files) before any long work starts. The rules:

1. Never touch an input: the output may not be an input, lie inside an input folder, or contain an input (replacing
   it would delete the input with it). A single-file model (a GGUF) protects the file, not the folder it sits in.
2. Never replace what ffnfusion did not write. Output folders carry a marker file naming the verb that wrote them;
   `--overwrite` replaces only an empty folder or one marked by the same verb. Output files are recognised by their
   content (each stage's JSON `format`, a signature line in Markdown/HTML).
3. Say what is in the way and how to proceed, before anything is loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

MARKER = ".ffnfusion-output.json"
MARKER_FORMAT = "ffnfusion-output"


class OutputError(ValueError):
    """An output location that would destroy an input or replace something ffnfusion did not write."""


# An input as (what it is, where it is): the label names it in messages ("input model", "data", "plan").
Input = tuple[str, "str | Path | None"]
Error = type[Exception]


def input_paths(inputs: Iterable[Input]) -> list[tuple[str, Path]]:
    """The inputs that are local files or folders (hub ids, dataset names and `self` protect nothing locally)."""
    paths = []
    for label, item in inputs:
        if item is None:
            continue
        path = Path(item).expanduser()
        if path.exists():
            paths.append((label, path.resolve()))
    return paths


def _check_inputs(out: Path, inputs: Iterable[Input], error: Error) -> None:
    for label, path in input_paths(inputs):
        if out == path:
            raise error(f"{out} is the {label} of this command; writing there would destroy it. Choose another output.")
        if path.is_dir() and path in out.parents:
            raise error(
                f"Refusing to write into the {label}'s folder {path} ({out} is inside the {label} folder): "
                "ffnfusion never writes into its inputs. Choose an output elsewhere."
            )
        if out in path.parents:
            raise error(
                f"{out} contains the {label} {path}; replacing it would delete that input. Choose another output."
            )


def _check_parents(out: Path, error: Error) -> None:
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"Cannot create {out}: {parent} is a file, not a folder. Choose another --out.")
            return


def marker_verb(folder: Path) -> str | None:
    """The verb that wrote `folder` (from its marker file), or None when ffnfusion did not write it."""
    try:
        raw = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("format") != MARKER_FORMAT:
        return None
    verb = raw.get("verb")
    return verb if isinstance(verb, str) else None


def write_marker(folder: Path, verb: str) -> None:
    """Mark `folder` as the output of `ffnfusion VERB`, so a later `--overwrite` of the same verb may replace it."""
    (folder / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "version": 1, "verb": verb}) + "\n")


def _listing(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(
    out: str | Path, verb: str, inputs: Iterable[Input] = (), overwrite: bool = False, error: Error = OutputError
) -> Path:
    """Refuse an output folder that would destroy an input or replace something not written by `ffnfusion VERB`.

    Returns the resolved folder. An absent or empty folder is always fine; a non-empty one needs `overwrite` and
    the marker of the same verb. `error` is the stage's own exception type.
    """
    out = Path(out).expanduser().resolve()
    _check_inputs(out, inputs, error)
    _check_parents(out, error)
    if not out.exists():
        return out
    if not out.is_dir():
        raise error(f"{out} is a file, not a folder: `ffnfusion {verb}` writes a folder. Choose another output.")
    if not any(out.iterdir()):
        return out
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it.")
    owner = marker_verb(out)
    if owner == verb:
        return out
    what = f"the output of `ffnfusion {owner}`" if owner else f"not an output of ffnfusion (no {MARKER} marker)"
    raise error(
        f"Refusing to replace {out}: it is {what}, and --overwrite only replaces an earlier `ffnfusion {verb}` "
        f"output. It holds: {_listing(out)}. Choose another output, or move that folder away yourself."
    )


def check_output_file(
    out: str | Path,
    verb: str,
    recognise: Callable[[Path], bool],
    inputs: Iterable[Input] = (),
    replace: bool = True,
    error: Error = OutputError,
) -> Path:
    """Refuse an output file that would destroy an input or replace a file `ffnfusion VERB` did not write.

    `recognise(path)` says whether an existing file is an earlier output of this verb; `replace=False` refuses
    even those (the verb's `--overwrite` was not given).
    """
    out = Path(out).expanduser().resolve()
    _check_inputs(out, inputs, error)
    _check_parents(out, error)
    if out.is_dir():
        raise error(f"{out} is a folder: `ffnfusion {verb}` writes a file there. Give a file name instead.")
    if not out.exists():
        return out
    if not recognise(out):
        raise error(
            f"Refusing to replace {out}: it is not an earlier output of `ffnfusion {verb}`. Choose another output "
            "file, or move that file away yourself."
        )
    if not replace:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it.")
    return out


def json_format_is(expected: str) -> Callable[[Path], bool]:
    """A recogniser for JSON files whose top-level `format` field is `expected`."""

    def recognise(path: Path) -> bool:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(raw, dict) and raw.get("format") == expected

    return recognise


def signature(verb: str) -> str:
    """The phrase that marks a Markdown, HTML or PNG file as written by `ffnfusion VERB`."""
    return f"written by ffnfusion {verb}"


def signature_line(verb: str) -> str:
    """`signature(verb)` as a comment line for Markdown and HTML."""
    return f"<!-- {signature(verb)} -->"


def has_signature(verb: str) -> Callable[[Path], bool]:
    """A recogniser for files that carry `signature(verb)` (PNG files: in their `Software` text chunk)."""

    def recognise(path: Path) -> bool:
        try:
            return signature(verb).encode() in path.read_bytes()
        except OSError:
            return False

    return recognise


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write a file under a temporary name beside it and rename it into place: a crash leaves the old file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
