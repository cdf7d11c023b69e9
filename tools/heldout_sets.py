#!/usr/bin/env python3
"""Writes held-out evaluation sets for kiln whose text is not in ../shared/fixtures.

    HF_HUB_OFFLINE=1 $KILN_PEERS_CACHE/venv/bin/python tools/heldout_sets.py --out ~/.cache/kiln/heldout

Text source: English prose from the docstrings of a fixed, sorted list of Python
standard-library modules (module docs, then public classes / functions / methods in
sorted name order, via `inspect.getdoc`). Docstrings are split into paragraphs;
paragraphs with indented, doctest or bullet lines are dropped; the rest are split into
sentences, and a sentence is kept if it has 8-60 words, starts with a capital letter,
ends in . ! or ?, has no code-like characters or dotted/underscored identifiers, and is
mostly letters. Sentences are deduplicated, and any sentence that equals, contains or
is contained in a sentence of minilm_dev.json is dropped. Nothing is random; the only
dependency of the text is the Python version running the script (recorded in the
metadata of every output).

Outputs (in --out):
  minilm_heldout.safetensors  input_ids, attention_mask, token_type_ids i64[256,T]
                              (tokenizer.json of all-MiniLM-L6-v2, max 128 tokens,
                              truncation on, padded with 0), embeddings f32[256,384]:
                              PyTorch f32 mean of last_hidden_state over attention_mask,
                              then L2-normalized (as in the fixtures' README).
  minilm_heldout.json         the 256 sentences, same order. They are taken evenly
                              spaced over the candidate list (index i*N//256).
  minilm_calib.safetensors    first 64 rows of fixtures/minilm_dev.safetensors
                              (input_ids, attention_mask, token_type_ids): calibration
                              set for kiln's quantize pass.
  minilm_calib_docs.safetensors, .json
                              512 sentences for calibration from the docstrings of
                              third-party packages (CALIB_MODULES: numpy, torch, ...;
                              the same filters), none equal to, inside or containing a
                              held-out or dev sentence; evenly spaced over the
                              candidates, tokenized as minilm_heldout (no embeddings).
                              Technical prose like the held-out text, unlike the dev
                              set's paper abstracts. Depends on the installed versions
                              of those packages (recorded in the metadata).
  smollm2_heldout.safetensors input_ids i64[16,128] and nll f32[16,127].
                              Text: the candidate sentences NOT used for MiniLM, joined
                              by " " within one docstring and "\\n\\n" between
                              docstrings, tokenized with the SmolLM2 tokenizer read from
                              the GGUF (transformers + gguf) with add_special_tokens=False,
                              i.e. NO BOS is inserted (same as smollm2_dev). 16 chunks of
                              128 consecutive tokens, evenly spaced over the token stream
                              (non-overlapping). nll: per-next-token negative
                              log-likelihood from transformers on the GGUF Q4_1 weights
                              dequantized to f32 (skip with --no-nll).

Models are found as in tools/heldout_check.py: $KILN_MODELS or ~/.cache/kiln/models.
"""
import argparse, importlib, inspect, json, os, re, sys, warnings

import numpy as np
import torch
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.environ.get("KILN_MODELS", os.path.expanduser("~/.cache/kiln/models"))
FIXTURES = os.environ.get("KILN_FIXTURES", os.path.join(os.path.dirname(ROOT), "shared", "fixtures"))
if not os.path.isdir(FIXTURES):
    FIXTURES = "/work/shared/fixtures"

MODULES = sorted([
    "argparse", "asyncio", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "email.parser", "email.utils", "enum", "fractions",
    "functools", "gzip", "heapq", "http.client", "http.cookiejar", "http.server",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "logging.handlers",
    "mailbox", "multiprocessing", "numbers", "optparse", "os", "pathlib", "pickle",
    "queue", "random", "sched", "selectors", "shutil", "socket", "socketserver",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "zipfile",
])

N_MINILM, MAX_LEN_MINILM = 256, 128
N_CALIB = 64
N_CALIB_DOCS = 512
CALIB_MODULES = sorted([
    "filelock", "fsspec", "huggingface_hub", "jinja2", "networkx", "numpy", "numpy.linalg",
    "numpy.ma", "numpy.polynomial", "numpy.random", "onnxruntime", "packaging", "requests",
    "safetensors", "sympy", "tokenizers", "torch", "torch.distributions", "torch.nn",
    "torch.nn.functional", "torch.optim", "torch.utils.data", "tqdm", "transformers",
    "urllib3", "yaml",
])
CHUNKS, CHUNK = 16, 128

CODE_CHARS = set("()[]{}<>=_*`|\\#@$%^~/+;")
ABBREV = re.compile(r"\b(e\.g|i\.e|etc|vs|cf|Mr|Dr|No)\.$")


def save_file(tensors, path, metadata):
    """safetensors writer with a byte-stable header (sorted tensor and metadata keys;
    safetensors.numpy.save_file orders the metadata differently from run to run)."""
    dt = {np.dtype(np.int64): "I64", np.dtype(np.float32): "F32"}
    header, off, blobs = {"__metadata__": dict(sorted(metadata.items()))}, 0, []
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[k] = {"dtype": dt[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def docstrings(modules):
    """(source, docstring) pairs of `modules` in a fixed order."""
    seen = set()
    warnings.simplefilter("ignore")  # deprecated attributes touched by getattr
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [(name, mod)]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            owner = getattr(obj, "__module__", "") or ""
            if not (owner == name or owner.startswith(name + ".") or owner.startswith("_" + name.split(".")[0])):
                continue
            objs.append((f"{name}.{attr}", obj))
            if inspect.isclass(obj):
                for m in sorted(vars(obj)):
                    if m.startswith("_") and m != "__init__":
                        continue
                    objs.append((f"{name}.{attr}.{m}", getattr(obj, m, None)))
        for src, obj in objs:
            try:
                doc = inspect.getdoc(obj)
            except Exception:
                doc = None
            if not doc or doc in seen:
                continue
            seen.add(doc)
            yield src, doc


def split_sentences(doc):
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.split("\n")
        if any(l[:1].isspace() or l.lstrip().startswith((">>>", "...", "- ", "* ", "+ ", "|", ":"))
               or l.rstrip().endswith(":") for l in lines):
            continue
        text = " ".join(l.strip() for l in lines)
        parts, cur = [], ""
        for piece in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text):
            cur = f"{cur} {piece}" if cur else piece
            if not ABBREV.search(cur):  # "e.g. Foo" does not end a sentence
                parts.append(cur)
                cur = ""
        if cur:
            parts.append(cur)
        out.extend(parts)
    return out


def good(s):
    words = s.split()
    if not 8 <= len(words) <= 60:
        return False
    if not re.match(r"^[A-Z][a-z]", s) or s[-1] not in ".!?":
        return False
    if any(c in CODE_CHARS for c in s) or "..." in s or "--" in s:
        return False
    for w in words:
        if w.lstrip("\"'").startswith("."):  # ".daemon"
            return False
        core = w.strip(".,;:!?\"'")
        if re.search(r"[.:]\w", core) or re.search(r"[a-z][A-Z]", core) or any(ch.isdigit() for ch in core):
            return False
    nonspace = [c for c in s if not c.isspace()]
    letters = sum(c.isalpha() for c in nonspace)
    if letters / len(nonspace) < 0.9:
        return False
    if not all(ord(c) < 128 for c in s):
        return False
    return True


def candidates(modules=MODULES, exclude=()):
    """(docstring index, sentence) of `modules`, none equal to, inside or containing a
    sentence of minilm_dev.json or of `exclude`."""
    fixture = json.load(open(os.path.join(FIXTURES, "minilm_dev.json"))) + list(exclude)
    fix_norm = [" ".join(f.lower().split()) for f in fixture]
    seen, out = set(), []  # (docstring index, sentence)
    for di, (_, doc) in enumerate(docstrings(modules)):
        for s in split_sentences(doc):
            s = " ".join(s.split())
            if s in seen or not good(s):
                continue
            n = s.lower()
            if any(n in f or f in n for f in fix_norm):
                continue
            seen.add(s)
            out.append((di, s))
    return out


def meta(**kw):
    import tokenizers, transformers
    m = {"producer": f"tools/heldout_sets.py; transformers {transformers.__version__}, "
                     f"torch {torch.__version__}, tokenizers {tokenizers.__version__}, float32, CPU",
         "text": "Python " + sys.version.split()[0] + " stdlib docstrings"}
    m.update({k: str(v) for k, v in kw.items()})
    return m


def minilm(out, sentences):
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(MODELS, "minilm")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok(sentences, padding=True, truncation=True, max_length=MAX_LEN_MINILM, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                  token_type_ids=enc["token_type_ids"]).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    tensors = {k: enc[k].to(torch.int64).numpy().copy() for k in ("input_ids", "attention_mask", "token_type_ids")}
    tensors["embeddings"] = emb.float().numpy().copy()
    save_file(tensors, os.path.join(out, "minilm_heldout.safetensors"),
              metadata=meta(model="sentence-transformers/all-MiniLM-L6-v2",
                            embeddings="mean of last_hidden_state over attention_mask, then L2-normalized",
                            max_length=MAX_LEN_MINILM))
    with open(os.path.join(out, "minilm_heldout.json"), "w") as f:
        json.dump(sentences, f, indent=1)
    return {k: list(v.shape) for k, v in tensors.items()}


def calib(out):
    dev = load_file(os.path.join(FIXTURES, "minilm_dev.safetensors"))
    tensors = {k: np.ascontiguousarray(dev[k][:N_CALIB]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    save_file(tensors, os.path.join(out, "minilm_calib.safetensors"),
              metadata={"source": f"first {N_CALIB} rows of fixtures/minilm_dev.safetensors",
                        "use": "calibration set for kiln quantize"})
    return {k: list(v.shape) for k, v in tensors.items()}


def docs_calib(out, heldout):
    """minilm_calib_docs: N_CALIB_DOCS sentences of CALIB_MODULES' docstrings."""
    from transformers import AutoTokenizer

    cands = [s for _, s in candidates(CALIB_MODULES, exclude=heldout)]
    if len(cands) < N_CALIB_DOCS:
        raise SystemExit(f"only {len(cands)} calibration sentences from {CALIB_MODULES}")
    sentences = [cands[i * len(cands) // N_CALIB_DOCS] for i in range(N_CALIB_DOCS)]
    tok = AutoTokenizer.from_pretrained(os.path.join(MODELS, "minilm"))
    enc = tok(sentences, padding=True, truncation=True, max_length=MAX_LEN_MINILM, return_tensors="np")
    tensors = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    versions = {}
    for name in sorted({m.split(".")[0] for m in CALIB_MODULES}):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:
            versions[name] = "missing"
    save_file(tensors, os.path.join(out, "minilm_calib_docs.safetensors"),
              metadata={"source": f"{N_CALIB_DOCS} docstring sentences of third-party packages, "
                                  "none in minilm_heldout or fixtures/minilm_dev",
                        "packages": json.dumps(versions, sort_keys=True),
                        "use": "calibration set for kiln quantize"})
    with open(os.path.join(out, "minilm_calib_docs.json"), "w") as f:
        json.dump(sentences, f, indent=1)
    return {"candidates": len(cands), **{k: list(v.shape) for k, v in tensors.items()}}


def smollm2(out, text, with_nll):
    from transformers import AutoTokenizer

    d = os.path.join(MODELS, "smollm2")
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    if n < CHUNKS * CHUNK:
        raise SystemExit(f"only {n} SmolLM2 tokens of held-out text, need {CHUNKS * CHUNK}")
    starts = [i * (n - CHUNK) // (CHUNKS - 1) for i in range(CHUNKS)]
    x = np.array([ids[s:s + CHUNK] for s in starts], dtype=np.int64)
    tensors = {"input_ids": x}
    extra = {}
    if with_nll:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        rows = []
        with torch.no_grad():
            for r in range(CHUNKS):  # one chunk at a time: no padding, small memory
                t = torch.from_numpy(x[r:r + 1])
                logits = model(t).logits[0].float()
                lp = torch.log_softmax(logits[:-1], dim=-1)
                rows.append(-lp.gather(1, t[0, 1:, None])[:, 0])
        nll = torch.stack(rows).numpy().astype(np.float32)
        tensors["nll"] = nll
        extra["perplexity"] = f"{float(np.exp(nll.astype(np.float64).mean())):.4f}"
    save_file(tensors, os.path.join(out, "smollm2_heldout.safetensors"),
              metadata=meta(model="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32",
                            chunk_tokens=CHUNK, bos="none", stream_tokens=n,
                            chunk_starts=",".join(map(str, starts)), **extra))
    res = {k: list(v.shape) for k, v in tensors.items()}
    res.update(extra)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.expanduser("~/.cache/kiln/heldout"))
    ap.add_argument("--no-nll", action="store_true", help="skip the PyTorch SmolLM2 nll reference")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)

    cands = candidates()
    if len(cands) < N_MINILM + 200:
        raise SystemExit(f"only {len(cands)} candidate sentences")
    pick = sorted({i * len(cands) // N_MINILM for i in range(N_MINILM)})
    assert len(pick) == N_MINILM
    chosen = set(pick)
    sentences = [cands[i][1] for i in pick]

    # SmolLM2 stream: the remaining sentences, grouped by docstring.
    paras, cur, cur_doc = [], [], None
    for i, (di, s) in enumerate(cands):
        if i in chosen:
            continue
        if di != cur_doc and cur:
            paras.append(" ".join(cur))
            cur = []
        cur_doc = di
        cur.append(s)
    if cur:
        paras.append(" ".join(cur))
    text = "\n\n".join(paras)

    report = {"candidates": len(cands), "out": a.out,
              "minilm_heldout": minilm(a.out, sentences),
              "minilm_calib": calib(a.out),
              "minilm_calib_docs": docs_calib(a.out, sentences),
              "smollm2_heldout": smollm2(a.out, text, not a.no_nll)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
