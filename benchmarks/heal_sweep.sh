#!/bin/bash
# Healing recipe at one depth: corpus prompts (and top-p) x learning rate (x block-boundary loss weight), the same
# token budget for every cell, one fused model. Cells: CELLS="mix:1e-3 mix:1e-3:1.0 mix@0.9:1e-3 ..."
# (prompts[@top_p]:lr[:layer_weight]; top-p 1.0, the model's own distribution as `--data self` samples it, unless a
# cell names one).
#
#   bash benchmarks/heal_sweep.sh MODEL.gguf VALID_TEXT TEST_TEXT WORK [DEPTH] [TOKENS]
#
# The fused model is `ffnfusion run` with the plan chosen by measured KL at DEPTH (default 45); each corpus is
# written by the original (`ffnfusion generate`, temperature 1, top-p as the cell says); each cell heals the same
# fused model on TOKENS (default 8M). Cells are compared on VALID_TEXT (choose there) and reported on TEST_TEXT;
# neither is ever trained on. Rerun to continue: finished steps are skipped.
set -euo pipefail
MODEL=$1 VALID=$2 TEST=$3 WORK=$4 DEPTH=${5:-45} TOKENS=${6:-8000000}
CELLS=${CELLS:-"chat:1e-4 chat:3e-4 mix:3e-4 chat:1e-3 bos:3e-4 mix:1e-3"}
ff() { "${PYTHON:-python3}" -m ffnfusion.cli "$@"; }
mkdir -p "$WORK"
printf 'data: self\nplan: {target_depth: %s, measure_recipes: true}\n' "$DEPTH" > "$WORK/fused.yaml"
ff run --model "$MODEL" --out "$WORK/fused" --config "$WORK/fused.yaml" --stop-after fuse
for cell in $CELLS; do
  corpus=${cell%%:*} prompts=${corpus%%@*} top_p=1.0
  [[ $corpus == *@* ]] && top_p=${corpus#*@}
  corpus=${corpus/@/-p}  # a path, and `--data` reads NAME@SPLIT as a datasets split
  resume=(); [ -d "$WORK/corpus-$corpus" ] && resume=(--resume)  # a complete corpus is then left as it is
  ff generate "$MODEL" --out "$WORK/corpus-$corpus" --tokens "$TOKENS" --top-p "$top_p" --prompts "$prompts" \
    --seed 11 "${resume[@]}"
done
healed=(); labels=(--label original --label fused)
for cell in $CELLS; do
  IFS=: read -r corpus lr layer <<< "$cell"
  corpus=${corpus/@/-p} name="$corpus-$lr${layer:+-layer$layer}" out="$WORK/healed-$name"
  resume=(); [ -d "$out.checkpoints" ] && resume=(--resume)
  [ -f "$out/heal_summary.json" ] || ff heal "$WORK/fused/fused" --teacher "$MODEL" --data "$WORK/corpus-$corpus" \
    --tokens "$TOKENS" --lr "$lr" --layer-weight "${layer:-0}" --out "$out" "${resume[@]}"
  healed+=("$out"); labels+=(--label "$name")
done
for split in valid:"$VALID" test:"$TEST"; do
  ff eval "$MODEL" "$WORK/fused/fused" "${healed[@]}" --reference "$MODEL" "${labels[@]}" --data "${split#*:}" \
    --out "$WORK/eval_${split%%:*}.json"
done
