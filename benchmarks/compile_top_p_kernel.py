"""Compile the fused top-p sampling kernel for a GPU architecture on a machine without one (Triton's own compiler,
down to a cubin through ptxas), and report its spills: the check a kernel edit gets before it reaches a GPU. The
interpreter check (check_kernels_interpreted.py) covers what it computes; this covers that the real compiler takes
it and keeps it in registers.

    pip install triton && python benchmarks/compile_top_p_kernel.py [--arch 90] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ffnfusion.engine import top_p_kernel

SIGNATURE = {"logits_ptr": "*bf16", "stride": "i64", "out_ptr": "*i64", "rng_ptr": "*i64", "inv_temp": "fp32",
             "top_p": "fp32", "vocab": "constexpr", "BLOCK": "constexpr"}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--blocks", default="1024,2048,4096")
    a = p.parse_args()
    failed = 0
    for block in (int(b) for b in a.blocks.split(",")):
        source = ASTSource(top_p_kernel._top_p_kernel, SIGNATURE, {"vocab": a.vocab, "BLOCK": block})
        kernel = triton.compile(source, target=GPUTarget("cuda", a.arch, 32))
        spills = len(re.findall(r"\b(?:ld|st)\.local", kernel.asm["ptx"]))
        failed += spills > 0 or "cubin" not in kernel.asm
        print(f"sm_{a.arch} vocab {a.vocab} block {block}: cubin {len(kernel.asm['cubin']):,} bytes, "
              f"{spills} local-memory loads/stores (spills)")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
