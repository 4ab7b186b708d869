// The fused Ranger / RAdam step on CUDA: one pass over parameter, gradient, moments, and (on
// sync steps) slow weights, in place; the same formulas, in the same order, as the CPU kernel
// (crates/candle-ranger/src/fused.rs). Scalars (step size, decay, ...) are computed on the host
// in f64 and passed in f32.
//
// Grid: one block per row of `row_len` elements (the last may be shorter). With centralization a
// row is `numel / dim0` elements and the block first reduces its sum (in f64, as the CPU does);
// without, rows are just chunks and the mean is 0.
//
// p: [n] (f32 / bf16 / f16), g: [n] (same type), m, v: [n] f32, slow: [n] f32 or unused,
// master: [n] f32 or unused (the f32 master copy of a half-precision parameter: the update
// reads and writes it, and p gets its rounding).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define BLOCK 256
#define NO_MOVE 0
#define MOMENTUM 1
#define RECTIFIED 2

// The scalar arguments, laid out as `RangerArgs` in src/gpu_step.rs.
struct RangerArgs {
    uint32_t n;
    uint32_t row_len;
    int32_t centralize;
    int32_t has_slow;
    int32_t has_master;
    float decay;
    float l2;
    float one_minus_b1;
    float b2;
    float one_minus_b2;
    float eps;
    int32_t mode;
    float step;
    float alpha;
    int32_t sync;
};

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ float load(__half x) { return __half2float(x); }
__device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float *p, float x) { *p = x; }
__device__ __forceinline__ void store(__half *p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float x) { *p = __float2bfloat16_rn(x); }

template <typename P>
__device__ void ranger_step(P *p, const P *g, float *m, float *v, float *slow, float *master, const RangerArgs a) {
    const size_t n = a.n, row_len = a.row_len;
    const int centralize = a.centralize, has_slow = a.has_slow, has_master = a.has_master, mode = a.mode,
              sync = a.sync;
    const float decay = a.decay, l2 = a.l2, one_minus_b1 = a.one_minus_b1, b2 = a.b2, one_minus_b2 = a.one_minus_b2,
                eps = a.eps, step = a.step, alpha = a.alpha;
    const size_t start = (size_t)blockIdx.x * row_len;
    if (start >= n) return;
    const size_t end = min(start + row_len, n);
    __shared__ double partial[BLOCK];
    __shared__ float mean_s;
    if (centralize) {
        double acc = 0.0;
        for (size_t i = start + threadIdx.x; i < end; i += BLOCK) acc += (double)load(g[i]);
        partial[threadIdx.x] = acc;
        __syncthreads();
        for (int s = BLOCK / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) mean_s = (float)(partial[0] / (double)(end - start));
        __syncthreads();
    }
    const float mean = centralize ? mean_s : 0.0f;
    for (size_t i = start + threadIdx.x; i < end; i += BLOCK) {
        // With a master copy, a variable changed from outside (where it is no longer the
        // master's rounding) is adopted, as on the CPU.
        const float pv = load(p[i]);
        float p0 = pv;
        if (has_master) {
            P r;
            store(&r, master[i]);
            p0 = (load(r) == pv) ? master[i] : pv;
        }
        float gi = load(g[i]) - mean;
        gi = gi + l2 * p0;
        float pi = p0 * decay;
        const float mi = m[i] + one_minus_b1 * (gi - m[i]);
        const float vi = v[i] * b2 + one_minus_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        if (mode == RECTIFIED) {
            pi = pi - step * (mi / (sqrtf(vi) + eps));
        } else if (mode == MOMENTUM) {
            pi = pi - step * mi;
        }
        if (sync && has_slow) {
            const float s = slow[i] + alpha * (pi - slow[i]);
            slow[i] = s;
            pi = s;
        }
        if (has_master) master[i] = pi;
        store(&p[i], pi);
    }
}

#define RANGER_OP(TYPENAME, FN_NAME)                                                                \
    extern "C" __global__ void FN_NAME(TYPENAME *p, const TYPENAME *g, float *m, float *v, float *slow,  \
                                       float *master, const RangerArgs a) {                             \
        ranger_step<TYPENAME>(p, g, m, v, slow, master, a);                                             \
    }

RANGER_OP(float, ranger_step_f32)
RANGER_OP(__half, ranger_step_f16)
RANGER_OP(__nv_bfloat16, ranger_step_bf16)
