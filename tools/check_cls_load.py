#!/usr/bin/env python3
"""Interoperability check of a ranger-tune classifier with transformers (and PEFT), a by-hand
check of real-size folders (CI checks tiny ones with tools/check_family_interop.py). Usage:

    python tools/check_cls_load.py MODEL_DIR PREDICTIONS.jsonl DATA.jsonl [--text-column text]
        [--adapter ADAPTER_DIR] [--max-length 128]

MODEL_DIR is a classifier folder written by `ranger-tune train --task classify` (model/ or best/),
or, with --adapter, the base model the LoRA adapter was trained on. PREDICTIONS.jsonl is what
`ranger-tune predict` wrote for DATA.jsonl with the same model. The script loads the model with
`transformers.AutoModelForSequenceClassification` (plus `peft.PeftModel.from_pretrained` for an
adapter), classifies the texts itself, and checks that the labels agree and the probabilities
match within 1e-4. Exits non-zero on failure.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("predictions")
    ap.add_argument("data")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--limit", type=int, default=200)
    a = ap.parse_args()
    if a.adapter:
        from peft import PeftModel

        labels = json.load(open(os.path.join(a.adapter, "classifier_config.json")))["id2label"]
        id2label = {int(k): v for k, v in labels.items()}
        tok = AutoTokenizer.from_pretrained(a.adapter)
        base = AutoModelForSequenceClassification.from_pretrained(
            a.model, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()}, dtype=torch.float32
        )
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tok.pad_token_id
        model = PeftModel.from_pretrained(base, a.adapter)
    else:
        tok = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=torch.float32)
        id2label = model.config.id2label
    model.eval()
    texts = [json.loads(l)[a.text_column] for l in open(a.data) if l.strip()][: a.limit]
    preds = [json.loads(l) for l in open(a.predictions) if l.strip()][: a.limit]
    failures, worst = 0, 0.0
    for i in range(0, len(texts), 16):
        enc = tok(texts[i : i + 16], padding=True, truncation=True, max_length=a.max_length, return_tensors="pt")
        with torch.no_grad():
            probs = model(**enc).logits.softmax(-1)
        for j, p in enumerate(probs):
            ours = preds[i + j]
            label = id2label[int(p.argmax())]
            for k, name in id2label.items():
                worst = max(worst, abs(float(p[k]) - ours["scores"][name]))
            if label != ours["label"]:
                failures += 1
                print(f"FAIL text {i + j}: transformers says {label}, ranger-tune {ours['label']}")
    ok = failures == 0 and worst < 1e-4
    print(f"{'ok' if ok else 'FAIL'}   {len(texts)} texts: labels agree, max |probability difference| {worst:.2e}")
    print("ALL OK" if ok else "FAILURES")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
