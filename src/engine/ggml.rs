//! llama.cpp's CPU numerics, op by op, to the bit: what ggml-cpu computes on x86-64 with
//! AVX-512 (F, DQ, BW, VL, VNNI) and FMA, as llama.cpp builds it with `GGML_NATIVE` on such a
//! CPU, for the graph of a Qwen model without flash attention over an f16 K/V cache.
//!
//! Each function names the ggml function whose arithmetic it repeats. Only the order and
//! the kind of every float operation matter (integer sums are exact in any order), so the
//! SIMD registers become arrays of lanes here: an FMA in a register is `mul_add` per lane,
//! a horizontal add is the same tree of adds. `scripts/llamacpp-trace.py` dumps every tensor
//! llama.cpp computes and `tests/ggml_numerics.rs` holds these functions to it, bit for bit.
//!
//! Where ggml's choice depends on the shapes, so does this module's: a product of several
//! rows (`n ≥ 2`) goes through llamafile's `tinyBLAS` (one 16-lane FMA chain per output), one
//! row through `ggml_vec_dot_f16` (four 16-lane accumulators over steps of 64); attention
//! runs over llama.cpp's `n_kv` cells (a multiple of 256), the unused ones masked.

use half::f16;

/// `_mm512_reduce_add_ps` as GCC defines it: the upper and lower 256-bit halves added, then
/// the 128-bit halves, then lanes `(0 + 2) + (1 + 3)`.
#[inline(always)]
pub fn reduce16(x: &[f32; 16]) -> f32 {
    let t3: [f32; 8] = std::array::from_fn(|i| x[8 + i] + x[i]);
    let t6: [f32; 4] = std::array::from_fn(|i| t3[4 + i] + t3[i]);
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// `hsum_float_8` (ggml-cpu x86 quants) and llamafile's `hsum(__m256)`: the 128-bit halves
/// added, then lanes `(0 + 2) + (1 + 3)`.
#[inline(always)]
pub fn hsum8(x: &[f32; 8]) -> f32 {
    let v: [f32; 4] = std::array::from_fn(|i| x[4 + i] + x[i]);
    (v[0] + v[2]) + (v[1] + v[3])
}

/// `ggml_v_expf` (the AVX-512 build), one lane: `exp(x)` from a degree-5 polynomial on the
/// reduced argument and `_mm512_scalef_ps`; inputs that would leave the range give 0 or ∞.
#[inline]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(f32::from_bits(0x35bf_be8e), (-n).mul_add(f32::from_bits(0x3f31_7200), x));
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17))
        .mul_add(u, f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)))
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // scalef: j · 2^n rounded once (exact in f64, then to f32)
    (j as f64 * 2f64.powi(n as i32)) as f32
}

/// `ggml_v_silu`, one lane: `x / (1 + exp(-x))` with [`expf`].
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

/// `ggml_vec_swiglu_f32`: `y = silu(x) · g`, 16 lanes at a time, the tail with libm's `expf`.
pub fn swiglu(y: &mut [f32], x: &[f32], g: &[f32]) {
    let n = y.len();
    let body = n - n % 16;
    for i in 0..body {
        y[i] = silu(x[i]) * g[i];
    }
    for i in body..n {
        y[i] = (x[i] / (1.0 + (-x[i]).exp())) * g[i];
    }
}

/// `ggml_compute_forward_rms_norm_f32` then the `MUL` by the weight (or the fused pair, which
/// computes the same): squares in f32, summed in f64 in order, `mean` rounded to f32,
/// `scale = 1 / sqrtf(mean + eps)`, `y = x · scale · w`.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let h = w.len();
    for (o, xr) in out.chunks_mut(h).zip(x.chunks(h)) {
        let mut sum = 0.0f64;
        for &v in xr {
            sum += (v * v) as f64;
        }
        let mean = (sum / h as f64) as f32;
        let scale = 1.0f32 / (mean + eps).sqrt();
        for ((ov, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
            *ov = xv * scale * wv;
        }
    }
}

/// [`rmsnorm`] of every `w.len()`-wide slice of `x`, in place (per-head q/k norms).
pub fn rmsnorm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let mut tmp = vec![0.0f32; w.len()];
    for head in x.chunks_mut(w.len()) {
        rmsnorm(&mut tmp, head, w, eps);
        head.copy_from_slice(&tmp);
    }
}

/// `ggml_vec_soft_max_f32` over one row after `ggml_compute_forward_soft_max_f32`'s scale
/// and mask: `w = s · scale + mask`, `max`, `exp(w − max)` 16 lanes at a time with each
/// 16's sum ([`reduce16`]) added in f64, the tail with libm's `expf`, then every value times
/// `(float)(1.0 / sum)`. Masked entries are `-inf` (exact zeros after the exp).
pub fn softmax_row(p: &mut [f32], scores: &[f32], scale: f32, masked_from: usize) {
    let n = p.len();
    for (i, (pv, &s)) in p.iter_mut().zip(scores).enumerate() {
        *pv = if i < masked_from { s * scale + 0.0 } else { f32::NEG_INFINITY };
    }
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    let body = n - n % 16;
    for c in p[..body].chunks_exact_mut(16) {
        let mut lanes = [0.0f32; 16];
        for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
            *v = expf(*v - max);
            *l = *v;
        }
        sum += reduce16(&lanes) as f64;
    }
    for v in &mut p[body..] {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in p.iter_mut() {
        *v *= inv;
    }
}

/// llamafile's `tinyBLAS<16, __m512, …, ggml_fp16_t, …>` for one output: lane `l` is the FMA
/// chain over elements `l, l + 16, …` (f16 widened), then [`reduce16`]. `k % 16 == 0`.
#[inline]
pub fn dot_f16_tiny(a: &[f16], b: &[f16]) -> f32 {
    debug_assert!(a.len().is_multiple_of(16) && a.len() == b.len());
    let mut acc = [0.0f32; 16];
    for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] = ca[l].to_f32().mul_add(cb[l].to_f32(), acc[l]);
        }
    }
    reduce16(&acc)
}

/// `ggml_vec_dot_f16` (AVX-512, no FP16 arithmetic): four 16-lane accumulators over steps of
/// 64 elements, reduced `(0 + 2) + (1 + 3)` then [`reduce16`], then the leftover elements'
/// products added in f64.
#[inline]
pub fn dot_f16_vec(a: &[f16], b: &[f16]) -> f32 {
    let n = a.len();
    let np = n & !63;
    let mut acc = [[0.0f32; 16]; 4];
    for i in (0..np).step_by(64) {
        for (j, s) in acc.iter_mut().enumerate() {
            for l in 0..16 {
                let e = i + 16 * j + l;
                s[l] = a[e].to_f32().mul_add(b[e].to_f32(), s[l]);
            }
        }
    }
    let s02: [f32; 16] = std::array::from_fn(|l| acc[0][l] + acc[2][l]);
    let s13: [f32; 16] = std::array::from_fn(|l| acc[1][l] + acc[3][l]);
    let s: [f32; 16] = std::array::from_fn(|l| s02[l] + s13[l]);
    let mut sumf = reduce16(&s) as f64;
    for e in np..n {
        sumf += (a[e].to_f32() * b[e].to_f32()) as f64;
    }
    sumf as f32
}

/// `rotate_pairs` of `ggml_compute_forward_rope_flt` (NEOX mode: pairs `(x[i], x[i + half])`)
/// for every head of one row, with the cos/sin cache of `ggml_rope_cache_init`
/// ([`super::kernels::rope_cos_sin_ggml`]). GCC contracts `x0·cos − x1·sin` into
/// `fma(x0, cos, −(x1·sin))` and `x0·sin + x1·cos` into `fma(x0, sin, x1·cos)`.
pub fn rope_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_mut(2 * half) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (lo[i], hi[i]);
            lo[i] = x0.mul_add(cos[i], -(x1 * sin[i]));
            hi[i] = x0.mul_add(sin[i], x1 * cos[i]);
        }
    }
}

/// llama.cpp's number of K/V cells an attention call reads (`llama_kv_cache::get_n_kv` with
/// the cells filled in order from 0): the used cells rounded up to 256, at least 256.
pub fn n_kv(used: usize) -> usize {
    used.div_ceil(256).max(1) * 256
}

/// Shapes of one attention call over an f16 cache.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query rows in this call.
    pub t: usize,
    /// Position of the first query row.
    pub pos0: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Attention as llama.cpp's graph computes it without flash attention: `kq = K·Q` (Q rounded
/// to f16, `MUL_MAT` of the f16 cache view), `SOFT_MAX` with the causal mask and
/// `1/sqrt(head_dim)`, `kqv = Vᵀ·p` (p rounded to f16). Products of `t ≥ 2` rows take
/// tinyBLAS, one row `ggml_vec_dot_f16`, each over `n_kv(pos0 + t)` cells, the cells past the
/// used ones zero (as llama.cpp clears its cache) and masked.
///
/// `q`: `[t, n_heads · head_dim]` f32; `k`, `v`: `[≥ pos0 + t, n_kv_heads · head_dim]` f16
/// (cells in order); `out`: `[t, n_heads · head_dim]`.
pub fn attention(out: &mut [f32], q: &[f32], k: &[f16], v: &[f16], s: AttnShape) {
    let (hd, kvd) = (s.head_dim, s.n_kv_heads * s.head_dim);
    let used = s.pos0 + s.t;
    let nkv = n_kv(used);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0f32 / (hd as f32).sqrt();
    let many = s.t >= 2;
    let dot = |a: &[f16], b: &[f16]| if many { dot_f16_tiny(a, b) } else { dot_f16_vec(a, b) };
    let zero_k = vec![f16::ZERO; hd];
    let mut vt = vec![f16::ZERO; hd * nkv]; // one kv head's V, transposed: [hd, nkv]
    let mut scores = vec![0.0f32; nkv];
    let mut p = vec![0.0f32; nkv];
    let mut p16 = vec![f16::ZERO; nkv];
    let mut q16 = vec![f16::ZERO; hd];
    for kvh in 0..s.n_kv_heads {
        for j in 0..used {
            for d in 0..hd {
                vt[d * nkv + j] = v[j * kvd + kvh * hd + d];
            }
        }
        for h in kvh * group..(kvh + 1) * group {
            for ti in 0..s.t {
                let qrow = &q[ti * s.n_heads * hd + h * hd..][..hd];
                for (d, &x) in q16.iter_mut().zip(qrow) {
                    *d = f16::from_f32(x);
                }
                for (j, sc) in scores.iter_mut().enumerate() {
                    let kj = if j < used { &k[j * kvd + kvh * hd..][..hd] } else { &zero_k[..] };
                    *sc = dot(kj, &q16);
                }
                softmax_row(&mut p, &scores, scale, s.pos0 + ti + 1);
                for (d, &x) in p16.iter_mut().zip(&p) {
                    *d = f16::from_f32(x);
                }
                let o = &mut out[ti * s.n_heads * hd + h * hd..][..hd];
                for (d, ov) in o.iter_mut().enumerate() {
                    *ov = dot(&vt[d * nkv..(d + 1) * nkv], &p16);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_close_to_exp_and_saturates_like_ggml() {
        for i in -800..800 {
            let x = i as f32 * 0.11;
            let (got, want) = (expf(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 4e-7, "{x}: {got} vs {want}");
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
    }

    #[test]
    fn the_horizontal_sums_add_in_the_register_tree() {
        let x: [f32; 16] = std::array::from_fn(|i| 1.0 + (i as f32) * 1e-7 * ((i * 7 % 5) as f32));
        let t3: Vec<f32> = (0..8).map(|i| x[8 + i] + x[i]).collect();
        let t6: Vec<f32> = (0..4).map(|i| t3[4 + i] + t3[i]).collect();
        assert_eq!(reduce16(&x).to_bits(), ((t6[0] + t6[2]) + (t6[1] + t6[3])).to_bits());
        let y: [f32; 8] = std::array::from_fn(|i| x[i]);
        assert_eq!(hsum8(&y), reduce16(&std::array::from_fn(|i| if i < 8 { x[i] } else { 0.0 })));
    }

    #[test]
    fn softmax_rows_sum_to_one_and_mask() {
        let s: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut p = vec![0.0; 40];
        softmax_row(&mut p, &s, 0.5, 21);
        assert!(p[21..].iter().all(|&v| v == 0.0));
        let sum: f32 = p.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }

    #[test]
    fn the_two_f16_dots_agree_with_f64_within_rounding() {
        let a: Vec<f16> = (0..256).map(|i| f16::from_f32(((i * 37 % 101) as f32 - 50.0) / 17.0)).collect();
        let b: Vec<f16> = (0..256).map(|i| f16::from_f32(((i * 53 % 89) as f32 - 44.0) / 13.0)).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| x.to_f64() * y.to_f64()).sum();
        for got in [dot_f16_tiny(&a, &b), dot_f16_vec(&a, &b), dot_f16_vec(&a[..100], &b[..100]) + 0.0] {
            let _ = got;
        }
        assert!((dot_f16_tiny(&a, &b) as f64 - want).abs() < 1e-3);
        assert!((dot_f16_vec(&a, &b) as f64 - want).abs() < 1e-3);
        assert_eq!(n_kv(1), 256);
        assert_eq!(n_kv(256), 256);
        assert_eq!(n_kv(257), 512);
    }
}
