"""Each verb's options are the stage's own settings: same names, same defaults, so they cannot drift apart.

The stage function's signature (and HealSettings for heal) is the declaration; the typer verb restates it with help
texts. Every intended difference is listed here with its reason, so a new option added on one side only fails.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ffnfusion import cli

EMPTY = inspect.Parameter.empty


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()}


def _stage(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    from ffnfusion.analyze.stage import analyze
    from ffnfusion.bench.stage import bench
    from ffnfusion.eval.stage import evaluate
    from ffnfusion.fuse import fuse

    return {
        "analyze": (cli.analyze, analyze),
        "fuse": (cli.fuse, fuse),
        "eval": (cli.eval_, evaluate),
        "bench": (cli.bench, bench),
    }[name]


# verb -> (options only the CLI has, parameters only the stage has, defaults the CLI writes differently)
DIFFERENCES: dict[str, tuple[set[str], set[str], dict[str, tuple[Any, Any]]]] = {
    # The CLI always shows progress and logs to stderr.
    "analyze": (set(), {"log", "show_progress"}, {"device": ("auto", None)}),
    # GiB on the command line, bytes in Python.
    "fuse": ({"max_shard_size_gb"}, {"max_shard_bytes"}, {}),
    # --label is repeatable (one per model); the stage takes the list and a progress switch.
    "eval": ({"label"}, {"labels", "progress"}, {"out": (EMPTY, None)}),
    # --tp launches the tensor-parallel path; the CLI records its own command line; comma-separated sizes.
    "bench": (
        {"tp"},
        {"command", "log"},
        {
            "device": ("auto", None),
            "graphs": (True, None),
            "batch_sizes": ("1,8,32", (1, 8, 32)),
            "out": (Path("bench.json"), None),
            "compare": (None, ()),
        },
    ),
}


@pytest.mark.parametrize("verb", sorted(DIFFERENCES))
def test_verb_options_are_the_stage_parameters(verb: str) -> None:
    verb_fn, stage_fn = _stage(verb)
    cli_only, stage_only, written_differently = DIFFERENCES[verb]
    options, params = _defaults(verb_fn), _defaults(stage_fn)
    assert set(options) - set(params) == cli_only
    assert set(params) - set(options) == stage_only
    for name in set(options) & set(params):
        expected = written_differently.get(name, (params[name], params[name]))
        assert (options[name], params[name]) == expected, name


def test_heal_options_are_heal_settings() -> None:
    from ffnfusion.heal.settings import HealSettings
    from ffnfusion.heal.stage import heal

    settings = {f.name: f.default for f in dataclasses.fields(HealSettings)}
    options = _defaults(cli.heal)
    stage = _defaults(heal)
    # The models and the output are arguments of both; the stage alone takes callbacks and a progress switch.
    assert set(options) == set(settings) | (set(stage) - {"settings", "callbacks", "progress"})
    for name, default in options.items():
        if name in ("data", "student", "teacher", "out"):  # required on both sides
            assert default is EMPTY
            continue
        assert default == settings.get(name, stage.get(name)), name
