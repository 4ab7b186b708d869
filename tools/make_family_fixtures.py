#!/usr/bin/env python3
"""Writes tests/fixtures/families/<family>: a tiny random model of each newer decoder family saved
by transformers itself, a PEFT LoRA adapter on every projection (values moved off their
init so each one matters), a sequence classifier of the same family, and the logits (and class
probabilities) transformers + PEFT compute, so that tests/family_fixtures.rs checks ranger-tune
loads each to the same numbers. Not run in CI (its output is committed); rerun by hand after changing it:

    python tools/make_family_fixtures.py tests/fixtures/families

Families: smollm3 (4 layers, the second without rotary embeddings: `no_rope_layers`); gemma3
(`gemma3_text`: 4 layers alternating a 3-token sliding window and global attention, linear rope
scaling on the global layers, query_pre_attn_scalar 24 for a head_dim of 16); gemma2 (the
same shape, attention-logit and final-logit soft-capping at 2 and 3, small enough to bend the
tiny model's scores and logits); phi3 (fused qkv_proj and gate_up_proj, LongRoPE with a
pretraining context of 6 tokens so the 8-token inputs take the long factors and their first 4
tokens, also checked, the short ones, a 5-token sliding window, untied); phi4mini (Phi-4-mini's
shape: the same with 3/4 of each head rotated and tied embeddings); gpt2 (`GPT2LMHeadModel`:
learned positions, LayerNorm, Conv1D weights stored transposed, the adapter on c_attn, c_proj and
c_fc with PEFT's fan_in_fan_out); modernbert (`ModernBertForSequenceClassification` only, as
ModernBERT is an encoder: 4 layers alternating global attention and a local window of 4 (2 either
side), rotary bases 160000 / 10000, `cls` and `mean` pooling, on a right-padded batch with its
attention mask).
"""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model

IDS = [[3, 7, 1, 12, 5, 9, 30, 2], [11, 4, 4, 8, 21, 0, 17, 6]]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def smollm3():
    from transformers import SmolLM3Config, SmolLM3ForCausalLM, SmolLM3ForSequenceClassification

    cfg = dict(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, no_rope_layers=[1, 0, 1, 1],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return SmolLM3Config(**cfg), SmolLM3ForCausalLM, SmolLM3ForSequenceClassification


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextForSequenceClassification

    cfg = dict(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64,
        query_pre_attn_scalar=24, sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    return Gemma3TextConfig(**cfg), Gemma3ForCausalLM, Gemma3TextForSequenceClassification


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification

    cfg = dict(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64,
        query_pre_attn_scalar=24, sliding_window=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    return Gemma2Config(**cfg), Gemma2ForCausalLM, Gemma2ForSequenceClassification


def phi3(partial=1.0, tied=False, factors=8):
    from transformers import Phi3Config, Phi3ForCausalLM, Phi3ForSequenceClassification

    short = [1.0, 1.2, 1.5, 2.0, 1.1, 1.3, 1.7, 1.05][:factors]
    long = [2.0, 3.0, 4.0, 6.0, 2.5, 8.0, 5.0, 7.0][:factors]
    cfg = dict(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=64, original_max_position_embeddings=6,
        partial_rotary_factor=partial, sliding_window=5, tie_word_embeddings=tied,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return Phi3Config(**cfg), Phi3ForCausalLM, Phi3ForSequenceClassification


def phi4mini():
    return phi3(partial=0.75, tied=True, factors=6)


def gpt2():
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    cfg = dict(vocab_size=40, n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
    return GPT2Config(**cfg), GPT2LMHeadModel, GPT2ForSequenceClassification


FAMILIES = {"smollm3": smollm3, "gemma3": gemma3, "gemma2": gemma2, "phi3": phi3, "phi4mini": phi4mini, "gpt2": gpt2}
TARGETS = {"phi3": FUSED, "phi4mini": FUSED, "gpt2": ["c_attn", "c_proj", "c_fc"]}


def moved(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # larger than the default init, so every path shows in the logits
    return model


def write(out, family):
    cfg, causal, classifier = FAMILIES[family]()
    d = os.path.join(out, family)
    torch.manual_seed(0)
    base = moved(causal(cfg))
    base.eval()
    base.save_pretrained(os.path.join(d, "base"))
    ids = torch.tensor(IDS)
    ref = {"input_ids": IDS}
    with torch.no_grad():
        ref["base"] = base(ids).logits.flatten().tolist()
        # The first four tokens alone (for phi3: within LongRoPE's short range).
        ref["base_short"] = base(ids[:, :4]).logits.flatten().tolist()
    torch.manual_seed(1)
    lora = get_peft_model(causal.from_pretrained(os.path.join(d, "base")),
                          LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS.get(family, ALL)))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    lora.eval()
    lora.save_pretrained(os.path.join(d, "lora"))
    os.remove(os.path.join(d, "lora", "README.md"))  # PEFT's model card template
    with torch.no_grad():
        ref["lora"] = lora(ids).logits.flatten().tolist()
    # A sequence classifier: the same backbone, a `score` head, the last non-pad token pooled.
    cls_cfg = cfg.__class__(**{**cfg.to_dict(), "id2label": {i: f"LABEL_{i}" for i in range(3)}})
    torch.manual_seed(2)
    cls = moved(classifier(cls_cfg))
    cls.eval()
    cls.save_pretrained(os.path.join(d, "classifier"))
    with torch.no_grad():
        logits = cls(ids).logits
    ref["classifier_logits"] = logits.flatten().tolist()
    ref["classifier_probs"] = torch.softmax(logits, -1).flatten().tolist()
    ref["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                       "peft": __import__("peft").__version__}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(f"wrote {d}")


def write_modernbert(out):
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    d = os.path.join(out, "modernbert")
    ids = torch.tensor(IDS)
    # The second row has 5 real tokens, then padding (id 0).
    ids[1, 5:] = 0
    attention = torch.ones_like(ids)
    attention[1, 5:] = 0
    ref = {"input_ids": ids.tolist(), "lengths": [8, 5]}
    for pooling in ["cls", "mean"]:
        cfg = ModernBertConfig(
            vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            local_attention=4, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2, classifier_pooling=pooling,
            id2label={i: f"LABEL_{i}" for i in range(3)},
        )
        torch.manual_seed(3)
        cls = moved(ModernBertForSequenceClassification(cfg))
        cls.eval()
        cls.save_pretrained(os.path.join(d, pooling))
        with torch.no_grad():
            logits = cls(input_ids=ids, attention_mask=attention).logits
        ref[f"{pooling}_logits"] = logits.flatten().tolist()
        ref[f"{pooling}_probs"] = torch.softmax(logits, -1).flatten().tolist()
    ref["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(f"wrote {d}")


def main():
    out = sys.argv[1]
    for family in sys.argv[2:] or [*FAMILIES, "modernbert"]:
        if family == "modernbert":
            write_modernbert(out)
        else:
            write(out, family)


if __name__ == "__main__":
    main()
