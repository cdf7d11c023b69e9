#!/usr/bin/env bash
# Native programs (kiln compile --emit exe): the commands of docs/measurements.md, section 4.
#
#   tools/measure_native.sh [PART...]      (default: every part, in this order)
#
# Parts: build (the programs; kiln compile prints their sizes), bits (same bits as kiln
# run), speed (program against the JIT, alternating), startup (whole-process times,
# resident memory), smollm2 (tokens, start-up and decode speed of the bits=4.5 programs),
# cpus (programs for x86-64-v2).
#
# Needs examples/fetch.sh, a release build (cargo build --release: kiln and
# libkiln_native.a), a C compiler (cc), the peers' Python (../shared/peers/setup.sh) to
# write the 1 x 128 input and read the greedy fixture, and the held-out sets of
# tools/heldout_sets.py (see docs/measurements.md). Programs and artifacts go to
# $KILN_MEASURE_OUT (the artifacts as tools/measure_compression.sh writes them).
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/measure_common.sh

H=$HELDOUT/minilm_heldout.safetensors
ONE128=$OUT/one128.safetensors
Q=$OUT/smollm2-bits4.5.kiln

# The greedy fixture's prompt, as comma-separated ids.
prompt_ids() {
  "$PY" -c 'import sys; from safetensors.numpy import load_file
print(",".join(map(str, load_file(sys.argv[1])["prompt_ids"].reshape(-1))))' \
    "$FIXTURES/smollm2_greedy.safetensors"
}

need() {
  [ -e "$1" ] || { echo "missing $1: run tools/measure_native.sh build first" >&2; exit 1; }
}

build() {
  mkdir -p "$OUT"
  section "the 1 x 128 MiniLM input (ids 1000..1127, mask all ones)"
  "$PY" - "$ONE128" <<'EOF'
import sys
import numpy as np
from safetensors.numpy import save_file
ids = np.arange(1000, 1128, dtype=np.int64).reshape(1, 128)
save_file({"input_ids": ids, "attention_mask": np.ones_like(ids)}, sys.argv[1])
EOF
  echo "wrote $ONE128"
  section "artifacts (as tools/measure_compression.sh compiles them)"
  [ -s "$OUT/minilm-w8a8.kiln" ] || run "$KILN" compile "$MINILM_SPEC" -w "$MINILM_W" \
    --passes "quantize(format=int8, activations=int8)" --calib "$HELDOUT/minilm_calib.safetensors" \
    -o "$OUT/minilm-w8a8.kiln"
  [ -s "$Q" ] || run "$KILN" compile "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --passes "quantize(bits=4.5)" \
    --calib "$FIXTURES/smollm2_dev.safetensors" -o "$Q"
  section "programs (sizes as kiln compile prints them)"
  TIMEFORMAT="compile: %R s"
  time run "$KILN" compile "$MINILM_SPEC" -w "$MINILM_W" --emit exe -o "$OUT/minilm"
  time run "$KILN" compile "$OUT/minilm-w8a8.kiln" --emit exe -o "$OUT/w8a8"
  time run "$KILN" compile "$Q" --emit exe -o "$OUT/q"
  time run "$KILN" compile "$Q" --emit exe --activations int8 -o "$OUT/q-int8"
}

bits() {
  need "$OUT/minilm"
  section "MiniLM program against kiln run, 256 held-out sentences"
  run "$OUT/minilm" -i "$H" -o "$OUT/a.st" --threads 2
  run "$KILN" run "$MINILM_SPEC" -w "$MINILM_W" -i "$H" -o "$OUT/b.st" --threads 1
  run cmp "$OUT/a.st" "$OUT/b.st" && echo "identical"
  section "W8A8 program against kiln run"
  run "$OUT/w8a8" -i "$H" -o "$OUT/a8.st" --threads 2
  run "$KILN" run "$OUT/minilm-w8a8.kiln" -i "$H" -o "$OUT/b8.st" --threads 1
  run cmp "$OUT/a8.st" "$OUT/b8.st" && echo "identical"
}

speed() {
  need "$OUT/minilm"
  for round in 1 2 3; do
    section "round $round: MiniLM 1 x 128, program / JIT (the program also prints when its engine is ready)"
    run "$OUT/minilm" -i "$ONE128" --runs 30 --threads 2
    run "$KILN" bench "$MINILM_SPEC" -w "$MINILM_W" --shape batch=1,seq=128 --runs 30 --threads 2
  done
}

startup() {
  need "$OUT/minilm"
  TIMEFORMAT="%R s"
  section "MiniLM program, whole process, ten runs"
  for _ in 1 2 3 4 5 6 7 8 9 10; do time "$OUT/minilm" -i "$ONE128" -o "$OUT/o.st"; done
  section "kiln run, the same, ten runs"
  for _ in 1 2 3 4 5 6 7 8 9 10; do time "$KILN" run "$MINILM_SPEC" -w "$MINILM_W" -i "$ONE128" -o "$OUT/o.st"; done
  section "resident memory of the MiniLM program"
  run /usr/bin/time -f "max resident: %M KB" "$OUT/minilm" -i "$ONE128" -o "$OUT/o.st"
  section "kiln bench's MiniLM engine (load_ms: ready after)"
  run "$KILN" bench "$MINILM_SPEC" -w "$MINILM_W" --shape batch=1,seq=128 --json
  section "W8A8 program (packs its int8 panels at start-up: ready in)"
  run "$OUT/w8a8" -i "$ONE128" --runs 30
}

smollm2() {
  need "$OUT/q"
  local ids
  ids=$(prompt_ids)
  section "greedy fixture's prompt, 32 tokens: program, then kiln generate (f32, then int8 activations)"
  run "$OUT/q" --prompt-ids "$ids" --max-tokens 32 --json
  run "$KILN" generate "$Q" --prompt-ids "$ids" --max-tokens 32 --json
  run "$OUT/q-int8" --prompt-ids "$ids" --max-tokens 32 --json
  run "$KILN" generate "$Q" --prompt-ids "$ids" --max-tokens 32 --json --activations int8
  section "start-up: one token, whole process (int8 activations, then f32)"
  TIMEFORMAT="%R s"
  for _ in 1 2 3 4 5; do time "$OUT/q-int8" --prompt-ids "$ids" --max-tokens 1 --threads 2; done
  for _ in 1 2 3 4 5; do time "$OUT/q" --prompt-ids "$ids" --max-tokens 1 --threads 2; done
  for round in 1 2 3; do
    section "round $round: decoding 64 tokens, int8 activations: program / kiln generate (ms/token on stderr)"
    run "$OUT/q-int8" --prompt-ids "$ids" --max-tokens 64 --ignore-eos --threads 2
    run "$KILN" generate "$Q" --prompt-ids "$ids" --max-tokens 64 --ignore-eos --activations int8 --threads 2
  done
}

cpus() {
  need "$OUT/minilm"
  section "MiniLM for x86-64-v2 against kiln run"
  run "$KILN" compile "$MINILM_SPEC" -w "$MINILM_W" --emit exe --target-cpu x86-64-v2 -o "$OUT/minilm-v2"
  run "$OUT/minilm-v2" -i "$H" -o "$OUT/v2.st" --threads 2
  run "$KILN" run "$MINILM_SPEC" -w "$MINILM_W" -i "$H" -o "$OUT/b.st" --threads 1
  run cmp "$OUT/v2.st" "$OUT/b.st" && echo "identical"
  section "SmolLM2 bits=4.5 for x86-64-v2 (ms/token on stderr)"
  run "$KILN" compile "$Q" --emit exe --target-cpu x86-64-v2 -o "$OUT/q-v2"
  run "$OUT/q-v2" --prompt-ids "$(prompt_ids)" --max-tokens 8 --threads 2
}

parts=${*:-build bits speed startup smollm2 cpus}
for part in $parts; do
  case $part in
    build | bits | speed | startup | smollm2 | cpus) "$part" ;;
    *)
      echo "unknown part $part (parts: build bits speed startup smollm2 cpus)" >&2
      exit 2
      ;;
  esac
done
