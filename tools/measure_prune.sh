#!/usr/bin/env bash
# Pruning: the commands of docs/measurements.md, section 7 (size and held-out fidelity of
# prune and drop pipelines).
#
#   tools/measure_prune.sh [minilm|smollm2|drop|size|compose|structured|speed|all]   (default: all)
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
  "prune(sparsity=0.5, adaptive=true)"
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
  for passes in "drop(blocks=3)" "drop(blocks=3, refit=true)" "drop(blocks=6)"; do
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
if [ "$which" = compose ] || [ "$which" = all ]; then
  # Pruned, then quantized with calibration: GPTQ on the kept values (quantize's default
  # with --calib) against rounding them to nearest, beside the dense model so quantized.
  for passes in "quantize(format=int4g64a)" "prune(pattern=2:4), quantize(format=int4g64a)" \
    "prune(pattern=2:4), quantize(format=int4g64a, method=rtn)" "prune(sparsity=0.5), quantize(format=int4g64a)" \
    "prune(sparsity=0.5), quantize(format=int4g64a, method=rtn)"; do
    section "MiniLM $passes"
    compile minilm-compose "$MINILM_SPEC" "$MINILM_W" "$passes" "$MINILM_CALIB"
    run "$KILN" eval "$OUT/minilm-compose.kiln" --data "$HELDOUT/minilm_heldout.safetensors" --json
    section "SmolLM2 $passes"
    compile smollm2-compose "$SMOLLM2_SPEC" "$SMOLLM2_W" "$passes" "$SMOLLM2_CALIB"
    run "$KILN" eval "$OUT/smollm2-compose.kiln" --data "$HELDOUT/smollm2_heldout.safetensors" --json
  done
fi
if [ "$which" = structured ] || [ "$which" = all ]; then
  # Heads and channels: held-out fidelity of each refit, calibrated on the dev rows and on
  # the docstring calibration set (text of the held-out kind).
  for passes in "prune(heads=0.25, channels=0.25, refit=none)" "prune(heads=0.25, channels=0.25)" \
    "prune(heads=0.25, channels=0.25, refit=reference)"; do
    section "MiniLM $passes"
    compile minilm-structured "$MINILM_SPEC" "$MINILM_W" "$passes" "$MINILM_CALIB"
    run "$KILN" eval "$OUT/minilm-structured.kiln" --data "$HELDOUT/minilm_heldout.safetensors" --json
  done
  section "MiniLM prune(heads=0.25, channels=0.25), docstring calibration"
  compile minilm-structured "$MINILM_SPEC" "$MINILM_W" "prune(heads=0.25, channels=0.25)" \
    "$HELDOUT/minilm_calib_docs.safetensors"
  run "$KILN" eval "$OUT/minilm-structured.kiln" --data "$HELDOUT/minilm_heldout.safetensors" --json
  for passes in "prune(channels=0.25)" "prune(heads=0.34, channels=0.25)"; do
    section "SmolLM2 $passes"
    compile smollm2-structured "$SMOLLM2_SPEC" "$SMOLLM2_W" "$passes" "$SMOLLM2_CALIB"
    run "$KILN" eval "$OUT/smollm2-structured.kiln" --data "$HELDOUT/smollm2_heldout.safetensors" --json
  done
fi
if [ "$which" = speed ] || [ "$which" = all ]; then
  # Sparse against dense of the same value format, side by side: three alternating rounds,
  # median of each (no calibration: speed does not depend on which weights are kept).
  lscpu | grep -m1 "Model name"
  bench_rounds() { # NAME... : three rounds over the artifacts, alternating
    for round in 1 2 3; do
      for name in "$@"; do
        printf '%s round %s: ' "$name" "$round"
        "$KILN" bench "$OUT/$name.kiln" $BENCH --json
      done
    done
  }
  build() { # NAME SPEC WEIGHTS PASSES
    run "$KILN" compile "$2" -w "$3" --passes "$4" -o "$OUT/$1.kiln" 2>&1 | tail -n 1
  }
  section "SmolLM2 decode (32 tokens after 64) and prefill (64 tokens), int8 values"
  build s-int8 "$SMOLLM2_SPEC" "$SMOLLM2_W" "quantize(format=int8)"
  build s-2of4-int8 "$SMOLLM2_SPEC" "$SMOLLM2_W" "prune(pattern=2:4, method=magnitude), quantize(format=int8)"
  build s-50-int8 "$SMOLLM2_SPEC" "$SMOLLM2_W" "prune(sparsity=0.5, method=magnitude), quantize(format=int8)"
  build s-70-int8 "$SMOLLM2_SPEC" "$SMOLLM2_W" "prune(sparsity=0.7, method=magnitude), quantize(format=int8)"
  BENCH="--decode 32 --prompt-len 64" bench_rounds s-int8 s-2of4-int8 s-50-int8 s-70-int8
  section "MiniLM 1 x 128, f32"
  build m-f32 "$MINILM_SPEC" "$MINILM_W" "dead_code"
  build m-heads-channels "$MINILM_SPEC" "$MINILM_W" "prune(heads=0.25, channels=0.25)"
  build m-2of4 "$MINILM_SPEC" "$MINILM_W" "prune(pattern=2:4, method=magnitude)"
  BENCH="--shape batch=1,seq=128" bench_rounds m-f32 m-heads-channels m-2of4
  section "MiniLM 1 x 1 (one row: the sparse kernel), f32"
  BENCH="--shape batch=1,seq=1" bench_rounds m-f32 m-2of4
fi
