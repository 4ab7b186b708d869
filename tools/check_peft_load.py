#!/usr/bin/env python3
"""Interoperability check of a ranger-tune LoRA adapter with PEFT (a by-hand check of real-size
adapters, not run in CI; CI checks tiny ones with tools/check_family_interop.py). Usage:

    python tools/check_peft_load.py BASE_HF_DIR ADAPTER_DIR [--prompt TEXT] [--expect-text TEXT]
                                    [--merged MERGED_HF_DIR] [--atol A]

Loads the base model with transformers, applies the adapter with
`peft.PeftModel.from_pretrained`, checks every tensor of adapter_model.safetensors landed in the
model unchanged (so PEFT's names and shapes match), that the adapter changes the logits, and
prints the greedy continuation of the prompt (compare with
`ranger-tune generate --model BASE --adapter ADAPTER --temperature 0`). With --merged (a folder
written by `ranger-tune merge` from the same base and adapter) it also loads that folder with
transformers and checks its logits equal PEFT's base + adapter within --atol (default 1e-3).
Exits non-zero on failure.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_family_interop import peft_key  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("--prompt", default="Question: What does Zoe like?\nAnswer: Zoe")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--expect-text", default=None)
    ap.add_argument("--merged", default=None)
    ap.add_argument("--atol", type=float, default=1e-3)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.base)
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    ids = tok(a.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
    model = PeftModel.from_pretrained(base, a.adapter)
    model.eval()
    saved = load_file(os.path.join(a.adapter, "adapter_model.safetensors"))
    state = model.state_dict()
    failures = 0
    modules_to_save = model.peft_config["default"].modules_to_save or []
    for name, t in saved.items():
        # PEFT's state-dict key of the file's tensor (the mapping CI's interop check uses).
        key = peft_key(name, modules_to_save)
        if key not in state:
            print(f"FAIL {name}: not a parameter of the PEFT model")
            failures += 1
        elif not torch.equal(state[key].float(), t.float()):
            print(f"FAIL {name}: loaded value differs from the file")
            failures += 1
    print(f"{'ok' if failures == 0 else 'FAIL'}   {len(saved)} adapter tensors loaded by PEFT with their values")
    with torch.no_grad():
        logits = model(ids).logits
        diff = (logits - base_logits).abs().max().item()
        out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"{'ok' if diff > 0 else 'FAIL'}   adapter changes the logits (max |diff| {diff:.4f})")
    failures += diff == 0
    print(f"greedy: {a.prompt!r} -> {text!r}")
    if a.merged is not None:
        merged = AutoModelForCausalLM.from_pretrained(a.merged, dtype=torch.float32)
        with torch.no_grad():
            merged_logits = merged(ids).logits
        d = (merged_logits - logits).abs().max().item()
        ok = d <= a.atol
        print(f"{'ok' if ok else 'FAIL'}   merged folder's logits vs PEFT base + adapter: max |diff| {d:.2e} (atol {a.atol})")
        failures += not ok
    if a.expect_text is not None:
        same = text == a.expect_text
        print(f"{'ok' if same else 'FAIL'}   greedy text {'matches' if same else 'differs from'} the expected {a.expect_text!r}")
        failures += not same
    print("ALL OK" if failures == 0 else f"{failures} FAILURES")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
