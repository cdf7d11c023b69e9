#!/usr/bin/env python3
"""Checks kiln against PyTorch on inputs that are not in the fixtures (held-out text),
including greedy generation.

Needs the peers' venv (../shared/peers/setup.sh) and a release build of kiln:
    $KILN_PEERS_CACHE/venv/bin/python tools/heldout_check.py [--engine interp]
For each model it writes the held-out inputs, runs `kiln run --text ... --output`, runs
PyTorch + transformers on the same text, and prints the worst disagreement.
"""
import argparse, json, os, subprocess, sys, tempfile

import numpy as np
import torch
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.environ.get("KILN_MODELS", os.path.expanduser("~/.cache/kiln/models"))
KILN = os.path.join(ROOT, "target/release/kiln")

SENTENCES = [
    "The lighthouse keeper counted ships until the fog rolled in.",
    "Quantum error correction protects fragile qubits from noise.",
    "A recipe for sourdough needs patience, flour, water and salt.",
    "Stock markets fell sharply after the central bank raised rates.",
    "¿Dónde está la biblioteca? Está cerca del río.",
    "short",
    "Compilers translate high-level programs into efficient machine code, "
    "applying optimizations such as inlining, vectorization and register allocation "
    "so that the resulting binaries run fast on real hardware.",
    "1234 5678 + 99 = ?",
]

GENERATE = 24

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The derivative of x squared is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Paris is the capital of France, and Berlin is the capital of",
]


def kiln_run(spec, weights, texts, engine):
    out = tempfile.mktemp(suffix=".safetensors")
    cmd = [KILN, "run", spec, "--weights", weights, "--output", out, "--engine", engine]
    for t in texts:
        cmd += ["--text", t]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return load_file(out)


def minilm(engine):
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(MODELS, "minilm")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).numpy()
    got = kiln_run(os.path.join(ROOT, "examples/minilm/minilm.kiln"), os.path.join(path, "model.safetensors"),
                   SENTENCES, engine)["embeddings"]
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    return {"model": "minilm", "sentences": len(SENTENCES), "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean())}


def smollm2(engine):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.join(MODELS, "smollm2")
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    worst, nll_diffs, ids_match = 0.0, [], True
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model(ids).logits[0].numpy()
        got = kiln_run(os.path.join(ROOT, "examples/smollm2/smollm2.kiln"), os.path.join(d, f), [p], engine)["logits"][0]
        if got.shape != ref.shape:
            ids_match = False
            continue
        worst = max(worst, float(np.abs(got - ref).max()))
        t = ids[0].numpy()
        ls = lambda l: l - (np.log(np.exp(l - l.max(-1, keepdims=True)).sum(-1, keepdims=True)) + l.max(-1, keepdims=True))
        nll_g = -ls(got.astype(np.float64))[np.arange(len(t) - 1), t[1:]]
        nll_r = -ls(ref.astype(np.float64))[np.arange(len(t) - 1), t[1:]]
        nll_diffs.extend(np.abs(nll_g - nll_r).tolist())
    # Greedy continuations: `kiln generate` (KV cache, one token per step) against
    # transformers' generate on the same weights.
    same = 0
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=GENERATE, do_sample=False)[0, ids.shape[1]:].tolist()
        out = subprocess.run([KILN, "generate", os.path.join(ROOT, "examples/smollm2/smollm2.kiln"), "-w",
                              os.path.join(d, f), "--prompt", p, "--max-tokens", str(GENERATE), "--json",
                              "--engine", engine], check=True, capture_output=True, text=True).stdout
        got = json.loads(out)["ids"]
        if got == ref:
            same += 1
        else:
            print(f"generate differs for {p!r}:\n  kiln {got}\n  torch {ref}", file=sys.stderr)
    return {"model": "smollm2", "prompts": len(PROMPTS), "tokenization_matches": ids_match,
            "logits_max_abs_diff": worst, "nll_mean_abs_diff": float(np.mean(nll_diffs)),
            "greedy_continuations_identical": f"{same}/{len(PROMPTS)}", "tokens_generated_each": GENERATE}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="interp")
    a = ap.parse_args()
    print(json.dumps(minilm(a.engine)))
    print(json.dumps(smollm2(a.engine)))
