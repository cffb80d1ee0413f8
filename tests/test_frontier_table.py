"""benchmarks/frontier.py --table-only: the frontier table read back from hand-built run folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = {"t0": {"acc": 0.5}, "t1": {"acc": 0.35}}


def _variant(
    work: Path, name: str, recipe: str, depth: int, ppl: float, kl: float, accs: list[float], ms: dict
) -> None:
    folder = work / name
    folder.mkdir(parents=True)
    candidates = [
        {"recipe": "parallel", "reached_target": True, "predicted_kl": 0.7, "predicted_kl_is": "measured"},
        {"recipe": "layer-drop", "reached_target": True, "predicted_kl": 0.9, "predicted_kl_is": "measured"},
        {"recipe": "attention", "reached_target": False, "predicted_kl": 0.1, "predicted_kl_is": "measured"},
    ]
    plan = {
        "remove_attention": [3],
        "remove_ffn": [],
        "fuse_ffn": [],
        "parallel_blocks": [],
        "info": {
            "predicted_kl": 0.7,
            "predicted": {"sequential_sub_blocks": {"plan": depth, "original": 60}},
            "recipes": {"chosen": recipe, "candidates": candidates},
        },
    }
    (folder / "plan.json").write_text(json.dumps(plan))
    tasks = {f"t{i}": {"acc": a} for i, a in enumerate(accs)}
    models = [
        {"label": "original", "perplexity": {"ppl": 30.0}, "fidelity": {"kl": 0.0, "top1": 1.0}, "tasks": ORIGINAL},
        {"label": "fused", "perplexity": {"ppl": 2 * ppl}, "fidelity": {"kl": 2 * kl, "top1": 0.5}},
        {"label": "healed", "perplexity": {"ppl": ppl}, "fidelity": {"kl": kl, "top1": 0.7}, "tasks": tasks},
    ]
    (folder / "eval.json").write_text(json.dumps({"models": models}))
    runs = [{"runs": [{"batch": b, "decode_ms_per_token": v} for b, v in times.items()]} for times in ms.values()]
    (folder / "bench.json").write_text(json.dumps({"models": runs}))


def test_table_only_reads_the_finished_variants_deepest_first(tmp_path: Path) -> None:
    work = tmp_path / "frontier"
    _variant(work, "d45-layer-drop", "layer-drop", 45, 45.5, 0.47, [0.5, 0.25], {"o": {1: 0.8}, "f": {1: 0.69}})
    _variant(work, "d52-auto", "parallel", 52, 33.37, 0.158, [0.5, 0.3], {"o": {1: 1.3}, "f": {1: 0.85}})
    _variant(work, "d45-auto", "parallel", 45, 39.74, 0.341, [0.5, 0.4], {"o": {1: 0.9}, "f": {1: 0.73}})
    (work / "d48-auto").mkdir()  # planned but never evaluated: left out of the table
    (work / "d48-auto" / "plan.json").write_text("{}")

    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--work", str(work), "--table-only"],
        check=True,
        capture_output=True,
    )

    lines = (work / "frontier.md").read_text().splitlines()
    body = [line for line in lines[:6] if line.startswith("| ")][1:]
    # The original's latency is the median of the three runs that timed it (0.8, 0.9, 1.3; the mean would be 1.0).
    assert body[0] == "| original | 60 | 30.00 | 0 | 1 | 0.425 | | | 0.900 |"
    assert body[1] == "| d52-auto (parallel) | 52 | 33.37 | 0.1580 | 0.700 | 0.400 | 66.74 | 0.3160 | 0.850 |"
    assert [line.split(" | ")[0] for line in body[2:]] == ["| d45-layer-drop (layer-drop)", "| d45-auto (parallel)"]
    assert "| 45 | 0.9000 | 0.7000 |" in lines  # a recipe that cannot reach the depth gets no column
    rows = json.loads((work / "frontier.json").read_text())
    assert [r["variant"] for r in rows] == ["d52-auto", "d45-layer-drop", "d45-auto"]
    assert rows[2]["healed"]["task_mean"] == 0.45
    assert (work / "frontier.png").stat().st_size > 0
