#!/usr/bin/env bash
# Speed against the peers, and the kernel timings behind the design decisions: the commands
# of docs/measurements.md, sections 3 and 5.
#
#   tools/measure_speed.sh [PART...]      (default: every part, in this order)
#
# Parts: sitting (3.1), compressed (3.2), decode (3.2), f32 (3.3), profile (3.4),
# load (3.5), kernels (5).
#
# Needs examples/fetch.sh, a release build (cargo build --release), the peers
# (../shared/peers/setup.sh) and, for the artifacts it compiles when they are missing, the
# held-out sets of tools/heldout_sets.py (see docs/measurements.md). Peers and kiln run
# with 2 threads, one after the other, so that their numbers share a sitting: compare
# ratios within a run of this script, not numbers across runs.
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/measure_common.sh
BENCH_PY=../shared/peers/bench.py

# artifact NAME SPEC WEIGHTS PASSES CALIB: $OUT/NAME.kiln, compiled as in
# tools/measure_compression.sh unless it is there already.
artifact() {
  [ -s "$OUT/$1.kiln" ] && return 0
  run "$KILN" compile "$2" -w "$3" --passes "$4" --calib "$5" -o "$OUT/$1.kiln"
}

artifacts() {
  mkdir -p "$OUT"
  artifact minilm-w8a8-row "$MINILM_SPEC" "$MINILM_W" "quantize(format=int8, activations=int8-row)" \
    "$HELDOUT/minilm_calib.safetensors"
  artifact minilm-w8a8 "$MINILM_SPEC" "$MINILM_W" "quantize(format=int8, activations=int8)" \
    "$HELDOUT/minilm_calib.safetensors"
  artifact minilm-bits4.5 "$MINILM_SPEC" "$MINILM_W" "quantize(bits=4.5)" "$HELDOUT/minilm_calib.safetensors"
  artifact minilm-bits4.5-docs "$MINILM_SPEC" "$MINILM_W" "quantize(bits=4.5)" \
    "$HELDOUT/minilm_calib_docs.safetensors"
  artifact minilm-fp8 "$MINILM_SPEC" "$MINILM_W" "quantize(format=fp8)" "$HELDOUT/minilm_calib.safetensors"
  artifact smollm2-bits4.5 "$SMOLLM2_SPEC" "$SMOLLM2_W" "quantize(bits=4.5)" "$FIXTURES/smollm2_dev.safetensors"
}

# 3.1: the peers, then every kiln case, in one sitting.
sitting() {
  artifacts
  section "Peers (bench.py all)"
  run "$PY" "$BENCH_PY" all
  section "kiln, MiniLM: f32, W8A8 int8-row, W8A8 int8, bits=4.5 dev / docs, fp8 (1 x 128)"
  run "$KILN" bench "$MINILM_SPEC" -w "$MINILM_W" --shape batch=1,seq=128 --runs 30 --threads 2 --json
  for a in w8a8-row w8a8 bits4.5 bits4.5-docs fp8; do
    run "$KILN" bench "$OUT/minilm-$a.kiln" --shape batch=1,seq=128 --runs 30 --threads 2 --json
  done
  section "kiln, MiniLM 32 x 128: f32, W8A8 int8-row"
  run "$KILN" bench "$MINILM_SPEC" -w "$MINILM_W" --shape batch=32,seq=128 --runs 30 --threads 2 --json
  run "$KILN" bench "$OUT/minilm-w8a8-row.kiln" --shape batch=32,seq=128 --runs 30 --threads 2 --json
  section "kiln, SmolLM2 Q4_1 file: --activations int8, exact (prefill_ms, median_ms per token)"
  run "$KILN" bench "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --decode 64 --prompt-len 128 --activations int8 \
    --threads 2 --json
  run "$KILN" bench "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --decode 64 --prompt-len 128 --threads 2 --json
  section "kiln, SmolLM2 bits=4.5: --activations int8, exact"
  run "$KILN" bench "$OUT/smollm2-bits4.5.kiln" --decode 64 --prompt-len 128 --activations int8 \
    --threads 2 --json
  run "$KILN" bench "$OUT/smollm2-bits4.5.kiln" --decode 64 --prompt-len 128 --threads 2 --json
}

# 3.2: MiniLM f32 / fp8 / bits=4.5 (docs) / W8A8, three alternating rounds.
compressed() {
  artifacts
  for round in 1 2 3; do
    section "round $round: MiniLM 1 x 128, f32 / fp8 / bits=4.5 (docs) / W8A8"
    run "$KILN" bench "$MINILM_SPEC" -w "$MINILM_W" --shape batch=1,seq=128 --runs 30 --threads 2
    for a in fp8 bits4.5-docs w8a8; do
      run "$KILN" bench "$OUT/minilm-$a.kiln" --shape batch=1,seq=128 --runs 30 --threads 2
    done
  done
}

# 3.2: SmolLM2 bits=4.5 decoding against llama.cpp, three alternating rounds.
decode() {
  artifacts
  for round in 1 2 3; do
    section "round $round: SmolLM2 decode, llama.cpp (Q4_1 file) / kiln bits=4.5"
    run "$PY" "$BENCH_PY" smollm2
    run "$KILN" bench "$OUT/smollm2-bits4.5.kiln" --decode 64 --prompt-len 128 --activations int8 --threads 2
  done
}

# 3.3: MiniLM f32 against PyTorch and ONNX Runtime, five alternating rounds.
f32() {
  for round in 1 2 3 4 5; do
    section "round $round: MiniLM f32, peers / kiln 1 x 128 / kiln 32 x 128"
    run "$PY" "$BENCH_PY" minilm
    run "$KILN" bench "$MINILM_SPEC" -w "$MINILM_W" --shape batch=1,seq=128 --runs 30 --threads 2 --json
    run "$KILN" bench "$MINILM_SPEC" -w "$MINILM_W" --shape batch=32,seq=128 --runs 10 --threads 2 --json
  done
}

# 3.4 (and 5): time per op and per linear shape, on stderr.
profile() {
  section "MiniLM 1 x 128 profile"
  run "$KILN" bench "$MINILM_SPEC" -w "$MINILM_W" --shape batch=1,seq=128 --runs 30 --threads 2 --profile
}

# 3.5: compile_ms and load_ms of kiln bench's JSON.
load() {
  section "compile_ms, load_ms: MiniLM, SmolLM2, SmolLM2 with int8 activations"
  run "$KILN" bench "$MINILM_SPEC" -w "$MINILM_W" --shape batch=1,seq=128 --json
  run "$KILN" bench "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --shape batch=1,seq=128 --json
  run "$KILN" bench "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --shape batch=1,seq=128 --activations int8 --json
}

# 5: single-kernel timings (one thread).
kernels() {
  section "opt_level none / speed"
  run cargo run --release -p kiln-jit --example linear_timing -- --best --opt none --formats f32,q4_1 \
    --shapes 576x1536
  run cargo run --release -p kiln-jit --example linear_timing -- --best --opt speed --formats f32,q4_1 \
    --shapes 576x1536
  section "emitted f32 kernel against matrixmultiply"
  run cargo run --release -p kiln-jit --example linear_timing -- --best --formats f32 --shapes 576x576
  section "sgemm"
  run cargo run --release -p kiln-exec --example sgemm_timing
  section "int8 weights from DRAM, stored and packed"
  run cargo run --release -p kiln-jit --example i8_timing -- --cold --formats q8_0,q4_1 \
    --shapes 576x49152,576x1536 --panels 0,16
  section "gemm_q8 against gemm_i8"
  run cargo run --release -p kiln-jit --example i8_timing -- --formats q8_0 \
    --shapes 384x384,384x1536,1536x384 --m 128 --panel 16
  section "per-row W8A8"
  run cargo run --release -p kiln-jit --example row_timing
}

parts=${*:-sitting compressed decode f32 profile load kernels}
for part in $parts; do
  case $part in
    sitting | compressed | decode | f32 | profile | load | kernels) "$part" ;;
    *)
      echo "unknown part $part (parts: sitting compressed decode f32 profile load kernels)" >&2
      exit 2
      ;;
  esac
done
