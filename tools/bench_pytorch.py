#!/usr/bin/env python3
"""PyTorch + transformers counterpart of `cargo run --release --example finetune_bench` (CPU)
and of `tools/gpu_checks.sh`'s `ranger-tune` rows (CUDA).

Full fine-tuning (or LoRA with `--lora`) of a Hugging Face folder (SmolLM2-135M as written by
`ranger-tune convert --model <SmolLM2 gguf> --output DIR`, or a random model of any shape) on the
same synthetic text as finetune_bench. Prints tokens/s (mean over steps 2..N) and the peak memory:
resident memory on the CPU, `torch.cuda.max_memory_allocated` (and reserved) on a GPU.

    python tools/bench_pytorch.py DIR [STEPS]                               # CPU, f32, AdamW, 256 x 4
    python tools/bench_pytorch.py DIR 12 --device cuda --dtype bf16 --optimizer radam --seq 512 --batch 8

`--dtype bf16` is what a PyTorch user does on a GPU: f32 weights, gradients and optimizer state,
the forward and backward passes under `torch.autocast(dtype=torch.bfloat16)`.
"""
import argparse
import resource
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("steps", nargs="?", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--optimizer", choices=["adamw", "radam"], default="adamw")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lora", action="store_true", help="PEFT LoRA r=8 on every projection")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.path)
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32).to(dev)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    model.train()
    ids = tok(synthetic_text())["input_ids"]
    while len(ids) < args.seq * args.batch * 2:
        ids = ids + ids
    blocks = [ids[i:i + args.seq] for i in range(0, len(ids) - args.seq, args.seq)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.RAdam if args.optimizer == "radam" else torch.optim.AdamW)(params, lr=1e-4)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rates = []
    for step in range(args.steps):
        start = (step * args.batch) % max(1, len(blocks) - args.batch)
        batch = torch.tensor(blocks[start:start + args.batch], device=dev)
        sync()
        t = time.time()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        rates.append(batch.numel() / (time.time() - t))
        print(f"step {step + 1}: loss {loss.item():.4f} {rates[-1]:.1f} tokens/s", flush=True)
    mean = sum(rates[1:]) / max(1, len(rates) - 1)
    what = f"{'LoRA r=8' if args.lora else 'full'}, {args.optimizer}, {args.dtype}, seq {args.seq} x batch {args.batch}"
    if cuda:
        gib = 1 << 30
        print(f"pytorch {torch.__version__} {torch.cuda.get_device_name()} ({what}): {mean:.1f} tokens/s "
              f"(steps 2..{args.steps}), peak allocated {torch.cuda.max_memory_allocated() / gib:.2f} GiB, "
              f"reserved {torch.cuda.max_memory_reserved() / gib:.2f} GiB")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
        print(f"pytorch {torch.__version__} threads {torch.get_num_threads()} ({what}): {mean:.1f} tokens/s "
              f"(steps 2..{args.steps}), peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
