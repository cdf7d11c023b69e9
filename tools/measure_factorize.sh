#!/usr/bin/env bash
# Factorization: the commands of docs/measurements.md, section 6 (size, held-out fidelity
# and compile time of factorize pipelines).
#
#   tools/measure_factorize.sh [minilm|smollm2|all]      (default: all)
#
# Needs examples/fetch.sh, a release build and the held-out sets of tools/heldout_sets.py in
# $KILN_HELDOUT (see docs/measurements.md). Calibration as issue 16 sets it: the dev
# fixtures (MiniLM: the 64 dev sentences of minilm_calib; SmolLM2: the 16 dev sequences);
# evaluation on the held-out sets, whose text is in no fixture. Prints each command, then
# its output; `compile: S s` is the wall time of the compile.
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/measure_common.sh
which=${1:-all}
MINILM_CALIB=$HELDOUT/minilm_calib.safetensors
SMOLLM2_CALIB=$FIXTURES/smollm2_dev.safetensors
TIMEFORMAT="compile: %R s"

for f in "$HELDOUT/minilm_heldout.safetensors" "$HELDOUT/smollm2_heldout.safetensors" "$MINILM_CALIB"; do
  [ -s "$f" ] || { echo "missing $f: run tools/heldout_sets.py (see docs/measurements.md)" >&2; exit 1; }
done
mkdir -p "$OUT"

# compile NAME SPEC WEIGHTS PASSES CALIB: writes $OUT/NAME.kiln; prints its time and size.

if [ "$which" = minilm ] || [ "$which" = all ]; then
  section "MiniLM f32 on the held-out sentences"
  run "$KILN" eval "$MINILM_SPEC" -w "$MINILM_W" --data "$HELDOUT/minilm_heldout.safetensors" --json
  for passes in "factorize(keep=0.9)" "factorize(keep=0.9, heal=false)" \
    "factorize(keep=0.9, allocate=uniform, heal=false)" "factorize(keep=0.9, allocate=uniform)" \
    "factorize(keep=0.75)" "factorize(keep=0.75, allocate=uniform, heal=false)" \
    "quantize(bits=4.5)" "factorize(keep=0.9), quantize(bits=4.5)" \
    "factorize(method=tt, keep=0.9)" "factorize(method=tt, keep=0.9, allocate=uniform)" \
    "factorize(method=tt, keep=0.75)"; do
    section "MiniLM $passes"
    compile minilm-factorize "$MINILM_SPEC" "$MINILM_W" "$passes" "$MINILM_CALIB"
    run "$KILN" eval "$OUT/minilm-factorize.kiln" --data "$HELDOUT/minilm_heldout.safetensors" --json
  done
fi

if [ "$which" = smollm2 ] || [ "$which" = all ]; then
  section "SmolLM2 (Q4_1 file, f32 compute) on the held-out sequences"
  run "$KILN" eval "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --data "$HELDOUT/smollm2_heldout.safetensors" --json
  for passes in "factorize(keep=0.9)" "factorize(keep=0.9, heal=false)" \
    "factorize(keep=0.9, allocate=uniform, heal=false)" "factorize(keep=0.75)" \
    "factorize(keep=0.75, allocate=uniform, heal=false)" "factorize(keep=0.8), quantize(bits=4)" \
    "quantize(bits=4)" "quantize(bits=4.5)" \
    "factorize(method=tt, keep=0.9)" "factorize(method=tt, keep=0.9, allocate=uniform)" \
    "factorize(method=tt, keep=0.75)"; do
    section "SmolLM2 $passes"
    compile smollm2-factorize "$SMOLLM2_SPEC" "$SMOLLM2_W" "$passes" "$SMOLLM2_CALIB"
    run "$KILN" eval "$OUT/smollm2-factorize.kiln" --data "$HELDOUT/smollm2_heldout.safetensors" --json
  done
fi
