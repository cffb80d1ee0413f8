#!/usr/bin/env bash
# The tensor-parallel measurements (issue 9), for a host with 8 GPUs. Usage: benchmarks/tp_targets.sh OUTDIR [SIZES]
# SIZES: tensor-parallel sizes to run (default "1 2 4 8"; sizes above the GPU count are skipped).
# Each run times the original and the fused model (random weights) at batch 1, 8 and 32 in one process group, and
# counts all-reduces per decode step. TP 1 runs the same code unsharded: the like-for-like single-GPU baseline.
# Communication variables (NCCL_*, TORCH_*) are inherited from the caller unchanged and recorded in each JSON.
set -u
out=${1:?usage: benchmarks/tp_targets.sh OUTDIR [SIZES]}
sizes=${2:-"1 2 4 8"}
mkdir -p "$out"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi topo -m || true
run() {  # run TP SHAPE PLAN NAME [extra args]
  local tp=$1 shape=$2 plan=$3 name=$4
  shift 4
  [ "$tp" -le "$gpus" ] || { echo "skip $name: TP $tp > $gpus GPUs"; return; }
  torchrun --standalone --nproc-per-node "$tp" benchmarks/tp_bench.py --shape "$shape" --plan "$plan" \
    --batch-sizes 1,8,32 --prompt-len 512 --new-tokens 128 --out "$out/$name.json" "$@"
}
for tp in $sizes; do
  extra=()
  [ "$tp" -le 2 ] && extra=(--check)  # the gathered 8B model fits on one GPU
  run "$tp" llama-3.1-8b benchmarks/plans/llama8b_fuse4.json "tp${tp}_llama8b" "${extra[@]}"
  # 70B in full needs 2+ GPUs (140 GB of bf16 weights); its first 40 layers fit one, for TP1 vs TP8.
  [ "$tp" -ge 2 ] && run "$tp" llama-3.1-70b benchmarks/plans/llama70b_fuse4.json "tp${tp}_llama70b"
  [ "$tp" -eq 1 ] || [ "$tp" -eq 8 ] && run "$tp" llama-3.1-70b benchmarks/plans/llama70b_40layers_fuse4.json \
    "tp${tp}_llama70b_40l" --layers 40
done
