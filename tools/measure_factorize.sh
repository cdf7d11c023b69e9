#!/usr/bin/env bash
# Factorization: the commands of docs/measurements.md, section 3 (fidelity and compile time
# of factorize pipelines).
#
#   tools/measure_factorize.sh [minilm|smollm2|all]      (default: all)
#
# Needs examples/fetch.sh, a release build and a Python with numpy and safetensors (the
# peers' venv, or any: KILN_PYTHON=/path/to/python). Splits the dev fixtures so that no
# evaluation row is a calibration row: MiniLM calibrates on sentences 0-63 and is compared
# with PyTorch on 64-299; SmolLM2 calibrates on sequences 0-7 and is evaluated on 8-15.
# These are dev rows, not the held-out sets of tools/heldout_sets.py.
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/measure_common.sh
which=${1:-all}
PY=${KILN_PYTHON:-$PY}
SPLIT=$OUT/split
TIMEFORMAT="compile: %R s"

mkdir -p "$SPLIT"
"$PY" - "$FIXTURES" "$SPLIT" <<'PYEOF'
import sys
from safetensors.numpy import load_file, save_file
fixtures, out = sys.argv[1], sys.argv[2]
d = load_file(f"{fixtures}/minilm_dev.safetensors")
save_file({k: v[:64].copy() for k, v in d.items() if k != "embeddings"}, f"{out}/minilm_calib.safetensors")
save_file({k: v[64:].copy() for k, v in d.items()}, f"{out}/minilm_eval.safetensors")
d = load_file(f"{fixtures}/smollm2_dev.safetensors")
save_file({"input_ids": d["input_ids"][:8].copy()}, f"{out}/smollm2_calib.safetensors")
save_file({k: v[8:].copy() for k, v in d.items()}, f"{out}/smollm2_eval.safetensors")
PYEOF

# compile NAME SPEC WEIGHTS PASSES CALIB: writes $OUT/NAME.kiln; prints its time.
compile() {
  echo "+ $KILN compile $2 -w $3 --passes \"$4\" --calib $5 -o $OUT/$1.kiln" >&2
  time "$KILN" compile "$2" -w "$3" --passes "$4" --calib "$5" -o "$OUT/$1.kiln"
}

if [ "$which" = minilm ] || [ "$which" = all ]; then
  section "MiniLM f32 on the evaluation rows"
  run "$KILN" eval "$MINILM_SPEC" -w "$MINILM_W" --data "$SPLIT/minilm_eval.safetensors" --json
  for passes in "factorize(keep=0.9)" "factorize(keep=0.9, allocate=errors)" \
    "factorize(keep=0.9, allocate=errors, method=svd)" "factorize(keep=0.75)" \
    "factorize(keep=0.75, allocate=errors)" "quantize(bits=4.5)" "factorize(keep=0.9), quantize(bits=4.5)"; do
    section "MiniLM $passes"
    compile minilm-factorize "$MINILM_SPEC" "$MINILM_W" "$passes" "$SPLIT/minilm_calib.safetensors"
    echo "size: $(stat -c %s "$OUT/minilm-factorize.kiln") bytes"
    run "$KILN" eval "$OUT/minilm-factorize.kiln" --data "$SPLIT/minilm_eval.safetensors" --json
  done
fi

if [ "$which" = smollm2 ] || [ "$which" = all ]; then
  section "SmolLM2 (Q4_1 file, f32 compute) on the evaluation rows"
  run "$KILN" eval "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --data "$SPLIT/smollm2_eval.safetensors" --json
  for passes in "factorize(keep=0.9)" "factorize(keep=0.9, allocate=errors)"; do
    section "SmolLM2 $passes"
    compile smollm2-factorize "$SMOLLM2_SPEC" "$SMOLLM2_W" "$passes" "$SPLIT/smollm2_calib.safetensors"
    echo "size: $(stat -c %s "$OUT/smollm2-factorize.kiln") bytes"
    run "$KILN" eval "$OUT/smollm2-factorize.kiln" --data "$SPLIT/smollm2_eval.safetensors" --json
  done
fi
