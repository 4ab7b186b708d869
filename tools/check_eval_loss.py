#!/usr/bin/env python3
"""Interoperability check: transformers' (and PEFT's) loss on a file of `text` records, computed as
`ranger-tune eval` computes it, beside the figure that command printed. Not run in CI (CI checks tiny
models' logits with tools/check_family_interop.py); a by-hand check that a folder ranger-tune wrote (a fine-tuned model, a merged one), or a
PEFT adapter it wrote over any base transformers loads (a folder or a GGUF file), is the model
ranger-tune trained:

    python tools/check_eval_loss.py --model DIR_OR_GGUF [--adapter ADAPTER_DIR] --data FILE.jsonl \\
        --expect "$(ranger-tune eval --model ... [--adapter ...] --data FILE.jsonl --json)" [--tol 1e-4]

Each record's ids are the tokenizer's (special tokens included) with the eos id appended, cut to
--max-seq-length (512, as `eval`'s default); the loss is the mean over every predicted token of all
records (each sequence's first token is not predicted). Exits non-zero when the loss differs from
--expect's by more than --tol.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--data", required=True)
    ap.add_argument("--expect", help="`ranger-tune eval --json` output")
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    if a.model.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(a.model))
        kw = {"gguf_file": name}
    else:
        folder, kw = a.model, {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True, **kw).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
    if a.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, a.adapter).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for line in open(a.data):
            if not line.strip():
                continue
            ids = tok(json.loads(line)["text"])["input_ids"]
            if ids[-1] != tok.eos_token_id:
                ids.append(tok.eos_token_id)
            ids = torch.tensor([ids[:a.max_seq_length]])
            logits = model(ids).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    loss = nll / count
    print(f"transformers{' + PEFT' if a.adapter else ''}: loss {loss:.6f} over {count} tokens")
    if a.expect:
        want = json.loads(a.expect)
        print(f"ranger-tune eval:  loss {want['loss']:.6f} over {want['target_tokens']} tokens")
        if want["target_tokens"] != count or abs(want["loss"] - loss) > a.tol:
            sys.exit(f"differ: {abs(want['loss'] - loss):.2e} (tolerance {a.tol})")
        print(f"agree within {abs(want['loss'] - loss):.2e}")


if __name__ == "__main__":
    main()
