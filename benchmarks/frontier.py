"""The depth/quality/latency frontier: for each target depth and recipe, `ffnfusion run` with the same healing budget,
then one table (frontier.md, frontier.json) and one plot (frontier.png) of perplexity, KL, top-1, task accuracy and
decode latency against sequential sub-blocks.

    python benchmarks/frontier.py --model SmolLM2-135M-Instruct.Q4_1.gguf --eval-data wiki.test.raw \\
        --work runs/frontier --depths 52,48,45,40 --recipes auto,attention,fusion,parallel,layer-drop \\
        [--heal-tokens 8000000] [--tasks hellaswag,arc_easy,... --task-data-dir DIR --limit 500 --task-depths 45]
        [--jobs 2] [--heal layer_weight=1.0 --heal lr=3e-3]

Every variant is an ordinary run folder (work/d45-auto/ ...) made from one shared analysis (work/base), so each row
can be inspected, reported or resumed like any run, and the script itself resumes: rerun it and finished stages
are skipped. Healing text is `self` by default (the model writes it; one corpus, cached, shared by every variant),
or the one `--data` (a `ffnfusion generate` corpus, say) for all, never the evaluation text. With --jobs N the plan
and fuse stages of N variants run at once; heal, eval and bench then run variant by variant, alone, so each heal has
the whole GPU and latencies are not disturbed. `--table-only` runs nothing and rebuilds the table and plot from the
variants under --work that finished (say, results brought back from a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

RECIPES = ("auto", "attention", "fusion", "parallel", "layer-drop")


def variant_config(args: argparse.Namespace, depth: int, recipe: str) -> dict:
    """run.yaml of one variant: everything but the plan is the same for every row."""
    data = args.data if args.data == "self" else str(Path(args.data).resolve())
    config: dict = {"data": data, "eval_data": str(Path(args.eval_data).resolve()), "seed": args.seed}
    if args.device:
        config["device"] = args.device
    config["analyze"] = {"samples": args.samples} if args.samples else {}
    config["plan"] = {"target_depth": depth, "measure_recipes": not args.proxy}
    if recipe != "auto":
        config["plan"]["recipe"] = recipe
    config["heal"] = {"tokens": args.heal_tokens} if args.heal_tokens else {}
    if args.heal_batch_size:
        config["heal"]["batch_size"] = args.heal_batch_size
    for option in args.heal or []:
        key, _, value = option.partition("=")
        config["heal"][key.strip().replace("-", "_")] = _option_value(value.strip())
    config["eval"] = {"batch_size": args.eval_batch_size} if args.eval_batch_size else {}
    if args.tasks and (not args.task_depths or depth in {int(d) for d in args.task_depths.split(",")}):
        config["eval"] |= {"tasks": args.tasks.split(","), "task_data_dir": str(Path(args.task_data_dir).resolve())}
        if args.limit:
            config["eval"]["limit"] = args.limit
    config["bench"] = {"batch_sizes": [int(b) for b in args.batch_sizes.split(",")]}
    return config


def _option_value(text: str) -> object:
    """A --heal value: a number where it reads as one (YAML takes 3e-3 for a string), else YAML (true, [1, 2])."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def ffnfusion_run(model: str, folder: Path, *extra: str) -> None:
    """One `ffnfusion run` in its own process (a fresh CUDA context; its log beside it)."""
    command = [sys.executable, "-m", "ffnfusion.cli", "run", "--model", model, "--out", str(folder)]
    command += ["--config", str(folder.parent / f"{folder.name}.yaml"), *extra]
    with open(folder.parent / f"{folder.name}.log", "a") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def prepare(args: argparse.Namespace) -> list[Path]:
    """The shared analysis (work/base), then one run folder per variant seeded with it."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = [(int(d), r) for d in args.depths.split(",") for r in args.recipes.split(",")]
    if bad := sorted({r for _, r in variants} - set(RECIPES)):
        raise SystemExit(f"unknown recipes {bad}; choose from {', '.join(RECIPES)}")
    base = work / "base"
    # The base's config is any variant's: the analyze stage's key depends only on model, data, seed and options.
    (work / "base.yaml").write_text(yaml.safe_dump(variant_config(args, *variants[0])))
    ffnfusion_run(args.model, base, "--stop-after", "analyze")
    folders = []
    for depth, recipe in variants:
        folder = work / f"d{depth}-{recipe}"
        (work / f"{folder.name}.yaml").write_text(yaml.safe_dump(variant_config(args, depth, recipe)))
        if not folder.exists():
            shutil.copytree(base, folder)
        folders.append(folder)
    return folders


def measure(args: argparse.Namespace, folders: list[Path]) -> list[Path]:
    """Plan and fuse the variants N at a time (mostly host work: loading, measuring recipes), then heal, evaluate and
    bench each alone: one heal fills the GPU (heals sharing it ran no faster in all, and ran out of memory), and a
    latency is measured with nothing else running. A variant that fails is reported and left for a rerun; the
    others go on. Returns the variants that finished."""

    def attempt(folder: Path, *extra: str) -> bool:
        try:
            ffnfusion_run(args.model, folder, *extra)
            return True
        except subprocess.CalledProcessError:
            print(f"{folder.name} failed: see {folder.parent / folder.name}.log; rerun to resume it", flush=True)
            return False

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        fused = list(pool.map(lambda f: attempt(f, "--stop-after", "fuse"), folders))
    rest = ("--skip", args.skip) if args.skip else ()
    return [folder for folder, good in zip(folders, fused, strict=True) if good and attempt(folder, *rest)]


def row(folder: Path) -> dict:
    """One variant's figures, read back from its run folder's files."""
    plan = json.loads((folder / "plan.json").read_text())
    evaluation = json.loads((folder / "eval.json").read_text())
    models = {m["label"]: m for m in evaluation["models"]}
    final = models.get("healed") or models["fused"]
    info = plan.get("info") or {}
    out = {
        "variant": folder.name,
        "recipe": (info.get("recipes") or {}).get("chosen", folder.name.split("-", 1)[1]),
        "sub_blocks": info["predicted"]["sequential_sub_blocks"]["plan"],
        "original_sub_blocks": info["predicted"]["sequential_sub_blocks"]["original"],
        "predicted_kl": info.get("predicted_kl"),
        "recipes": {
            c["recipe"]: c["predicted_kl"]
            for c in (info.get("recipes") or {}).get("candidates", [])
            if c.get("reached_target") and c.get("predicted_kl_is") == "measured"
        },
        "plan": {k: plan[k] for k in ("remove_attention", "remove_ffn", "fuse_ffn", "parallel_blocks")},
        "original": _quality(models["original"]),
        "before_heal": _quality(models["fused"]),
        "healed": _quality(final) if "healed" in models else None,
    }
    heal_file = folder / "healed" / "heal_summary.json"
    if heal_file.is_file():  # what the heal actually used (automatic values resolved), to tell tables apart
        heal = json.loads(heal_file.read_text())
        used = {k: heal["settings"].get(k) for k in ("lr", "batch_size", "layer_weight", "cos_weight", "scope")}
        out["heal"] = {**used, "tokens": heal["result"]["tokens"], "steps": heal["result"]["steps"]}
    bench_file = folder / "bench.json"
    if bench_file.is_file():
        bench = json.loads(bench_file.read_text())["models"]
        out["decode_ms"] = {
            name: {str(r["batch"]): r["decode_ms_per_token"] for r in m["runs"]}
            for name, m in zip(("original", "fused"), bench, strict=True)
        }
    return out


def _quality(model: dict) -> dict:
    ppl, fid = model.get("perplexity") or {}, model.get("fidelity") or {}
    tasks = model.get("tasks") or {}
    accs = [t["acc"] for t in tasks.values() if t.get("acc") is not None]
    return {
        "ppl": ppl.get("ppl"),
        "kl": fid.get("kl"),
        "top1": fid.get("top1"),
        "task_mean": sum(accs) / len(accs) if accs else None,
        "tasks": {name: t.get("acc") for name, t in tasks.items()},
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def write_table(rows: list[dict], work: Path) -> str:
    """frontier.md: the healed variants (the original's latency is the median over the runs that measured it),
    then every recipe's KL before healing at each depth, as `plan` measured it when choosing."""
    batches = sorted({b for r in rows for b in (r.get("decode_ms") or {}).get("fused", {})}, key=int)
    lines = [
        "| variant | sub-blocks | PPL | KL | top-1 | task mean | PPL before heal | KL before heal |"
        + "".join(f" ms/token b{b} |" for b in batches),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(batches),
    ]
    original = rows[0]["original"]
    original_ms = [
        _median([ms for r in rows if (ms := (r.get("decode_ms") or {}).get("original", {}).get(b)) is not None])
        for b in batches
    ]
    lines.append(
        f"| original | {rows[0]['original_sub_blocks']} | {_cell(original['ppl'], '.2f')} | 0 | 1 "
        f"| {_cell(original['task_mean'], '.3f')} | | |" + "".join(f" {_cell(ms, '.3f')} |" for ms in original_ms)
    )
    for r in rows:
        q, b = r["healed"] or r["before_heal"], r["before_heal"]
        ms = (r.get("decode_ms") or {}).get("fused", {})
        lines.append(
            f"| {r['variant']} ({r['recipe']}) | {r['sub_blocks']} | {_cell(q['ppl'], '.2f')} "
            f"| {_cell(q['kl'], '.4f')} | {_cell(q['top1'], '.3f')} | {_cell(q['task_mean'], '.3f')} "
            f"| {_cell(b['ppl'], '.2f')} | {_cell(b['kl'], '.4f')} |"
            + "".join(f" {_cell(ms.get(k), '.3f')} |" for k in batches)
        )
    heals = sorted({json.dumps(r["heal"], sort_keys=True) for r in rows if r.get("heal")})
    lines += [""] + [f"heal: {', '.join(f'{k} {v}' for k, v in json.loads(h).items())}" for h in heals]
    lines += ["", *recipe_table(rows)]
    table = "\n".join(lines) + "\n"
    (work / "frontier.md").write_text(table)
    (work / "frontier.json").write_text(json.dumps(rows, indent=2) + "\n")
    return table


def recipe_table(rows: list[dict]) -> list[str]:
    """KL of every recipe before healing, one row per depth (from the plans that measured them all)."""
    by_depth = {r["sub_blocks"]: r["recipes"] for r in rows if r.get("recipes")}
    names = sorted({name for recipes in by_depth.values() for name in recipes})
    if not by_depth:
        return []
    lines = [
        "KL before healing of every recipe, as `plan` measured it (- : cannot reach the depth):",
        "",
        "| sub-blocks |" + "".join(f" {name} |" for name in names),
        "|---:|" + "---:|" * len(names),
    ]
    for d in sorted(by_depth, reverse=True):
        lines.append(f"| {d} |" + "".join(f" {_cell(by_depth[d].get(name), '.4f')} |" for name in names))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity after healing against depth, and against measured batch-1 decode latency (where it was
    measured): equal depth is not equal speed, since a dropped layer also drops its FFN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    original = rows[0]["original"]["ppl"]
    original_ms = _median([ms for r in rows if (ms := (r.get("decode_ms") or {}).get("original", {}).get("1"))])
    for recipe in sorted({r["recipe"] for r in rows}):
        mine = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r["sub_blocks"])
        ppl = [(r["healed"] or r["before_heal"])["ppl"] for r in mine]
        axes[0].plot([r["sub_blocks"] for r in mine], ppl, marker="o", label=recipe)
        timed = [(r["decode_ms"]["fused"]["1"], p) for r, p in zip(mine, ppl, strict=True) if _has_b1(r)]
        if timed:
            axes[1].plot(*zip(*timed, strict=True), marker="o", label=recipe)
    axes[0].axhline(original, color="grey", linestyle="--", linewidth=0.8)
    axes[0].plot([rows[0]["original_sub_blocks"]], [original], marker="*", markersize=12, color="grey", linestyle="")
    axes[0].set_xticks(sorted({r["sub_blocks"] for r in rows} | {rows[0]["original_sub_blocks"]}))
    axes[0].set_xlabel("sequential sub-blocks")
    if original_ms is not None:
        axes[1].plot([original_ms], [original], marker="*", markersize=12, color="grey", linestyle="")
    axes[1].set_xlabel("decode ms/token, batch 1 (measured)")
    for ax in axes:
        ax.plot([], [], marker="*", markersize=12, color="grey", linestyle="", label="original")
        ax.set_ylabel("perplexity after healing")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _has_b1(r: dict) -> bool:
    return (r.get("decode_ms") or {}).get("fused", {}).get("1") is not None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--eval-data", help="perplexity text; never trained on")
    p.add_argument(
        "--data", default="self", help="calibration and healing text of every variant: self, or a file / corpus"
    )
    p.add_argument("--work", required=True, help="folder for the base analysis, the variants and the table")
    p.add_argument("--depths", default="52,48,45,40")
    p.add_argument("--recipes", default="auto,layer-drop", help=f"comma-separated: {', '.join(RECIPES)}")
    p.add_argument("--heal-tokens", type=int, help="the same budget for every variant (default: the run's)")
    p.add_argument("--heal-batch-size", type=int)
    p.add_argument(
        "--heal", action="append", metavar="KEY=VALUE", help="any heal option for every variant (repeatable): lr=3e-3"
    )
    p.add_argument("--samples", type=int, help="analysis calibration sequences (default: analyze's)")
    p.add_argument("--proxy", action="store_true", help="rank recipes by the proxy instead of measuring them")
    p.add_argument("--tasks")
    p.add_argument("--task-data-dir")
    p.add_argument("--limit", type=int)
    p.add_argument("--task-depths", help="run --tasks only at these depths (comma-separated; default: all)")
    p.add_argument("--batch-sizes", default="1,32", help="decode batch sizes to bench")
    p.add_argument(
        "--eval-batch-size",
        type=int,
        help="sequences per forward pass in eval (perplexity windows and task requests; default: eval's automatic "
        "size)",
    )
    p.add_argument(
        "--skip",
        help="stages every variant skips for now (`ffnfusion run --skip`), e.g. bench while other jobs share the GPU; "
        "rerun without it to add them",
    )
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="variants planned and fused at once (heal, eval and bench run one variant at a time)",
    )
    p.add_argument(
        "--table-only",
        action="store_true",
        help="run nothing: rebuild the table and plot from the variant folders under --work that finished",
    )
    args = p.parse_args()
    if not args.table_only and not (args.model and args.eval_data):
        p.error("--model and --eval-data are required (unless --table-only)")
    if args.table_only:
        finished = sorted(f for f in Path(args.work).glob("d*-*") if (f / "eval.json").is_file())
    else:
        finished = measure(args, prepare(args))
    if not finished:
        raise SystemExit("no variant finished; see the logs in the work folder")
    # Deepest first, then by recipe: the table reads as a frontier whatever order the variants ran in.
    rows = sorted((row(f) for f in finished), key=lambda r: (-r["sub_blocks"], r["recipe"]))
    print(write_table(rows, Path(args.work)))
    plot(rows, Path(args.work) / "frontier.png")


if __name__ == "__main__":
    main()
