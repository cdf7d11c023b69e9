#!/usr/bin/env python3
"""PyTorch reference for factorize: one-shot whitened SVD (SVD-LLM: S = chol(X X^T), the SVD
of W S truncated, W' = U_r S_r V_r^T S^-1) with uniform ranks r = floor(keep * n k / (n + k))
on every linear of SmolLM2's blocks. Calibrates on the 16 x 128 dev tokens of the fixtures
and prints the perplexity on the held-out set of tools/heldout_sets.py, before and after.
kiln's `factorize(keep=F, allocate=uniform, heal=false)` is the same method (ranks rounded
to multiples of 32), so the two are compared on the same tokens in docs/measurements.md.

    HF_HUB_OFFLINE=1 $KILN_PEERS_CACHE/venv/bin/python tools/torch_whitened_svd.py KEEP [DAMP]

DAMP (default 0) adds DAMP * mean(diag H) to H's diagonal before the Cholesky factor.
"""
import os, sys, torch, numpy as np
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
keep = float(sys.argv[1]); damp = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
models = os.environ.get("KILN_MODELS", os.path.expanduser("~/.cache/kiln/models"))
heldout = os.environ.get("KILN_HELDOUT", os.path.expanduser("~/.cache/kiln/heldout"))
fixtures = os.environ.get("KILN_FIXTURES", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))
d = os.path.join(models, "smollm2"); f = "SmolLM2-135M-Instruct.Q4_1.gguf"
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
calib = torch.from_numpy(load_file(os.path.join(fixtures, "smollm2_dev.safetensors"))["input_ids"])
held = torch.from_numpy(load_file(os.path.join(heldout, "smollm2_heldout.safetensors"))["input_ids"])
lins = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}
grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}
def hook(n):
    def f(mod, i, o):
        x = i[0].reshape(-1, i[0].shape[-1]).double()
        grams[n].add_(x.T @ x)
    return f
hooks = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
with torch.no_grad():
    for r in range(calib.shape[0]): model(calib[r:r+1])
for h in hooks: h.remove()
def ppl():
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in range(held.shape[0]):
            lg = model(held[r:r+1]).logits[0].double()
            lp = torch.log_softmax(lg[:-1], -1); t = held[r, 1:]
            nll -= lp[torch.arange(len(t)), t].sum().item(); n += len(t)
    return float(np.exp(nll / n))
base = ppl(); print("base", base, flush=True)
with torch.no_grad():
    for n, m in lins.items():
        W = m.weight.double(); out, k = W.shape
        H = grams[n] + damp * grams[n].diagonal().mean() * torch.eye(k, dtype=torch.float64)
        S = torch.linalg.cholesky(H)
        U, s, Vt = torch.linalg.svd(W @ S, full_matrices=False)
        r = int(keep * out * k / (out + k))
        Wr = (U[:, :r] * s[:r]) @ Vt[:r] @ torch.linalg.inv(S)
        m.weight.copy_(Wr.float())
p = ppl(); print(f"keep={keep} damp={damp}: ppl {p:.3f} ratio {p/base:.3f}", flush=True)
