//! Optimizer step throughput, side by side on the same transformer-shaped f32 parameter sets:
//! fused Ranger, portable (tensor-op) Ranger, `candle_nn::AdamW`, and a memory-bandwidth
//! reference (a STREAM-like triad over as many bytes as the fused update moves).
//!
//!     cargo bench -p candle-ranger --bench optimizer_step            # 1M, 25M, 100M
//!     cargo bench -p candle-ranger --bench optimizer_step -- 25      # only ~25M
//!     cargo bench -p candle-ranger --features cuda --bench optimizer_step -- 100 1000 --device cuda
//!
//! On a GPU (`--device cuda` or `metal`, with the matching feature) the variables, gradients and
//! state live on the device, each timing ends with a device synchronisation, the fused row is
//! the GPU kernel (`UpdatePath::Fused`), 8-bit and bf16 state take the tensor-op path (the GPU
//! kernels keep f32 state), and the bandwidth row is a device copy of the same bytes
//! (`Tensor::copy`: read + write). `1000` selects a ~1B-parameter set.
//!
//! Each figure is the mean over 12 timed steps (after 6 untimed ones, so the rectified phase is
//! measured), which include two Lookahead syncs (k = 6).

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use candle_ranger::{ParamsRanger, Ranger, StatePrecision, UpdatePath};
use rayon::prelude::*;

const WARMUP: usize = 6;
const TIMED: usize = 12;

/// Shapes of a decoder-only transformer with roughly `target` parameters.
fn transformer_shapes(target: usize) -> Vec<Vec<usize>> {
    let (hidden, layers, vocab) = match target {
        t if t <= 2_000_000 => (128, 4, 4_000),
        t if t <= 40_000_000 => (512, 6, 8_000),
        t if t <= 200_000_000 => (1024, 7, 16_000),
        _ => (2048, 18, 32_000),
    };
    let mut shapes = vec![vec![vocab, hidden]];
    for _ in 0..layers {
        shapes.extend([
            vec![hidden],
            vec![hidden, hidden],
            vec![hidden, hidden],
            vec![hidden, hidden],
            vec![hidden, hidden],
            vec![hidden],
            vec![4 * hidden, hidden],
            vec![hidden, 4 * hidden],
            vec![4 * hidden],
            vec![hidden],
        ]);
    }
    shapes.push(vec![hidden]);
    shapes
}

/// `n` values spread uniformly with standard deviation `std`, from a fixed xorshift seed: the
/// same data on every run (Candle's CPU `randn` cannot be seeded).
fn uniform(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let half_width = std * 3f32.sqrt();
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width
        })
        .collect()
}

fn make_vars(shapes: &[Vec<usize>], dev: &Device) -> (Vec<Var>, GradStore) {
    let mut grads = GradStore::default();
    let vars: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.iter().product();
            let values = Tensor::from_vec(uniform(n, 0.02, 2 * i as u64 + 1), s.as_slice(), dev).unwrap();
            let v = Var::from_tensor(&values).unwrap();
            grads.insert(&v, Tensor::from_vec(uniform(n, 1e-3, 2 * i as u64 + 2), s.as_slice(), dev).unwrap());
            v
        })
        .collect();
    (vars, grads)
}

fn time_steps<O: Optimizer>(opt: &mut O, grads: &GradStore, dev: &Device) -> f64 {
    for _ in 0..WARMUP {
        opt.step(grads).unwrap();
    }
    dev.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..TIMED {
        opt.step(grads).unwrap();
    }
    dev.synchronize().unwrap();
    t.elapsed().as_secs_f64() / TIMED as f64
}

/// The GPU's bandwidth row: copies of a tensor of `bytes / 2` bytes (each copy reads and writes
/// it), so the same bytes move as in the fused update.
fn device_copy_seconds(bytes: usize, dev: &Device) -> f64 {
    let a = Tensor::zeros(bytes / 8, candle_core::DType::F32, dev).unwrap();
    let mut keep = a.copy().unwrap();
    dev.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..TIMED {
        keep = a.copy().unwrap();
    }
    dev.synchronize().unwrap();
    std::hint::black_box(&keep);
    t.elapsed().as_secs_f64() / TIMED as f64
}

/// A triad `a = b + s * c` over `bytes` bytes in total (three f32 arrays), multithreaded.
fn triad_seconds(bytes: usize) -> f64 {
    let n = bytes / 12;
    let mut a = vec![0f32; n];
    let b = vec![1f32; n];
    let c = vec![2f32; n];
    let run = |a: &mut [f32]| {
        a.par_chunks_mut(1 << 16)
            .zip(b.par_chunks(1 << 16))
            .zip(c.par_chunks(1 << 16))
            .for_each(|((a, b), c)| a.iter_mut().zip(b).zip(c).for_each(|((a, b), c)| *a = b + 3.0 * c));
    };
    run(&mut a);
    let t = Instant::now();
    for _ in 0..TIMED {
        run(&mut a);
    }
    std::hint::black_box(&a);
    t.elapsed().as_secs_f64() / TIMED as f64
}

fn main() {
    let device_arg = std::env::args().skip_while(|a| a != "--device").nth(1).unwrap_or_else(|| "cpu".into());
    let dev = match device_arg.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).expect("--device cuda needs the cuda feature and a GPU"),
        "metal" => Device::new_metal(0).expect("--device metal needs the metal feature and a Mac"),
        other => panic!("--device {other}: expected cpu, cuda or metal"),
    };
    let sizes: Vec<usize> = {
        let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
        // (numbers select sizes in millions; `--only <text>` keeps the rows whose label has it;
        // `--device cpu|cuda|metal`)
        if args.is_empty() {
            vec![1, 25, 100]
        } else {
            args
        }
    };
    let only = std::env::args().skip_while(|a| a != "--only").nth(1).unwrap_or_default();
    let wanted = |label: &str| label.contains(only.as_str());
    println!(
        "device: {device_arg}; threads: {}; allocator: system (set MALLOC_MMAP_THRESHOLD_ to change glibc's)",
        rayon::current_num_threads()
    );
    println!("{:>10} {:<34} {:>11} {:>13} {:>10} {:>10}", "params", "what", "ms/step", "params/s", "GB/s", "vs bound");
    for millions in sizes {
        let shapes = transformer_shapes(millions * 1_000_000);
        let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        // Bytes the fused update must move per step: p, g, m, v read + p, m, v written (28 B),
        // plus slow read + written on one step in six (8 B / 6).
        let bytes = 28 * n + 8 * n / 6;
        let bound = if dev.is_cpu() { triad_seconds(bytes) } else { device_copy_seconds(bytes, &dev) };
        let row = |what: &str, secs: f64| {
            println!(
                "{:>10} {:<34} {:>11.2} {:>13.3e} {:>10.1} {:>9.2}x",
                n,
                what,
                secs * 1e3,
                n as f64 / secs,
                bytes as f64 / secs / 1e9,
                secs / bound
            );
        };
        row(if dev.is_cpu() { "bandwidth bound (triad, same bytes)" } else { "bandwidth bound (device copy)" }, bound);
        for (label, path, state_precision) in [
            (
                if dev.is_cpu() { "Ranger fused (CPU kernel)" } else { "Ranger fused (GPU kernel)" },
                UpdatePath::Fused,
                StatePrecision::F32,
            ),
            ("Ranger fused, 8-bit state", UpdatePath::Fused, StatePrecision::Int8),
            ("Ranger fused, bf16 state", UpdatePath::Fused, StatePrecision::Bf16),
            ("Ranger portable (tensor ops)", UpdatePath::Portable, StatePrecision::F32),
        ] {
            if !wanted(label) {
                continue;
            }
            // The GPU kernels keep f32 state: packed state takes the tensor-op path there.
            let (path, label) = match (dev.is_cpu(), state_precision) {
                (false, StatePrecision::Int8) => (UpdatePath::Auto, "Ranger tensor ops, 8-bit state"),
                (false, StatePrecision::Bf16) => (UpdatePath::Auto, "Ranger tensor ops, bf16 state"),
                _ => (path, label),
            };
            let (vars, grads) = make_vars(&shapes, &dev);
            let params = ParamsRanger { update_path: path, state_precision, ..Default::default() };
            let mut opt = Ranger::new(vars, params).unwrap();
            row(label, time_steps(&mut opt, &grads, &dev));
        }
        if !wanted("candle_nn::AdamW") {
            continue;
        }
        let (vars, grads) = make_vars(&shapes, &dev);
        let mut adamw = AdamW::new(vars, ParamsAdamW::default()).unwrap();
        row("candle_nn::AdamW", time_steps(&mut adamw, &grads, &dev));
    }
}
