"""Each verb's options are the stage's own settings: same names, same defaults, so they cannot drift apart.

The stage's settings model (AnalyzeSettings, ..., HealSettings) and the stage function's own keyword parameters are
the declaration; the typer verb is generated from it (cli/options.py). Every intended difference is listed here with
its reason, so a new option added on one side only fails.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ffnfusion import cli

EMPTY = inspect.Parameter.empty


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()}


def _declared(fn: Callable[..., Any], *models: Any) -> dict[str, Any]:
    """A stage's options and their defaults: its own keyword parameters and its settings models' fields."""
    params = {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is not p.VAR_KEYWORD and name not in ("settings", "run")
    }
    for model in models:
        params |= {name: EMPTY if f.is_required() else f.default for name, f in model.model_fields.items()}
    return params


def _stage(name: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    from ffnfusion.analyze.settings import AnalyzeSettings
    from ffnfusion.analyze.stage import analyze
    from ffnfusion.bench.settings import BenchSettings
    from ffnfusion.bench.stage import bench
    from ffnfusion.eval.settings import EvalSettings
    from ffnfusion.eval.stage import evaluate
    from ffnfusion.fuse import fuse
    from ffnfusion.fuse_settings import FuseSettings
    from ffnfusion.generate import GenerateSettings, generate

    return {
        "analyze": (cli.analyze, _declared(analyze, AnalyzeSettings)),
        "fuse": (cli.fuse, _declared(fuse, FuseSettings)),
        "eval": (cli.eval_, _declared(evaluate, EvalSettings)),
        "bench": (cli.bench, _declared(bench, BenchSettings)),
        "generate": (cli.generate, _declared(generate, GenerateSettings)),
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
    # The stage logs through a callback; the engine's host-sync interval is no option.
    "generate": (set(), {"log", "sync_every"}, {}),
}


@pytest.mark.parametrize("verb", sorted(DIFFERENCES))
def test_verb_options_are_the_stage_parameters(verb: str) -> None:
    verb_fn, params = _stage(verb)
    cli_only, stage_only, written_differently = DIFFERENCES[verb]
    options = _defaults(verb_fn)
    assert set(options) - set(params) == cli_only
    assert set(params) - set(options) == stage_only
    for name in set(options) & set(params):
        expected = written_differently.get(name, (params[name], params[name]))
        assert (options[name], params[name]) == expected, name


def test_heal_options_are_heal_settings() -> None:
    from ffnfusion.heal.settings import HealRun, HealSettings
    from ffnfusion.heal.stage import heal

    settings = _declared(lambda: None, HealSettings, HealRun)
    options = _defaults(cli.heal)
    stage = _declared(heal)
    # The models and the output are arguments of both; the stage alone takes callbacks and a progress switch.
    assert set(options) == set(settings) | (set(stage) - {"settings", "callbacks", "progress"})
    for name, default in options.items():
        if name in ("data", "student", "teacher", "out"):  # required on both sides
            assert default is EMPTY
            continue
        assert default == settings.get(name, stage.get(name)), name
