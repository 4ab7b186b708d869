#!/usr/bin/env python3
"""Writes tests/fixtures/chat_templates.json: how transformers renders a few conversations with
three models' real chat templates (Gemma 2's, Phi-3.5's, SmolLM3's, from llama.cpp's
models/templates, fetched by `tools/fetch_test_assets.sh vocab`), and for Phi-3.5 the ids of each
rendering under the real Phi-3 tokenizer (transformers' tokenizer built from llama.cpp's
ggml-vocab-phi-3.gguf, which gives the original tokenizer's ids on all of that file's test
texts). tests/chat_templates.rs renders and tokenizes the same conversations with ranger-tune.
Not run in CI (CI has no transformers); rerun by hand:

    python tools/make_chat_template_fixtures.py "$(tools/fetch_test_assets.sh vocab | tail -n1)"
"""
import json
import os
import sys

from transformers import AutoTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What does the lighthouse keeper count?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "  Name three ships, please.  "}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Why salt?"},
     {"role": "assistant", "content": "It keeps the names."}],
]
TEMPLATES = {
    "gemma2": ("google-gemma-2-2b-it", "<bos>", "<eos>"),
    "phi3": ("microsoft-Phi-3.5-mini-instruct", "<s>", "<|endoftext|>"),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B", "", "<|im_end|>"),
}


def main():
    assets = sys.argv[1]
    phi3 = AutoTokenizer.from_pretrained(assets, gguf_file="ggml-vocab-phi-3.gguf")
    out = {}
    for name, (file, bos, eos) in TEMPLATES.items():
        template = open(os.path.join(assets, f"{file}.jinja")).read()
        tok = phi3  # any tokenizer renders; only Phi-3's ids are recorded
        cases = []
        for messages in CONVERSATIONS:
            for gen in [False, True]:
                if gen and messages[-1]["role"] == "assistant":
                    continue
                try:
                    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                   add_generation_prompt=gen, bos_token=bos, eos_token=eos)
                except Exception as e:  # a template that refuses the conversation (Gemma: system)
                    cases.append({"messages": messages, "add_generation_prompt": gen, "error": str(e)})
                    continue
                case = {"messages": messages, "add_generation_prompt": gen, "rendered": text}
                if name == "phi3":
                    case["ids"] = tok(text, add_special_tokens=False)["input_ids"]
                cases.append(case)
        out[name] = {"template": file, "bos_token": bos, "eos_token": eos, "cases": cases}
    out["versions"] = {"transformers": __import__("transformers").__version__}
    with open("tests/fixtures/chat_templates.json", "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print("wrote tests/fixtures/chat_templates.json")


if __name__ == "__main__":
    main()
