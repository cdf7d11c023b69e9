#!/usr/bin/env python3
"""PyTorch reference for prune: SparseGPT (Frantar & Alistarh 2023, the reference
implementation's `fasterprune`: damping relative to the mean diagonal of H, blocks of 128
columns, the mask chosen per block by w^2 / [H^-1]_jj^2, N:M groups chosen as the sweep
reaches them) on every linear of the model's blocks, sequentially: the linears that read
the same input are pruned together, in execution order, each on the Gram matrix of the
inputs that the model pruned so far feeds them (padding excluded). kiln's
`prune(sparsity=S)` / `prune(pattern=N:M)` with `--calib` is the same method, so the two
are compared on the same held-out tokens in docs/measurements.md.

    HF_HUB_OFFLINE=1 $KILN_PEERS_CACHE/venv/bin/python tools/torch_sparsegpt.py MODEL TARGET [DAMP] [CALIB]

MODEL is smollm2 or minilm; TARGET a sparsity (0.5) or a pattern (2:4); DAMP defaults
to 0.01 (the paper's). Calibration: SmolLM2 the 16 x 128 dev tokens of the fixtures;
MiniLM the first CALIB (default 64) dev sentences, as kiln's `minilm_calib`. Evaluation:
the held-out sets of tools/heldout_sets.py (SmolLM2 perplexity, MiniLM cosine of the
embeddings against the f32 model's). Prints the dense and pruned figures.
"""
import os, sys, time
import numpy as np
import torch
from safetensors.numpy import load_file

torch.set_num_threads(2)
model_name, target = sys.argv[1], sys.argv[2]
damp = float(sys.argv[3]) if len(sys.argv) > 3 else 0.01
n_calib = int(sys.argv[4]) if len(sys.argv) > 4 else 64
if ":" in target:
    prunen, prunem = (int(x) for x in target.split(":"))
    sparsity = 0.0
else:
    prunen, prunem, sparsity = 0, 0, float(target)
models = os.environ.get("KILN_MODELS", os.path.expanduser("~/.cache/kiln/models"))
heldout = os.environ.get("KILN_HELDOUT", os.path.expanduser("~/.cache/kiln/heldout"))
fixtures = os.environ.get("KILN_FIXTURES", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures"))


def fasterprune(W, H, blocksize=128):
    """The reference implementation's SparseGPT sweep over W [rows, cols] (float64)."""
    W = W.clone()
    cols = W.shape[1]
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / (torch.diag(Hinv1)[i:i + prunem].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunem - prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def prune_sequentially(model, groups, run_calibration, token_mask):
    """Prunes each group of linears (names in execution order) on the Gram matrix of its
    input from the model as pruned so far."""
    mods = dict(model.named_modules())
    for gi, names in enumerate(groups):
        k = mods[names[0]].in_features
        H = torch.zeros(k, k, dtype=torch.float64)
        state = {}

        def hook(mod, inp, out):
            x = inp[0].double()
            m = state["mask"]
            x = x[m] if m is not None else x.reshape(-1, x.shape[-1])
            H.add_(x.T @ x)

        h = mods[names[0]].register_forward_hook(hook)
        run_calibration(state)
        h.remove()
        with torch.no_grad():
            for n in names:
                lin = mods[n]
                lin.weight.copy_(fasterprune(lin.weight.double(), H).float())
        print(f"\r{gi + 1}/{len(groups)} groups", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def smollm2():
    from transformers import AutoModelForCausalLM
    d = os.path.join(models, "smollm2")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                 dtype=torch.float32).eval()
    calib = torch.from_numpy(load_file(os.path.join(fixtures, "smollm2_dev.safetensors"))["input_ids"])
    held = torch.from_numpy(load_file(os.path.join(heldout, "smollm2_heldout.safetensors"))["input_ids"])

    def ppl():
        nll, n = 0.0, 0
        with torch.no_grad():
            for r in range(held.shape[0]):
                lg = model(held[r:r + 1]).logits[0].double()
                lp = torch.log_softmax(lg[:-1], -1)
                t = held[r, 1:]
                nll -= lp[torch.arange(len(t)), t].sum().item()
                n += len(t)
        return float(np.exp(nll / n))

    def run_calibration(state):
        state["mask"] = None
        with torch.no_grad():
            for r in range(calib.shape[0]):
                model(calib[r:r + 1])

    groups = []
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        groups += [[p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                   [p + "self_attn.o_proj"], [p + "mlp.gate_proj", p + "mlp.up_proj"], [p + "mlp.down_proj"]]
    base = ppl()
    print(f"dense perplexity {base:.3f}", flush=True)
    t0 = time.time()
    prune_sequentially(model, groups, run_calibration, None)
    t1 = time.time()
    p = ppl()
    print(f"smollm2 {target} damp={damp}: perplexity {p:.3f} ratio {p / base:.4f} (pruning {t1 - t0:.0f} s)", flush=True)


def minilm():
    from transformers import AutoModel
    path = os.path.join(models, "minilm")
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    keys = ("input_ids", "attention_mask", "token_type_ids")
    dev = load_file(os.path.join(fixtures, "minilm_dev.safetensors"))
    calib = {k: torch.from_numpy(dev[k][:n_calib]) for k in keys}
    held_file = load_file(os.path.join(heldout, "minilm_heldout.safetensors"))
    held = {k: torch.from_numpy(held_file[k]) for k in keys}
    ref = torch.from_numpy(held_file["embeddings"]).double()

    def embed(batch):
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).double()

    def cosine():
        e = embed(held)
        c = (e * ref).sum(-1)
        return float(c.mean()), float(c.min())

    def run_calibration(state):
        state["mask"] = calib["attention_mask"].bool()
        with torch.no_grad():
            model(**calib)

    groups = []
    for i in range(len(model.encoder.layer)):
        p = f"encoder.layer.{i}."
        groups += [[p + "attention.self.query", p + "attention.self.key", p + "attention.self.value"],
                   [p + "attention.output.dense"], [p + "intermediate.dense"], [p + "output.dense"]]
    print("dense cosine mean %.4f min %.4f" % cosine(), flush=True)
    prune_sequentially(model, groups, run_calibration, None)
    mean, low = cosine()
    print(f"minilm {target} damp={damp} calib={n_calib}: cosine mean {mean:.4f} min {low:.4f}", flush=True)


{"smollm2": smollm2, "minilm": minilm}[model_name]()
