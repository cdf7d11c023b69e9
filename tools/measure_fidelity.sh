#!/usr/bin/env bash
# Fidelity against PyTorch: the commands of docs/measurements.md, section 1.
#
#   tools/measure_fidelity.sh
#
# Needs examples/fetch.sh, a release build (cargo build --release) and the peers' Python
# (../shared/peers/setup.sh) for tools/heldout_check.py and for reading the greedy fixture.
# Prints each command, then its output (JSON from kiln eval and kiln generate).
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/measure_common.sh

PROMPT="The key idea of post-training quantization is"

mkdir -p "$OUT"

section "MiniLM vs PyTorch, 300 dev sentences"
for engine in jit interp; do
  run "$KILN" eval "$MINILM_SPEC" -w "$MINILM_W" --data "$FIXTURES/minilm_dev.safetensors" \
    --batch 32 --json --engine "$engine"
done

section "SmolLM2 vs PyTorch, 16 x 128 dev tokens"
for engine in jit interp; do
  run "$KILN" eval "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --data "$FIXTURES/smollm2_dev.safetensors" \
    --json --engine "$engine"
done

section "SmolLM2, int8 activations"
run "$KILN" eval "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --data "$FIXTURES/smollm2_dev.safetensors" \
  --json --activations int8

section "SmolLM2 greedy generation (compare with the fixture's ids)"
echo "fixture: $("$PY" -c 'import sys; from safetensors.numpy import load_file
print(",".join(map(str, load_file(sys.argv[1])["generated_ids"].reshape(-1))))' \
  "$FIXTURES/smollm2_greedy.safetensors")"
for engine in jit interp; do
  run "$KILN" generate "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --prompt "$PROMPT" --max-tokens 32 \
    --json --engine "$engine"
done
run "$KILN" compile "$SMOLLM2_SPEC" -w "$SMOLLM2_W" -o "$OUT/smollm2.kiln"
run "$KILN" generate "$OUT/smollm2.kiln" --prompt "$PROMPT" --max-tokens 32 --json

section "Held-out text vs PyTorch"
# heldout_check.py runs target/release/kiln (not $KILN) and reads $KILN_MODELS.
run "$PY" tools/heldout_check.py --engine jit
