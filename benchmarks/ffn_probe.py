"""k FFN sub-blocks in sequence vs fused into one wide FFN, at decode, for real model shapes (random weights).

python benchmarks/ffn_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import json

import torch

from ffnfusion.bench.timing import copy_bandwidth, ffn_group_probe

SHAPES = {"llama-3.1-8b": (4096, 14336), "llama-3.1-70b": (8192, 28672)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="ffn_probe.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    rows = []
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print(
        "| shape | FFNs | batch | sequential ms | fused ms | speedup | floor ms | seq / floor "
        "| unpacked seq ms | speedup |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape, (hidden, width) in SHAPES.items():
        for k in (2, 4):
            for batch in (1, 8):
                r = ffn_group_probe(hidden, width, k, torch.bfloat16, device, batch, bw) | {"shape": shape}
                rows.append(r)
                print(
                    f"| {shape} | {k} | {batch} | {r['sequential_ms']:.3f} | {r['fused_ms']:.3f} | {r['speedup']:.3f} "
                    f"| {r['floor_ms']:.3f} | {r['max_speedup_at_floor']:.3f} | {r['sequential_unpacked_ms']:.3f} "
                    f"| {r['speedup_over_unpacked']:.3f} |"
                )
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(
            {"copy_bandwidth_GBps": bw / 1e9, "device": torch.cuda.get_device_name(), "probes": rows}, f, indent=2
        )


if __name__ == "__main__":
    main()
