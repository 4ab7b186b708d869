#!/usr/bin/env bash
# QLoRA adapters load with PEFT: trains a QLoRA and a DoRA-over-quantized adapter on SmolLM2's Q4_1
# GGUF (30 steps of the README's example data), merges each, and runs tools/check_peft_load.py on
# them against the base written by `ranger-tune convert`: every adapter tensor loads into PEFT with
# its value, PEFT's base + adapter gives the logits of our merged folder (1e-3), and PEFT's greedy
# text equals `ranger-tune generate --adapter`'s. Needs torch, transformers and peft
# (PYTHON=/path/to/python; not run in CI). Usage: tools/check_qlora_peft.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WORK="${1:-$(mktemp -d)}"
GGUF="$(bash tools/fetch_test_assets.sh smollm2)"
cargo build --release -q -p ranger-tune
B=target/release/ranger-tune
PROMPT="Glimmerholm is famous for"
$B convert --model "$GGUF" --output "$WORK/base"
for kind in qlora qdora; do
  extra=()
  [ "$kind" = qdora ] && extra=(--dora --lora-dropout 0.05)
  $B train --model "$GGUF" --data examples/data/glimmerholm.jsonl --output "$WORK/$kind" --lora "${extra[@]}" --max-steps 30
  $B merge --model "$GGUF" --adapter "$WORK/$kind/adapter" --output "$WORK/$kind-merged"
  text="$($B generate --model "$GGUF" --adapter "$WORK/$kind/adapter" --prompt "$PROMPT" --temperature 0 --max-tokens 12)"
  "$PYTHON" tools/check_peft_load.py "$WORK/base" "$WORK/$kind/adapter" --prompt "$PROMPT" \
    --expect-text "$text" --merged "$WORK/$kind-merged"
done
echo "QLoRA PEFT check passed ($WORK)"
