"""How long one load of a GGUF model takes: read through transformers each time (parse + dequantise) against the
dequantised copy in ffnfusion's cache. Every stage of `ffnfusion run` loads the original once.

    python benchmarks/gguf_load.py MODEL.gguf [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from ffnfusion.io.source import load_model, resolve_model


def timed(path: str) -> float:
    start = time.perf_counter()
    load_model(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FFNFUSION_CACHE"] = cache
        resolve_model(args.model).config()  # parsed once per process either way: not part of a load
        os.environ["FFNFUSION_GGUF_CACHE"] = "0"
        direct = [timed(args.model) for _ in range(args.repeats)]
        os.environ["FFNFUSION_GGUF_CACHE"] = "1"
        first = timed(args.model)
        cached = [timed(args.model) for _ in range(args.repeats)]
    print(f"direct from the GGUF: median {statistics.median(direct):.2f} s of {args.repeats}")
    print(f"first load, writing the cached copy: {first:.2f} s")
    print(f"from the cached copy: median {statistics.median(cached):.2f} s of {args.repeats}")
    print(f"ratio, direct / cached: {statistics.median(direct) / statistics.median(cached):.0f}x")


if __name__ == "__main__":
    main()
