#!/usr/bin/env bash
# Layer tying: the commands of docs/measurements.md, section 8 (the similarity of blocks,
# held-out fidelity, size and decode speed of tied models).
#
#   tools/measure_tie.sh [similarity|quality|size|speed|all]   (default: all)
#
# Needs examples/fetch.sh, a release build and the held-out sets of tools/heldout_sets.py in
# $KILN_HELDOUT. Calibration on the dev fixtures, evaluation on the held-out sets, as
# tools/measure_prune.sh does. Prints each command, then its output.
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/measure_common.sh
which=${1:-all}
MINILM_CALIB=$HELDOUT/minilm_calib.safetensors
SMOLLM2_CALIB=$FIXTURES/smollm2_dev.safetensors
TIMEFORMAT="compile: %R s"
mkdir -p "$OUT"
# SmolLM2: 8 pairs of adjacent late blocks (COMPRESSION.md's PyTorch experiment).
PAIRS="[[14,15],[16,17],[18,19],[20,21],[22,23],[24,25],[26,27],[28,29]]"

if [ "$which" = similarity ] || [ "$which" = all ]; then
  section "MiniLM similarity"
  run "$KILN" analyze "$MINILM_SPEC" -w "$MINILM_W" --calib "$MINILM_CALIB" --similarity --plot "$OUT/minilm-similarity.svg"
  section "SmolLM2 similarity"
  run "$KILN" analyze "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --calib "$SMOLLM2_CALIB" --similarity --plot "$OUT/smollm2-similarity.svg"
fi
if [ "$which" = quality ] || [ "$which" = all ]; then
  for passes in "tie(groups=$PAIRS, delta_rank=64)" "tie(groups=$PAIRS, delta_rank=128)" "tie(groups=$PAIRS, delta_rank=0)" \
    "tie(keep=0.87)"; do
    section "SmolLM2 $passes"
    compile smollm2-tie "$SMOLLM2_SPEC" "$SMOLLM2_W" "$passes" "$SMOLLM2_CALIB"
    run "$KILN" eval "$OUT/smollm2-tie.kiln" --data "$HELDOUT/smollm2_heldout.safetensors" --json
    run "$KILN" eval "$OUT/smollm2-tie.kiln" --data "$SMOLLM2_CALIB" --json
  done
  for passes in "tie(groups=[[4,5]], delta_rank=64)" "tie(groups=[[2,3],[4,5]], delta_rank=64)" \
    "tie(groups=[[2,3],[4,5]], delta_rank=128)" "tie(keep=0.9)"; do
    section "MiniLM $passes"
    compile minilm-tie "$MINILM_SPEC" "$MINILM_W" "$passes" "$MINILM_CALIB"
    run "$KILN" eval "$OUT/minilm-tie.kiln" --data "$HELDOUT/minilm_heldout.safetensors" --json
  done
fi
if [ "$which" = size ] || [ "$which" = all ]; then
  for passes in "quantize(bits=4.5)" "tie(groups=$PAIRS, delta_rank=64), quantize(bits=4.5)"; do
    section "SmolLM2 $passes"
    compile smollm2-tie-q "$SMOLLM2_SPEC" "$SMOLLM2_W" "$passes" "$SMOLLM2_CALIB"
    run "$KILN" eval "$OUT/smollm2-tie-q.kiln" --data "$HELDOUT/smollm2_heldout.safetensors" --json
  done
fi
if [ "$which" = speed ] || [ "$which" = all ]; then
  # Tied against untied at the same value format, three alternating rounds.
  lscpu | grep -m1 "Model name"
  run "$KILN" compile "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --passes "quantize(format=int8)" -o "$OUT/s-int8.kiln" 2>&1 | tail -n 1
  run "$KILN" compile "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --passes "tie(groups=$PAIRS, delta_rank=64), quantize(format=int8)" \
    -o "$OUT/s-tie-int8.kiln" 2>&1 | tail -n 1
  for round in 1 2 3; do
    for name in s-int8 s-tie-int8; do
      printf '%s round %s: ' "$name" "$round"
      "$KILN" bench "$OUT/$name.kiln" --decode 32 --prompt-len 64 --json
    done
  done
fi
