"""Time `ffnfusion analyze` (both dependency matrices + attention scores) on a real model.

    python benchmarks/analyze_timing.py MODEL --data TEXT --samples 64 --seq-len 512 --device cpu --out runs/x

Prints one line of JSON: wall seconds (all of analyze, and the measurements alone), the process's CPU seconds and
the load average (wall time on a shared machine depends on the other work), the device, and the cost in
full-forward equivalents that analysis.json records.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

from ffnfusion.analyze import analyze


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--remove-attention", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    result = analyze(
        args.model,
        args.out,
        data=args.data,
        samples=args.samples,
        seq_len=args.seq_len,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        remove_attention=args.remove_attention,
        overwrite=True,
        show_progress=sys.stderr.isatty(),
    )
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    a = result.analysis
    print(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "device": result.device,
                "dtype": a.settings.dtype,
                "batch_size": a.settings.batch_size,
                "torch": torch.__version__,
                "layers": a.num_layers,
                "tokens": a.calibration.samples * a.calibration.seq_len,
                "wall_seconds": round(wall, 1),
                "analyze_seconds": round(result.seconds, 1),
                "measure_seconds": round(result.measure_seconds, 1),
                # On a shared machine wall time depends on the other work; CPU time of this process does not.
                "process_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                "torch_threads": torch.get_num_threads(),
                "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "forward_equivalents": {k: v.forward_equivalents for k, v in a.cost.parts.items()},
                "total_forward_equivalents": a.cost.total_forward_equivalents,
                "original_lm_loss": round(a.original_lm_loss, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
