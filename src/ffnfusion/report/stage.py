"""`ffnfusion report DIR`: one Markdown file and one self-contained HTML page, built only from the stage files.

Reads what exists of DIR/analysis/, DIR/plan.json, DIR/fused/, DIR/healed/, DIR/eval.json, DIR/bench.json and says
plainly which stages are missing. The HTML embeds every image as a data URI so the page travels as one file.
"""

from __future__ import annotations

import base64
import html
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import markdown

from ffnfusion.formats.plan import Plan, plan_blocks, sequential_sub_blocks
from ffnfusion.io.output import check_output_file, has_signature, signature, signature_line, write_atomic

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #dd8452; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 9px; }
th { background: #f3f3f3; }
td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 1px 4px; }
.missing { color: #a33; }
"""


class ReportError(ValueError):
    """DIR holds nothing a report can be built from."""


def _load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _num_layers(folder: Path, analysis: dict[str, Any] | None, plan: Plan) -> int | None:
    """Layers of the original model: from the analysis, else from the fused checkpoint's block count."""
    if analysis:
        return int(analysis["model"]["num_layers"])
    fused = _load_json(folder / "fused" / "config.json")
    if not fused:
        return None
    # Layers past the plan's last index map one-to-one onto blocks, so the fused block count pins the total.
    touched = plan.remove_attention + plan.remove_ffn + [i for g in plan.fuse_ffn + plan.parallel_blocks for i in g]
    known = max(touched, default=-1) + 1
    return known + len(fused["block_configs"]) - len(plan_blocks(plan, known))


def _perplexities(eval_json: dict[str, Any] | None) -> dict[str, float]:
    if not eval_json:
        return {}
    return {m["label"]: m["perplexity"]["ppl"] for m in eval_json["models"] if m.get("perplexity")}


def _decode_ms(bench_json: dict[str, Any] | None) -> dict[str, float]:
    """Decode latency at the smallest batch: 'original' is bench's first model, 'fused' the one compared with it."""
    if not bench_json:
        return {}
    out = {}
    for i, model in enumerate(bench_json["models"]):
        runs = sorted((r for r in model["runs"] if "decode_ms_per_token" in r), key=lambda r: r["batch"])
        if runs:
            out["original" if i == 0 else "fused"] = runs[0]["decode_ms_per_token"]
    return out


def plot_tradeoff(
    perplexities: dict[str, float], latency: dict[str, float], depth: dict[str, int], path: Path
) -> Path | None:
    """Quality vs speed: perplexity against measured decode latency, or against sequential depth without a bench."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not perplexities:
        return None
    # The healed model has the fused model's architecture, hence its speed.
    speed_of = {"original": "original", "fused": "fused", "healed": "fused"}
    use_latency = all(speed_of.get(label, "fused") in latency for label in perplexities)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, ppl in perplexities.items():
        arch = speed_of.get(label, "fused")
        x = latency[arch] if use_latency else depth.get(arch)
        if x is None:
            continue
        ax.scatter([x], [ppl], s=60, label=label)
        ax.annotate(label, (x, ppl), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("decode latency, ms/token (batch 1)" if use_latency else "sequential sub-blocks (latency proxy)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("quality vs speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": signature("report")})
    plt.close(fig)
    return path


def build_report(folder: str | Path) -> str:
    """The report's Markdown; writes plan.png and tradeoff.png into `folder` on the way."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder; give the run folder of `ffnfusion run` (or stage outputs).")
    analysis = _load_json(folder / "analysis" / "analysis.json")
    plan_path = folder / "plan.json"
    plan = Plan.load(plan_path) if plan_path.is_file() else None
    eval_json = _load_json(folder / "eval.json")
    bench_json = _load_json(folder / "bench.json")
    run_json = _load_json(folder / "run.json")
    if not any((analysis, plan, eval_json, bench_json)):
        raise ReportError(
            f"{folder} holds none of analysis/analysis.json, plan.json, eval.json, bench.json: nothing to report."
        )
    lines = _header(folder, analysis, plan, eval_json, bench_json, run_json)
    depth: dict[str, int] = {}
    n = _num_layers(folder, analysis, plan) if plan is not None else None
    if plan is not None and n is not None:
        depth = {"original": 2 * n, "fused": sequential_sub_blocks(plan_blocks(plan, n))}
        lines += _plan_section(folder, plan, n, depth)
    if analysis is not None:
        lines += _analysis_section(folder, analysis)
    lines += _quality_section(eval_json)
    healed_curve = folder / "healed" / "loss_curve.png"
    if healed_curve.is_file():
        lines += ["## Healing", "", "![healing loss](healed/loss_curve.png)", ""]
    lines += _speed_section(bench_json)
    tradeoff = plot_tradeoff(_perplexities(eval_json), _decode_ms(bench_json), depth, folder / "tradeoff.png")
    if tradeoff:
        lines += ["## Accuracy vs latency", "", "![quality vs speed](tradeoff.png)", ""]
    return "\n".join(lines).rstrip() + "\n"


def _header(
    folder: Path, analysis: Any, plan: Plan | None, eval_json: Any, bench_json: Any, run_json: Any
) -> list[str]:
    """Title, build date, and which stage outputs the folder lacks."""
    model_name = (analysis or {}).get("model", {}).get("name") or (run_json or {}).get("config", {}).get("model")
    title = Path(model_name).name if model_name else folder.name
    lines = [f"# FFN Fusion report: {title}", ""]
    lines.append(f"Built {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from the stage files in `{folder.name}/`.")
    missing = [
        name
        for name, present in (
            ("analysis", analysis),
            ("plan", plan),
            ("fused checkpoint", (folder / "fused" / "config.json").is_file()),
            ("healed checkpoint", (folder / "healed" / "config.json").is_file()),
            ("eval", eval_json),
            ("bench", bench_json),
        )
        if not present
    ]
    if missing:
        lines.append(f"Not available: {', '.join(missing)}.")
    lines.append("")
    return lines


def _plan_section(folder: Path, plan: Plan, n: int, depth: dict[str, int]) -> list[str]:
    """The plan in words and as plan.png (written here)."""
    from ffnfusion.report.diagram import plot_plan

    blocks = plan_blocks(plan, n)
    plot_plan(plan, n, folder / "plan.png")
    lines = [
        "## Model and plan",
        "",
        f"- layers: {n} -> {len(blocks)} blocks; sequential sub-blocks {depth['original']} -> {depth['fused']}",
        f"- attention removed in layers {plan.remove_attention or '-'}",
        f"- FFN groups fused: {plan.fuse_ffn or '-'}",
    ]
    if plan.remove_ffn:
        lines.append(f"- FFNs removed: {plan.remove_ffn}")
    if plan.parallel_blocks:
        lines.append(f"- blocks run in parallel: {plan.parallel_blocks}")
    predicted = plan.info.get("predicted", {}) if plan.info else {}
    if latency := predicted.get("latency"):
        lines.append(f"- predicted latency speedup (cost model): {latency.get('speedup', float('nan')):.3f}x")
    return [*lines, "", "![plan](plan.png)", ""]


def _analysis_section(folder: Path, analysis: dict[str, Any]) -> list[str]:
    lines = ["## Dependency analysis", ""]
    calib = analysis.get("calibration", {})
    lines.append(
        f"Calibration: `{calib.get('data')}`, {calib.get('samples')} x {calib.get('seq_len')} tokens. "
        "M[i, j] = 1 - cos(h_j, h_j with i removed): low values mean little dependency (good fusion candidates)."
    )
    lines.append("")
    for png in sorted((folder / "analysis").glob("*.png")):
        lines += [f"![{png.stem}](analysis/{png.name})", ""]
    return lines


def _quality_section(eval_json: Any) -> list[str]:
    lines = ["## Quality", ""]
    if not eval_json:
        return [*lines, "No eval.json: run `ffnfusion eval`.", ""]
    from ffnfusion.eval.stage import markdown_table

    lines += [markdown_table(eval_json), ""]
    settings = eval_json["settings"]
    lines.append(f"Text: `{settings.get('data')}`; reference for KL/top-1: `{eval_json.get('reference')}`.")
    lines.append("")
    return lines


def _speed_section(bench_json: Any) -> list[str]:
    if not bench_json:
        return ["## Speed", "", "No bench.json: run `ffnfusion bench` on a GPU (skipped on CPU).", ""]
    from ffnfusion.bench.table import markdown_table as bench_table

    device = bench_json.get("device", "?")
    return ["## Speed", "", f"Device: {device}; dtype {bench_json.get('dtype')}.", "", bench_table(bench_json), ""]


def _inline_images(page: str, folder: Path) -> str:
    def embed(match: re.Match[str]) -> str:
        src = match.group(1)
        path = folder / html.unescape(src)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    return re.sub(r'src="([^"]+\.png)"', embed, page)


REPORT_FILES = ("report.md", "report.html", "plan.png", "tradeoff.png")


def check_report_outputs(folder: Path) -> None:
    """Refuse to write the report over files in `folder` that an earlier report did not write."""
    for name in REPORT_FILES:
        check_output_file(folder / name, "report", has_signature("report"))


def write_report(folder: str | Path) -> tuple[Path, Path]:
    """Write report.md and a self-contained report.html into `folder`; returns both paths."""
    folder = Path(folder)
    check_report_outputs(folder)
    text = build_report(folder).rstrip("\n") + "\n\n" + signature_line("report") + "\n"
    body = markdown.markdown(text, extensions=["tables"])
    title = html.escape(text.splitlines()[0].lstrip("# "))
    page = f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
    page += f"<body>\n{_inline_images(body, folder)}\n</body></html>\n"
    outputs = []
    for name, content in (("report.md", text), ("report.html", page)):
        outputs.append(write_atomic(folder / name, content))
    return outputs[0], outputs[1]
