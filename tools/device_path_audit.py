#!/usr/bin/env python3
"""Device-path audit: lists every device->host read and every f64 use in the library code that
training, evaluation and the optimizer run, and fails on any not declared below.

Why: on CUDA and Metal every device->host read (`to_scalar`, `to_vec*`, a copy to the CPU)
waits for the device's queue to drain, and Metal has no f64 at all. The training step makes
exactly one read (`candle_ranger::check_grads`); everything else that reads back or uses f64
must be CPU-only, once per run or evaluation, or outside training, and say so here.

Usage: python3 tools/device_path_audit.py [repo root]   (exit 1 on an undeclared use)
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent)
SCANNED = ["crates/candle-ranger/src", "crates/ranger-train/src"]
# A device->host read, or an f64 dtype used in an op.
# Calls of the crate's helpers that read back are listed too, so a new caller must be declared.
PATTERN = re.compile(
    r"to_scalar|to_vec[0-3]|to_host_f64|to_device\(&(?:Device::Cpu|cpu)\)|DType::F64"
    r"|non_finite_grads\(|\bgrad_norm\(|clip_grad_norm\(|\ball_finite\("
)

# (file, substring of the line) -> why it is not on the per-step device path. A file given as a
# directory prefix covers every file below it.
DECLARED = [
    # The step's one read.
    ("crates/candle-ranger/src/grad_check.rs", "", "the step's one read (check_grads); f64 only for f64 gradients"),
    # Host-side or dtype bookkeeping, no device op.
    ("crates/candle-ranger/src/state.rs", "DType::F64", "state dtype for f64 variables (refused on Metal)"),
    ("crates/candle-ranger/src/state_file.rs", "", "state files: written at checkpoints only"),
    ("crates/candle-ranger/src/ranger/state.rs", "", "state save/load: at checkpoints only"),
    ("crates/candle-ranger/src/ranger/slot.rs", "DType::F64", "host buffers of f64 variables (CPU fused path)"),
    ("crates/candle-ranger/src/ranger/slot.rs", "to_device(&Device::Cpu)", "master copy of a CPU (fused) variable"),
    ("crates/candle-ranger/src/fused.rs", "", "the fused CPU kernel: CPU tensors only"),
    ("crates/candle-ranger/src/device_support.rs", "", "the check that refuses f64 on Metal"),
    ("crates/candle-ranger/src/grad.rs", "", "public helpers (grad_norm, to_host_f64) the trainer's step does not use"),
    ("crates/candle-ranger/src/portable.rs", "to_scalar", "all_finite, only when no GradCheck covers a tensor"),
    ("crates/candle-ranger/src/lib.rs", "", "crate docs (doctest code)"),
    ("crates/candle-ranger/src/portable.rs", "fn all_finite", "its definition"),
    ("crates/candle-ranger/src/ranger/mod.rs", "None => all_finite(g)?", "only for a gradient no GradCheck covers"),
    ("crates/candle-ranger/src/lookahead.rs", "non_finite_grads(", "Lookahead<O> over any optimizer: not the trainer's step"),
    ("crates/ranger-train/src/kernels/dtype.rs", "DType::F64", "compute dtype: f64 models stay f64 (refused on Metal)"),
    ("crates/ranger-train/src/kernels/linear.rs", "DType::F64", "weight-gradient sink of the fused CPU linear"),
    ("crates/ranger-train/src/kernels/grad_sink.rs", "to_vec1", "add_tensor: CPU gradients only (taken under grad.device().is_cpu())"),
    ("crates/ranger-train/src/kernels/lm_head.rs", "to_scalar", "backward of the fused CPU LM-head loss (CPU only)"),
    ("crates/ranger-train/src/kernels/quantized_lm_head.rs", "to_scalar", "backward of the quantized CPU LM-head loss (CPU only)"),
    ("crates/ranger-train/src/kernels/path.rs", "DType::F64", "the fused-path test: CPU tensors only"),
    ("crates/ranger-train/src/model/llama.rs", "to_device(&Device::Cpu)", "fused LM-head loss: taken only for CPU tensors"),
    ("crates/ranger-train/src/model/llama.rs", "to_host_f64", "mean_loss: evaluation helper, once per call"),
    ("crates/ranger-train/src/trainer/step.rs", "to_scalar", "check_gradients: the first step only"),
    ("crates/ranger-train/src/task.rs", "to_host_f64", "classifier evaluation: once per evaluation batch"),
    ("crates/ranger-train/src/held_out.rs", "to_host_f64", "causal-LM evaluation and `eval`: once per batch"),
    ("crates/ranger-train/src/classify.rs", "to_vec2", "predictions and accuracy: evaluation and predict"),
    ("crates/ranger-train/src/output.rs", "DType::F64", "torch_dtype name for config.json"),
    ("crates/ranger-train/src/peft.rs", "to_scalar", "adapter import/export check, outside the step"),
    ("crates/ranger-train/src/testing.rs", "", "test helpers (random f64 models)"),
    ("crates/ranger-train/src/weights.rs", "", "weight files: load and save"),
    ("crates/ranger-train/src/gguf.rs", "to_vec1", "GGUF import: Phi-3's LongRoPE factors, read once on load (CPU)"),
    ("crates/ranger-train/src/gguf_export.rs", "to_device(&Device::Cpu)", "merge --gguf: the merged weights quantized on the CPU, once, outside training"),
]


def code_lines(path):
    """The file's lines up to its unit-test module, with line comments dropped."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() == "#[cfg(test)]":
            # A test-only module: unit tests sit at the end of a file in this code base.
            rest = path.read_text().splitlines()[n:]
            if rest and rest[0].strip().startswith("mod "):
                return
        stripped = line.strip()
        if stripped.startswith("//"):
            continue
        yield n, line


def main():
    undeclared, used = [], set()
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.rs")):
            rel = path.relative_to(ROOT).as_posix()
            if path.name == "tests.rs":  # a `#[cfg(test)] mod tests;` file
                continue
            for n, line in code_lines(path):
                if not PATTERN.search(line):
                    continue
                hit = next(
                    (i for i, (f, sub, _) in enumerate(DECLARED) if (rel == f or (f.endswith("/") and rel.startswith(f))) and sub in line),
                    None,
                )
                if hit is None:
                    undeclared.append(f"{rel}:{n}: {line.strip()}")
                else:
                    used.add(hit)
    for line in undeclared:
        print(f"undeclared device->host read or f64 use: {line}")
    stale = [f"{f} ({sub or 'any'})" for i, (f, sub, _) in enumerate(DECLARED) if i not in used]
    for s in stale:
        print(f"declared but not found (remove it from DECLARED): {s}")
    if undeclared or stale:
        sys.exit(1)
    print(f"device path audit: {len(used)} declared uses, no other device->host read or f64 use")


if __name__ == "__main__":
    main()
