#!/usr/bin/env bash
# Factorization's speed (issue 16, item 5): a forward pass at keep=0.5 against the dense
# model in the same weight format, measured side by side in one run, alternating.
#
#   tools/measure_factorize_speed.sh [ROUNDS]      (default: 5)
#
# MiniLM at 1 x 128, f32 weights: `factorize(keep=0.5)` against the f32 model. SmolLM2
# decode (64 tokens after 128) with int8 activations: `factorize(keep=0.5),
# quantize(format=int8g32, method=rtn)` against `quantize(format=int8g32, method=rtn)`.
# Each round runs `kiln bench` on both (median of its runs); the script prints every
# median, then the least median of each side over the rounds and their ratio (the least,
# because other work on a shared machine only ever adds time). Needs examples/fetch.sh,
# a release build and the dev fixtures (calibration).
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/measure_common.sh
ROUNDS=${1:-5}
MINILM_CALIB=$HELDOUT/minilm_calib.safetensors
[ -s "$MINILM_CALIB" ] || MINILM_CALIB=$FIXTURES/minilm_dev.safetensors
SMOLLM2_CALIB=$FIXTURES/smollm2_dev.safetensors
mkdir -p "$OUT"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) threads;" \
  "avx512: $(grep -qm1 avx512f /proc/cpuinfo && echo yes || echo no)"

compile() { # NAME SPEC WEIGHTS PASSES CALIB
  [ -s "$OUT/$1.kiln" ] && [ -z "${REBUILD:-}" ] && return
  run "$KILN" compile "$2" -w "$3" --passes "$4" --calib "$5" -o "$OUT/$1.kiln" 2>&1 | tail -1
}
median() { python3 -c "import json,sys; print(json.load(sys.stdin)['median_ms'])"; }

compile minilm-keep0.5 "$MINILM_SPEC" "$MINILM_W" "factorize(keep=0.5)" "$MINILM_CALIB"
compile smollm2-int8g32 "$SMOLLM2_SPEC" "$SMOLLM2_W" "quantize(format=int8g32, method=rtn)" "$SMOLLM2_CALIB"
compile smollm2-keep0.5-int8g32 "$SMOLLM2_SPEC" "$SMOLLM2_W" \
  "factorize(keep=0.5), quantize(format=int8g32, method=rtn)" "$SMOLLM2_CALIB"

pair() { # LABEL DENSE_ARGS... -- FACTORED_ARGS...
  local label=$1; shift
  local dense=() factored=()
  while [ "$1" != -- ]; do dense+=("$1"); shift; done; shift
  factored=("$@")
  local best_d=1e9 best_f=1e9
  for round in $(seq "$ROUNDS"); do
    d=$("$KILN" bench "${dense[@]}" --json 2>/dev/null | median)
    f=$("$KILN" bench "${factored[@]}" --json 2>/dev/null | median)
    echo "$label round $round: dense $d ms, keep=0.5 $f ms"
    best_d=$(python3 -c "print(min($best_d, $d))"); best_f=$(python3 -c "print(min($best_f, $f))")
  done
  echo "$label: dense $best_d ms, keep=0.5 $best_f ms, ratio $(python3 -c "print(round($best_f / $best_d, 3))")"
}

section "MiniLM 1 x 128, f32 weights"
pair minilm "$MINILM_SPEC" -w "$MINILM_W" --shape batch=1,seq=128 --runs 30 -- \
  "$OUT/minilm-keep0.5.kiln" --shape batch=1,seq=128 --runs 30
section "SmolLM2 decode 64 after 128, int8g32 weights, int8 activations"
pair smollm2 "$OUT/smollm2-int8g32.kiln" --decode 64 --prompt-len 128 --activations int8 -- \
  "$OUT/smollm2-keep0.5-int8g32.kiln" --decode 64 --prompt-len 128 --activations int8
section "MiniLM keep=0.5: where the time goes"
run "$KILN" bench "$OUT/minilm-keep0.5.kiln" --shape batch=1,seq=128 --runs 30 --profile 2>&1 >/dev/null | tail -3
