#!/usr/bin/env bash
# The GPU checks, run on a machine with an NVIDIA GPU, PyTorch, transformers and peft but no Rust
# toolchain, from the binaries tools/build_cuda_bins.sh put in .devbin/:
#   tests  the device-capable tests with RANGER_TEST_DEVICE=cuda (the optimizer against the
#          PyTorch reference, tensor ops and the fused CUDA kernel; one training step of every
#          architecture and classifier in f32 and bf16 against the CPU; training, exact resume,
#          QLoRA and checkpointing on the GPU);
#   bench  the optimizer step on the GPU (fused kernel, tensor ops, 8-bit and bf16 state, candle's
#          AdamW, a device copy of the same bytes), and on the machine's CPU cores;
#   train  ranger-tune beside PyTorch + transformers (tools/bench_pytorch.py) on random models of
#          SmolLM2-135M's and Llama-3.2-1B's shapes: tokens/s and peak GPU memory (nvidia-smi);
#   profile  Nsight Compute's time per kernel over a stretch of a SmolLM2-shaped training step,
#          summed by kernel name.
# Usage: bash tools/gpu_checks.sh [tests] [bench] [train] [profile]    (default: all four)
# DEADLINE=N (seconds) skips the training runs and the profile that would start too late to end
# by then.
# (the device tool carries .devbin.tar.xz: `run` with carry [".devbin.tar.xz"], command
# `bash tools/gpu_checks.sh`)
# Logs go to $OUT (default /tmp/gpu-checks): tests.log, bench.log, train.log, summary.txt.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-checks}"
mkdir -p "$OUT"
BIN="$PWD/.devbin"
[ -d "$BIN" ] || tar xJf .devbin.tar.xz
PARTS="${*:-tests bench train profile}"
DEADLINE="${DEADLINE:-0}"
# Whether a step estimated at $1 seconds still ends before the deadline.
time_for() { [ "$DEADLINE" = 0 ] || [ $((SECONDS + $1)) -lt "$DEADLINE" ]; }
SUMMARY="$OUT/summary.txt"
say() { echo "$*" | tee -a "$SUMMARY"; }

# The tests read their fixtures under the path they were compiled at.
BUILT_AT="$(cat "$BIN/repo_path")"
if [ "$BUILT_AT" != "$PWD" ] && [ ! -e "$BUILT_AT" ]; then
    mkdir -p "$(dirname "$BUILT_AT")" && ln -s "$PWD" "$BUILT_AT"
fi
# cuBLAS, cuRAND and NVRTC 13 from PyTorch's wheels.
NV="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$NV/cu13/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$SUMMARY"
ldd "$BIN/ranger-tune" | grep -E "not found" && say "missing libraries"
say "cpu cores: $(nproc)"

if [[ " $PARTS " == *" tests "* ]]; then
    export RANGER_TEST_DEVICE=cuda
    for t in ranger_reference master_weights device_paths gradient_checkpointing trainer classify_trainer qlora; do
        start=$(date +%s)
        timeout 150 "$BIN/$t" >>"$OUT/tests.log" 2>&1
        rc=$?
        say "test $t: rc $rc, $(( $(date +%s) - start )) s, $(grep -h '^test result' "$OUT/tests.log" | tail -n1)"
    done
    unset RANGER_TEST_DEVICE
fi

if [[ " $PARTS " == *" bench "* ]]; then
    timeout 120 "$BIN/optimizer_step" 100 1000 --device cuda 2>&1 | tee -a "$OUT/bench.log" >>"$SUMMARY"
    # The CPU rows three times (this machine's 16 cores, against the 2 of the development machine).
    for round in 1 2 3; do
        timeout 60 "$BIN/optimizer_step" 100 --only "Ranger fused" 2>&1 | tee -a "$OUT/bench.log" >>"$SUMMARY"
    done
fi

# Runs a command while nvidia-smi samples the memory in use; appends its log to train.log.
with_memory() {
    local name="$1"
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"/tmp/mem-$name" &
    local smi=$!
    timeout 240 "$@" >/tmp/last.log 2>&1
    local rc=$?
    { echo "== $name: $*"; cat /tmp/last.log; } >>"$OUT/train.log"
    kill "$smi"
    PEAK_MIB="$(sort -n "/tmp/mem-$name" | tail -n1)"
    return $rc
}

# Random models of SmolLM2-135M's and Llama-3.2-1B's shapes (written by transformers, with
# SmolLM2's tokenizer) and the synthetic text, under /tmp/gpu-models, once.
M=/tmp/gpu-models
write_models() {
    [ -f "$M/data.txt" ] && return 0
    mkdir -p "$M"
    python3 - "$M" "$BIN/smollm2-tokenizer" <<'EOF' >>"$OUT/train.log" 2>&1
import shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
root, tok = sys.argv[1], sys.argv[2]
shapes = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0, dtype=torch.float32),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500000.0, dtype=torch.bfloat16),
}
for name, s in shapes.items():
    dtype = s.pop("dtype")
    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, **s)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(f"{root}/{name}")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tok}/{f}", f"{root}/{name}/{f}")
    print(name, sum(p.numel() for p in model.parameters()), "parameters")
EOF
    python3 -c 'import sys; sys.path.insert(0, "tools"); from bench_pytorch import synthetic_text; print(synthetic_text())' >"$M/data.txt"
}

if [[ " $PARTS " == *" train "* ]]; then
    write_models
    tps() { python3 -c 'import json,sys; r=[json.loads(l).get("tokens_per_sec") for l in open(sys.argv[1])]; r=[x for x in r if x]; print(f"{sum(r[1:])/max(1,len(r)-1):.0f}")' "$1"; }
    for model in smollm2-135m llama-1b; do
        # (the 1B model: LoRA in bf16 only, 8 steps: a full run's final checkpoint is ~20 GB)
        steps=12
        [ "$model" = llama-1b ] && steps=8
        for run in "full bf16" "full bf16 tensor-ops" "lora bf16" "full f32"; do
            set -- $run
            [ "$model" = llama-1b ] && [ "$run" != "lora bf16" ] && continue
            time_for 40 || { say "skipped ranger-tune $model $run (deadline)"; continue; }
            flags=(--dtype "$2")
            [ "$1" = lora ] && flags+=(--lora)
            [ -n "${3:-}" ] && flags+=(--optimizer-kernel "$3")
            rm -rf /tmp/rt-out
            with_memory "rt-$model-${run// /-}" "$BIN/ranger-tune" train --model "$M/$model" --data "$M/data.txt" \
                --output /tmp/rt-out --max-steps $steps --max-seq-length 512 --batch-size 8 --pack --device cuda \
                --learning-rate 1e-4 --log-every 1 "${flags[@]}"
            rc=$?
            say "ranger-tune $model $run, seq 512 x batch 8: rc $rc, $(tps /tmp/rt-out/metrics.jsonl 2>/dev/null) tokens/s (steps 2..$steps), peak GPU memory $PEAK_MIB MiB"
        done
        for run in "full bf16 radam" "lora bf16 radam" "full f32 radam"; do
            set -- $run
            [ "$model" = llama-1b ] && [ "$run" != "lora bf16 radam" ] && continue
            time_for 40 || { say "skipped pytorch $model $run (deadline)"; continue; }
            flags=(--dtype "$2" --optimizer "$3")
            [ "$1" = lora ] && flags+=(--lora)
            with_memory "pt-$model-${run// /-}" python3 tools/bench_pytorch.py "$M/$model" $steps --device cuda \
                --seq 512 --batch 8 "${flags[@]}"
            rc=$?
            say "$(grep '^pytorch' /tmp/last.log || echo "pytorch $run failed") [$model; rc $rc; peak GPU memory $PEAK_MIB MiB]"
        done
    done
fi

if [[ " $PARTS " == *" profile "* ]] && time_for 90; then
    write_models
    # Kernels 4,000 to 10,000 of a full bf16 run: past loading and the first step's setup.
    rm -rf /tmp/rt-out
    NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n1)"
    timeout 90 "$NCU" --clock-control none --metrics gpu__time_duration.sum --launch-skip 4000 --launch-count 6000 \
        --csv --log-file "$OUT/ncu.csv" "$BIN/ranger-tune" train --model /tmp/gpu-models/smollm2-135m \
        --data /tmp/gpu-models/data.txt --output /tmp/rt-out --max-steps 3 --max-seq-length 512 --batch-size 8 \
        --pack --device cuda --dtype bf16 --learning-rate 1e-4 >/tmp/ncu-run.log 2>&1
    say "profile: rc $?"
    python3 - "$OUT/ncu.csv" <<'EOF' | tee -a "$SUMMARY"
import csv, collections, sys
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))]
by = collections.defaultdict(lambda: [0.0, 0])
for r in rows:
    if r.get("Metric Name") == "gpu__time_duration.sum":
        # (in microseconds)
        v = float(r["Metric Value"].replace(",", "")) * {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}[r["Metric Unit"]]
        by[r["Kernel Name"][:90]][0] += v
        by[r["Kernel Name"][:90]][1] += 1
total = sum(v for v, _ in by.values())
print(f"profile: {sum(c for _, c in by.values())} kernels, {total / 1e3:.1f} ms of kernel time")
for name, (v, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:25]:
    print(f"  {v / 1e3:8.2f} ms {100 * v / total:5.1f} % {c:6d} x {name}")
EOF
fi
