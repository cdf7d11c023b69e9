# The settings and helpers every tools/measure_*.sh shares; sourced, not run.
# Override any path by its variable: KILN, KILN_MODELS, KILN_FIXTURES, KILN_HELDOUT,
# KILN_PEERS_CACHE, KILN_MEASURE_OUT.

KILN=${KILN:-target/release/kiln}
MODELS=${KILN_MODELS:-$HOME/.cache/kiln/models}
FIXTURES=${KILN_FIXTURES:-../shared/fixtures}
HELDOUT=${KILN_HELDOUT:-$HOME/.cache/kiln/heldout}
PEERS=${KILN_PEERS_CACHE:-$HOME/.cache/kiln-peers}
OUT=${KILN_MEASURE_OUT:-/tmp/kiln-measure}
PY=$PEERS/venv/bin/python

MINILM_SPEC=examples/minilm/minilm.kiln
MINILM_W=$MODELS/minilm/model.safetensors
SMOLLM2_SPEC=examples/smollm2/smollm2.kiln
SMOLLM2_W=$MODELS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

run() { # prints a command, then runs it
  echo "+ $*" >&2
  "$@"
}
section() { printf '\n== %s\n' "$*"; }
compile() { # NAME SPEC WEIGHTS PASSES CALIB: compiles to $OUT/NAME.kiln, timed, and prints its size
  echo "+ $KILN compile $2 -w $3 --passes \"$4\" --calib $5 -o $OUT/$1.kiln" >&2
  time "$KILN" compile "$2" -w "$3" --passes "$4" --calib "$5" -o "$OUT/$1.kiln"
  echo "size: $(stat -c %s "$OUT/$1.kiln") bytes"
}
