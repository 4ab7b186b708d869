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
rounding, so a tensor written in a layout llama.cpp does not expect shows there); with
`--llama-cpp`, llama.cpp itself (llama-cpp-python) on the same token ids, against the converted
folder (its own kernels: f16 or 8-bit products, so close rather than equal); and the greedy
replies.
Needs torch, transformers and gguf (tools/interop_check.sh's virtual environment has them), and
for `--llama-cpp` llama-cpp-python (built from source by pip: CMake and a C++ compiler).
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


def llama_cpp_run(path, ids, tok, max_tokens):
    """llama.cpp's logits at every position of `ids` and its greedy reply after them."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False, n_threads=os.cpu_count())
    llm.eval(ids)
    logits = torch.tensor(llm.scores[: len(ids)].copy())
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        if t == tok.eos_token_id or len(out) >= max_tokens:
            break
        out.append(t)
    return logits, tok.decode(out, skip_special_tokens=True).strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--prompt", default="why is Glimmerholm famous")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--llama-cpp", action="store_true", help="also run each file with llama.cpp (llama-cpp-python)")
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

            def against(ours, other, what):
                worst = (ours - other).abs().max().item()
                same = bool((ours.argmax(-1) == other.argmax(-1)).all())
                return f"max |logit - {what}'s| {worst:.2e}, same greedy token at all {ids.shape[1]} positions: {same}"

            print(f"{os.path.basename(f)} (largest |logit| {got.abs().max().item():.2f}):")
            print(f"  {against(got, want, 'merged folder')}")
            conv = None
            if converted:
                conv = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()(ids).logits
                print(f"  {against(got, conv, 'ranger-tune convert')}")
            print(f"  reply {reply(m, tok, ids, a.max_tokens)!r}")
            if a.llama_cpp:
                lc_logits, lc_reply = llama_cpp_run(path, ids[0].tolist(), tok, a.max_tokens)
                lc = lc_logits.reshape(want.shape)
                ref, what = (conv, "ranger-tune convert") if conv is not None else (want, "merged folder")
                print(f"  llama.cpp: {against(lc, ref, what)}")
                print(f"  llama.cpp reply {lc_reply!r}")


if __name__ == "__main__":
    main()
