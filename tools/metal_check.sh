#!/usr/bin/env bash
# Type-check and lint the Metal build of the optimizer crate without a Mac: `cargo clippy
# --features metal --target aarch64-apple-darwin` of candle-ranger (its fused Metal step's Rust
# side; the shader itself is compiled by the Metal device at run time). The objc2 crates that
# Candle's Metal backend uses are plain Rust, so they check on Linux; ranger-train does not (its
# tokenizer and TLS dependencies compile C code that needs the macOS SDK).
#
# Usage: tools/metal_check.sh [extra cargo args]
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-apple-darwin
if ! rustup target list --installed | grep -qx "$TARGET"; then
    if ! rustup target add "$TARGET"; then
        echo "metal_check: SKIPPED: the $TARGET standard library could not be installed (rustup needs static.rust-lang.org)" >&2
        exit 0
    fi
fi
cargo clippy -p candle-ranger --all-targets --features metal --target "$TARGET" "$@" -- -D warnings
