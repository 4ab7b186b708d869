#!/usr/bin/env bash
# Build, on a machine without a GPU, the CUDA binaries that tools/gpu_checks.sh runs on one: the
# device-capable test binaries, ranger-tune and the optimizer-step bench, into .devbin/ (and, packed,
# .devbin.tar.xz; both git-ignored, as is its target-cuda/), stripped, with the SmolLM2 tokenizer
# for the random benchmark models.
#
# nvcc comes from PyPI wheels pinned to the GPU machine's CUDA (13.0 by default: its driver must
# be able to JIT the PTX, and a driver JITs no PTX newer than itself); the driver library libcuda
# is linked against a stub made from cudarc's symbol list (the real one is loaded there), and
# cuBLAS, cuRAND and NVRTC against the wheels' libraries (PyTorch's wheels provide them there).
#
# Usage: tools/build_cuda_bins.sh         CUDA_VERSION=13.0 CUDA_COMPUTE_CAP=90 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_VERSION="${CUDA_VERSION:-13.0}"
VENV="$PWD/.cache/cu${CUDA_VERSION/./}"
if [ ! -x "$VENV/lib/python3"*/site-packages/nvidia/cu13/bin/nvcc ] 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-cuda-runtime==$CUDA_VERSION.*" "nvidia-cuda-crt==$CUDA_VERSION.*" \
        "nvidia-nvvm==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" "nvidia-cublas==$CUDA_VERSION.*" \
        "nvidia-cuda-nvrtc==$CUDA_VERSION.*" nvidia-curand
fi
CUDA_ROOT="$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)"
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# Link-time stand-ins: libcuda from cudarc's extern declarations, the others the wheels' libraries.
STUB="$PWD/.cache/cudastub"
mkdir -p "$STUB"
cargo fetch -q
CUDARC_VERSION="$(grep -A1 '^name = "cudarc"' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')"
CUDARC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$CUDARC_VERSION" | head -n1)"
grep -ohE "^\s+fn cu[A-Za-z0-9_]+\(" "$CUDARC/src/driver/sys/mod.rs" | sed -E 's/\s+fn //; s/\(//' | sort -u |
    awk '{print "void "$1"(void){}"}' >"$STUB/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/stub.c"
ln -sf libcuda.so "$STUB/libcuda.so.1"
for l in cublas cublasLt nvrtc cudart; do ln -sf "$CUDA_ROOT/lib/lib$l.so.13" "$STUB/lib$l.so"; done
ln -sf "$CUDA_ROOT/lib/libcurand.so.10" "$STUB/libcurand.so"

export RUSTFLAGS="-L $STUB" CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-$PWD/target-cuda}"
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true
TESTS="device_paths gradient_checkpointing trainer classify_trainer qlora"
F=candle-ranger/cuda,ranger-train/cuda
cargo test --release -p candle-ranger --features cuda --no-run --test ranger_reference --test master_weights
cargo test --release --features $F --no-run $(for t in $TESTS; do printf -- '--test %s ' "$t"; done)
cargo bench -p candle-ranger --features cuda --no-run --bench optimizer_step
cargo build --release -p ranger-tune --features cuda

rm -rf .devbin && mkdir -p .devbin
newest() { ls -t "$CARGO_TARGET_DIR"/release/deps/"$1"-* | grep -v '\.d$' | head -n1; }
for t in ranger_reference master_weights $TESTS optimizer_step; do cp "$(newest "$t")" ".devbin/$t"; done
cp "$CARGO_TARGET_DIR/release/ranger-tune" .devbin/
# The tests find their fixtures under the path they were compiled at.
echo "$PWD" >.devbin/repo_path
# A tokenizer for the random models (ranger-tune convert writes it from SmolLM2's GGUF).
if [ ! -f .cache/smollm2-tokenizer/tokenizer.json ]; then
    GGUF="$(bash tools/fetch_test_assets.sh smollm2 | tail -n1)"
    rm -rf .cache/smollm2-hf
    # (on the CPU the stub driver library is never called)
    LD_LIBRARY_PATH="$STUB:$CUDA_ROOT/lib" ./.devbin/ranger-tune convert --model "$GGUF" --output .cache/smollm2-hf >/dev/null
    mkdir -p .cache/smollm2-tokenizer
    cp .cache/smollm2-hf/tokenizer.json .cache/smollm2-hf/tokenizer_config.json .cache/smollm2-tokenizer/
    rm -rf .cache/smollm2-hf
fi
cp -r .cache/smollm2-tokenizer .devbin/
du -sh .devbin/* | sort -h
# One archive under the device tool's 64 MiB: the binaries share Candle's kernels, so a window
# wider than one binary compresses ~560 MB to ~17 MB (about 4 minutes on 2 cores).
tar cf - .devbin | xz -T2 --lzma2=preset=6,dict=1GiB >.devbin.tar.xz
ls -la .devbin.tar.xz
