#!/usr/bin/env python3
"""PyTorch + transformers counterpart of `cargo run --release --example finetune_bench`.

Full fine-tuning of SmolLM2-135M (the Hugging Face folder written by
`ranger-tune convert --model <SmolLM2 gguf> --output DIR`), f32, CPU, sequence 256, batch 4,
torch.optim.AdamW, on the same synthetic text. Prints tokens/s (mean over steps 2..N) and the
peak resident memory. Usage: python tools/bench_pytorch.py DIR [STEPS]
"""
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def synthetic_text():
    words = ("the of and to in is was for on that with as by at from his her it an were which are this also be or "
             "has had first one their its after new who they have two been other but all when there more into years time").split(" ")
    state, paras = 1, []
    for _ in range(60):
        p = []
        for _ in range(220):
            state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            p.append(words[(state >> 33) % len(words)])
        paras.append(" ".join(p) + ".")
    return "\n\n".join(paras)


def main():
    path, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    ids = tok(synthetic_text())["input_ids"]
    blocks = [ids[i:i + 256] for i in range(0, len(ids) - 256, 256)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rates = []
    for step in range(steps):
        batch = torch.tensor(blocks[(step * 4) % len(blocks):(step * 4) % len(blocks) + 4])
        t = time.time()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(batch.numel() / (time.time() - t))
        print(f"step {step + 1}: loss {loss.item():.4f} {rates[-1]:.1f} tokens/s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"pytorch {torch.__version__} threads {torch.get_num_threads()}: {sum(rates[1:]) / max(1, len(rates) - 1):.1f} tokens/s "
          f"(steps 2..{steps}), peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
