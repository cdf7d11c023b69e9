#!/usr/bin/env bash
# Pruning: the commands of docs/measurements.md, section 7 (size and held-out fidelity of
# prune and drop pipelines).
#
#   tools/measure_prune.sh [minilm|smollm2|drop|size|all]      (default: all)
#
# Needs examples/fetch.sh, a release build and the held-out sets of tools/heldout_sets.py in
# $KILN_HELDOUT. Calibration on the dev fixtures, evaluation on the held-out sets, as
# tools/measure_factorize.sh does. Prints each command, then its output.
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/measure_common.sh
which=${1:-all}
MINILM_CALIB=$HELDOUT/minilm_calib.safetensors
SMOLLM2_CALIB=$FIXTURES/smollm2_dev.safetensors
TIMEFORMAT="compile: %R s"
mkdir -p "$OUT"


PIPELINES=(
  "prune(sparsity=0.5, method=magnitude)"
  "prune(sparsity=0.5, method=wanda)"
  "prune(sparsity=0.5)"
  "prune(sparsity=0.5, damp=0.01)"
  "prune(pattern=2:4, method=wanda)"
  "prune(pattern=2:4)"
  "prune(pattern=2:4, damp=0.01)"
)
if [ "$which" = minilm ] || [ "$which" = all ]; then
  for passes in "${PIPELINES[@]}"; do
    section "MiniLM $passes"
    compile minilm-prune "$MINILM_SPEC" "$MINILM_W" "$passes" "$MINILM_CALIB"
    run "$KILN" eval "$OUT/minilm-prune.kiln" --data "$HELDOUT/minilm_heldout.safetensors" --json
  done
fi
if [ "$which" = smollm2 ] || [ "$which" = all ]; then
  for passes in "${PIPELINES[@]}"; do
    section "SmolLM2 $passes"
    compile smollm2-prune "$SMOLLM2_SPEC" "$SMOLLM2_W" "$passes" "$SMOLLM2_CALIB"
    run "$KILN" eval "$OUT/smollm2-prune.kiln" --data "$HELDOUT/smollm2_heldout.safetensors" --json
    # The calibration text itself: how closely the method fits the rows it saw.
    run "$KILN" eval "$OUT/smollm2-prune.kiln" --data "$SMOLLM2_CALIB" --json
  done
fi
if [ "$which" = drop ] || [ "$which" = all ]; then
  for passes in "drop(blocks=3)" "drop(blocks=6)"; do
    section "SmolLM2 $passes"
    compile smollm2-drop "$SMOLLM2_SPEC" "$SMOLLM2_W" "$passes" "$SMOLLM2_CALIB"
    run "$KILN" eval "$OUT/smollm2-drop.kiln" --data "$HELDOUT/smollm2_heldout.safetensors" --json
  done
fi
if [ "$which" = size ] || [ "$which" = all ]; then
  # Sizes only (no calibration): each pruned pipeline beside the dense one of the same format.
  for passes in "quantize(format=int8)" "prune(sparsity=0.5, method=magnitude), quantize(format=int8)" \
    "quantize(format=int4g64a)" "prune(pattern=2:4, method=magnitude), quantize(format=int4g64a)"; do
    for model in minilm smollm2; do
      section "$model $passes (size)"
      if [ $model = minilm ]; then spec=$MINILM_SPEC w=$MINILM_W; else spec=$SMOLLM2_SPEC w=$SMOLLM2_W; fi
      run "$KILN" compile "$spec" -w "$w" --passes "$passes" -o "$OUT/$model-size.kiln"
      echo "size: $(stat -c %s "$OUT/$model-size.kiln") bytes"
    done
  done
fi
