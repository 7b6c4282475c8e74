// clipft's CUDA kernels (`--features cuda`), compiled to PTX by build.rs and loaded through
// candle's custom-module cache (src/model/cuda.rs): for inference, and layer norm and QuickGELU
// with their backward passes for training.
//
// candle runs a dense layer as a cuBLAS GEMM followed by a broadcast bias add, an activation in
// one to three elementwise kernels and a residual add, and attention as a head-split copy, two
// batched GEMMs, a softmax and a head-merge copy: each a full pass over activations that the
// GEMMs themselves barely touch. Here one pass finishes a dense layer (bias, activation,
// residual) and one kernel does the whole attention core from the QKV layer's output. For
// training, candle's layer norm has no backward pass, so the trained tower composed it from a
// dozen passes forward and twice that backward; here it is one kernel each way (plus a column
// sum for the weight and bias gradients).
//
// Only constructs that scripts/check_cuda_kernels.sh can emulate on the CPU are used (static
// __shared__ arrays, __syncthreads, __syncwarp, full-warp __shfl_xor_sync), so the kernels are
// checked against a plain reference without a GPU.

#ifndef CLIPFT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// Activation codes, as `cuda::Act` in src/model/cuda.rs.
enum : uint32_t { ACT_NONE = 0, ACT_QUICK_GELU = 1, ACT_SILU = 2, ACT_GELU_ERF = 3, ACT_GELU_TANH = 4 };

__device__ __forceinline__ float activate(float x, uint32_t act) {
    switch (act) {
    case ACT_QUICK_GELU:
        return x / (1.0f + expf(-1.702f * x));
    case ACT_SILU:
        return x / (1.0f + expf(-x));
    case ACT_GELU_ERF:
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case ACT_GELU_TANH:
        return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    default:
        return x;
    }
}

// y[i, j] = act(y[i, j] + bias[j]) (+ res[i, j]), in place on the GEMM's contiguous output.
// The sum is taken in f32 and rounded to T once. Blocks stride over rows and threads over a
// row's columns: no per-element division to find the bias.
template <typename T>
__device__ void bias_act_impl(T *y, const T *bias, const T *res, uint32_t rows, uint32_t cols,
                              uint32_t act) {
    for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t base = (size_t)row * cols;
        for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
            float x = activate(to_f(y[base + c]) + to_f(bias[c]), act);
            if (res != nullptr) {
                x += to_f(res[base + c]);
            }
            y[base + c] = from_f<T>(x);
        }
    }
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o /= 2) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// Keys and values staged per block, 32 at a time (one per lane for the scores).
constexpr uint32_t KEY_CHUNK = 32;
constexpr uint32_t MAX_WARPS = 8;

// Multi-head attention for every query item of a batch of sequences, straight from the
// projections' output rows (no head split or merge copies).
//
// Grid: (query tiles, heads, sequences); block: up to MAX_WARPS warps, one query item each.
// `seqs` holds 5 u32 per sequence: first key/value row, number of keys, first query/output row,
// number of query items, position (within the sequence) of the first item. Item i of a sequence
// reads its query from row (first query row + i) of `q` and, when `causal`, attends to the keys
// at positions <= (first position + i); output row = first query row + i.
// The head dimension is at most 32·R; queries arrive scaled by 1/sqrt(head_dim).
// Softmax is the streaming (online) form over key chunks, in f32.
template <typename T, int R>
__device__ void attention_impl(const T *q, uint32_t q_stride, const T *kv, uint32_t kv_stride,
                               uint32_t k_off, uint32_t v_off, T *out, uint32_t out_stride,
                               const uint32_t *seqs, uint32_t head_dim, uint32_t causal) {
    constexpr uint32_t HD = 32 * R;
    __shared__ float ks[KEY_CHUNK][HD + 1]; // +1: lanes read different rows, different banks
    __shared__ float vs[KEY_CHUNK][HD];
    __shared__ float qs[MAX_WARPS][HD];
    __shared__ float ps[MAX_WARPS][KEY_CHUNK];

    const uint32_t *s = seqs + 5 * (size_t)blockIdx.z;
    const uint32_t kv_start = s[0], kv_len = s[1], item_start = s[2], item_count = s[3],
                   pos0 = s[4];
    const uint32_t nwarps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t first = blockIdx.x * nwarps;
    if (first >= item_count) {
        return; // the whole block: no barrier is skipped by part of it
    }
    const uint32_t item = first + warp;
    const bool active = item < item_count; // uniform across the warp
    const uint32_t col = blockIdx.y * head_dim;
    const uint32_t last = min(first + nwarps, item_count) - 1;
    const uint32_t n_keys = causal ? min(kv_len, pos0 + last + 1) : kv_len;
    const uint32_t my_keys = causal ? min(kv_len, pos0 + item + 1) : kv_len;

    if (active) {
        const T *qrow = q + (size_t)(item_start + item) * q_stride + col;
        for (uint32_t d = lane; d < head_dim; d += 32) {
            qs[warp][d] = to_f(qrow[d]);
        }
    }
    float m = -INFINITY, l = 0.0f, acc[R];
    for (int r = 0; r < R; ++r) {
        acc[r] = 0.0f;
    }
    for (uint32_t c0 = 0; c0 < n_keys; c0 += KEY_CHUNK) {
        const uint32_t nc = min(KEY_CHUNK, n_keys - c0);
        __syncthreads(); // the previous chunk is consumed (and qs written, the first time)
        for (uint32_t i = threadIdx.x; i < nc * head_dim; i += blockDim.x) {
            const uint32_t j = i / head_dim, d = i % head_dim;
            const T *row = kv + (size_t)(kv_start + c0 + j) * kv_stride + col + d;
            ks[j][d] = to_f(row[k_off]);
            vs[j][d] = to_f(row[v_off]);
        }
        __syncthreads();
        if (active) {
            float sc = -INFINITY;
            if (lane < nc && c0 + lane < my_keys) {
                float a = 0.0f;
                for (uint32_t d = 0; d < head_dim; ++d) {
                    a += qs[warp][d] * ks[lane][d];
                }
                sc = a;
            }
            const float m_new = fmaxf(m, warp_max(sc));
            // Nothing seen yet (m = -inf) scales nothing; a key past the limit weighs 0.
            const float p = sc == -INFINITY ? 0.0f : expf(sc - m_new);
            const float corr = m == -INFINITY ? 0.0f : expf(m - m_new);
            l = l * corr + warp_sum(p);
            m = m_new;
            for (int r = 0; r < R; ++r) {
                acc[r] *= corr;
            }
            ps[warp][lane] = p;
            __syncwarp();
            for (uint32_t j = 0; j < nc; ++j) {
                const float pj = ps[warp][j];
                for (int r = 0; r < R; ++r) {
                    const uint32_t d = lane + 32 * r;
                    if (d < head_dim) {
                        acc[r] += pj * vs[j][d];
                    }
                }
            }
            __syncwarp(); // ps is rewritten by the next chunk
        }
    }
    if (active) {
        T *orow = out + (size_t)(item_start + item) * out_stride + col;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int r = 0; r < R; ++r) {
            const uint32_t d = lane + 32 * r;
            if (d < head_dim) {
                orow[d] = from_f<T>(acc[r] * inv);
            }
        }
    }
}

// Sum of `v` over the block (every thread gets it; at most 32 warps). The first barrier keeps
// a call from overwriting partials that a previous call's threads are still reading.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    v = warp_sum(v);
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) {
        part[warp] = v;
    }
    __syncthreads();
    float total = 0.0f;
    for (uint32_t i = 0; i < nwarps; ++i) {
        total += part[i];
    }
    return total;
}

// Mean and 1/sqrt(var + eps) of one row, two passes in f32 (as PyTorch: E[x²] − E[x]² loses
// the variance of rows with a large mean).
template <typename T>
__device__ void row_stats(const T *x, uint32_t h, float eps, float &mean, float &rstd) {
    float s = 0.0f;
    for (uint32_t c = threadIdx.x; c < h; c += blockDim.x) {
        s += to_f(x[c]);
    }
    mean = block_sum(s) / (float)h;
    float v = 0.0f;
    for (uint32_t c = threadIdx.x; c < h; c += blockDim.x) {
        const float d = to_f(x[c]) - mean;
        v += d * d;
    }
    rstd = 1.0f / sqrtf(block_sum(v) / (float)h + eps);
}

// Layer norm over rows of h: y = (x − μ)·r·w + b. Blocks stride over rows (a uniform trip
// count, so the barriers inside are reached by every thread), threads over columns.
template <typename T>
__device__ void layer_norm_impl(const T *x, const T *w, const T *b, T *y, uint32_t rows,
                                uint32_t h, float eps) {
    for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const T *xr = x + (size_t)row * h;
        T *yr = y + (size_t)row * h;
        float mean, rstd;
        row_stats(xr, h, eps, mean, rstd);
        for (uint32_t c = threadIdx.x; c < h; c += blockDim.x) {
            yr[c] = from_f<T>((to_f(xr[c]) - mean) * rstd * to_f(w[c]) + to_f(b[c]));
        }
    }
}

// Columns per thread in layer norm's backward pass: the launch keeps h <= LN_COLS·blockDim.x.
constexpr uint32_t LN_COLS = 4;

// Layer norm's backward pass, statistics recomputed per row: with x̂ = (x − μ)·r and
// d = g·w, dx = r·(d − mean(d) − x̂·mean(d·x̂)). The weight and bias gradients Σ g·x̂ and Σ g
// over this block's rows go to `partial` [gridDim.x][2h] (dw's columns, then db's), summed
// over blocks by column_sums_impl.
template <typename T>
__device__ void layer_norm_grad_impl(const T *x, const T *w, const T *g, T *dx, float *partial,
                                     uint32_t rows, uint32_t h, float eps) {
    float pw[LN_COLS], pb[LN_COLS];
    for (uint32_t k = 0; k < LN_COLS; ++k) {
        pw[k] = 0.0f;
        pb[k] = 0.0f;
    }
    for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const T *xr = x + (size_t)row * h, *gr = g + (size_t)row * h;
        T *dxr = dx + (size_t)row * h;
        float mean, rstd;
        row_stats(xr, h, eps, mean, rstd);
        float m1 = 0.0f, m2 = 0.0f;
        for (uint32_t k = 0; k < LN_COLS; ++k) {
            const uint32_t c = threadIdx.x + k * blockDim.x;
            if (c < h) {
                const float xhat = (to_f(xr[c]) - mean) * rstd, gv = to_f(gr[c]);
                const float d = gv * to_f(w[c]);
                m1 += d;
                m2 += d * xhat;
                pw[k] += gv * xhat;
                pb[k] += gv;
            }
        }
        m1 = block_sum(m1) / (float)h;
        m2 = block_sum(m2) / (float)h;
        for (uint32_t k = 0; k < LN_COLS; ++k) {
            const uint32_t c = threadIdx.x + k * blockDim.x;
            if (c < h) {
                const float xhat = (to_f(xr[c]) - mean) * rstd;
                const float d = to_f(gr[c]) * to_f(w[c]);
                dxr[c] = from_f<T>(rstd * (d - m1 - xhat * m2));
            }
        }
    }
    float *p = partial + (size_t)blockIdx.x * 2 * h;
    for (uint32_t k = 0; k < LN_COLS; ++k) {
        const uint32_t c = threadIdx.x + k * blockDim.x;
        if (c < h) {
            p[c] = pw[k];
            p[h + c] = pb[k];
        }
    }
}

// out[i] = Σ_b partial[b·n + i] for i < n, summed in f32 and rounded to T once.
template <typename T>
__device__ void column_sums_impl(const float *partial, uint32_t blocks, uint32_t n, T *out) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (uint32_t b = 0; b < blocks; ++b) {
            s += partial[(size_t)b * n + i];
        }
        out[i] = from_f<T>(s);
    }
}

// QuickGELU for training, y = x·σ(1.702x), and its backward pass dx = g·σ·(1 + 1.702·x·(1 − σ)):
// one pass each, where candle composes three kernels forward and five backward. Grid-stride
// loops over n elements.
template <typename T> __device__ void quick_gelu_impl(const T *x, T *y, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        y[i] = from_f<T>(activate(to_f(x[i]), ACT_QUICK_GELU));
    }
}

template <typename T>
__device__ void quick_gelu_grad_impl(const T *x, const T *g, T *dx, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const float v = to_f(x[i]);
        const float s = 1.0f / (1.0f + expf(-1.702f * v));
        dx[i] = from_f<T>(to_f(g[i]) * s * (1.0f + 1.702f * v * (1.0f - s)));
    }
}

} // namespace

#define BIAS_ACT(NAME, T)                                                                          \
    extern "C" __global__ void NAME(T *y, const T *bias, const T *res, uint32_t rows,             \
                                    uint32_t cols, uint32_t act) {                                 \
        bias_act_impl<T>(y, bias, res, rows, cols, act);                                           \
    }
BIAS_ACT(bias_act_f32, float)
BIAS_ACT(bias_act_f16, __half)
BIAS_ACT(bias_act_bf16, __nv_bfloat16)

#define ATTENTION(NAME, T, R)                                                                      \
    extern "C" __global__ void NAME(const T *q, uint32_t q_stride, const T *kv,                   \
                                    uint32_t kv_stride, uint32_t k_off, uint32_t v_off, T *out,   \
                                    uint32_t out_stride, const uint32_t *seqs,                     \
                                    uint32_t head_dim, uint32_t causal) {                          \
        attention_impl<T, R>(q, q_stride, kv, kv_stride, k_off, v_off, out, out_stride, seqs,     \
                             head_dim, causal);                                                    \
    }
#define ATTENTION_R(T, SUFFIX)                                                                     \
    ATTENTION(attention_##SUFFIX##_r1, T, 1)                                                       \
    ATTENTION(attention_##SUFFIX##_r2, T, 2)                                                       \
    ATTENTION(attention_##SUFFIX##_r3, T, 3)                                                       \
    ATTENTION(attention_##SUFFIX##_r4, T, 4)
ATTENTION_R(float, f32)
ATTENTION_R(__half, f16)
ATTENTION_R(__nv_bfloat16, bf16)

#define LAYER_NORM(SUFFIX, T)                                                                      \
    extern "C" __global__ void layer_norm_##SUFFIX(const T *x, const T *w, const T *b, T *y,      \
                                                   uint32_t rows, uint32_t h, float eps) {         \
        layer_norm_impl<T>(x, w, b, y, rows, h, eps);                                              \
    }                                                                                              \
    extern "C" __global__ void layer_norm_grad_##SUFFIX(const T *x, const T *w, const T *g,       \
                                                        T *dx, float *partial, uint32_t rows,      \
                                                        uint32_t h, float eps) {                   \
        layer_norm_grad_impl<T>(x, w, g, dx, partial, rows, h, eps);                               \
    }                                                                                              \
    extern "C" __global__ void column_sums_##SUFFIX(const float *partial, uint32_t blocks,        \
                                                    uint32_t n, T *out) {                          \
        column_sums_impl<T>(partial, blocks, n, out);                                              \
    }
LAYER_NORM(f32, float)
LAYER_NORM(f16, __half)
LAYER_NORM(bf16, __nv_bfloat16)

#define QUICK_GELU(SUFFIX, T)                                                                      \
    extern "C" __global__ void quick_gelu_##SUFFIX(const T *x, T *y, uint64_t n) {                \
        quick_gelu_impl<T>(x, y, n);                                                               \
    }                                                                                              \
    extern "C" __global__ void quick_gelu_grad_##SUFFIX(const T *x, const T *g, T *dx,            \
                                                        uint64_t n) {                              \
        quick_gelu_grad_impl<T>(x, g, dx, n);                                                      \
    }
QUICK_GELU(f32, float)
QUICK_GELU(f16, __half)
QUICK_GELU(bf16, __nv_bfloat16)
