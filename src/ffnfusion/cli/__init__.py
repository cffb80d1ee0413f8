"""The `ffnfusion` command: one verb per pipeline stage, each a thin wrapper over the stage's function.

Each verb is a function in its own module here; this package registers them on the one typer app (`cli.app`)
in pipeline order. Heavy libraries are imported inside the verbs, so `--help` and argument errors answer
at once.
"""

from ffnfusion.cli import analyze as _analyze_verb
from ffnfusion.cli import bench as _bench_verb
from ffnfusion.cli import cache as _cache_verb
from ffnfusion.cli import eval as _eval_verb
from ffnfusion.cli import export as _export_verb
from ffnfusion.cli import fuse as _fuse_verb
from ffnfusion.cli import generate as _generate_verb
from ffnfusion.cli import heal as _heal_verb
from ffnfusion.cli import pipeline as _pipeline_verb
from ffnfusion.cli import plan as _plan_verb
from ffnfusion.cli.app import USER_ERRORS, app, console, describe_error, err_console, fail

# The verbs, in pipeline order (the order `--help` lists them).
analyze = app.command()(_analyze_verb.analyze)
generate = app.command()(_generate_verb.generate)
plan_ = app.command("plan")(_plan_verb.plan_)
fuse = app.command()(_fuse_verb.fuse)
heal = app.command()(_heal_verb.heal)
eval_ = app.command("eval")(_eval_verb.eval_)
bench = app.command()(_bench_verb.bench)
run_ = app.command("run")(_pipeline_verb.run_)
report = app.command()(_pipeline_verb.report)
export = app.command()(_export_verb.export)
cache = app.command()(_cache_verb.cache)

__all__ = [
    "USER_ERRORS", "analyze", "app", "bench", "cache", "console", "describe_error", "err_console", "eval_", "export",
    "fail", "fuse", "generate", "heal", "main", "plan_", "report", "run_",
]  # fmt: skip


def main() -> None:
    app()
