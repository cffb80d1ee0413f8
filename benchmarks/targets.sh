#!/usr/bin/env bash
# The issue-6 GPU measurements, as run for benchmarks/RESULTS.md. Usage: benchmarks/targets.sh synthetic|extra|real OUTDIR
#   synthetic: kernel/engine correctness checks, then random-weight models of real shapes (speed does not depend on
#              weights): SmolLM2-135M (targets 1, 2), Llama-3.1-8B (target 3, FFN probe), 2048-token prefill (target 4)
#   extra:     FFN probes at 8B/70B shapes, SmolLM2 2048-token prefill, Llama-3.2-1B shape
#   real:      the real SmolLM2-135M-Instruct GGUF (MODEL=path): fp32 greedy check over 128 tokens, bf16 timings
set -u
stage=$1
out=${2:-bench-out}
mkdir -p "$out"
bench() { python3 -m ffnfusion.cli bench "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
if [ "$stage" = synthetic ]; then
  python3 benchmarks/check_engine.py --json "$out/check.json"
  bench --random-weights --shape smollm2-135m --plan benchmarks/plans/smollm2_cut27.json \
    --batch-sizes 1,8,32 --prompt-len 512 --new-tokens 128 --reference-tokens 16 --out "$out/smollm2_cut27.json"
  bench --random-weights --shape llama-3.1-8b --plan benchmarks/plans/llama8b_fuse4.json \
    --batch-sizes 1,8 --prompt-len 512 --new-tokens 128 --reference-tokens 8 --ffn-probe 4 --out "$out/llama8b.json"
  bench --random-weights --shape llama-3.1-8b --plan benchmarks/plans/llama8b_fuse4.json \
    --batch-sizes 1 --prompt-len 2048 --new-tokens 8 --reference-tokens 0 --repeats 5 --out "$out/prefill2048.json"
  bench --random-weights --shape smollm2-135m --plan benchmarks/plans/smollm2_cut40.json \
    --batch-sizes 1,8 --prompt-len 512 --new-tokens 128 --reference-tokens 0 --out "$out/smollm2_cut40.json"
  bench --random-weights --shape llama-3.1-70b --layers 8 --plan benchmarks/plans/llama70b_8layers_fuse4.json \
    --batch-sizes 1 --prompt-len 512 --new-tokens 64 --reference-tokens 0 --ffn-probe 4 --out "$out/llama70b_8l.json"
elif [ "$stage" = extra ]; then
  python3 benchmarks/ffn_probe.py --out "$out/ffn_probe.json"
  bench --random-weights --shape smollm2-135m --plan benchmarks/plans/smollm2_cut27.json \
    --batch-sizes 1 --prompt-len 2048 --new-tokens 8 --reference-tokens 0 --repeats 5 --out "$out/prefill2048_smollm2.json"
  bench --random-weights --shape llama-3.2-1b --plan benchmarks/plans/llama1b_fuse4.json \
    --batch-sizes 1,8,32 --prompt-len 512 --new-tokens 128 --reference-tokens 8 --out "$out/llama1b.json"
elif [ "$stage" = real ]; then
  model=${MODEL:?set MODEL to the SmolLM2-135M-Instruct GGUF}
  text=${PROMPT_FILE:?set PROMPT_FILE to a text file}
  bench "$model" --plan benchmarks/plans/smollm2_cut27.json --dtype float32 --batch-sizes 1,8 --prompt-len 512 \
    --new-tokens 128 --reference-tokens 128 --repeats 2 --prompt-file "$text" --out "$out/real_fp32.json"
  bench "$model" --plan benchmarks/plans/smollm2_cut27.json --batch-sizes 1,8,32 --prompt-len 512 \
    --new-tokens 128 --reference-tokens 32 --prompt-file "$text" --out "$out/real_bf16.json"
fi
