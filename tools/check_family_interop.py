#!/usr/bin/env python3
"""transformers and PEFT load what ranger-tune wrote for every new model family, and give the
logits ranger-tune computes. Run by .ci/run after `cargo test`:

    RANGER_INTEROP_DIR=DIR cargo test --test family_folders
    python tools/check_family_interop.py DIR [--atol 1e-4]

`tests/family_folders.rs` trains each family's tiny transformers-saved model (Gemma 2, Gemma 3,
Phi-3, Phi-4-mini, SmolLM3, GPT-2 as causal LMs and classifiers; ModernBERT as a classifier) and
tiny random Llama (both) and BERT (classifier) folders: full, LoRA, and the LoRA merged by
`merge_adapter`. From the GGUF fixtures (`gguf-<family>`) it makes `convert`'s folder, a full
fine-tune of the GGUF and LoRA on it (PEFT's base: `convert`'s folder), and that LoRA merged
into a GGUF file (`merge --gguf f32`, read with `gguf_file`). It keeps every folder
under DIR/<family> with `interop.json`: for each result, the folder (and adapter), fixed input
ids and the logits ranger-tune computes from them. This script then, for each result:

- loads the folder with `AutoModelForCausalLM` or `AutoModelForSequenceClassification`
  (local files only), and requires no missing, unexpected or mismatched weight;
- for an adapter, loads the base the same way and applies the adapter with
  `peft.PeftModel.from_pretrained`, and requires every tensor of `adapter_model.safetensors` to
  be in the PEFT model with its value (so PEFT's names and shapes match ours);
- runs the ids through it and requires the logits within --atol of ranger-tune's (times the
  largest |logit| where that is below 1, down to 0.01).

Exits non-zero if anything fails, or if a family is missing from DIR (the test did not export it).
"""
import argparse
import json
import os
import sys
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The loading report (an adapter's base lacks the classifier head PEFT supplies) and progress
# bars: this script checks the loading information itself.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

EXPECTED_FAMILIES = {"gemma2", "gemma3", "phi3", "phi4mini", "smollm3", "gpt2", "modernbert", "llama", "bert"} | {
    f"gguf-{f}" for f in ("gemma2", "gemma3", "phi3", "phi4mini", "gpt2", "llama")
}


def peft_key(name, modules_to_save):
    """The key of a saved adapter tensor in the PEFT model's state dict (adapter "default"): a
    whole saved module's tensors live under `<module>.modules_to_save.default.`, where `<module>`
    is the path that ends with a `modules_to_save` entry (ModernBERT's `head` holds `dense` and
    `norm`)."""
    if name.endswith("lora_magnitude_vector"):
        return name + ".default.weight"
    if ".lora_" in name:
        return name.replace(".weight", ".default.weight")
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        if any(module == m or module.endswith("." + m) for m in modules_to_save):
            return ".".join([module, "modules_to_save", "default"] + parts[i:])
    return None


def load_plain(auto, folder, **kw):
    model, info = auto.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **kw)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    return model, problems


def check_case(root, case, atol):
    """Failures (strings) of one result of interop.json."""
    auto = AutoModelForCausalLM if case["task"] == "causal" else AutoModelForSequenceClassification
    failures = []
    if case["adapter"] is None and case["model"].endswith(".gguf"):
        # A GGUF file (`merge --gguf`): transformers reads it with the gguf package, undoing
        # llama.cpp's changes as it does for llama.cpp's own files.
        path = os.path.join(root, case["model"])
        model = auto.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    elif case["adapter"] is None:
        model, problems = load_plain(auto, os.path.join(root, case["model"]))
        if problems:
            failures.append(f"transformers loaded {case['model']} with {problems}")
    else:
        adapter = os.path.join(root, case["adapter"])
        kw = {}
        if case["task"] == "classify":
            # The labels live next to the adapter (PEFT adapters have no config.json); the head
            # itself comes from the adapter's modules_to_save.
            # A decoder classifier pools each row's last non-padding token, so transformers
            # needs the pad id, which a causal LM's config may lack; ranger-tune writes it there.
            saved = json.load(open(os.path.join(adapter, "classifier_config.json")))
            labels = saved["id2label"]
            kw = {"num_labels": len(labels), "id2label": {int(k): v for k, v in labels.items()}}
            if saved.get("pad_token_id") is not None:
                kw["pad_token_id"] = saved["pad_token_id"]
        base = auto.from_pretrained(os.path.join(root, case["base"]), dtype=torch.float32, **kw)
        model = PeftModel.from_pretrained(base, adapter)
        saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        state = model.state_dict()
        modules_to_save = model.peft_config["default"].modules_to_save or []
        for name, t in saved.items():
            key = peft_key(name, modules_to_save)
            if key not in state:
                failures.append(f"{name}: not a parameter of the PEFT model")
            elif not torch.equal(state[key].float(), t.float()):
                failures.append(f"{name}: PEFT holds another value than the file's")
    model.eval()
    ids = torch.tensor(case["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    ours = torch.tensor(case["logits"]).reshape(case["shape"])
    if tuple(logits.shape) != tuple(ours.shape):
        failures.append(f"logits of shape {tuple(logits.shape)}, ranger-tune's {tuple(ours.shape)}")
    else:
        worst = (logits - ours).abs().max().item()
        # --atol, scaled down for small logits (a fresh classifier head's are about 0.03 to 0.4),
        # so that an error of the same relative size fails there too.
        scale = ours.abs().max().item()
        tol = atol * min(1.0, max(scale, 0.01))
        print(f"  {case['what']}: max |logit - ranger-tune's| {worst:.2e} (largest |logit| {scale:.2f})")
        if not worst <= tol:
            failures.append(f"logits differ from ranger-tune's by {worst:.3e} (> {tol:.1e})")
    return failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--atol", type=float, default=1e-4)
    a = ap.parse_args()
    families = sorted(f for f in os.listdir(a.dir) if os.path.isfile(os.path.join(a.dir, f, "interop.json")))
    missing = EXPECTED_FAMILIES - set(families)
    failures = [f"{f}: no interop.json (did tests/family_folders.rs run with RANGER_INTEROP_DIR?)" for f in sorted(missing)]
    for family in families:
        root = os.path.join(a.dir, family)
        cases = json.load(open(os.path.join(root, "interop.json")))["cases"]
        print(f"{family}: {len(cases)} results")
        for case in cases:
            try:
                failures += [f"{family}, {case['what']}: {f}" for f in check_case(root, case, a.atol)]
            except Exception as e:  # a load error is a failure of this result, not the run
                failures.append(f"{family}, {case['what']}: {type(e).__name__}: {e}")
    for f in failures:
        print("FAIL", f)
    total = sum(len(json.load(open(os.path.join(a.dir, f, "interop.json")))["cases"]) for f in families)
    print(f"{'ok' if not failures else 'FAIL'}: {total} results of {len(families)} families checked with transformers and PEFT")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
