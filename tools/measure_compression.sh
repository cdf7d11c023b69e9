#!/usr/bin/env bash
# Compression: the commands of docs/measurements.md, section 2 (size, held-out fidelity and
# compile time of each quantize pipeline).
#
#   tools/measure_compression.sh [minilm|smollm2|all]      (default: all)
#
# Needs examples/fetch.sh, a release build (cargo build --release) and the held-out sets of
# tools/heldout_sets.py in $KILN_HELDOUT (see docs/measurements.md). Writes the artifacts to
# $KILN_MEASURE_OUT, where tools/measure_speed.sh and tools/measure_native.sh find them.
# Prints each command, then its output; `compile: S s` is the wall time of the compile.
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/measure_common.sh
which=${1:-all}

CALIB=$HELDOUT/minilm_calib.safetensors        # 64 dev sentences (paper abstracts)
DOCS=$HELDOUT/minilm_calib_docs.safetensors    # 512 docstring sentences: the `docs` rows
SMOLLM2_CALIB=$FIXTURES/smollm2_dev.safetensors
TIMEFORMAT="compile: %R s"

# quantize NAME SPEC WEIGHTS PASSES CALIB: writes $OUT/NAME.kiln; prints its time and size.
quantize() {
  echo "+ $KILN compile $2 -w $3 --passes \"$4\" --calib $5 -o $OUT/$1.kiln" >&2
  time "$KILN" compile "$2" -w "$3" --passes "$4" --calib "$5" -o "$OUT/$1.kiln"
  echo "size: $(stat -c %s "$OUT/$1.kiln") bytes"
}

# minilm NAME PASSES CALIB: compile, then cosine against PyTorch on the held-out sentences.
minilm() {
  section "MiniLM $2, calibration $(basename "$3")"
  quantize "minilm-$1" "$MINILM_SPEC" "$MINILM_W" "$2" "$3"
  run "$KILN" eval "$OUT/minilm-$1.kiln" --data "$HELDOUT/minilm_heldout.safetensors" --json
}

# smollm2 NAME PASSES: compile, then held-out perplexity (exact: 25.787).
smollm2() {
  section "SmolLM2 $2"
  quantize "smollm2-$1" "$SMOLLM2_SPEC" "$SMOLLM2_W" "$2" "$SMOLLM2_CALIB"
  run "$KILN" eval "$OUT/smollm2-$1.kiln" --data "$HELDOUT/smollm2_heldout.safetensors" --json
}

for f in "$HELDOUT/minilm_heldout.safetensors" "$HELDOUT/smollm2_heldout.safetensors" "$CALIB" "$DOCS"; do
  [ -s "$f" ] || { echo "missing $f: run tools/heldout_sets.py (see docs/measurements.md)" >&2; exit 1; }
done
mkdir -p "$OUT"

if [ "$which" = minilm ] || [ "$which" = all ]; then
  section "MiniLM f32"
  echo "size: $(stat -c %s "$MINILM_W") bytes"
  run "$KILN" eval "$MINILM_SPEC" -w "$MINILM_W" --data "$HELDOUT/minilm_heldout.safetensors" --json

  minilm int4g64a "quantize(format=int4g64a)" "$CALIB"
  minilm bits4.5 "quantize(bits=4.5)" "$CALIB"
  minilm bits4.5-docs "quantize(bits=4.5)" "$DOCS"
  minilm bits4.5-damp-docs "quantize(bits=4.5, damp=0.1)" "$DOCS"
  minilm bits4.5-dev300 "quantize(bits=4.5)" "$FIXTURES/minilm_dev.safetensors"
  minilm bits4.5-damp-dev300 "quantize(bits=4.5, damp=0.1)" "$FIXTURES/minilm_dev.safetensors"
  minilm bits8.5 "quantize(bits=8.5)" "$CALIB"
  minilm w8a8 "quantize(format=int8, activations=int8)" "$CALIB"
  minilm w8a8-row "quantize(format=int8, activations=int8-row)" "$CALIB"
  minilm fp8 "quantize(format=fp8)" "$CALIB"
  minilm int4g32a "quantize(format=int4g32a)" "$CALIB"
  minilm int4g32a-lorc8 "quantize(format=int4g32a, lorc_rank=8)" "$CALIB"
  minilm int4g32a-lorc32 "quantize(format=int4g32a, lorc_rank=32)" "$CALIB"

  section "Artifacts are byte-reproducible: the docs bits=4.5 artifact again"
  quantize again "$MINILM_SPEC" "$MINILM_W" "quantize(bits=4.5)" "$DOCS"
  run cmp "$OUT/minilm-bits4.5-docs.kiln" "$OUT/again.kiln" && echo "identical"
fi

if [ "$which" = smollm2 ] || [ "$which" = all ]; then
  section "SmolLM2 exact (Q4_1 file, f32 compute)"
  echo "size: $(stat -c %s "$SMOLLM2_W") bytes"
  run "$KILN" eval "$SMOLLM2_SPEC" -w "$SMOLLM2_W" --data "$HELDOUT/smollm2_heldout.safetensors" --json

  smollm2 int4g64a-rtn "quantize(format=int4g64a, method=rtn)"
  smollm2 int4g64a-rtn-noclip "quantize(format=int4g64a, method=rtn, clip=false)"
  smollm2 int4g64a "quantize(format=int4g64a)"
  smollm2 int4g64a-noclip "quantize(format=int4g64a, clip=false)"
  smollm2 int4g128a "quantize(format=int4g128a)"
  smollm2 bits4.5 "quantize(bits=4.5)"
  run "$KILN" eval "$OUT/smollm2-bits4.5.kiln" --data "$HELDOUT/smollm2_heldout.safetensors" --json \
    --activations int8
  smollm2 int3g64a "quantize(format=int3g64a)"
  smollm2 bits3.5 "quantize(bits=3.5)"
fi
