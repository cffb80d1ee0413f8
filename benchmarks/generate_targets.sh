#!/usr/bin/env bash
# The issue-15 GPU measurements of `ffnfusion generate`, as run for benchmarks/RESULTS.md.
# Usage: benchmarks/generate_targets.sh OUTDIR [HF_TOKENIZER_DIR]
#   1. SmolLM2-135M shape, random weights: engine (batch 256/512/1024) vs eager `generate` (batch 64), same run.
#   2. Llama-3.1-8B shape, random weights, all 32 layers: engine (batch 64/256) vs eager `generate` (batch 16).
#   3. With HF_TOKENIZER_DIR (config.json + tokenizer.json of SmolLM2-135M-Instruct): the real CLI end to end on a
#      random-weights model of that config, chat template + built-in instructions, 4M tokens.
set -u
out=${1:-gen-out}
tok=${2:-}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
python3 benchmarks/generate_speed.py --json "$out/smollm2.json" 2>&1 | tee "$out/smollm2.log"
python3 benchmarks/generate_speed.py --shape llama-3.1-8b --batch-sizes 64,256 --top-p 0.95 --tokens 131072 \
  --repeats 2 --eager-batch 16 --eager-tokens 64 --json "$out/llama8b.json" 2>&1 | tee "$out/llama8b.log"
if [ -n "$tok" ]; then
  python3 - "$tok" /tmp/rnd-smollm2 <<'PY'
import shutil, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = sys.argv[1:]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
model.save_pretrained(dst)
for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
    shutil.copy(f"{src}/{name}", dst)
PY
  /usr/bin/time -v python3 -m ffnfusion.cli generate /tmp/rnd-smollm2 --out /tmp/corpus --tokens 4M 2>&1 \
    | grep -v "^\s*\(Page\|Minor\|Major\|Vol\|Invol\|Swaps\|File\|Socket\|Signals\|Average\|Exit\|Percent\)" \
    | tee "$out/cli.log"
  cp /tmp/corpus/manifest.json "$out/manifest.json"
fi
