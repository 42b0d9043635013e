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
// The 4 values of a 16-byte load.
__device__ __forceinline__ void unpack(uint4 v, float* f) {
    f[0] = __uint_as_float(v.x), f[1] = __uint_as_float(v.y), f[2] = __uint_as_float(v.z), f[3] = __uint_as_float(v.w);
}
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
__device__ __forceinline__ float bits2f(unsigned int b) { return h2f((unsigned short)b); }
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
__device__ __forceinline__ float bits2f(unsigned int b) { return b2f((unsigned short)b); }
#else
#error "define PB_F32, PB_F16 or PB_BF16"
#endif
#if defined(PB_F16) || defined(PB_BF16)
// The 8 values of a 16-byte load, in memory order.
__device__ __forceinline__ void unpack(uint4 v, float* f) {
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) f[2 * i] = bits2f(w[i] & 0xffffu), f[2 * i + 1] = bits2f(w[i] >> 16);
}
#endif

// Elements of T in one 16-byte load.
#define PB_VEC (16 / (int)sizeof(T))

// Whether `p` may be read in 16-byte loads.
__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long)p) & 15ul) == 0; }

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
// scale), softmax in f32, probabilities to_T, then sum_j p_j v_j in f32.
// q, out: [t, n_heads * hd]; kc, vc: [>= pos0 + t, n_kv * hd]; hd <= PB_MAX_HD.
// Grid: (n_heads, t), block: PB_BLOCK, dynamic shared memory: (pos0 + t) floats.
// q.k: one thread per key, d ascending in one f32 chain (16-byte loads of the key where the
// layout allows); p.v: see below. Fixed orders throughout: the result does not depend on
// timing.
#define PB_MAX_HD 256
extern "C" __global__ void pb_attention(T* out, const T* q, const T* kc, const T* vc, int pos0, int n_heads,
                                        int n_kv, int hd, float scale) {
    extern __shared__ float scores[];
    __shared__ float red[PB_BLOCK];
    __shared__ float qs[PB_MAX_HD];
    __shared__ float pv[PB_BLOCK * PB_VEC];
    int h = blockIdx.x, row = blockIdx.y, tid = threadIdx.x;
    int kvh = h / (n_heads / n_kv);
    int n_keys = pos0 + row + 1;
    long kv_dim = (long)n_kv * hd;
    long qb = ((long)row * n_heads + h) * hd;
    for (int d = tid; d < hd; d += PB_BLOCK) qs[d] = ld(q, qb + d);
    __syncthreads();
    bool vec = hd % PB_VEC == 0 && kv_dim % PB_VEC == 0 && aligned16(kc);
    float mx = -PB_INF;
    for (int j = tid; j < n_keys; j += PB_BLOCK) {
        const T* kr = kc + (long)j * kv_dim + (long)kvh * hd;
        float acc = 0.0f;
        if (vec) {
            for (int d = 0; d < hd; d += PB_VEC) {
                float f[PB_VEC];
                unpack(*(const uint4*)(kr + d), f);
#pragma unroll
                for (int i = 0; i < PB_VEC; i++) acc = fmaf(qs[d + i], f[i], acc);
            }
        } else {
            for (int d = 0; d < hd; d++) acc = fmaf(qs[d], ld(kr, d), acc);
        }
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
    // p.v: a thread takes PB_VEC consecutive dimensions (one 16-byte load per key) of the keys
    // g, g + groups, ...; the groups' partial sums are then added in group order
    int cpr = hd / PB_VEC; // chunks per key row
    const T* vb = vc + (long)kvh * hd;
    if (vec && aligned16(vc) && cpr <= PB_BLOCK) {
        int groups = PB_BLOCK / cpr, grp = tid / cpr, ch = tid % cpr;
        float acc[PB_VEC];
#pragma unroll
        for (int i = 0; i < PB_VEC; i++) acc[i] = 0.0f;
        if (grp < groups) {
#pragma unroll 4
            for (int j = grp; j < n_keys; j += groups) {
                float f[PB_VEC];
                unpack(*(const uint4*)(vb + (long)j * kv_dim + ch * PB_VEC), f);
                float p = scores[j];
#pragma unroll
                for (int i = 0; i < PB_VEC; i++) acc[i] = fmaf(p, f[i], acc[i]);
            }
#pragma unroll
            for (int i = 0; i < PB_VEC; i++) pv[grp * hd + ch * PB_VEC + i] = acc[i];
        }
        __syncthreads();
        for (int d = tid; d < hd; d += PB_BLOCK) {
            float o = pv[d];
            for (int gi = 1; gi < groups; gi++) o += pv[gi * hd + d];
            st(out, qb + d, o);
        }
        return;
    }
    for (int d = tid; d < hd; d += PB_BLOCK) {
        float acc = 0.0f;
        for (int j = 0; j < n_keys; j++) acc = fmaf(scores[j], ld(vb, (long)j * kv_dim + d), acc);
        st(out, qb + d, acc);
    }
}

// ---- matrix products of a few rows ----------------------------------------------------------
//
// The dot product of a weight row and an activation row in the order every few-row product
// here uses: lane l of a warp takes chunks l, l + 32, ... of PB_VEC elements (16-byte loads
// where k and the addresses allow, else single elements l, l + 32, ...) and sums them in
// ascending order; a fixed butterfly of shuffles then adds the lanes (every lane gets the
// same sum). The same weights and activations give the same bits in every kernel below.
__device__ __forceinline__ bool vec_ok(const T* w, const T* x, int k) {
    return k % PB_VEC == 0 && aligned16(w) && aligned16(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_dot(const T* w, const T* x, int k, int lane) {
    float acc = 0.0f;
    if (vec_ok(w, x, k)) {
#pragma unroll 4
        for (int i = lane * PB_VEC; i < k; i += 32 * PB_VEC) {
            float wf[PB_VEC], xf[PB_VEC];
            unpack(*(const uint4*)(w + i), wf);
            unpack(*(const uint4*)(x + i), xf);
#pragma unroll
            for (int j = 0; j < PB_VEC; j++) acc = fmaf(wf[j], xf[j], acc);
        }
    } else {
        for (int i = lane; i < k; i += 32) acc = fmaf(ld(w, i), ld(x, i), acc);
    }
    return warp_sum(acc);
}

// out[r, c] = to_T(sum_i x[r, i] * w[c, i]) for r < t <= PB_GEMV_ROWS (decode): f32
// accumulation, as cuBLAS with compute type 32F, but reading the weights at the memory's
// speed when there are too few rows for a tiled product to fill the GPU. Up to three
// products of the same x in one launch (q, k and v; gate and up): segment s has n_s columns,
// weights w_s [n_s, k] and output out_s [t, n_s]; columns are numbered across the segments.
// Each warp takes `cols` <= PB_GEMV_COLS consecutive columns (one weight load per column and
// chunk, the x chunk shared), each column in warp_dot's order. x: [t, k].
// Grid: ceil((n0 + n1 + n2) / (PB_GEMV_WARPS * cols)), block: 32 * PB_GEMV_WARPS.
#define PB_GEMV_WARPS 4
#define PB_GEMV_ROWS 8
#define PB_GEMV_COLS 4
extern "C" __global__ void pb_gemv(const T* x, int t, int k, int cols, T* out0, const T* w0, int n0, T* out1,
                                   const T* w1, int n1, T* out2, const T* w2, int n2) {
    int lane = threadIdx.x & 31;
    int n = n0 + n1 + n2;
    int c0 = (blockIdx.x * PB_GEMV_WARPS + (threadIdx.x >> 5)) * cols;
    if (c0 >= n) return; // the whole warp: c0 is the warp's
    const T* wc[PB_GEMV_COLS];
    T* oc[PB_GEMV_COLS];
    int nc[PB_GEMV_COLS], cc[PB_GEMV_COLS];
    bool vec = k % PB_VEC == 0 && aligned16(x);
#pragma unroll
    for (int j = 0; j < PB_GEMV_COLS; j++) {
        int c = min(c0 + j, n - 1); // a column past the end repeats the last one, unstored
        int seg = c < n0 ? 0 : (c < n0 + n1 ? 1 : 2);
        cc[j] = c - (seg == 0 ? 0 : (seg == 1 ? n0 : n0 + n1));
        nc[j] = seg == 0 ? n0 : (seg == 1 ? n1 : n2);
        oc[j] = seg == 0 ? out0 : (seg == 1 ? out1 : out2);
        const T* ws = seg == 0 ? w0 : (seg == 1 ? w1 : w2);
        wc[j] = ws + (long)cc[j] * k;
        vec = vec && aligned16(ws);
    }
    float acc[PB_GEMV_ROWS][PB_GEMV_COLS];
#pragma unroll
    for (int r = 0; r < PB_GEMV_ROWS; r++)
#pragma unroll
        for (int j = 0; j < PB_GEMV_COLS; j++) acc[r][j] = 0.0f;
    if (vec) {
#pragma unroll 2
        for (int i = lane * PB_VEC; i < k; i += 32 * PB_VEC) {
            float wf[PB_GEMV_COLS][PB_VEC];
#pragma unroll
            for (int j = 0; j < PB_GEMV_COLS; j++)
                if (j < cols) unpack(*(const uint4*)(wc[j] + i), wf[j]);
#pragma unroll
            for (int r = 0; r < PB_GEMV_ROWS; r++) {
                if (r < t) {
                    float xf[PB_VEC];
                    unpack(*(const uint4*)(x + (long)r * k + i), xf);
#pragma unroll
                    for (int j = 0; j < PB_GEMV_COLS; j++)
                        if (j < cols)
#pragma unroll
                            for (int e = 0; e < PB_VEC; e++) acc[r][j] = fmaf(wf[j][e], xf[e], acc[r][j]);
                }
            }
        }
    } else {
        for (int i = lane; i < k; i += 32) {
#pragma unroll
            for (int j = 0; j < PB_GEMV_COLS; j++) {
                if (j < cols) {
                    float wv = ld(wc[j], i);
#pragma unroll
                    for (int r = 0; r < PB_GEMV_ROWS; r++)
                        if (r < t) acc[r][j] = fmaf(wv, ld(x, (long)r * k + i), acc[r][j]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < PB_GEMV_ROWS; r++) {
#pragma unroll
        for (int j = 0; j < PB_GEMV_COLS; j++) {
            if (r < t && j < cols) {
                float v = warp_sum(acc[r][j]);
                if (lane == 0 && c0 + j < n) st(oc[j], (long)r * nc[j] + cc[j], v);
            }
        }
    }
}

// ---- MoE experts of one row (decode), routed on the device ------------------------------------
//
// The k experts of a single row, read from `ids` (pb_moe_route's output) on the device, so
// the host neither waits for the routing nor plans the dispatch. Each product is warp_dot's
// order, as pb_gemv; an expert id outside [0, e) gives NaN, never a read out of bounds.

// g[j, c] = to_T(x . gate[ids[j]][c, :]), u[j, c] likewise with up. x: [h]; gate, up:
// [e, im, h]; g, u: [k, im]. Grid: (ceil(im / PB_GEMV_WARPS), k), block: 32 * PB_GEMV_WARPS.
extern "C" __global__ void pb_moe_gate_up(T* g, T* u, const T* x, const T* gate, const T* up, const int* ids,
                                          int e, int h, int im) {
    int lane = threadIdx.x & 31;
    int c = blockIdx.x * PB_GEMV_WARPS + (threadIdx.x >> 5);
    if (c >= im) return;
    int slot = blockIdx.y, ex = ids[slot];
    long o = (long)slot * im + c;
    if (ex < 0 || ex >= e) {
        if (lane == 0) st(g, o, __int_as_float(0x7fc00000)), st(u, o, __int_as_float(0x7fc00000));
        return;
    }
    long wo = ((long)ex * im + c) * h;
    float ag = warp_dot(gate + wo, x, h, lane);
    float au = warp_dot(up + wo, x, h, lane);
    if (lane == 0) st(g, o, ag), st(u, o, au);
}

// d[j, c] = to_T(a[j, :] . down[ids[j]][c, :]). a: [k, im]; down: [e, h, im]; d: [k, h].
// Grid: (ceil(h / PB_GEMV_WARPS), k), block: 32 * PB_GEMV_WARPS.
extern "C" __global__ void pb_moe_down(T* d, const T* a, const T* down, const int* ids, int e, int h, int im) {
    int lane = threadIdx.x & 31;
    int c = blockIdx.x * PB_GEMV_WARPS + (threadIdx.x >> 5);
    if (c >= h) return;
    int slot = blockIdx.y, ex = ids[slot];
    long o = (long)slot * h + c;
    if (ex < 0 || ex >= e) {
        if (lane == 0) st(d, o, __int_as_float(0x7fc00000));
        return;
    }
    float v = warp_dot(down + ((long)ex * h + c) * im, a + (long)slot * im, im, lane);
    if (lane == 0) st(d, o, v);
}

// o[c] = the experts' outputs added in ascending expert order, each scaled by its routing
// weight: acc = to_T(acc + to_T(d[j, c] * w[j])) from 0, as pb_scatter_add_scaled adds them
// expert by expert. ids: [k] (distinct), d: [k, h], o: [h]. Grid: ceil(h / 256), block 256.
extern "C" __global__ void pb_moe_combine(T* o, const T* d, const int* ids, const float* w, int k, int h) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= h) return;
    float acc = 0.0f;
    int prev = -2147483647 - 1;
    for (int n = 0; n < k; n++) {
        int best = -1;
        for (int j = 0; j < k; j++)
            if (ids[j] > prev && (best < 0 || ids[j] < ids[best])) best = j;
        if (best < 0) break;
        prev = ids[best];
        acc = rnd(acc + rnd(ld(d, (long)best * h + c) * w[best]));
    }
    st(o, c, acc);
}

// Busy-waits `ns` nanoseconds of the GPU's global timer: the profiler queues the work of a
// forward pass behind it, so its events time the kernels and not the host's launches.
extern "C" __global__ void pb_spin(long ns) {
    unsigned long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while ((long)(t - t0) < ns);
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

// MoE routing, one block per row: softmax (f32) of the router logits [t, e] (the sum in
// expert order, by one thread), the k largest (ties: lower expert first, like torch.topk) by
// k block-wide arg-max reductions, optional renormalisation, weights rounded to T (HF:
// `routing_weights.to(hidden_states.dtype)`). ids: [t, k], w: [t, k]. A row whose
// probabilities are NaN gets id -1. Grid: t, block: PB_BLOCK. e <= PB_MAX_EXPERTS.
#define PB_MAX_EXPERTS 1024
extern "C" __global__ void pb_moe_route(int* ids, float* w, const T* logits, int t, int e, int k, int renorm) {
    __shared__ float pr[PB_MAX_EXPERTS];
    __shared__ float rv[PB_BLOCK];
    __shared__ int ri[PB_BLOCK];
    __shared__ float inv_sum, total;
    int r = blockIdx.x, tid = threadIdx.x;
    long base = (long)r * e;
    float mx = -PB_INF;
    for (int x = tid; x < e; x += PB_BLOCK) mx = fmaxf(mx, ld(logits, base + x));
    mx = block_max(mx, rv);
    for (int x = tid; x < e; x += PB_BLOCK) pr[x] = expf(ld(logits, base + x) - mx);
    __syncthreads();
    if (tid == 0) {
        float sum = 0.0f;
        for (int x = 0; x < e; x++) sum += pr[x];
        inv_sum = 1.0f / sum;
        total = 0.0f;
    }
    __syncthreads();
    for (int x = tid; x < e; x += PB_BLOCK) pr[x] = pr[x] * inv_sum;
    __syncthreads();
    for (int j = 0; j < k; j++) {
        // the largest remaining probability, lowest expert first among equals
        float bp = -PB_INF;
        int bi = -1;
        for (int x = tid; x < e; x += PB_BLOCK) {
            if (pr[x] > bp) bp = pr[x], bi = x;
        }
        rv[tid] = bp, ri[tid] = bi;
        __syncthreads();
        for (int s = PB_BLOCK / 2; s > 0; s >>= 1) {
            if (tid < s) {
                float ov = rv[tid + s];
                int oi = ri[tid + s];
                if (oi >= 0 && (ri[tid] < 0 || ov > rv[tid] || (ov == rv[tid] && oi < ri[tid]))) rv[tid] = ov, ri[tid] = oi;
            }
            __syncthreads();
        }
        if (tid == 0) {
            ids[(long)r * k + j] = ri[0];
            w[(long)r * k + j] = rv[0];
            total += rv[0];
            if (ri[0] >= 0) pr[ri[0]] = -PB_INF;
        }
        __syncthreads();
    }
    if (tid == 0) {
        for (int j = 0; j < k; j++) {
            float v = w[(long)r * k + j];
            if (renorm) v = v / total;
            w[(long)r * k + j] = rnd(v);
        }
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

// ---- GGUF dequantization ------------------------------------------------------------------
//
// Raw ggml blocks (the file's bytes, uploaded as stored) to T: one thread per output element,
// grid-stride over `n` elements. Each value is computed in f32 with the operations and order
// of the host dequantization (src/engine/gguf/quants.rs, itself bit-exact vs gguf-py), using
// the _rn intrinsics so that no multiply and add is contracted into an FMA; f16 scales are
// widened bit by bit (exact, NaN payloads kept as numpy keeps them). The f32 value is then
// stored with `st`: the identity for f32, round-to-nearest-even for f16 / bf16, exactly as the
// host's `StorageType::encode`. Bytes are read one at a time: blocks of 18, 22 or 34 bytes
// are not aligned for wider loads.

__device__ __forceinline__ float pb_f16_bits(unsigned int h) {
    unsigned int s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return __uint_as_float(s | 0x7f800000u | (m << 13)); // inf, NaN with payload
    if (e == 0u) {                                                       // zero, subnormal: m * 2^-24
        float f = __fmul_rn((float)m, 5.9604644775390625e-8f);
        return __uint_as_float(__float_as_uint(f) | s);
    }
    return __uint_as_float(s | ((e + 112u) << 23) | (m << 13));
}
__device__ __forceinline__ float pb_f16_at(const unsigned char* b, int i) {
    return pb_f16_bits((unsigned int)b[i] | ((unsigned int)b[i + 1] << 8));
}
__device__ __forceinline__ unsigned int pb_u32_at(const unsigned char* b, int i) {
    return (unsigned int)b[i] | ((unsigned int)b[i + 1] << 8) | ((unsigned int)b[i + 2] << 16) |
           ((unsigned int)b[i + 3] << 24);
}
// ggml's get_scale_min_k4: the 6-bit scale (which = 0) or min (which = 1) of sub-block j.
__device__ __forceinline__ unsigned int pb_scale_min_k4(int j, const unsigned char* s, int which) {
    if (j < 4) return which ? (s[j + 4] & 63u) : (s[j] & 63u);
    return which ? ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) : ((s[j + 4] & 0x0fu) | ((s[j - 4] >> 6) << 4));
}

#define PB_DEQUANT_LOOP(BS, TS)                                                                  \
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) { \
        const unsigned char* b = src + (i / (BS)) * (TS);                                        \
        [[maybe_unused]] int j = (int)(i % (BS));

// F32: the little-endian bits as they are.
extern "C" __global__ void pb_dequant_f32(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(1, 4)
        st(dst, i, __uint_as_float(pb_u32_at(b, 0)));
    }
}

// F16: exact widening.
extern "C" __global__ void pb_dequant_f16(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(1, 2)
        st(dst, i, pb_f16_at(b, 0));
    }
}

// BF16: the 16 bits become the high half of an f32.
extern "C" __global__ void pb_dequant_bf16(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(1, 2)
        st(dst, i, __uint_as_float(((unsigned int)b[0] | ((unsigned int)b[1] << 8)) << 16));
    }
}

// Q8_0, 34 bytes: d: f16, qs: [i8; 32]; y = qs * d.
extern "C" __global__ void pb_dequant_q8_0(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(32, 34)
        st(dst, i, __fmul_rn((float)(signed char)b[2 + j], pb_f16_at(b, 0)));
    }
}

// Q4_0, 18 bytes: d: f16, qs: [u8; 16]; element j < 16 the low nibble of qs[j], j >= 16 the
// high nibble of qs[j - 16]; y = (q - 8) * d.
extern "C" __global__ void pb_dequant_q4_0(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(32, 18)
        int q = j < 16 ? (b[2 + j] & 0x0f) : (b[2 + j - 16] >> 4);
        st(dst, i, __fmul_rn((float)(q - 8), pb_f16_at(b, 0)));
    }
}

// Q4_1, 20 bytes: d, m: f16, qs: [u8; 16]; y = d * q + m (two roundings).
extern "C" __global__ void pb_dequant_q4_1(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(32, 20)
        int q = j < 16 ? (b[4 + j] & 0x0f) : (b[4 + j - 16] >> 4);
        st(dst, i, __fadd_rn(__fmul_rn(pb_f16_at(b, 0), (float)q), pb_f16_at(b, 2)));
    }
}

// Q5_0, 22 bytes: d: f16, qh: u32, qs: [u8; 16]; the fifth bit of element j is bit j of qh;
// y = (q - 16) * d.
extern "C" __global__ void pb_dequant_q5_0(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(32, 22)
        unsigned int qh = pb_u32_at(b, 2);
        int lo = j < 16 ? (b[6 + j] & 0x0f) : (b[6 + j - 16] >> 4);
        int q = lo | (int)(((qh >> j) & 1u) << 4);
        st(dst, i, __fmul_rn((float)(q - 16), pb_f16_at(b, 0)));
    }
}

// Q5_1, 24 bytes: d, m: f16, qh: u32, qs: [u8; 16]; y = d * q + m.
extern "C" __global__ void pb_dequant_q5_1(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(32, 24)
        unsigned int qh = pb_u32_at(b, 4);
        int lo = j < 16 ? (b[8 + j] & 0x0f) : (b[8 + j - 16] >> 4);
        int q = lo | (int)(((qh >> j) & 1u) << 4);
        st(dst, i, __fadd_rn(__fmul_rn(pb_f16_at(b, 0), (float)q), pb_f16_at(b, 2)));
    }
}

// Q4_K, 144 bytes: d, dmin: f16, scales: [u8; 12], qs: [u8; 128]. Element j: chunk c = j / 64
// (bytes qs[32c..32c+32]), sub-block s = j / 32 (low nibbles for even s, high for odd);
// y = (d * sc) * q - (dmin * m), each product rounded to f32 first.
extern "C" __global__ void pb_dequant_q4_k(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(256, 144)
        int s = j / 32, l = j % 32, c = j / 64;
        unsigned int byte = b[16 + 32 * c + l];
        unsigned int q = (s & 1) ? (byte >> 4) : (byte & 0x0fu);
        float dl = __fmul_rn(pb_f16_at(b, 0), (float)pb_scale_min_k4(s, b + 4, 0));
        float ml = __fmul_rn(pb_f16_at(b, 2), (float)pb_scale_min_k4(s, b + 4, 1));
        st(dst, i, __fsub_rn(__fmul_rn(dl, (float)q), ml));
    }
}

// Q5_K, 176 bytes: d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]. As Q4_K, with
// the fifth bit of element l of sub-block s in bit s of qh[l].
extern "C" __global__ void pb_dequant_q5_k(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(256, 176)
        int s = j / 32, l = j % 32, c = j / 64;
        unsigned int byte = b[48 + 32 * c + l];
        unsigned int q = ((s & 1) ? (byte >> 4) : (byte & 0x0fu)) | (((b[16 + l] >> s) & 1u) << 4);
        float dl = __fmul_rn(pb_f16_at(b, 0), (float)pb_scale_min_k4(s, b + 4, 0));
        float ml = __fmul_rn(pb_f16_at(b, 2), (float)pb_scale_min_k4(s, b + 4, 1));
        st(dst, i, __fsub_rn(__fmul_rn(dl, (float)q), ml));
    }
}

// Q6_K, 210 bytes: ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16. Element j: half
// h = j / 128, k = (j % 128) / 32, l = j % 32; low 4 bits: nibble k / 2 of ql[64h + 32(k % 2) + l],
// high 2 bits: bits 2k..2k+2 of qh[32h + l]; y = (d * scales[j / 16]) * (q - 32).
extern "C" __global__ void pb_dequant_q6_k(T* dst, const unsigned char* src, long n) {
    PB_DEQUANT_LOOP(256, 210)
        int h = j / 128, k = (j % 128) / 32, l = j % 32;
        unsigned int lo = (b[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0fu;
        unsigned int hi = ((b[128 + 32 * h + l] >> (2 * k)) & 3u) << 4;
        int q = (int)(lo | hi) - 32;
        float dl = __fmul_rn(pb_f16_at(b, 208), (float)(signed char)b[192 + j / 16]);
        st(dst, i, __fmul_rn(dl, (float)q));
    }
}
