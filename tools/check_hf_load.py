#!/usr/bin/env python3
"""Interoperability check: can Hugging Face transformers load a ranger-tune export?

Usage:
    python tools/check_hf_load.py <output_dir> [--expect-logits <json>] [--atol A]
                                  [--max-new-tokens N] [--prompt TEXT]

<output_dir> is a folder written by ranger-tune's HF-format export (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, ...). The script loads it
with transformers.AutoModelForCausalLM / AutoTokenizer strictly from local files
(HF_HUB_OFFLINE=1, local_files_only=True), then

  * runs a forward pass on a short prompt and prints the argmax next token,
  * prints loss and perplexity of the model on a fixed sentence,
  * greedily generates --max-new-tokens (default 20) tokens and prints them.

With --expect-logits <json> (e.g. tests/fixtures/smollm2_reference.json) it also
compares against reference values: the tokenizer must reproduce `input_ids` for
`prompt_text` (and `chat_input_ids` for `chat_messages`, when present), and
`logits_last`, `logits_first16_pos0`, `logits_last_argmax` and `loss` must match
within --atol (default 2e-3 on logits, loss within 1e-3 relative). Use this for
exports of an *unmodified* model; after fine-tuning, run without --expect-logits.

Exit status is 0 only if everything loaded and every check passed; any exception
or failed check gives a non-zero exit.

This is a manual check of real-size folders, not run in CI; CI checks every family's outputs on
tiny models with tools/check_family_interop.py (tools/interop_check.sh).
"""
import argparse
import json
import math
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXED_SENTENCE = "The quick brown fox jumps over the lazy dog. It was a sunny day in Paris."
DEFAULT_PROMPT = "The capital of France is"


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    return 1


def load(output_dir):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(output_dir, local_files_only=True)
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = "dtype" if major >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        output_dir, local_files_only=True, **{dtype_kw: torch.float32}
    )
    model.eval()
    return tok, model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("output_dir")
    ap.add_argument("--expect-logits", metavar="JSON", help="reference fixture to compare against")
    ap.add_argument("--atol", type=float, default=2e-3, help="absolute tolerance on logits")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--prompt", default=None, help=f"prompt (default: fixture prompt_text or {DEFAULT_PROMPT!r})")
    args = ap.parse_args()

    if not os.path.isdir(args.output_dir):
        return fail(f"{args.output_dir} is not a directory")

    import torch
    import transformers

    torch.manual_seed(0)
    expect = None
    if args.expect_logits:
        with open(args.expect_logits) as f:
            expect = json.load(f)

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"files: {sorted(os.listdir(args.output_dir))}")
    tok, model = load(args.output_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {type(model).__name__} ({n_params / 1e6:.1f}M params), tokenizer {type(tok).__name__}")

    errors = []

    def check(cond, msg):
        print(("ok   " if cond else "FAIL ") + msg)
        if not cond:
            errors.append(msg)

    # 1. forward on a short prompt
    prompt = args.prompt or (expect or {}).get("prompt_text") or DEFAULT_PROMPT
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    check(len(ids) > 0, f"prompt tokenizes to {len(ids)} ids: {ids}")
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=x, labels=x if len(ids) > 1 else None)
    logits = out.logits[0].float()
    check(bool(torch.isfinite(logits).all()), f"logits finite, shape {tuple(logits.shape)}")
    am = int(logits[-1].argmax())
    print(f"prompt {prompt!r}: next-token argmax {am} {tok.decode([am])!r}")

    # 2. reference comparison
    if expect is not None:
        if "input_ids" in expect and prompt == expect.get("prompt_text"):
            check(ids == expect["input_ids"], f"input_ids match fixture {expect['input_ids']}")
        if "chat_input_ids" in expect and "chat_messages" in expect:
            if getattr(tok, "chat_template", None):
                chat = tok.apply_chat_template(expect["chat_messages"], tokenize=True, add_generation_prompt=True)
                if hasattr(chat, "keys"):
                    chat = chat["input_ids"]
                chat = list(chat)
                if chat and isinstance(chat[0], list):
                    chat = chat[0]
                check(chat == expect["chat_input_ids"], "chat template ids match fixture")
            else:
                check(False, "tokenizer has a chat_template")
        if ids == expect.get("input_ids"):
            for key, row in (("logits_last", -1), ("logits_first16_pos0", 0)):
                if key in expect:
                    ref = torch.tensor(expect[key], dtype=torch.float32)
                    got = logits[row, : len(ref)]
                    diff = float((got - ref).abs().max())
                    check(diff <= args.atol, f"{key} max abs diff {diff:.2e} <= {args.atol:g}")
            if "logits_last_argmax" in expect:
                check(am == expect["logits_last_argmax"], f"argmax {am} == {expect['logits_last_argmax']}")
            if "loss" in expect and out.loss is not None:
                l, r = float(out.loss), float(expect["loss"])
                check(abs(l - r) <= 1e-3 * max(1.0, abs(r)), f"loss {l:.6f} vs fixture {r:.6f}")
        else:
            check(False, "prompt ids equal fixture ids (needed to compare logits)")

    # 3. loss / perplexity on a fixed sentence
    sids = tok(FIXED_SENTENCE, add_special_tokens=False)["input_ids"]
    sx = torch.tensor([sids])
    with torch.no_grad():
        loss = float(model(input_ids=sx, labels=sx).loss)
    check(math.isfinite(loss), f"fixed-sentence loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f} ({len(sids)} tokens)")

    # 4. greedy generation
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if tok.pad_token_id is not None:
        gen_kwargs["pad_token_id"] = tok.pad_token_id
    elif tok.eos_token_id is not None:
        gen_kwargs["pad_token_id"] = tok.eos_token_id
    with torch.no_grad():
        gen = model.generate(x, attention_mask=torch.ones_like(x), **gen_kwargs)
    new = gen[0, x.shape[1]:].tolist()
    check(len(new) > 0, f"greedy generated {len(new)} tokens: {new}")
    print(f"greedy: {prompt!r} -> {tok.decode(new, skip_special_tokens=False)!r}")

    if errors:
        print(f"{len(errors)} check(s) failed", file=sys.stderr)
        return 1
    print("ALL OK")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - any failure must give a non-zero exit
        import traceback

        traceback.print_exc()
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
