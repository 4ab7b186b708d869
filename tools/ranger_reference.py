#!/usr/bin/env python3
"""Generate the reference trajectories that `crates/candle-ranger/tests/ranger_reference.rs` checks against.

The reference is PyTorch's own `torch.optim.RAdam` (one parameter group per case), with
gradient centralization applied to `.grad` before each step and Lookahead applied after it,
exactly as described in the Ranger papers. Every Lookahead case is cross-checked against
`pytorch_optimizer.Ranger(..., degenerated_to_sgd=True)`; the script fails if they disagree.
The "skip" fallback has no PyTorch counterpart, so for it the script uses a short hand-written
loop over torch ops (the same formulas as `torch.optim.RAdam`, minus the SGD fallback).

Usage (needs torch, pytorch_optimizer, safetensors, numpy):
    python tools/ranger_reference.py crates/candle-ranger/tests/fixtures/ranger_reference.safetensors

The output holds, for case C and tensor i,
    C/i/grads   [steps, *shape]     the gradient fed at each step
    C/i/params  [steps + 1, *shape] the parameter before the first step and after every step
and the metadata key C holds the case's hyperparameters as JSON.
"""
import json
import math
import sys

import numpy as np
import torch
from pytorch_optimizer import Ranger as PoRanger
from safetensors.numpy import save_file

STEPS = 64
SHAPES = [(13,), (8, 11), (3, 4, 3, 3)]
# Gradient scale per tensor: the trajectories cover gradients from ~1e-3 to ~10.
SCALES = [1e-3, 1.0, 10.0]

CASES = [
    # name, hyperparameters (ParamsRanger field names)
    ("ranger_default", dict(lr=1e-2, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.0,
                            decoupled_weight_decay=True, lookahead_k=6, lookahead_alpha=0.5,
                            centralization="rank>1", fallback="sgd")),
    ("decoupled_wd_k5", dict(lr=3e-2, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.1,
                             decoupled_weight_decay=True, lookahead_k=5, lookahead_alpha=0.8,
                             centralization="rank>1", fallback="sgd")),
    ("l2_wd_no_gc_k4", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-5, weight_decay=0.05,
                            decoupled_weight_decay=False, lookahead_k=4, lookahead_alpha=0.3,
                            centralization="off", fallback="sgd")),
    ("conv_only_k7", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          decoupled_weight_decay=True, lookahead_k=7, lookahead_alpha=0.5,
                          centralization="rank>3", fallback="sgd")),
    ("beta2_099_k3", dict(lr=5e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01,
                          decoupled_weight_decay=True, lookahead_k=3, lookahead_alpha=0.6,
                          centralization="rank>1", fallback="sgd")),
    ("radam_torch_defaults", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                  decoupled_weight_decay=False, lookahead_k=0, lookahead_alpha=0.5,
                                  centralization="off", fallback="sgd")),
    ("radam_l2", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02,
                      decoupled_weight_decay=False, lookahead_k=0, lookahead_alpha=0.5,
                      centralization="off", fallback="sgd")),
    ("ranger_skip_fallback", dict(lr=1e-2, beta1=0.95, beta2=0.999, eps=1e-5, weight_decay=0.1,
                                  decoupled_weight_decay=True, lookahead_k=6, lookahead_alpha=0.5,
                                  centralization="rank>1", fallback="skip")),
]


def make_grads(rng, dtype):
    """Per tensor: a persistent direction plus noise, so momentum neither vanishes nor saturates."""
    out = []
    for shape, scale in zip(SHAPES, SCALES):
        direction = rng.standard_normal(shape)
        noise = rng.standard_normal((STEPS,) + shape)
        g = scale * (direction[None] + 0.7 * noise)
        out.append(torch.tensor(g, dtype=dtype))
    return out


def make_params(rng, dtype):
    return [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in SHAPES]


def centralize(g, mode):
    threshold = {"off": None, "rank>1": 1, "rank>3": 3}[mode]
    if threshold is None or g.dim() <= threshold:
        return g
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


def run_torch_radam(hp, params0, grads):
    """torch.optim.RAdam + gradient centralization + Lookahead."""
    ps = [p.clone().requires_grad_(True) for p in params0]
    opt = torch.optim.RAdam(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"],
                            decoupled_weight_decay=hp["decoupled_weight_decay"], foreach=False)
    slow = [p.detach().clone() for p in ps]
    traj = [[p.detach().clone()] for p in ps]
    for t in range(STEPS):
        for p, g in zip(ps, grads):
            p.grad = centralize(g[t].clone(), hp["centralization"])
        opt.step()
        k = hp["lookahead_k"]
        if k > 0 and (t + 1) % k == 0:
            with torch.no_grad():
                for p, s in zip(ps, slow):
                    s.add_(p - s, alpha=hp["lookahead_alpha"])
                    p.copy_(s)
        for tr, p in zip(traj, ps):
            tr.append(p.detach().clone())
    return [torch.stack(tr) for tr in traj]


def run_manual_skip(hp, params0, grads):
    """RAdam with the 'skip' fallback (no update while rho_t <= 5) + GC + Lookahead, in torch ops."""
    b1, b2, lr, eps, wd = hp["beta1"], hp["beta2"], hp["lr"], hp["eps"], hp["weight_decay"]
    ps = [p.clone() for p in params0]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    slow = [p.clone() for p in ps]
    traj = [[p.clone()] for p in ps]
    rho_inf = 2 / (1 - b2) - 1
    for t in range(1, STEPS + 1):
        for i, (p, m, v) in enumerate(zip(ps, ms, vs)):
            g = centralize(grads[i][t - 1].clone(), hp["centralization"])
            if wd != 0:
                if hp["decoupled_weight_decay"]:
                    p.mul_(1 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            rho_t = rho_inf - 2 * t * (b2 ** t) / bc2
            if rho_t > 5:
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                p.add_((m / bc1) * lr * (bc2 ** 0.5 / (v.sqrt() + eps)) * r, alpha=-1.0)
        k = hp["lookahead_k"]
        if k > 0 and t % k == 0:
            for p, s in zip(ps, slow):
                s.add_(p - s, alpha=hp["lookahead_alpha"])
                p.copy_(s)
        for tr, p in zip(traj, ps):
            tr.append(p.clone())
    return [torch.stack(tr) for tr in traj]


def run_pytorch_optimizer_ranger(hp, params0, grads):
    ps = [p.clone().requires_grad_(True) for p in params0]
    opt = PoRanger(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), alpha=hp["lookahead_alpha"],
                   k=hp["lookahead_k"], n_sma_threshold=5, degenerated_to_sgd=True,
                   weight_decay=hp["weight_decay"], weight_decouple=hp["decoupled_weight_decay"],
                   use_gc=hp["centralization"] != "off", gc_conv_only=hp["centralization"] == "rank>3",
                   eps=hp["eps"], foreach=False)
    traj = [[p.detach().clone()] for p in ps]
    for t in range(STEPS):
        for p, g in zip(ps, grads):
            p.grad = g[t].clone()
        opt.step()
        for tr, p in zip(traj, ps):
            tr.append(p.detach().clone())
    return [torch.stack(tr) for tr in traj]


def main(out_path):
    tensors, metadata = {}, {}
    for dtype, dname in [(torch.float64, "f64"), (torch.float32, "f32")]:
        for ci, (name, hp) in enumerate(CASES):
            rng = np.random.default_rng(1000 + ci)
            params0, grads = make_params(rng, dtype), make_grads(rng, dtype)
            if hp["fallback"] == "skip":
                traj = run_manual_skip(hp, params0, grads)
            else:
                traj = run_torch_radam(hp, params0, grads)
            if hp["lookahead_k"] > 0 and hp["fallback"] == "sgd":
                other = run_pytorch_optimizer_ranger(hp, params0, grads)
                for a, b in zip(traj, other):
                    err = ((a - b).abs() / (b.abs() + b.abs().mean())).max().item()
                    limit = 1e-13 if dtype == torch.float64 else 1e-5
                    assert err < limit, f"{name} {dname}: torch RAdam+LA vs pytorch_optimizer.Ranger differ by {err}"
                    print(f"{name:24s} {dname}: torch vs pytorch_optimizer max rel diff {err:.2e}")
            key = f"{name}_{dname}"
            for i, (g, tr) in enumerate(zip(grads, traj)):
                tensors[f"{key}/{i}/grads"] = g.numpy()
                tensors[f"{key}/{i}/params"] = tr.numpy()
            metadata[key] = json.dumps(dict(hp, dtype=dname, steps=STEPS))
    save_file(tensors, out_path, metadata=metadata)
    print(f"wrote {len(tensors)} tensors, {len(metadata)} cases to {out_path} (torch {torch.__version__})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "crates/candle-ranger/tests/fixtures/ranger_reference.safetensors")
