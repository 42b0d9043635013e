// The CUDA backend's kernels, compiled at run time by NVRTC once per storage type.
//
// The host prepends `#define PB_F32`, `#define PB_F16` or `#define PB_BF16`; `T` is then the
// storage type of weights and activations (float, or the 16 raw bits of a half / bfloat16).
// Every kernel loads with `ld` (to f32), computes in f32, and stores with `st` (one rounding
// to T, round-to-nearest-even), at the points where HF transformers rounds in the same dtype.
// No header is included, so NVRTC needs nothing besides its own library.
//
// Determinism: no atomics anywhere; block reductions are fixed trees in shared memory; each
// output element is written by exactly one thread.

#if defined(PB_F32)
typedef float T;
__device__ __forceinline__ float ld(const T* p, long i) { return p[i]; }
__device__ __forceinline__ float rnd(float v) { return v; }
__device__ __forceinline__ void st(T* p, long i, float v) { p[i] = v; }
#elif defined(PB_F16)
typedef unsigned short T;
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float ld(const T* p, long i) { return h2f(p[i]); }
__device__ __forceinline__ float rnd(float v) { return h2f(f2h(v)); }
__device__ __forceinline__ void st(T* p, long i, float v) { p[i] = f2h(v); }
#elif defined(PB_BF16)
typedef unsigned short T;
__device__ __forceinline__ float b2f(unsigned short b) { return __int_as_float(((unsigned int)b) << 16); }
__device__ __forceinline__ unsigned short f2b(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u); // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                                   // nearest, ties to even
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float ld(const T* p, long i) { return b2f(p[i]); }
__device__ __forceinline__ float rnd(float v) { return b2f(f2b(v)); }
__device__ __forceinline__ void st(T* p, long i, float v) { p[i] = f2b(v); }
#else
#error "define PB_F32, PB_F16 or PB_BF16"
#endif

#define PB_INF __int_as_float(0x7f800000)

// Threads per block of the reducing kernels (a power of two; the host uses the same value).
#define PB_BLOCK 256

// Sum of `v` over the block, in a fixed tree; every thread gets the result.
__device__ float block_sum(float v, float* red) {
    int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int w = PB_BLOCK / 2; w > 0; w >>= 1) {
        if (tid < w) red[tid] += red[tid + w];
        __syncthreads();
    }
    float r = red[0];
    __syncthreads();
    return r;
}

// Max of `v` over the block; every thread gets the result.
__device__ float block_max(float v, float* red) {
    int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int w = PB_BLOCK / 2; w > 0; w >>= 1) {
        if (tid < w) red[tid] = fmaxf(red[tid], red[tid + w]);
        __syncthreads();
    }
    float r = red[0];
    __syncthreads();
    return r;
}

// out[t, :] = table[ids[t], :]. Grid: (ceil(h / 256), t).
extern "C" __global__ void pb_embed(T* out, const T* table, const int* ids, int h) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int r = blockIdx.y;
    if (c < h) out[(long)r * h + c] = table[(long)ids[r] * h + c];
}

// RMSNorm of every row, HF's order: weight * to_T(x * rsqrt(mean(x^2) + eps)).
// x, out: [rows, n] (may alias), w: [n]. Grid: rows, block: PB_BLOCK.
extern "C" __global__ void pb_rmsnorm(T* out, const T* x, const T* w, int n, float eps) {
    __shared__ float red[PB_BLOCK];
    long base = (long)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += PB_BLOCK) {
        float v = ld(x, base + i);
        ss = fmaf(v, v, ss);
    }
    float var = block_sum(ss, red) / (float)n;
    float inv = rsqrtf(var + eps);
    for (int i = threadIdx.x; i < n; i += PB_BLOCK) {
        float normed = rnd(ld(x, base + i) * inv);
        st(out, base + i, ld(w, i) * normed);
    }
}

// RoPE, rotate_half convention, in place on every head of rows [t, n_heads * hd] at
// positions pos0 + row. cos/sin computed in f32 from inv_freq, then rounded to T as HF's
// `cos.to(dtype)` does. Grid: (n_heads, t), block: hd / 2.
extern "C" __global__ void pb_rope(T* x, const float* inv_freq, int pos0, int n_heads, int hd) {
    int half = hd / 2;
    int i = threadIdx.x;
    if (i >= half) return;
    int row = blockIdx.y;
    float ang = (float)(pos0 + row) * inv_freq[i];
    float c = rnd(cosf(ang));
    float s = rnd(sinf(ang));
    long base = ((long)row * n_heads + blockIdx.x) * hd;
    float a = ld(x, base + i);
    float b = ld(x, base + i + half);
    st(x, base + i, rnd(a * c) + rnd(-b * s));
    st(x, base + i + half, rnd(b * c) + rnd(a * s));
}

// Causal grouped-query attention, HF eager's rounding points: scores = to_T(to_T(q.k) *
// scale), softmax in f32, probabilities to_T, then sum_j p_j v_j in f32 in key order.
// q, out: [t, n_heads * hd]; kc, vc: [>= pos0 + t, n_kv * hd]. Grid: (n_heads, t), block:
// PB_BLOCK, dynamic shared memory: (pos0 + t) floats.
extern "C" __global__ void pb_attention(T* out, const T* q, const T* kc, const T* vc, int pos0, int n_heads,
                                        int n_kv, int hd, float scale) {
    extern __shared__ float scores[];
    __shared__ float red[PB_BLOCK];
    int h = blockIdx.x, row = blockIdx.y, tid = threadIdx.x;
    int kvh = h / (n_heads / n_kv);
    int n_keys = pos0 + row + 1;
    long kv_dim = (long)n_kv * hd;
    long qb = ((long)row * n_heads + h) * hd;
    float mx = -PB_INF;
    for (int j = tid; j < n_keys; j += PB_BLOCK) {
        long kb = (long)j * kv_dim + (long)kvh * hd;
        float acc = 0.0f;
        for (int d = 0; d < hd; d++) acc = fmaf(ld(q, qb + d), ld(kc, kb + d), acc);
        float s = rnd(rnd(acc) * scale);
        scores[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, red);
    float part = 0.0f;
    for (int j = tid; j < n_keys; j += PB_BLOCK) {
        float e = expf(scores[j] - mx);
        scores[j] = e;
        part += e;
    }
    float inv = 1.0f / block_sum(part, red);
    for (int j = tid; j < n_keys; j += PB_BLOCK) scores[j] = rnd(scores[j] * inv);
    __syncthreads();
    for (int d = tid; d < hd; d += PB_BLOCK) {
        float acc = 0.0f;
        for (int j = 0; j < n_keys; j++) acc = fmaf(scores[j], ld(vc, (long)j * kv_dim + (long)kvh * hd + d), acc);
        st(out, qb + d, acc);
    }
}

// g = to_T(to_T(silu(g)) * u), SwiGLU. Grid: ceil(n / 256).
extern "C" __global__ void pb_swiglu(T* g, const T* u, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = ld(g, i);
    float s = rnd(x / (1.0f + expf(-x)));
    st(g, i, s * ld(u, i));
}

// x = to_T(x + y), the residual add. Grid: ceil(n / 256).
extern "C" __global__ void pb_add(T* x, const T* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) st(x, i, ld(x, i) + ld(y, i));
}

// x[r, c] = to_T(x[r, c] + b[c]). x: [rows, n]. Grid: (ceil(n / 256), rows).
extern "C" __global__ void pb_add_bias(T* x, const T* b, int n) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < n) {
        long i = (long)blockIdx.y * n + c;
        st(x, i, ld(x, i) + ld(b, c));
    }
}

// MoE routing of one row per thread: softmax (f32) of the router logits [t, e], the k
// largest (ties: lower expert first, like torch.topk), optional renormalisation, weights
// rounded to T (HF: `routing_weights.to(hidden_states.dtype)`). ids: [t, k], w: [t, k].
// Grid: ceil(t / 64), block 64. e <= 1024.
extern "C" __global__ void pb_moe_route(int* ids, float* w, const T* logits, int t, int e, int k, int renorm) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= t) return;
    long base = (long)r * e;
    float mx = -PB_INF;
    for (int x = 0; x < e; x++) mx = fmaxf(mx, ld(logits, base + x));
    float sum = 0.0f;
    for (int x = 0; x < e; x++) sum += expf(ld(logits, base + x) - mx);
    float inv = 1.0f / sum;
    float total = 0.0f;
    int prev = -1;
    float prev_p = PB_INF;
    for (int j = 0; j < k; j++) {
        // the largest probability below (prev_p, prev) in the order (p desc, index asc)
        int best = -1;
        float bp = -PB_INF;
        for (int x = 0; x < e; x++) {
            float p = expf(ld(logits, base + x) - mx) * inv;
            bool after_prev = (p < prev_p) || (p == prev_p && x > prev);
            if (after_prev && (best < 0 || p > bp)) {
                best = x;
                bp = p;
            }
        }
        ids[(long)r * k + j] = best;
        w[(long)r * k + j] = bp;
        total += bp;
        prev = best;
        prev_p = bp;
    }
    for (int j = 0; j < k; j++) {
        float v = w[(long)r * k + j];
        if (renorm) v = v / total;
        w[(long)r * k + j] = rnd(v);
    }
}

// out[i, :] = x[rows[i], :]. out: [n, h]. Grid: (ceil(h / 256), n).
extern "C" __global__ void pb_gather_rows(T* out, const T* x, const int* rows, int h) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < h) out[(long)blockIdx.y * h + c] = x[(long)rows[blockIdx.y] * h + c];
}

// o[rows[i], :] = to_T(o[rows[i], :] + to_T(d[i, :] * w[i])): one expert's rows added in.
// Rows are distinct within one call, so no element is written twice. Grid: (ceil(h / 256), n).
extern "C" __global__ void pb_scatter_add_scaled(T* o, const T* d, const int* rows, const float* w, int h) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= h) return;
    int i = blockIdx.y;
    long oi = (long)rows[i] * h + c;
    st(o, oi, ld(o, oi) + rnd(ld(d, (long)i * h + c) * w[i]));
}
