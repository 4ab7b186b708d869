#!/usr/bin/env python3
"""transformers reads the GGUF files `ranger-tune merge --gguf` wrote as it reads llama.cpp's:

    python tools/check_gguf_export.py MERGED_FOLDER FILE.gguf[:CONVERTED] ... [--prompt TEXT]

MERGED_FOLDER is the Hugging Face folder the same `merge` wrote. For each GGUF file this loads the
model with `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` (the gguf package
dequantizes it and undoes llama.cpp's tensor changes, as for llama.cpp's own files) and prints
the largest |logit| difference over the prompt's chat-formatted tokens and whether the greedy
next token agrees at every position: against the merged folder (the file's quantization error),
and, with `:CONVERTED`, against the folder `ranger-tune convert --model FILE.gguf --output
CONVERTED` wrote (ranger-tune's own reading of the file: the two readers must agree to float
rounding, so a tensor written in a layout llama.cpp does not expect shows there); and the
greedy replies.
Needs torch, transformers and gguf (tools/interop_check.sh's virtual environment has them).
"""
import argparse
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def reply(model, tok, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--prompt", default="why is Glimmerholm famous")
    ap.add_argument("--max-tokens", type=int, default=40)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.folder)
    text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(a.folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits
        print(f"folder: {reply(ref, tok, ids, a.max_tokens)!r}")
        for spec in a.files:
            f, _, converted = spec.partition(":")
            path = os.path.abspath(f)
            m = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
            ).eval()
            got = m(ids).logits

            def against(other, what):
                worst = (got - other).abs().max().item()
                same = bool((got.argmax(-1) == other.argmax(-1)).all())
                return f"max |logit - {what}'s| {worst:.2e}, same greedy token at all {ids.shape[1]} positions: {same}"

            print(f"{os.path.basename(f)} (largest |logit| {got.abs().max().item():.2f}):")
            print(f"  {against(want, 'merged folder')}")
            if converted:
                conv = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
                print(f"  {against(conv(ids).logits, 'ranger-tune convert')}")
            print(f"  reply {reply(m, tok, ids, a.max_tokens)!r}")


if __name__ == "__main__":
    main()
