#!/usr/bin/env bash
# transformers and PEFT load what ranger-tune writes for every new model family, with
# ranger-tune's logits (README "Model families against transformers"). Run by .ci/run:
#   1. a virtual environment with pinned torch, transformers, peft and gguf (transformers reads
#      GGUF files with it) from PyPI (about 5.6 GB
#      with torch's CUDA libraries, which torch needs to import even on a CPU), kept in
#      $RANGER_INTEROP_VENV (default .cache/interop-venv) and reused when it has those versions;
#   2. tests/family_folders.rs, keeping its folders and logits in a temporary folder;
#   3. tools/check_family_interop.py over them.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=(torch==2.15.0 transformers==5.25.0 peft==0.21.2 gguf==0.19.0)
venv="${RANGER_INTEROP_VENV:-.cache/interop-venv}"
have() {
  "$venv/bin/python" - "${pins[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
PY
}
if ! have; then
  rm -rf "$venv"
  # pip holds the downloaded wheels and the installed files at once: about 8.5 GB at the peak
  # (measured in a clean clone). Say so up front rather than fail half-way with ENOSPC.
  mkdir -p "$(dirname "$venv")"
  free_kb=$(df -Pk "$(dirname "$venv")" | awk 'NR == 2 { print $4 }')
  if [ "$free_kb" -lt $((9 * 1024 * 1024)) ]; then
    echo "interop_check: installing ${pins[*]} needs about 9 GB free under $(dirname "$venv"), and" \
      "$((free_kb / 1024)) MB are; free some space or point RANGER_INTEROP_VENV elsewhere" >&2
    exit 1
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-cache-dir "${pins[@]}"
  have || { echo "interop_check: $venv lacks ${pins[*]}" >&2; exit 1; }
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
RANGER_INTEROP_DIR="$out" cargo test -q --test family_folders
"$venv/bin/python" tools/check_family_interop.py "$out"
