#!/usr/bin/env python3
"""Writes tests/fixtures/gemma3_270m_reference.json: what Hugging Face transformers computes with
the real Gemma 3 270M GGUF (gemma-3-270m-q4_k_m.gguf, `tools/fetch_test_assets.sh gemma3-gguf`),
loaded by its own GGUF loader (dequantized to f32, llama.cpp's `1 + w` norms undone), for
tests/gemma3_e2e.rs to hold ranger-tune's GGUF path to: the ids of a text under transformers'
GGUF tokenizer and under the real Gemma 3 tokenizer (`tools/fetch_test_assets.sh gemma`), the
logits at the first and last positions, the top five at every position, the mean causal-LM loss,
and a greedy continuation. Not run in CI (its output is committed); rerun by hand:

    python tools/make_gemma3_reference.py "$(tools/fetch_test_assets.sh gemma3-gguf | tail -n1)" \\
        "$(tools/fetch_test_assets.sh gemma | tail -n1)/gemma3"
"""
import hashlib
from importlib.metadata import version
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = ("The lighthouse on the northern cape was built in 1871. Its keeper counted the ships that "
        "passed each night and wrote their names in a ledger, which is now kept in the town museum.")
PROMPT = "The capital of France is"
GREEDY_TOKENS = 16


def main():
    gguf, real_tokenizer = sys.argv[1], sys.argv[2]
    folder, name = os.path.split(os.path.abspath(gguf))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    real = AutoTokenizer.from_pretrained(real_tokenizer)
    ids = tok(TEXT, add_special_tokens=True)["input_ids"]
    assert ids == real(TEXT)["input_ids"], "transformers' GGUF tokenizer and the real one differ"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
        loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
        top = logits.topk(5, dim=-1)
        prompt = tok(PROMPT, return_tensors="pt").input_ids
        greedy = model.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, prompt.shape[1]:]
    sha = hashlib.sha256(open(gguf, "rb").read()).hexdigest()
    out = {
        "description": "transformers loading the real Gemma 3 270M GGUF (Q4_K_M) directly, dequantized to f32; "
                       "written by tools/make_gemma3_reference.py",
        "gguf_file": name,
        "gguf_sha256": sha,
        "text": TEXT,
        "input_ids": ids,
        "logits_first16_pos0": logits[0, :16].tolist(),
        "logits_last16_last": logits[-1, -16:].tolist(),
        "top5_ids": top.indices.tolist(),
        "top5_values": top.values.tolist(),
        "loss": loss,
        "loss_definition": "mean cross-entropy of logits[:-1] vs input_ids[1:]",
        "prompt": PROMPT,
        "prompt_ids": prompt[0].tolist(),
        "greedy_ids": greedy.tolist(),
        "greedy_text": tok.decode(greedy),
        "versions": {m: version(m) for m in ["torch", "transformers", "gguf", "tokenizers"]},
    }
    path = "tests/fixtures/gemma3_270m_reference.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}: loss {loss:.6f}, greedy {out['greedy_text']!r}")


if __name__ == "__main__":
    main()
