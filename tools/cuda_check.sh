#!/usr/bin/env bash
# Compile the CUDA build without a GPU: `cargo clippy --features cuda` (a check plus lints) of the
# libraries and the CLI, which runs the kernel build scripts (Candle's and ours: nvcc -> PTX) and
# type-checks every cuda_fwd.
# No link (the driver library libcuda is not on a machine without a GPU), no run.
#
# nvcc and the CUDA headers come from PyPI wheels, pinned to 13.4 (cudarc 0.19 accepts CUDA up to
# 13.4; mixing 13.5 parts makes ptxas fail with "Unsupported .version"), installed once into
# $RANGER_CUDA_VENV (default <repo>/.cache/cuda-venv, git-ignored).
#
# Usage: tools/cuda_check.sh [extra cargo args]     CUDA_COMPUTE_CAP defaults to 90 (H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RANGER_CUDA_VENV:-$PWD/.cache/cuda-venv}"
if [ ! -x "$VENV/lib/python3"*/site-packages/nvidia/cu13/bin/nvcc ] 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        'nvidia-cuda-nvcc==13.4.*' 'nvidia-cuda-runtime==13.4.*' 'nvidia-cuda-crt==13.4.*' \
        'nvidia-nvvm==13.4.*' nvidia-cuda-cccl
fi
CUDA_ROOT="$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)"
[ -x "$CUDA_ROOT/bin/nvcc" ] || { echo "cuda_check: no nvcc under $CUDA_ROOT" >&2; exit 1; }
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -n 2
cargo clippy -p candle-ranger -p ranger-train -p ranger-tune --all-targets --features cuda "$@" -- -D warnings
