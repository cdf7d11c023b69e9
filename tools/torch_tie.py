#!/usr/bin/env python3
"""PyTorch reference for tie: blocks of SmolLM2 tied in groups, each matrix role's shared
weight the least-squares fit S = (sum_l W_l H_l)(sum_l H_l + damp)^-1 over the group, each
member keeping its residual W_l - S truncated to rank R by an SVD whitened by chol(H_l)
(damped by 1% of its mean diagonal), the tied model's weight W_l' = S + delta_l. H_l is the
Gram of layer l's inputs on the 16 x 128 dev tokens of the fixtures, from the original
model (no refit). kiln's `tie(groups=..., delta_rank=R)` with the same calibration is the
same method; prints the perplexity on the held-out set of tools/heldout_sets.py and on the
calibration tokens, dense and tied.

    HF_HUB_OFFLINE=1 $KILN_PEERS_CACHE/venv/bin/python tools/torch_tie.py [R] [FIRST] [LAST]

Default: R = 64, pairs of adjacent blocks from FIRST = 14 to LAST = 29.
"""
import os, sys, torch, numpy as np
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
rank = int(sys.argv[1]) if len(sys.argv) > 1 else 64
first = int(sys.argv[2]) if len(sys.argv) > 2 else 14
last = int(sys.argv[3]) if len(sys.argv) > 3 else 29
models = os.environ.get("KILN_MODELS", os.path.expanduser("~/.cache/kiln/models"))
heldout = os.environ.get("KILN_HELDOUT", os.path.expanduser("~/.cache/kiln/heldout"))
fixtures = os.environ.get("KILN_FIXTURES", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures"))
d = os.path.join(models, "smollm2")
model = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()
calib = torch.from_numpy(load_file(os.path.join(fixtures, "smollm2_dev.safetensors"))["input_ids"])
held = torch.from_numpy(load_file(os.path.join(heldout, "smollm2_heldout.safetensors"))["input_ids"])
roles = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
mods = dict(model.named_modules())
names = [f"model.layers.{i}.{r}" for i in range(first, last + 1) for r in roles]
grams = {n: torch.zeros(mods[n].in_features, mods[n].in_features, dtype=torch.float64) for n in names}
def hook(n):
    def f(mod, i, o):
        x = i[0].reshape(-1, i[0].shape[-1]).double()
        grams[n].add_(x.T @ x)
    return f
hooks = [mods[n].register_forward_hook(hook(n)) for n in names]
with torch.no_grad():
    for r in range(calib.shape[0]):
        model(calib[r:r + 1])
for h in hooks:
    h.remove()
def ppl(ids):
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in range(ids.shape[0]):
            lg = model(ids[r:r + 1]).logits[0].double()
            lp = torch.log_softmax(lg[:-1], -1); t = ids[r, 1:]
            nll -= lp[torch.arange(len(t)), t].sum().item(); n += len(t)
    return float(np.exp(nll / n))
base, base_dev = ppl(held), ppl(calib)
print(f"dense: held-out {base:.3f}, calibration {base_dev:.3f}", flush=True)
def damped(h, rel):
    return h + rel * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
with torch.no_grad():
    for a in range(first, last, 2):
        for r in roles:
            group = [f"model.layers.{a}.{r}", f"model.layers.{a + 1}.{r}"]
            ws = [mods[n].weight.double() for n in group]
            hs = [grams[n] for n in group]
            h = damped(sum(hs), 0.01)
            s = torch.linalg.solve(h, sum(hl @ w.T for w, hl in zip(ws, hs))).T
            for n, w, hl in zip(group, ws, hs):
                l = torch.linalg.cholesky(damped(hl, 0.01))
                u, sv, vt = torch.linalg.svd((w - s) @ l, full_matrices=False)
                delta = (u[:, :rank] * sv[:rank]) @ vt[:rank] @ torch.linalg.inv(l)
                mods[n].weight.copy_((s + delta).float())
p, p_dev = ppl(held), ppl(calib)
print(f"tied pairs {first}..{last}, delta rank {rank}: held-out {p:.3f} ({p / base:.3f}x), calibration {p_dev:.3f} ({p_dev / base_dev:.3f}x)", flush=True)
