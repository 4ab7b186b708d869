//! Each fused CPU kernel against its op-by-op (portable) version: values and gradients.

use super::activations::{geglu, geglu_ops, gelu_erf, gelu_tanh, gelu_tanh_ops, swiglu, swiglu_ops};
use super::cpu_op::Fused;
use super::cross_entropy::{cross_entropy_rows, cross_entropy_rows_ops};
use super::linear::{linear, FrozenLinear};
use super::lm_head::{LinearCrossEntropy, IGNORE_TARGET};
use super::norms::{layer_norm, layer_norm_ops, rms_norm, rms_norm_ops};
use super::rotary::{apply_rotary, apply_rotary_ops, apply_rotary_rows};
use super::softmax::{masked_softmax, softmax_last_dim, softmax_last_dim_ops};
use crate::rng::Rng;
use candle_core::{Device, Shape, Tensor, Var};

/// A fused function and its op-by-op counterpart.
type Pair<'a> = (&'a dyn Fn(&Tensor) -> Tensor, &'a dyn Fn(&Tensor) -> Tensor);

/// Normal f64 samples from a seeded generator: Candle's CPU `randn` cannot be seeded, and every
/// test must see the same data on every run.
pub(super) fn randn(rng: &mut Rng, mean: f64, std: f64, shape: impl Into<Shape>) -> Tensor {
    let shape = shape.into();
    let values: Vec<f64> = (0..shape.elem_count()).map(|_| mean + std * rng.normal()).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn close(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn fused_kernels_match_the_op_by_op_versions() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(7);
    let x = Var::from_tensor(&(randn(&mut rng, 0f64, 3.0, (6, 37)))).unwrap();
    let w = randn(&mut rng, 0f64, 1.0, (6, 37));
    let t = Tensor::new(&[0u32, 5, 36, 7, 7, 12], &dev).unwrap();
    let frozen = randn(&mut rng, 0f64, 1.0, (5, 37));
    let w5 = randn(&mut rng, 0f64, 1.0, (6, 5));
    let frozen_linear = |x: &Tensor| x.apply_op1(Fused(FrozenLinear { weight: frozen.clone() })).unwrap();
    let pairs: [Pair; 4] = [
        (&|x| frozen_linear(x).mul(&w5).unwrap().sum_all().unwrap(), &|x| {
            x.matmul(&frozen.t().unwrap()).unwrap().mul(&w5).unwrap().sum_all().unwrap()
        }),
        (&|x| gelu_erf(x).unwrap().mul(&w).unwrap().sum_all().unwrap(), &|x| {
            // x Φ(x) from erf, whose backward is exact (Candle's gelu_erf backward rounds 1/√(2π)).
            let phi = ((x * std::f64::consts::FRAC_1_SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5;
            (x * phi.unwrap()).unwrap().mul(&w).unwrap().sum_all().unwrap()
        }),
        (&|x| softmax_last_dim(x).unwrap().mul(&w).unwrap().sum_all().unwrap(), &|x| {
            softmax_last_dim_ops(x).unwrap().mul(&w).unwrap().sum_all().unwrap()
        }),
        (&|x| cross_entropy_rows(x, &t).unwrap().sum_all().unwrap(), &|x| {
            cross_entropy_rows_ops(x, &t).unwrap().sum_all().unwrap()
        }),
    ];
    // RMSNorm and rotary, values and both gradients.
    let x4v = Var::from_tensor(&randn(&mut rng, 0f64, 1.0, (2, 3, 5, 8))).unwrap();
    let wv = Var::from_tensor(&randn(&mut rng, 1f64, 0.1, 8)).unwrap();
    let cos = randn(&mut rng, 0f64, 1.0, (2, 1, 5, 8));
    let sin = randn(&mut rng, 0f64, 1.0, (2, 1, 5, 8));
    let w4 = randn(&mut rng, 0f64, 1.0, (2, 3, 5, 8));
    let bv = Var::from_tensor(&randn(&mut rng, 0f64, 0.1, 8)).unwrap();
    let run = |f: &dyn Fn(&Tensor) -> Tensor| {
        let y = f(x4v.as_tensor()).mul(&w4).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        (y, g.get(&x4v).unwrap().clone(), g.get(&wv).cloned(), g.get(&bv).cloned())
    };
    let pairs4: [Pair; 8] = [
        (&|x| rms_norm(x, wv.as_tensor(), 1e-5).unwrap(), &|x| rms_norm_ops(x, wv.as_tensor(), 1e-5).unwrap()),
        (&|x| layer_norm(x, wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap(), &|x| {
            layer_norm_ops(x, wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap()
        }),
        (&|x| apply_rotary(x, &cos, &sin).unwrap(), &|x| apply_rotary_ops(x, &cos, &sin).unwrap()),
        (
            // [b, h, s, d] -> rows [b * s, h * d] and back.
            &|x| {
                let rows = x.transpose(1, 2).unwrap().reshape((10, 24)).unwrap();
                let (c, s) = (cos.reshape((10, 8)).unwrap(), sin.reshape((10, 8)).unwrap());
                apply_rotary_rows(&rows, &c, &s, 8).unwrap().reshape((2, 5, 3, 8)).unwrap().transpose(1, 2).unwrap()
            },
            &|x| apply_rotary_ops(x, &cos, &sin).unwrap(),
        ),
        (
            // Partial (Phi): the first 4 of each head's 8 values rotate, the rest pass.
            &|x| {
                let rows = x.transpose(1, 2).unwrap().reshape((10, 24)).unwrap();
                let c = cos.reshape((10, 8)).unwrap().narrow(1, 0, 4).unwrap();
                let s = sin.reshape((10, 8)).unwrap().narrow(1, 0, 4).unwrap();
                apply_rotary_rows(&rows, &c, &s, 8).unwrap().reshape((2, 5, 3, 8)).unwrap().transpose(1, 2).unwrap()
            },
            &|x| {
                let (c, s) = (cos.narrow(3, 0, 4).unwrap(), sin.narrow(3, 0, 4).unwrap());
                let rotated = apply_rotary_ops(&x.narrow(3, 0, 4).unwrap(), &c, &s).unwrap();
                Tensor::cat(&[&rotated, &x.narrow(3, 4, 4).unwrap()], 3).unwrap()
            },
        ),
        (&|x| swiglu(x, &x.broadcast_mul(wv.as_tensor()).unwrap()).unwrap(), &|x| {
            swiglu_ops(x, &x.broadcast_mul(wv.as_tensor()).unwrap()).unwrap()
        }),
        (&|x| gelu_tanh(&(x * 2.0).unwrap()).unwrap(), &|x| gelu_tanh_ops(&(x * 2.0).unwrap()).unwrap()),
        // The inputs reach |x| ~ 4 (both tails of the tanh GELU).
        (&|x| geglu(&(x * 2.0).unwrap(), &x.broadcast_mul(wv.as_tensor()).unwrap()).unwrap(), &|x| {
            geglu_ops(&(x * 2.0).unwrap(), &x.broadcast_mul(wv.as_tensor()).unwrap()).unwrap()
        }),
    ];
    for (fused, ops) in pairs4 {
        let (a, b) = (run(fused), run(ops));
        assert!(close(&a.0, &b.0) < 1e-10);
        assert!(close(&a.1, &b.1) < 1e-10);
        for (ga, gb) in [(&a.2, &b.2), (&a.3, &b.3)] {
            assert_eq!(ga.is_some(), gb.is_some());
            if let (Some(ga), Some(gb)) = (ga, gb) {
                assert!(close(ga, gb) < 1e-10);
            }
        }
    }
    // The fused LM head + loss, in chunks of 3 rows (one with no target at all), against
    // matmul + cross-entropy: loss and both gradients.
    let hidden = Var::from_tensor(&randn(&mut rng, 0f64, 1.0, (10, 8))).unwrap();
    let head = Var::from_tensor(&randn(&mut rng, 0f64, 1.0, (37, 8))).unwrap();
    let ignore = IGNORE_TARGET;
    let targets = [3u32, ignore, 36, ignore, ignore, ignore, 7, ignore, 12, 0];
    let keep = Tensor::new(&targets.map(|t| if t == ignore { 0f64 } else { 1.0 }), &dev).unwrap();
    let plain = Tensor::new(&targets.map(|t| if t == ignore { 0 } else { t }), &dev).unwrap();
    // Plain, and with Gemma 2's final-logit soft-capping at 1.5 (logits of order 3 here).
    for cap in [None, Some(1.5)] {
        let mut logits = hidden.matmul(&head.t().unwrap()).unwrap();
        if let Some(cap) = cap {
            logits = ((logits / cap).unwrap().tanh().unwrap() * cap).unwrap();
        }
        let reference = cross_entropy_rows_ops(&logits, &plain).unwrap().mul(&keep).unwrap().sum_all().unwrap();
        for rows in [3, 4, 100] {
            let op = LinearCrossEntropy::new(true, true).with_chunk_rows(rows).with_softcap(cap);
            let fused = hidden.apply_op3(head.as_tensor(), &Tensor::new(&targets, &dev).unwrap(), Fused(op)).unwrap();
            assert!(close(&fused, &reference) < 1e-12, "chunk {rows}, cap {cap:?}");
            let (gf, gr) =
                ((&fused * 3.0).unwrap().backward().unwrap(), (&reference * 3.0).unwrap().backward().unwrap());
            for v in [&hidden, &head] {
                assert!(close(gf.get(v).unwrap(), gr.get(v).unwrap()) < 1e-12, "chunk {rows}, cap {cap:?}");
            }
            // Evaluation (no gradients) gives the same loss.
            let op = LinearCrossEntropy::new(false, false).with_chunk_rows(rows).with_softcap(cap);
            let eval = hidden.apply_op3(head.as_tensor(), &Tensor::new(&targets, &dev).unwrap(), Fused(op)).unwrap();
            assert!(close(&eval, &reference) < 1e-12, "evaluation, chunk {rows}, cap {cap:?}");
        }
    }
    // A trainable linear layer: both gradients, and none of them tracked (they keep no
    // activation alive).
    let lw = Var::from_tensor(&randn(&mut rng, 0f64, 1.0, (5, 37))).unwrap();
    let lin = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
        let g = f(x.as_tensor(), lw.as_tensor()).mul(&w5).unwrap().sum_all().unwrap().backward().unwrap();
        (g.get(&x).unwrap().clone(), g.get(&lw).unwrap().clone())
    };
    let (a, b) = (lin(&|x, w| linear(x, w).unwrap()), lin(&|x, w| x.matmul(&w.t().unwrap()).unwrap()));
    assert!(close(&a.0, &b.0) < 1e-12 && close(&a.1, &b.1) < 1e-12);
    assert!(a.1.is_contiguous());
    // RMSNorm over more rows than one task of its backward takes (64).
    let xr = Var::from_tensor(&randn(&mut rng, 0f64, 1.0, (150, 8))).unwrap();
    let wr = randn(&mut rng, 0f64, 1.0, (150, 8));
    let rms_grads = |f: &dyn Fn(&Tensor) -> Tensor| {
        let g = f(xr.as_tensor()).mul(&wr).unwrap().sum_all().unwrap().backward().unwrap();
        (g.get(&xr).unwrap().clone(), g.get(&wv).unwrap().clone())
    };
    let (a, b) = (
        rms_grads(&|x| rms_norm(x, wv.as_tensor(), 1e-5).unwrap()),
        rms_grads(&|x| rms_norm_ops(x, wv.as_tensor(), 1e-5).unwrap()),
    );
    assert!(close(&a.0, &b.0) < 1e-10 && close(&a.1, &b.1) < 1e-10);
    let mask = randn(&mut rng, 0f64, 1.0, (2, 1, 3, 37));
    let x4 = x.as_tensor().reshape((2, 1, 3, 37)).unwrap();
    let fused_m = masked_softmax(&x4, &mask).unwrap();
    let ops_m = softmax_last_dim_ops(&x4.broadcast_add(&mask).unwrap()).unwrap();
    assert!(close(&fused_m, &ops_m) < 1e-12);
    for (fused, ops) in pairs {
        let (a, b) = (fused(x.as_tensor()), ops(x.as_tensor()));
        assert!(close(&a, &b) < 1e-12);
        let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
        assert!(close(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-12);
    }
}

/// The fused LoRA projection against `x W^T + scale (x_d A^T) B^T` op by op, with and without a
/// dropout mask: the output, the input's gradient and A's and B's, returned to Candle or
/// written into a sink (twice, accumulated).
#[test]
fn fused_lora_projection_matches_the_op_by_op_version() {
    use super::grad_sink::GradSink;
    use super::lora_linear::lora_linear;
    use super::weight::Weight;
    use candle_core::backprop::GradStore;
    let mut rng = Rng::new(11);
    let (n, inp, out, r, scale) = (7, 13, 9, 3, 0.7);
    let x = Var::from_tensor(&randn(&mut rng, 0f64, 1.0, (n, inp))).unwrap();
    let w = randn(&mut rng, 0f64, 1.0, (out, inp));
    let a = Var::from_tensor(&randn(&mut rng, 0f64, 0.5, (r, inp))).unwrap();
    let b = Var::from_tensor(&randn(&mut rng, 0f64, 0.5, (out, r))).unwrap();
    let probe = randn(&mut rng, 0f64, 1.0, (n, out));
    let keep: Vec<f64> = (0..n * inp).map(|i| if i % 3 == 0 { 0.0 } else { 1.5 }).collect();
    let mask = Tensor::from_vec(keep, (n, inp), &Device::Cpu).unwrap();
    for mask in [None, Some(&mask)] {
        let xd = match mask {
            Some(m) => x.as_tensor().mul(m).unwrap(),
            None => x.as_tensor().clone(),
        };
        let low = (xd.matmul(&a.t().unwrap()).unwrap() * scale).unwrap().matmul(&b.t().unwrap()).unwrap();
        let reference = (x.as_tensor().matmul(&w.t().unwrap()).unwrap() + low).unwrap();
        let fused =
            lora_linear(&x, &Weight::Dense(w.clone()), (&a, &b, scale), mask).unwrap().expect("the fused op applies");
        assert!(close(&fused, &reference) < 1e-12, "output, mask {}", mask.is_some());
        let loss = |y: &Tensor| y.mul(&probe).unwrap().sum_all().unwrap();
        let (gr, gf) = (loss(&reference).backward().unwrap(), loss(&fused).backward().unwrap());
        for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
            let d = close(gr.get(v).unwrap(), gf.get(v).unwrap());
            assert!(d < 1e-12, "{name} gradient differs by {d}, mask {}", mask.is_some());
        }
        // Through a sink, two passes accumulated: twice the gradients of A and B.
        let sink = GradSink::new();
        let mut acc = GradStore::default();
        for _ in 0..2 {
            let y = {
                let _on = sink.activate();
                lora_linear(&x, &Weight::Dense(w.clone()), (&a, &b, scale), mask).unwrap().unwrap()
            };
            let g = loss(&y).backward().unwrap();
            assert!(g.get(&a).is_none() && g.get(&b).is_none(), "A and B went to the sink");
            acc.insert(&x, g.get(&x).unwrap().clone());
        }
        sink.merge_into(&mut acc).unwrap();
        for v in [&a, &b] {
            let d = close(&(gr.get(v).unwrap() * 2.0).unwrap(), acc.get(v).unwrap());
            assert!(d < 1e-12, "sink gradient differs by {d}, mask {}", mask.is_some());
        }
    }
    // An input that needs no gradient gets none; A and B still get theirs.
    let plain_x = x.as_tensor().detach();
    let g = lora_linear(&plain_x, &Weight::Dense(w.clone()), (&a, &b, scale), None)
        .unwrap()
        .unwrap()
        .mul(&probe)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = g.backward().unwrap();
    assert!(g.get(&plain_x).is_none() && g.get(&a).is_some() && g.get(&b).is_some());
    // A trainable base weight is not this op's case: the caller computes it op by op.
    let wv = Var::from_tensor(&w).unwrap();
    assert!(lora_linear(&x, &Weight::Dense(wv.as_tensor().clone()), (&a, &b, scale), None).unwrap().is_none());
}

/// The fused LoRA projection over a quantized base equals the op-by-op LoRA projection over
/// the dequantized base (with a dropout mask): output, input gradient, A's and B's.
#[test]
fn lora_over_a_quantized_base_is_lora_over_the_dequantized_one() {
    use super::lora_linear::lora_linear;
    use super::quantized::QuantizedWeight;
    use super::weight::Weight;
    use candle_core::quantized::GgmlDType;
    use candle_core::DType;
    let values = |t: &Tensor| -> Vec<f64> { t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    let max_diff =
        |a: &Tensor, b: &Tensor| values(a).iter().zip(values(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let dev = Device::Cpu;
    let (n, inp, out, r, scale) = (9, 64, 24, 4, 0.5);
    let w = Tensor::randn(0f32, 0.5, (out, inp), &dev).unwrap();
    let qw = QuantizedWeight::quantize(&w, GgmlDType::Q4_1).unwrap().with_chunk_elems(7 * inp);
    let dense = qw.dequantize().unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, inp), &dev).unwrap()).unwrap();
    let a = Var::from_tensor(&Tensor::randn(0f32, 0.3, (r, inp), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (out, r), &dev).unwrap()).unwrap();
    let keep: Vec<f32> = (0..n * inp).map(|i| if i % 4 == 0 { 0.0 } else { 4.0 / 3.0 }).collect();
    let mask = Tensor::from_vec(keep, (n, inp), &dev).unwrap();
    let fused = lora_linear(&x, &Weight::Quantized(qw), (&a, &b, scale), Some(&mask)).unwrap().expect("applies");
    let low = (x.mul(&mask).unwrap().matmul(&a.t().unwrap()).unwrap() * scale).unwrap().matmul(&b.t().unwrap());
    let reference = (x.matmul(&dense.t().unwrap()).unwrap() + low.unwrap()).unwrap();
    assert!(max_diff(&fused, &reference) < 1e-4, "output");
    let (gf, gr) = (fused.sin().unwrap().sum_all().unwrap().backward().unwrap(), {
        reference.sin().unwrap().sum_all().unwrap().backward().unwrap()
    });
    for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
        let d = max_diff(gf.get(v).unwrap(), gr.get(v).unwrap());
        assert!(d < 1e-4, "{name} gradient differs by {d}");
    }
}

/// The fused LM head + loss in f32 over a real vocabulary's length (Gemma 3's 262,144) with a
/// peaked distribution, as a trained model's is: one logit at 0 and the rest near -20, whose
/// exponentials (~1e-9 each) vanish one by one against a running f32 sum of 1 but add up to
/// ~9e-4 of the loss. Dense and quantized heads, training and evaluation, against the loss
/// computed in f64.
#[test]
fn the_lm_head_loss_keeps_a_long_vocabulary_s_small_terms() {
    use super::quantized::QuantizedWeight;
    use super::quantized_lm_head::QuantizedLinearCrossEntropy;
    use candle_core::quantized::GgmlDType;
    let (v, h) = (262_144, 32);
    let mut rng = Rng::new(5);
    // x = e_0, so row i's logit is w[i, 0]: the target's (0) is 0, the others -20 + N(0, 1).
    let mut w = vec![0f32; v * h];
    for i in 1..v {
        w[i * h] = -20.0 + rng.normal() as f32;
    }
    let mut x = vec![0f32; h];
    x[0] = 1.0;
    let dev = Device::Cpu;
    let x = Tensor::from_vec(x, (1, h), &dev).unwrap();
    let t = Tensor::new(&[0u32], &dev).unwrap();
    let loss_of = |w: &[f32]| {
        let lse = (0..v).map(|i| (w[i * h] as f64).exp()).sum::<f64>().ln();
        lse - w[0] as f64
    };
    let dense = Tensor::from_vec(w.clone(), (v, h), &dev).unwrap();
    let want = loss_of(&w);
    assert!(want > 8e-4, "the small terms carry {want} of the loss");
    for grads in [false, true] {
        let got = x.apply_op3(&dense, &t, Fused(LinearCrossEntropy::new(grads, grads))).unwrap();
        let got = got.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6 * want.max(1.0), "dense head, grads {grads}: {got} vs {want}");
    }
    // Q8_0 blocks of 32: each row's one value is kept to its block's scale.
    let q = QuantizedWeight::quantize(&dense, GgmlDType::Q8_0).unwrap().with_dtype(candle_core::DType::F32);
    let deq: Vec<f32> = q.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want = loss_of(&deq);
    for grads in [false, true] {
        let got = x.apply_op2(&t, Fused(QuantizedLinearCrossEntropy::new(q.clone(), grads))).unwrap();
        let got = got.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6 * want.max(1.0), "quantized head, grads {grads}: {got} vs {want}");
    }
}
