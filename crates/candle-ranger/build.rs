//! With the `cuda` feature, compiles the fused CUDA step (src/cuda/ranger_step.cu) to PTX with
//! nvcc, as Candle's own kernels are built: `nvcc` from PATH or `$CUDA_ROOT/bin`, the virtual
//! architecture from `CUDA_COMPUTE_CAP` (default 80: the PTX is JIT-compiled for newer GPUs).
//! Without the feature this does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda/ranger_step.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("ranger_step.ptx");
    let nvcc = match std::env::var_os("CUDA_ROOT") {
        Some(root) if PathBuf::from(&root).join("bin/nvcc").exists() => PathBuf::from(root).join("bin/nvcc"),
        _ => PathBuf::from("nvcc"),
    };
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let status = Command::new(&nvcc)
        // No fused multiply-adds: the kernel rounds each operation as the CPU kernel does.
        .args(["--ptx", "-O3", "-std=c++17", "-fmad=false", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("src/cuda/ranger_step.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!("candle-ranger: cannot run {} ({e}); put nvcc on PATH or set CUDA_ROOT", nvcc.display())
        });
    assert!(status.success(), "candle-ranger: nvcc failed to compile src/cuda/ranger_step.cu");
}
