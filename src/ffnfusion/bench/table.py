"""bench.json's comparison rows (every model against the original) and its Markdown table."""

from __future__ import annotations

from typing import Any


def comparison(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every model against the first one (the original), batch by batch."""
    if len(models) < 2:
        return []
    base = models[0]
    rows = []
    for other in models[1:]:
        for b_run, o_run in zip(base["runs"], other["runs"]):
            row: dict[str, Any] = {
                "model": other["name"],
                "baseline": base["name"],
                "batch": b_run["batch"],
                "sub_block_ratio": base["sequential_sub_blocks"] / other["sequential_sub_blocks"],
                "prefill_speedup": b_run["prefill_ms"] / o_run["prefill_ms"],
            }
            if "decode_ms_per_token" in b_run and "decode_ms_per_token" in o_run:
                row["decode_speedup"] = b_run["decode_ms_per_token"] / o_run["decode_ms_per_token"]
                row["decode_speedup_over_ratio"] = row["decode_speedup"] / row["sub_block_ratio"]
            rows.append(row)
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    """bench.json as a Markdown table: one row per model and batch size, the first model as the baseline."""

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    speedups = {(c["model"], c["batch"]): c for c in result.get("comparison", [])}
    lines = [
        "| model | sub-blocks | batch | prefill ms | decode ms/token | tokens/s | x floor | decode speedup "
        "| eager ms/token | greedy = eager | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for m in result["models"]:
        for r in m["runs"]:
            c = speedups.get((m["name"], r["batch"]), {})
            speed = "1 (baseline)" if not c else f"{c.get('decode_speedup', 0):.2f} (ratio {c['sub_block_ratio']:.2f})"
            match = "-"
            if r.get("greedy_match"):
                match = f"yes ({r['tokens_compared']} tokens)"
            elif "greedy_match" in r:
                match = f"differs from token {r['first_mismatch']['step'] + 1}"
            peak = r.get("peak_memory_bytes")
            lines.append(
                f"| {m['name']} | {m['sequential_sub_blocks']} | {r['batch']} | {r['prefill_ms']:.2f} "
                f"| {fmt(r.get('decode_ms_per_token'), '.3f')} | {fmt(r.get('decode_tokens_per_s'), ',.0f')} "
                f"| {fmt(r.get('decode_over_floor'), '.2f')} | {speed} "
                f"| {fmt(r.get('eager_decode_ms_per_token'), '.2f')} | {match} "
                f"| {fmt(peak / 2**30 if peak else None, '.2f')} |"
            )
    parted = any(r.get("greedy_match") is False for m in result["models"] for r in m["runs"])
    if parted and result.get("dtype", "float32") != "float32":
        lines += [
            "",
            f"greedy = eager: in {result['dtype']} the engine's fused kernels and packed GEMMs round differently from "
            "eager `generate`, so two greedy paths part at the first near-tie; that is not an error. `--dtype "
            "float32` checks the engine against eager token for token.",
        ]
    if probe := result.get("ffn_probe"):
        lines.append("")
        lines.append(
            f"FFN probe (batch {probe['batch']}, hidden {probe['hidden']}, width {probe['width']}): "
            f"{probe['ffns']} FFNs in sequence {probe['sequential_ms']:.3f} ms, fused {probe['fused_ms']:.3f} ms, "
            f"speedup {probe['speedup']:.2f}x"
            + (f" (memory floor {probe['floor_ms']:.3f} ms)" if "floor_ms" in probe else "")
            + (
                f"; in sequence with separate gate/up GEMMs {probe['sequential_unpacked_ms']:.3f} ms "
                f"({probe['speedup_over_unpacked']:.2f}x)"
                if "sequential_unpacked_ms" in probe
                else ""
            )
        )
    return "\n".join(lines)
