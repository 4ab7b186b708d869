// The fused Ranger / RAdam / AdamW step on Metal: the CUDA kernel (../cuda/ranger_step.cu) in MSL,
// with the same formulas in the same order as the CPU kernel (../fused.rs). Metal has no f64, so
// a row's sum for centralization is accumulated in f32 (the CPU and CUDA kernels use f64).
//
// Grid: one threadgroup of BLOCK threads per row of `row_len` elements (the last may be shorter).
// p: [n] (float / half / bfloat), g: [n] (same type), m, v: [n] float, slow and master: [n] float
// or unused (has_slow / has_master).
#include <metal_stdlib>
using namespace metal;

#define BLOCK 256
#define NO_MOVE 0
#define MOMENTUM 1
#define RECTIFIED 2

// The scalar arguments, laid out as `RangerArgs` in src/gpu_step.rs.
struct RangerArgs {
    uint n;
    uint row_len;
    int centralize;
    int has_slow;
    int has_master;
    float decay;
    float l2;
    float one_minus_b1;
    float b2;
    float one_minus_b2;
    float eps;
    int mode;
    float step;
    float alpha;
    int sync;
};

template <typename P>
void ranger_step(
    device P *p, device const P *g, device float *m, device float *v, device float *slow,
    device float *master, constant RangerArgs &a, threadgroup float *partial, uint row, uint tid) {
    const uint start = row * a.row_len;
    if (start >= a.n) return;
    const uint end = min(start + a.row_len, a.n);
    float mean = 0.0f;
    if (a.centralize) {
        float acc = 0.0f;
        for (uint i = start + tid; i < end; i += BLOCK) acc += float(g[i]);
        partial[tid] = acc;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint s = BLOCK / 2; s > 0; s >>= 1) {
            if (tid < s) partial[tid] += partial[tid + s];
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        mean = partial[0] / float(end - start);
    }
    for (uint i = start + tid; i < end; i += BLOCK) {
        // With a master copy, a variable changed from outside (where it is no longer the
        // master's rounding) is adopted, as on the CPU.
        const float pv = float(p[i]);
        const float p0 = (a.has_master && float(P(master[i])) == pv) ? master[i] : pv;
        float gi = float(g[i]) - mean;
        gi = gi + a.l2 * p0;
        float pi = p0 * a.decay;
        const float mi = m[i] + a.one_minus_b1 * (gi - m[i]);
        const float vi = v[i] * a.b2 + a.one_minus_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        if (a.mode == RECTIFIED) {
            pi = pi - a.step * (mi / (sqrt(vi) + a.eps));
        } else if (a.mode == MOMENTUM) {
            pi = pi - a.step * mi;
        }
        if (a.sync && a.has_slow) {
            const float s = slow[i] + a.alpha * (pi - slow[i]);
            slow[i] = s;
            pi = s;
        }
        if (a.has_master) master[i] = pi;
        p[i] = P(pi);
    }
}

#define RANGER_OP(TYPENAME, FN_NAME)                                                              \
    kernel void FN_NAME(                                                                          \
        device TYPENAME *p [[buffer(0)]], device const TYPENAME *g [[buffer(1)]],                 \
        device float *m [[buffer(2)]], device float *v [[buffer(3)]],                             \
        device float *slow [[buffer(4)]], device float *master [[buffer(5)]],                     \
        constant RangerArgs &a [[buffer(6)]], uint row [[threadgroup_position_in_grid]],          \
        uint tid [[thread_position_in_threadgroup]]) {                                            \
        threadgroup float partial[BLOCK];                                                         \
        ranger_step<TYPENAME>(p, g, m, v, slow, master, a, partial, row, tid);                    \
    }

RANGER_OP(float, ranger_step_f32)
RANGER_OP(half, ranger_step_f16)
#if defined(__HAVE_BFLOAT__)
RANGER_OP(bfloat, ranger_step_bf16)
#endif
