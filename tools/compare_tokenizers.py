#!/usr/bin/env python3
"""By-hand check (not in CI): two tokenizer.json files give the same ids, with and without special
tokens, on llama.cpp's test texts (`tools/fetch_test_assets.sh vocab`), a few texts of ours, and
the first 20,000 characters of README.md. Used to hold the tokenizer ranger-tune rebuilds from a
GGUF file (`ranger-tune convert`'s `tokenizer.json`) to the model's real one:

    python tools/compare_tokenizers.py OURS/tokenizer.json REAL/tokenizer.json VOCAB_DIR

Needs the `tokenizers` package. Exits non-zero when any text differs.
"""
import glob
import os
import sys

from tokenizers import Tokenizer

TEXTS = ["Hello world", " leading space", "The lighthouse keeper counts 12,345 ships; café, naïve, 日本.",
         "\n\n  tabs\tand   spaces  ", "<start_of_turn>user\nHi<end_of_turn>\n", "emoji 🙂🚀 and ümlaut",
         "def f(x):\n    return x**2  # comment", "   ", ""]


def main():
    ours, real, vocab = Tokenizer.from_file(sys.argv[1]), Tokenizer.from_file(sys.argv[2]), sys.argv[3]
    texts = list(TEXTS)
    for f in sorted(glob.glob(os.path.join(vocab, "*.inp"))):
        texts += open(f, encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    texts.append(open(readme, encoding="utf-8").read()[:20000])
    bad = 0
    for t in texts:
        for special in (False, True):
            if ours.encode(t, add_special_tokens=special).ids != real.encode(t, add_special_tokens=special).ids:
                bad += 1
                print(f"differ (special tokens {special}): {t[:60]!r}")
    print(f"{len(texts)} texts, {bad} differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
