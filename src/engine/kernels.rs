//! The CPU kernels the forward pass is made of: small free functions over f32 slices.
//!
//! Determinism: every output element is computed by one call of a sequential function
//! ([`dot`] and friends) whose order of operations is fixed; rayon only splits *which*
//! elements a thread computes. Dumps are therefore bit-identical for any thread count.
//!
//! Numerics follow HF transformers in f32: RMSNorm as `weight * (x * rsqrt(mean(x²) + eps))`,
//! RoPE with `rotate_half` on the two halves of each head and `inv_freq` computed in f32,
//! attention scores `q·k * scale`, softmax in f32, SiLU as `x / (1 + exp(-x))`.

use rayon::prelude::*;

/// Lanes of the accumulators in [`dot`]: lane `i` sums the products of the elements
/// `i, i + 16, i + 32, ...` (16 f32 = two AVX registers, so the loops vectorize), then the
/// lanes are added pairwise in a fixed tree. Every kernel that computes a dot product
/// follows exactly this order, so a value does not depend on which kernel computed it.
const LANES: usize = 16;

/// Which dot-product implementation this CPU runs (`avx2+fma` or `portable`); both give
/// the same bits, so this is provenance for timings only.
pub fn simd_path() -> &'static str {
    if has_fma() { "avx2+fma" } else { "portable" }
}

/// Whether the fused-multiply-add paths can run (checked once, cached by std).
#[inline]
fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `Σ a[i]·b[i]` in the fixed order described at [`LANES`], each step a fused multiply-add
/// (`f32::mul_add`: one rounding, so the hardware FMA path and the portable path give the
/// same bits).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only
            // requirement of `dot_fma`.
            return unsafe { dot_fma(a, b) };
        }
    }
    dot_body(a, b)
}

/// [`dot_body`] with AVX2/FMA intrinsics: lanes 0..8 and 8..16 are two registers; the
/// tail and the lane reduction are [`dot_body`]'s own code.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: the caller guarantees AVX2 and FMA, all `dot_n_fma` needs.
    let [v] = unsafe { dot_n_fma(a, [b]) };
    v
}

/// `N` dot products of `x` with the rows `w` (`x` loaded once for all), each bit-identical
/// to [`dot_body`] of the same pair.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_n_fma<const N: usize>(x: &[f32], w: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::{_mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps};
    let k = x.len();
    let w = w.map(|r| &r[..k]);
    let full = k / LANES * LANES;
    let mut lo = [_mm256_setzero_ps(); N];
    let mut hi = [_mm256_setzero_ps(); N];
    let mut c = 0;
    while c < full {
        // SAFETY: `c + 16 <= full <= k`, and `x` and every `w[r]` hold `k` elements.
        unsafe {
            let xl = _mm256_loadu_ps(x.as_ptr().add(c));
            let xh = _mm256_loadu_ps(x.as_ptr().add(c + 8));
            for r in 0..N {
                let wp = w[r].as_ptr().add(c);
                lo[r] = _mm256_fmadd_ps(xl, _mm256_loadu_ps(wp), lo[r]);
                hi[r] = _mm256_fmadd_ps(xh, _mm256_loadu_ps(wp.add(8)), hi[r]);
            }
        }
        c += LANES;
    }
    let mut out = [0.0f32; N];
    for r in 0..N {
        let mut acc = [0.0f32; LANES];
        // SAFETY: `acc` holds 16 floats: two stores of 8.
        unsafe {
            _mm256_storeu_ps(acc.as_mut_ptr(), lo[r]);
            _mm256_storeu_ps(acc.as_mut_ptr().add(8), hi[r]);
        }
        for (i, (xv, wv)) in x[full..].iter().zip(&w[r][full..]).enumerate() {
            acc[i] = xv.mul_add(*wv, acc[i]);
        }
        out[r] = reduce_lanes(acc);
    }
    out
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    for (i, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[i] = x.mul_add(*y, acc[i]);
    }
    reduce_lanes(acc)
}

#[inline(always)]
fn reduce_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// `N` dot products of `x` with the rows `w`, each bit-identical to [`dot_body`].
#[inline(always)]
fn dot_n_body<const N: usize>(x: &[f32], w: [&[f32]; N]) -> [f32; N] {
    w.map(|r| dot_body(x, r))
}

/// Rows of `w` each task handles in [`matmul_t`] (a block of weight rows stays in cache
/// while every input row is multiplied with it).
const ROW_BLOCK: usize = 16;

/// The output of [`matmul_t`] shared by the tasks that fill disjoint parts of it.
struct SharedOut(*mut f32);

// SAFETY: `matmul_t` and `matmul_t_rows` hand each task a disjoint set of output elements
// (its block of columns), so no element is written by two threads and none is read during
// the call.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// `out = x · Wᵀ`, the product of a PyTorch `nn.Linear`.
///
/// `x`: `[t, k]`, `w`: `[n, k]`, `out`: `[t, n]`. Parallel over blocks of weight rows; each
/// task multiplies every input row with its block, so a weight is read from memory once
/// per call whatever `t` is. Every element equals [`dot`] of its row pair: the result does
/// not depend on `t`, the blocking or the thread count.
pub fn matmul_t(out: &mut [f32], x: &[f32], w: &[f32], t: usize, k: usize, n: usize) {
    assert!(
        x.len() == t * k && w.len() == n * k && out.len() == t * n,
        "matmul_t: x {} w {} out {} for t={t} k={k} n={n}",
        x.len(),
        w.len(),
        out.len()
    );
    let shared = SharedOut(out.as_mut_ptr());
    let fma = has_fma();
    (0..n.div_ceil(ROW_BLOCK)).into_par_iter().for_each(|blk| {
        let rows = blk * ROW_BLOCK..((blk + 1) * ROW_BLOCK).min(n);
        run_block(&Block { out: &shared, x, w, w_row0: 0, t, k, n, rows }, fma);
    });
}

/// [`matmul_t`] where the rows of `W` (`[n, k]`) are produced on demand: each task asks
/// `rows_f32(rows, buf)` for its block of rows as f32 (`buf`: `[rows.len(), k]`; widened
/// from f16, dequantized, ...) and multiplies them exactly as [`matmul_t`] does, so the
/// result is bit-identical to [`matmul_t`] over the whole f32 matrix.
pub fn matmul_t_rows(
    out: &mut [f32],
    x: &[f32],
    t: usize,
    k: usize,
    n: usize,
    rows_f32: &(dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync),
) {
    assert!(
        x.len() == t * k && out.len() == t * n,
        "matmul_t_rows: x {} out {} for t={t} k={k} n={n}",
        x.len(),
        out.len()
    );
    let shared = SharedOut(out.as_mut_ptr());
    let fma = has_fma();
    (0..n.div_ceil(ROW_BLOCK)).into_par_iter().for_each_init(Vec::new, |buf: &mut Vec<f32>, blk| {
        let rows = blk * ROW_BLOCK..((blk + 1) * ROW_BLOCK).min(n);
        buf.resize(rows.len() * k, 0.0);
        rows_f32(rows.clone(), buf);
        run_block(&Block { out: &shared, x, w: &buf[..], w_row0: rows.start, t, k, n, rows }, fma);
    });
}

/// One task, with the FMA kernels where the CPU has them.
#[inline(always)]
fn run_block(job: &Block, fma: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if fma {
            // SAFETY: `fma` says the CPU supports AVX2 and FMA.
            unsafe { block_fma(job) };
            return;
        }
    }
    let _ = fma;
    block_body(job);
}

/// One task of [`matmul_t`]: the columns `rows` of every output row.
struct Block<'a> {
    out: &'a SharedOut,
    x: &'a [f32],
    /// Weight rows `w_row0..`, `k` values each.
    w: &'a [f32],
    w_row0: usize,
    t: usize,
    k: usize,
    n: usize,
    rows: std::ops::Range<usize>,
}

/// [`matmul_t`]'s task with the AVX2/FMA dot products.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_fma(b: &Block) {
    // SAFETY: the caller guarantees AVX2 and FMA, all `dot_n_fma` needs.
    block_with(b, |x, w| unsafe { dot_n_fma(x, w) }, |x, w| unsafe { dot_fma(x, w) })
}

fn block_body(b: &Block) {
    block_with(b, dot_n_body::<4>, dot_body)
}

/// Fills the block. With several input rows (compute-bound) four weight rows at a time
/// with `dot4`, so each load of `x` feeds four products; with one input row (a decode
/// step: bound by memory bandwidth) one weight row at a time with `dot1`, which reads the
/// weights as one sequential stream that the hardware prefetcher follows (measured: `dot4`
/// halves the decode rate of a model with 1 KiB rows). Both give the same bits.
#[inline(always)]
fn block_with(b: &Block, dot4: impl Fn(&[f32], [&[f32]; 4]) -> [f32; 4], dot1: impl Fn(&[f32], &[f32]) -> f32) {
    let k = b.k;
    let wrow = |r: usize| &b.w[(r - b.w_row0) * k..(r - b.w_row0 + 1) * k];
    let put = |ti: usize, r: usize, v: f32| {
        debug_assert!(ti < b.t && r < b.n);
        // SAFETY: `ti * n + r < t * n = out.len()` (asserted in `matmul_t` and `matmul_t_rows`), and column
        // `r` belongs to this task's block only (see `SharedOut`).
        unsafe { *b.out.0.add(ti * b.n + r) = v };
    };
    for ti in 0..b.t {
        let xr = &b.x[ti * k..(ti + 1) * k];
        let mut r = b.rows.start;
        while b.t > 1 && r + 4 <= b.rows.end {
            let v = dot4(xr, [wrow(r), wrow(r + 1), wrow(r + 2), wrow(r + 3)]);
            for (j, vj) in v.into_iter().enumerate() {
                put(ti, r + j, vj);
            }
            r += 4;
        }
        while r < b.rows.end {
            put(ti, r, dot1(xr, wrow(r)));
            r += 1;
        }
    }
}
/// `x[i, :] += bias` for every row. `x`: `[t, n]`, `bias`: `[n]`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `x += y` element-wise (the residual add).
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// RMSNorm of every row, HF's order of operations: `weight * (x * rsqrt(mean(x²) + eps))`.
/// The mean of squares is accumulated in f64 (exact enough to be order-insensitive).
///
/// `x`, `out`: `[rows, weight.len()]`.
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f64) {
    let h = weight.len();
    for (o, xr) in out.chunks_mut(h).zip(x.chunks(h)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let var = (ss / h as f64) as f32;
        let inv = 1.0f32 / (var + eps as f32).sqrt();
        for ((ov, &xv), &w) in o.iter_mut().zip(xr).zip(weight) {
            *ov = w * (xv * inv);
        }
    }
}

/// RMSNorm in place, one head at a time (Qwen3's q_norm / k_norm over `head_dim`).
/// `x`: `[rows, n_heads * head_dim]`, `weight`: `[head_dim]`.
pub fn rmsnorm_heads_in_place(x: &mut [f32], weight: &[f32], eps: f64) {
    let hd = weight.len();
    let mut tmp = [0.0f32; 512];
    for head in x.chunks_mut(hd) {
        if hd <= tmp.len() {
            let t = &mut tmp[..hd];
            rmsnorm(t, head, weight, eps);
            head.copy_from_slice(t);
        } else {
            let t = head.to_vec();
            rmsnorm(head, &t, weight, eps);
        }
    }
}

/// RoPE frequencies as HF computes them: `inv_freq[i] = 1 / theta^(2i / head_dim)` in f32.
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    let base = theta as f32;
    (0..head_dim / 2).map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32)).collect()
}

/// The cos and sin of one position: `[head_dim / 2]` each (HF repeats them over both
/// halves of the head). `freq = pos * inv_freq` in f32, as HF's f32 matmul computes it.
pub fn rope_cos_sin(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    let p = pos as f32;
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let a = p * f;
        *c = a.cos();
        *s = a.sin();
    }
}

/// The cos and sin of one position as ggml-cpu computes them (`ggml_rope_cache_init`):
/// the angle of pair `i` is `pos * theta_scale^i` by repeated f32 multiplication, with
/// `theta_scale = powf(base, -2 / head_dim)`. Up to ~1e-5 rad from HF's angles at a few
/// hundred positions, which moves values across the f16 rounding of llama.cpp's K cache.
pub fn rope_cos_sin_ggml(pos: usize, base: f32, cos: &mut [f32], sin: &mut [f32]) {
    let theta_scale = base.powf(-2.0 / (2 * cos.len()) as f32);
    let mut theta = pos as f32;
    for (c, s) in cos.iter_mut().zip(sin.iter_mut()) {
        *c = theta.cos();
        *s = theta.sin();
        theta *= theta_scale;
    }
}

/// Rotates every head of one row in place, HF's `rotate_half` convention: the pairs are
/// `(x[i], x[i + half])`. `x`: `[n_heads * head_dim]`; `cos`, `sin`: `[head_dim / 2]`.
pub fn rope_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_mut(2 * half) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

/// Softmax in place, f32, fixed order (max, then `exp(x - max)`, then the sum left to right).
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// An f32 rounded to f16 (nearest even, as F16C's `vcvtps2ph` with imm 0 and ggml's f32 ->
/// f16 conversion) and widened back.
#[inline]
pub fn round_f16(v: f32) -> f32 {
    super::gguf::quants::f16_to_f32(half::f16::from_f32(v).to_bits())
}

/// [`round_f16`] of every value in place.
pub fn round_to_f16(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = round_f16(*v);
    }
}

/// `gate = silu(gate) * up`, the SwiGLU activation. `silu(x) = x / (1 + exp(-x))`.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = (*g / (1.0 + (-*g).exp())) * u;
    }
}

/// The `k` largest entries, largest first; equal values keep the lower index first (like
/// `torch.topk` on CPU). Returns `(index, value)` pairs.
pub fn top_k(x: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|i| (i, x[i])).collect()
}

/// Index of the largest entry (the first one on ties), for greedy decoding.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Shapes of one causal attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query rows in this call.
    pub t: usize,
    /// Absolute position of the first query row (keys before it come from the cache).
    pub pos0: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// llama.cpp's CPU attention numerics (K/V cache in f16, no flash attention): the
    /// probabilities are rounded to f16 before the product with V, as ggml converts them to
    /// V's type. The caller rounds Q, K and V to f16 (ggml converts Q to K's type).
    pub f16_probs: bool,
}

/// Causal grouped-query attention: query head `h` reads key/value head
/// `h / (n_heads / n_kv_heads)`; query row `t` at position `pos0 + t` sees keys `0..=pos0 + t`.
///
/// `q`: `[t, n_heads * head_dim]` (already normed and rotated), `k_cache`, `v_cache`:
/// `[≥ pos0 + t, n_kv_heads * head_dim]`, `out`: `[t, n_heads * head_dim]`.
/// Scores are `q·k * head_dim^-0.5`, softmax in f32, then the probability-weighted sum of
/// the values in key order. Parallel over (row, head) pairs.
pub fn attention(out: &mut [f32], q: &[f32], k_cache: &[f32], v_cache: &[f32], s: AttnShape) {
    let hd = s.head_dim;
    let kv_dim = s.n_kv_heads * hd;
    let group = s.n_heads / s.n_kv_heads;
    let scale = (hd as f64).powf(-0.5) as f32; // HF: a Python float, rounded to f32 once
    out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (i, o)| {
        let (t, h) = (i / s.n_heads, i % s.n_heads);
        let kvh = h / group;
        let n_keys = s.pos0 + t + 1;
        let qh = &q[i * hd..(i + 1) * hd];
        scores.clear();
        scores
            .extend((0..n_keys).map(|j| dot(qh, &k_cache[j * kv_dim + kvh * hd..j * kv_dim + (kvh + 1) * hd]) * scale));
        softmax_in_place(scores);
        if s.f16_probs {
            round_to_f16(scores);
        }
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let vj = &v_cache[j * kv_dim + kvh * hd..j * kv_dim + (kvh + 1) * hd];
            for (ov, &vv) in o.iter_mut().zip(vj) {
                *ov += p * vv;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    #[test]
    fn dot_matches_f64_and_the_portable_path() {
        let a: Vec<f32> = (0..1001).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let b: Vec<f32> = (0..1001).map(|i| ((i * 53 % 89) as f32 - 44.0) / 5.0).collect();
        let d = dot(&a, &b);
        assert!((d as f64 - naive_dot(&a, &b)).abs() < 1e-3 * naive_dot(&a, &a).sqrt() * naive_dot(&b, &b).sqrt());
        assert_eq!(d.to_bits(), dot_body(&a, &b).to_bits());
        let w = [&b[..], &a[..], &b[..], &a[..]];
        assert_eq!(dot_n_body(&a, w), [d, dot(&a, &a), d, dot(&a, &a)]);
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: checked just above.
            assert_eq!(unsafe { dot_n_fma(&a, w) }, [d, dot(&a, &a), d, dot(&a, &a)]);
            assert_eq!(unsafe { dot_fma(&a, &b) }.to_bits(), d.to_bits());
        }
    }

    #[test]
    fn matmul_t_is_x_times_w_transposed_and_deterministic() {
        let (t, k, n) = (3, 37, 41);
        let x: Vec<f32> = (0..t * k).map(|i| (i % 13) as f32 - 6.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
        let mut out = vec![0.0; t * n];
        matmul_t(&mut out, &x, &w, t, k, n);
        for ti in 0..t {
            for r in 0..n {
                let want = naive_dot(&x[ti * k..(ti + 1) * k], &w[r * k..(r + 1) * k]);
                assert_eq!(out[ti * n + r] as f64, want);
            }
        }
        // with inexact values every element still equals `dot` of its pair, bit for bit
        let xf: Vec<f32> = (0..t * k).map(|i| ((i * 7919 % 1013) as f32).sin()).collect();
        let wf: Vec<f32> = (0..n * k).map(|i| ((i * 104729 % 2027) as f32).cos()).collect();
        let mut of = vec![0.0; t * n];
        matmul_t(&mut of, &xf, &wf, t, k, n);
        for ti in 0..t {
            for r in 0..n {
                assert_eq!(of[ti * n + r].to_bits(), dot(&xf[ti * k..(ti + 1) * k], &wf[r * k..(r + 1) * k]).to_bits());
            }
        }
        // one row at a time gives the same bits as the batched product
        for ti in 0..t {
            let mut o1 = vec![0.0; n];
            matmul_t(&mut o1, &x[ti * k..(ti + 1) * k], &w, 1, k, n);
            assert_eq!(o1, out[ti * n..(ti + 1) * n]);
        }
    }

    #[test]
    fn rmsnorm_is_hf_rmsnorm() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 0.5, 2.0, 1.0];
        let mut out = [0.0f32; 4];
        rmsnorm(&mut out, &x, &w, 1e-6);
        let ms = (1.0 + 4.0 + 9.0 + 0.25) / 4.0f64;
        for i in 0..4 {
            let want = w[i] as f64 * x[i] as f64 / (ms + 1e-6).sqrt();
            assert!((out[i] as f64 - want).abs() < 1e-6, "{i}: {} vs {want}", out[i]);
        }
    }

    #[test]
    fn rope_rotates_halves_and_keeps_norms() {
        let inv = rope_inv_freq(8, 10000.0);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] as f64 - 10000f64.powf(-0.25)).abs() < 1e-7);
        let (mut c, mut s) = (vec![0.0; 4], vec![0.0; 4]);
        rope_cos_sin(0, &inv, &mut c, &mut s);
        let mut x: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let orig = x.clone();
        rope_in_place(&mut x, &c, &s);
        assert_eq!(x, orig, "position 0 is the identity");
        rope_cos_sin(3, &inv, &mut c, &mut s);
        rope_in_place(&mut x, &c, &s);
        // pair (x[0], x[4]) rotated by 3 radians
        let (a, b) = (orig[0] as f64, orig[4] as f64);
        assert!((x[0] as f64 - (a * 3f64.cos() - b * 3f64.sin())).abs() < 1e-5);
        assert!((x[4] as f64 - (b * 3f64.cos() + a * 3f64.sin())).abs() < 1e-5);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }

    #[test]
    fn top_k_breaks_ties_towards_the_lower_index() {
        let x = [0.1, 0.3, 0.3, 0.05, 0.3];
        assert_eq!(top_k(&x, 3).iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(argmax(&x), 1);
    }

    #[test]
    fn softmax_and_swiglu() {
        let mut x = [1.0f32, 2.0, 3.0];
        softmax_in_place(&mut x);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        for i in 0..3 {
            assert!((x[i] as f64 - e[i] / s).abs() < 1e-7);
        }
        let mut g = [0.0f32, 1.0, -1.0];
        swiglu_in_place(&mut g, &[2.0, 2.0, 2.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] as f64 - 2.0 / (1.0 + (-1f64).exp())).abs() < 1e-6);
    }

    #[test]
    fn attention_is_causal_and_grouped() {
        // 2 query heads share 1 kv head; head_dim 2; 3 positions.
        let s = AttnShape { t: 3, pos0: 0, n_heads: 2, n_kv_heads: 1, head_dim: 2, f16_probs: false };
        let q = vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let k = vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let v = vec![10.0, 0.0, 0.0, 20.0, 5.0, 5.0];
        let mut out = vec![0.0; 12];
        attention(&mut out, &q, &k, &v, s);
        // row 0 sees only key 0
        assert_eq!(&out[0..4], &[10.0, 0.0, 10.0, 0.0]);
        // the last row computed alone (pos0 = 2) equals the batched one
        let s1 = AttnShape { t: 1, pos0: 2, ..s };
        let mut o1 = vec![0.0; 4];
        attention(&mut o1, &q[8..12], &k, &v, s1);
        assert_eq!(&o1[..], &out[8..12]);
    }
    #[test]
    fn ggml_rope_angles_are_a_running_product() {
        let (half, base) = (32usize, 1.0e6f32);
        let (mut c, mut s) = (vec![0.0; half], vec![0.0; half]);
        rope_cos_sin_ggml(300, base, &mut c, &mut s);
        // the angle of pair i is 300 * scale^i, multiplied out one f32 step at a time
        let scale = base.powf(-2.0 / 64.0);
        let mut theta = 300.0f32;
        for i in 0..half {
            assert_eq!((c[i].to_bits(), s[i].to_bits()), (theta.cos().to_bits(), theta.sin().to_bits()), "pair {i}");
            theta *= scale;
        }
        // HF's angles (300 * inv_freq[i], one rounding) are not those: the difference is
        // what moves values across the f16 rounding of llama.cpp's K cache
        let (mut hc, mut hs) = (vec![0.0; half], vec![0.0; half]);
        rope_cos_sin(300, &rope_inv_freq(64, base as f64), &mut hc, &mut hs);
        assert_eq!(c[0], hc[0]);
        assert!(c.iter().zip(&hc).any(|(a, b)| a != b));
        let worst = c.iter().zip(&hc).chain(s.iter().zip(&hs)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{worst}");
    }

    #[test]
    fn f16_probabilities_are_rounded_before_the_product_with_v() {
        // one head, 3 keys: the last query row sees all three; V = identity rows pick out
        // each probability, so the output is the probabilities as they entered the product
        let s = AttnShape { t: 3, pos0: 0, n_heads: 1, n_kv_heads: 1, head_dim: 3, f16_probs: true };
        let q = vec![0.3, -0.2, 0.7, 0.11, 0.5, -0.9, 0.2, 0.1, 0.4];
        let k = vec![0.9, 0.1, -0.3, 0.2, 0.8, 0.05, -0.4, 0.33, 0.6];
        let v = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let (mut half, mut full) = (vec![0.0; 9], vec![0.0; 9]);
        attention(&mut half, &q, &k, &v, s);
        attention(&mut full, &q, &k, &v, AttnShape { f16_probs: false, ..s });
        let mut rounded = full[6..9].to_vec();
        round_to_f16(&mut rounded);
        assert_eq!(&half[6..9], &rounded[..]);
        assert_ne!(&half[6..9], &full[6..9]);
    }
}
