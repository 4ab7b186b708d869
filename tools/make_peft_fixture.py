#!/usr/bin/env python3
"""Writes tests/fixtures/peft_tiny: a tiny random Llama saved by transformers, adapters made by
PEFT itself on it, and the logits transformers + PEFT compute with each, so that
tests/peft_interop.rs checks ranger-tune loads adapters trained elsewhere to the same numbers.
Not run in CI (its output is committed); rerun by hand after changing it:

    python tools/make_peft_fixture.py tests/fixtures/peft_tiny

Adapters: plain LoRA on three projections (lora_dropout set, which must not matter in
evaluation), DoRA + rsLoRA on all seven projections, and LoRA with modules_to_save (the untied
lm_head and every norm). Every adapter tensor is moved off its initial value so each one matters.
"""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

IDS = [[3, 7, 1, 12, 5, 9, 30, 2], [11, 4, 4, 8, 21, 0, 17, 6]]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1),
    "dora_rslora": dict(r=4, lora_alpha=8, target_modules=ALL, use_dora=True, use_rslora=True),
    "saved_modules": dict(r=2, lora_alpha=4, target_modules=["o_proj"], modules_to_save=["lm_head", "norm"]),
}


def main():
    out = sys.argv[1]
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)  # larger than the default init, so every path shows in the logits
    base_dir = os.path.join(out, "base")
    base.save_pretrained(base_dir)
    ids = torch.tensor(IDS)
    reference = {"input_ids": IDS}
    with torch.no_grad():
        reference["base"] = base(ids).logits.flatten().tolist()
    for name, kwargs in VARIANTS.items():
        torch.manual_seed(1)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(task_type="CAUSAL_LM", **kwargs))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        model.eval()
        model.save_pretrained(os.path.join(out, name))
        os.remove(os.path.join(out, name, "README.md"))  # PEFT's model card template
        with torch.no_grad():
            reference[name] = model(ids).logits.flatten().tolist()
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
