//! Quantized dot products as ggml's CPU backend computes them, so that a quantized GGUF
//! gives the engine the numbers llama.cpp gives on the same file.
//!
//! For a weight stored in a quantized type, ggml-cpu does not widen the weight: it quantizes
//! each *activation* row to the weight type's `vec_dot_type` (`type_traits_cpu` in
//! `ggml-cpu/ggml-cpu.c`): Q8_0 for Q4_0, Q5_0 and Q8_0, Q8_1 for Q4_1 and Q5_1, Q8_K for
//! Q4_K, Q5_K and Q6_K, then takes integer dot products block by block and scales each
//! block's integer sum by the f16 scales of both sides. This module does the same.
//!
//! What is reproduced exactly (checked against ggml's own functions, called on real blocks
//! of `llama-quantize` files, by `tests/quant_dot.rs`):
//! - the activation quantizers as they run on x86 with AVX2 (`ggml-cpu/arch/x86/quants.c`):
//!   `quantize_row_q8_0` / `q8_1`: `d = amax / 127` stored as f16 (round to nearest even, as
//!   F16C does), `id = 127 / amax` (not `1 / d`, unlike the scalar reference), `q = x * id`
//!   rounded to nearest *even* (`_mm256_round_ps`, not `roundf`); Q8_1's `s = f16(d * Σq)`.
//!   `quantize_row_q8_K` is the reference `quantize_row_q8_K_ref` on every x86 build: the
//!   signed element of largest magnitude (first on ties) gives `iscale = -127 / max`,
//!   `q = nearest_int(iscale * x)` (the `+ 12582912` rounding trick), `d = 1 / iscale` in f32,
//!   `bsums` per 16. Every quantized byte equals ggml's.
//! - every integer sum (exact, so any order and any SIMD width gives the same value), and
//!   every float step after it in ggml's order, lane by lane, to the bit, for the kernel
//!   ggml-cpu picks on x86 with AVX2/AVX-512 for the product at hand ([`dot_rows_batched`]):
//!   - Q8_0 (`vec_dot_q8_0_q8_0`, and llamafile's `tinyBLAS_Q0_AVX` for batches, the same
//!     lanes): eight lanes, lane `l` the bytes `4l..4l+4` of each block, `fma(dx·dy, lane,
//!     acc)`, then `hsum_float_8`;
//!   - Q6_K and Q5_K one row at a time (`vec_dot_q6_K_q8_K`, `vec_dot_q5_K_q8_K`): the same
//!     eight lanes per super-block (Q6_K's `−32` taken off per lane from the bsums), Q5_K's
//!     mins in one running `fma`; from 8 rows on, the tiled kernel (`ggml-cpu/tiled`): each
//!     super-block's exact sum as `fma(S·dx, dy, acc)` (Q6_K) or `fma(fma(−dmin, M, S·d),
//!     dy, acc)` (Q5_K), GCC's contraction of `acc + r·dy` included;
//!   - Q4_K, which ggml repacks on x86 (`q4_K_8x8_q8_K`, rows a multiple of 8): `gemm` (rows
//!     in groups of 4) one `fma(S, d·dy)` per 64 elements, `gemv` (the remaining rows, every
//!     row of a MoE expert) one per super-block, the mins apart and subtracted at the end.
//!
//!   `tests/quant_dot.rs` holds `vec_dot` to ggml's own on real blocks, bit for bit, and
//!   `tests/ggml_numerics.rs` the whole forward pass to llama.cpp's tensors. Q4_0, Q4_1, Q5_0
//!   and Q5_1 keep the exact integers and per-block scales but add blocks in order (within
//!   1e-6 of ggml's): no fixture file uses them.
//!
//! The order is fixed, so the result does not depend on the thread count, and the SIMD
//! builds of this module (the same code compiled for AVX2 or AVX-512 VNNI, selected at run
//! time) give the bits of the portable build.

use half::f16;

use super::gguf::GgmlType;
use super::gguf::quants::{f16_at, scale_min_k4};
use super::ggml::hsum8;
use super::kernels::round_f16;

/// Elements per block of Q8_0 / Q8_1 (and of Q4_0, Q4_1, Q5_0, Q5_1).
pub const QK8: usize = 32;
/// Elements per super-block of Q8_K and the K-quants.
pub const QK_K: usize = 256;

/// One Q8_0 block of an activation row. `d` is the f16 scale, widened (exact).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f32,
    pub qs: [i8; QK8],
}

/// One Q8_1 block: as Q8_0 plus `s = d · Σ qs` (stored as f16 by ggml, widened here).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ8_1 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK8],
}

/// One Q8_K super-block: an f32 scale, 256 quants and their sums per 16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// The type activations are quantized to for a weight type (ggml's `vec_dot_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VecDotType {
    Q8_0,
    Q8_1,
    Q8K,
}

impl VecDotType {
    /// ggml's `type_traits_cpu[ty].vec_dot_type` for the quantized types the engine reads;
    /// `None` for float types (F32, F16, BF16), which take f32 activations here.
    pub fn of(ty: GgmlType) -> Option<VecDotType> {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(VecDotType::Q8_0),
            GgmlType::Q4_1 | GgmlType::Q5_1 => Some(VecDotType::Q8_1),
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => Some(VecDotType::Q8K),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            VecDotType::Q8_0 => "Q8_0",
            VecDotType::Q8_1 => "Q8_1",
            VecDotType::Q8K => "Q8_K",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            VecDotType::Q8_0 | VecDotType::Q8_1 => QK8,
            VecDotType::Q8K => QK_K,
        }
    }
}

/// Quantized activation rows `[t, k]`: `t * k / block_size` blocks, row after row.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantRows {
    Q8_0(Vec<BlockQ8_0>),
    Q8_1(Vec<BlockQ8_1>),
    Q8K(Vec<BlockQ8K>),
}

/// One quantized activation row.
#[derive(Debug, Clone, Copy)]
pub enum QuantRow<'a> {
    Q8_0(&'a [BlockQ8_0]),
    Q8_1(&'a [BlockQ8_1]),
    Q8K(&'a [BlockQ8K]),
}

impl QuantRows {
    /// Quantizes the rows of `x` (`[t, k]`, `k` a multiple of the block size) to `ty`.
    pub fn quantize(ty: VecDotType, x: &[f32], k: usize) -> QuantRows {
        debug_assert!(k.is_multiple_of(ty.block_size()) && x.len().is_multiple_of(k.max(1)));
        match ty {
            VecDotType::Q8_0 => QuantRows::Q8_0(x.as_chunks::<QK8>().0.iter().map(quantize_block_q8_0).collect()),
            VecDotType::Q8_1 => QuantRows::Q8_1(x.as_chunks::<QK8>().0.iter().map(quantize_block_q8_1).collect()),
            VecDotType::Q8K => QuantRows::Q8K(x.as_chunks::<QK_K>().0.iter().map(quantize_block_q8_k).collect()),
        }
    }

    /// Row `i` of rows holding `blocks_per_row` blocks each.
    pub fn row(&self, i: usize, blocks_per_row: usize) -> QuantRow<'_> {
        let r = i * blocks_per_row..(i + 1) * blocks_per_row;
        match self {
            QuantRows::Q8_0(b) => QuantRow::Q8_0(&b[r]),
            QuantRows::Q8_1(b) => QuantRow::Q8_1(&b[r]),
            QuantRows::Q8K(b) => QuantRow::Q8K(&b[r]),
        }
    }

    /// The blocks in ggml's memory layout (`block_q8_0`: f16 d, 32 × i8; `block_q8_1`: f16 d,
    /// f16 s, 32 × i8; `block_q8_K`: f32 d, 256 × i8, 16 × i16), for comparing with ggml.
    pub fn to_ggml_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let h = |v: f32| f16::from_f32(v).to_bits().to_le_bytes();
        match self {
            QuantRows::Q8_0(bs) => bs.iter().for_each(|b| {
                out.extend(h(b.d));
                out.extend(b.qs.iter().map(|&q| q as u8));
            }),
            QuantRows::Q8_1(bs) => bs.iter().for_each(|b| {
                out.extend(h(b.d));
                out.extend(h(b.s));
                out.extend(b.qs.iter().map(|&q| q as u8));
            }),
            QuantRows::Q8K(bs) => bs.iter().for_each(|b| {
                out.extend(b.d.to_le_bytes());
                out.extend(b.qs.iter().map(|&q| q as u8));
                b.bsums.iter().for_each(|s| out.extend(s.to_le_bytes()));
            }),
        }
        out
    }
}

/// Largest magnitude of a block (`_mm256_max_ps` over `|x|`).
#[inline]
fn abs_max(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// `x · id` rounded to nearest even, as `_mm256_round_ps(_MM_ROUND_NEAREST)` then
/// `_mm256_cvtps_epi32` and the saturating packs do.
#[inline]
fn quantize_block_8(x: &[f32; QK8], id: f32) -> [i8; QK8] {
    x.map(|v| (v * id).round_ties_even() as i8)
}

/// ggml-cpu's x86 `quantize_row_q8_0`, one block.
pub fn quantize_block_q8_0(x: &[f32; QK8]) -> BlockQ8_0 {
    let amax = abs_max(x);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    BlockQ8_0 { d: round_f16(d), qs: quantize_block_8(x, id) }
}

/// ggml-cpu's x86 `quantize_row_q8_1`, one block: Q8_0's quants and `s = f16(d · Σq)`
/// with the unrounded f32 `d`.
pub fn quantize_block_q8_1(x: &[f32; QK8]) -> BlockQ8_1 {
    let amax = abs_max(x);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let qs = quantize_block_8(x, id);
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    BlockQ8_1 { d: round_f16(d), s: round_f16(d * sum as f32), qs }
}

/// ggml's `nearest_int`: round to nearest even through the f32 adder (valid for
/// `|v| ≤ 4194303`).
#[inline]
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `quantize_row_q8_K_ref`, one super-block (what x86 builds run for Q8_K).
pub fn quantize_block_q8_k(x: &[f32; QK_K]) -> BlockQ8K {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };
    }
    let iscale = -127.0f32 / max;
    let qs = x.map(|v| nearest_int(iscale * v).min(127) as i8);
    let mut bsums = [0i16; QK_K / 16];
    for (s, q) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| i16::from(v)).sum();
    }
    BlockQ8K { d: 1.0 / iscale, qs, bsums }
}

/// Why a weight row and an activation row cannot be multiplied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no quantized dot product for {weight} weights with {activations} activations")]
pub struct DotTypeMismatch {
    pub weight: GgmlType,
    pub activations: &'static str,
}

/// Which build of the dot products runs: the same code compiled for more vector
/// instructions; every build gives the same bits (see the module doc). Ordered: a level
/// includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Portable,
    Avx2,
    Avx512Vnni,
}

impl SimdLevel {
    /// The best build this CPU runs (checked at run time, cached by std).
    pub fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                return SimdLevel::Avx512Vnni;
            }
            if has!("avx2") && has!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// The dot product of one weight row (`w`: the row's bytes in type `ty`) with one quantized
/// activation row, on the build `simd` (at most [`SimdLevel::detect`]: a higher level asked
/// for runs the best this CPU has).
pub fn vec_dot(ty: GgmlType, w: &[u8], a: QuantRow<'_>, simd: SimdLevel) -> Result<f32, DotTypeMismatch> {
    let mut out = [0.0f32];
    dot_rows(ty, w, w.len(), a, &mut out, simd)?;
    Ok(out[0])
}

/// `out[r] = w_r · a` for the consecutive weight rows `w` (`row_bytes` each) against one
/// activation row, on the build `simd` (at most [`SimdLevel::detect`]).
pub fn dot_rows(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    a: QuantRow<'_>,
    out: &mut [f32],
    simd: SimdLevel,
) -> Result<(), DotTypeMismatch> {
    let mismatch = || DotTypeMismatch {
        weight: ty,
        activations: match a {
            QuantRow::Q8_0(_) => "Q8_0",
            QuantRow::Q8_1(_) => "Q8_1",
            QuantRow::Q8K(_) => "Q8_K",
        },
    };
    if VecDotType::of(ty).map(VecDotType::name) != Some(mismatch().activations) {
        return Err(mismatch());
    }
    debug_assert!(w.len() >= out.len() * row_bytes);
    let simd = simd.min(SimdLevel::detect());
    #[cfg(target_arch = "x86_64")]
    {
        if simd >= SimdLevel::Avx2 {
            // SAFETY (each): `simd` is at most what `SimdLevel::detect` found: AVX2 is there.
            match (ty, a) {
                (GgmlType::Q8_0, QuantRow::Q8_0(y)) => {
                    unsafe { dot_rows_q8_0_avx2(w, row_bytes, y, out) };
                    return Ok(());
                }
                (GgmlType::Q4K, QuantRow::Q8K(y)) => {
                    unsafe { dot_rows_q45_k_avx2::<false, VEC_DOT>(w, row_bytes, y, out) };
                    return Ok(());
                }
                (GgmlType::Q5K, QuantRow::Q8K(y)) => {
                    unsafe { dot_rows_q45_k_avx2::<true, VEC_DOT>(w, row_bytes, y, out) };
                    return Ok(());
                }
                (GgmlType::Q6K, QuantRow::Q8K(y)) => {
                    unsafe { dot_rows_q6_k_avx2::<false>(w, row_bytes, y, out) };
                    return Ok(());
                }
                _ => {}
            }
        }
        match simd {
            SimdLevel::Avx512Vnni => {
                // SAFETY: `simd` is at most what `SimdLevel::detect` found on this CPU.
                unsafe { dot_rows_avx512(ty, w, row_bytes, a, out) };
                return Ok(());
            }
            SimdLevel::Avx2 => {
                // SAFETY: as above.
                unsafe { dot_rows_avx2(ty, w, row_bytes, a, out) };
                return Ok(());
            }
            SimdLevel::Portable => {}
        }
    }
    let _ = simd;
    dot_rows_body(ty, w, row_bytes, a, out);
    Ok(())
}

/// Which of ggml-cpu's matrix kernels a product of `batch` activation rows with weights of
/// type `ty` takes on x86 (`ggml_compute_forward_mul_mat`): the tiled K-quant kernel
/// (`ggml-cpu/tiled`) for Q5_K and Q6_K from 8 rows on, else `vec_dot` (llamafile's
/// `tinyBLAS_Q0_AVX` for Q8_0 batches adds the same lanes in the same order).
pub fn takes_tiled(ty: GgmlType, batch: usize) -> bool {
    batch >= 8 && matches!(ty, GgmlType::Q5K | GgmlType::Q6K)
}

/// Whether ggml-cpu repacks a weight of type `ty` with `rows` rows into its interleaved
/// layout ("CPU_REPACK", `ggml-cpu/repack.cpp`, on x86 with AVX2): Q4_K with rows a
/// multiple of 8 (`q4_K_8x8_q8_K`), computed by `gemv`/`gemm_q4_K_8x8_q8_K` at any batch.
pub fn takes_repack(ty: GgmlType, rows: usize) -> bool {
    ty == GgmlType::Q4K && rows.is_multiple_of(8)
}

/// Where one activation row sits in a product, which decides ggml's kernel.
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    /// Activation rows in the product.
    pub rows: usize,
    /// This row's index among them.
    pub row: usize,
    /// Rows of the weight (of the whole tensor, for experts).
    pub weight_rows: usize,
    /// A MoE expert's product (`MUL_MAT_ID`).
    pub expert: bool,
}

/// [`dot_rows`] for one activation row of a product ([`Batch`]), as the kernel ggml picks
/// computes it ([`takes_repack`], [`takes_tiled`]): the repacked
/// Q4_K kernels add `fma(S, d·y.d)` and `fma(M, dmin·y.d)` apart; the tiled kernel adds each super-block's exact integer sum `S` as
/// `(S · dx) · dy` (Q6_K) or `fma(−dmin, M, S · d) · dy` (Q5_K), one super-block after the
/// other; `vec_dot` keeps eight lanes of FMAs (see each type's kernel).
pub fn dot_rows_batched(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    a: QuantRow<'_>,
    out: &mut [f32],
    simd: SimdLevel,
    b: Batch,
) -> Result<(), DotTypeMismatch> {
    let (batch, row) = (b.rows, b.row);
    let repack = takes_repack(ty, b.weight_rows);
    if !takes_tiled(ty, batch) && !repack {
        return dot_rows(ty, w, row_bytes, a, out, simd);
    }
    let QuantRow::Q8K(y) = a else {
        return dot_rows(ty, w, row_bytes, a, out, simd);
    };
    let simd = simd.min(SimdLevel::detect());
    match ty {
        GgmlType::Q4K => {
            // rows `0..batch - batch % 4` go through `gemm` (groups of 4), the rest `gemv`;
            // `MUL_MAT_ID` takes `gemv` for every row
            let gemm = !b.expert && batch > 3 && row < batch - batch % 4;
            #[cfg(target_arch = "x86_64")]
            if simd >= SimdLevel::Avx2 {
                // SAFETY: `simd` is at most what `SimdLevel::detect` found: AVX2 is there.
                unsafe {
                    if gemm {
                        dot_rows_q45_k_avx2::<false, REPACK_GEMM>(w, row_bytes, y, out)
                    } else {
                        dot_rows_q45_k_avx2::<false, REPACK>(w, row_bytes, y, out)
                    }
                };
                return Ok(());
            }
            for (r, o) in out.iter_mut().enumerate() {
                let wr = &w[r * row_bytes..(r + 1) * row_bytes];
                *o = if gemm { dot_q4_k::<REPACK_GEMM>(wr, y) } else { dot_q4_k::<REPACK>(wr, y) };
            }
        }
        GgmlType::Q6K => {
            #[cfg(target_arch = "x86_64")]
            if simd >= SimdLevel::Avx2 {
                // SAFETY: `simd` is at most what `SimdLevel::detect` found: AVX2 is there.
                unsafe { dot_rows_q6_k_avx2::<true>(w, row_bytes, y, out) };
                return Ok(());
            }
            for (r, o) in out.iter_mut().enumerate() {
                *o = dot_q6_k::<true>(&w[r * row_bytes..(r + 1) * row_bytes], y);
            }
        }
        GgmlType::Q5K => {
            #[cfg(target_arch = "x86_64")]
            if simd >= SimdLevel::Avx2 {
                // SAFETY: as above.
                unsafe { dot_rows_q45_k_avx2::<true, TILED>(w, row_bytes, y, out) };
                return Ok(());
            }
            for (r, o) in out.iter_mut().enumerate() {
                *o = dot_q5_k::<TILED>(&w[r * row_bytes..(r + 1) * row_bytes], y);
            }
        }
        _ => return dot_rows(ty, w, row_bytes, a, out, simd),
    }
    Ok(())
}

/// [`dot_rows_body`] compiled for AVX-512 (VNNI, BW, VL).
///
/// # Safety
/// The CPU must support AVX-512F, BW, VL and VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_rows_avx512(ty: GgmlType, w: &[u8], row_bytes: usize, a: QuantRow<'_>, out: &mut [f32]) {
    dot_rows_body(ty, w, row_bytes, a, out)
}

/// [`dot_rows_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2(ty: GgmlType, w: &[u8], row_bytes: usize, a: QuantRow<'_>, out: &mut [f32]) {
    dot_rows_body(ty, w, row_bytes, a, out)
}

/// One type dispatch for a run of rows; the caller checked that `a` fits `ty`. Plain index
/// loops (no iterator adaptors such as `for_each`, whose out-of-line bodies would be
/// compiled without the caller's target features).
#[inline(always)]
#[expect(clippy::needless_range_loop, reason = "index loops keep the row loop inside the target-feature builds")]
fn dot_rows_body(ty: GgmlType, w: &[u8], row_bytes: usize, a: QuantRow<'_>, out: &mut [f32]) {
    let row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
    let n = out.len();
    match (ty, a) {
        (GgmlType::Q8_0, QuantRow::Q8_0(y)) => {
            for r in 0..n {
                out[r] = dot_q8_0(row(r), y);
            }
        }
        (GgmlType::Q4_0, QuantRow::Q8_0(y)) => {
            for r in 0..n {
                out[r] = dot_q4_0(row(r), y);
            }
        }
        (GgmlType::Q5_0, QuantRow::Q8_0(y)) => {
            for r in 0..n {
                out[r] = dot_q5_0(row(r), y);
            }
        }
        (GgmlType::Q4_1, QuantRow::Q8_1(y)) => {
            for r in 0..n {
                out[r] = dot_q4_1(row(r), y);
            }
        }
        (GgmlType::Q5_1, QuantRow::Q8_1(y)) => {
            for r in 0..n {
                out[r] = dot_q5_1(row(r), y);
            }
        }
        (GgmlType::Q4K, QuantRow::Q8K(y)) => {
            for r in 0..n {
                out[r] = dot_q4_k::<VEC_DOT>(row(r), y);
            }
        }
        (GgmlType::Q5K, QuantRow::Q8K(y)) => {
            for r in 0..n {
                out[r] = dot_q5_k::<VEC_DOT>(row(r), y);
            }
        }
        (GgmlType::Q6K, QuantRow::Q8K(y)) => {
            for r in 0..n {
                out[r] = dot_q6_k::<false>(row(r), y);
            }
        }
        _ => {}
    }
}

/// [`dot_q8_0`] over rows with the block's integer sum in AVX2 (`|x|·sign(y, x)` through
/// `maddubs`, which cannot saturate: |x| ≤ 128, |y| ≤ 127), the same exact `i32` and the same
/// float steps, so the same bits.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_q8_0_avx2(w: &[u8], row_bytes: usize, y: &[BlockQ8_0], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = (row_bytes / 34).min(y.len());
    for r in 0..out.len() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut acc = _mm256_setzero_ps();
        for i in 0..nb {
            let b = &row[34 * i..34 * i + 34];
            let yb = &y[i];
            // SAFETY: `b[2..34]` and `yb.qs` hold 32 bytes each; unaligned loads.
            unsafe {
                let vx = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
                let vy = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
                let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(vx, vx), _mm256_sign_epi8(vy, vx));
                let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b, 0) * yb.d), _mm256_cvtepi32_ps(p32), acc);
            }
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        out[r] = hsum8(&lanes);
    }
}

/// The sum of the eight i32 lanes of `v` (exact).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum_i32(v: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
    _mm_cvtsi128_si32(s1)
}

/// `Σ_l sc · q_l · y_l` over 32 elements as eight i32 lanes: `q` unsigned bytes below 64, `y`
/// signed bytes (`maddubs` cannot saturate: 2 · 63 · 128 < 2^15), `sc` one i16 per 128-bit
/// half (the scale of elements 0..16 and 16..32). Exact.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scaled_dot32(
    q: std::arch::x86_64::__m256i,
    y: std::arch::x86_64::__m256i,
    sc: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), sc)
}

/// [`dot_q4_k`] (`FIVE = false`) or [`dot_q5_k`] (`FIVE = true`) over rows, each super-block's
/// integer sum `Σ_j sc_j·Σq·y` in AVX2: the same exact `i32` and the same float steps, so the
/// same bits.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_q45_k_avx2<const FIVE: bool, const MODE: u8>(
    w: &[u8],
    row_bytes: usize,
    y: &[BlockQ8K],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    // Q4_K: d, dmin, 12 scale bytes, 128 nibble bytes; Q5_K: 32 bytes of fifth bits before the nibbles
    let (bytes, qs) = if FIVE { (176, 48) } else { (144, 16) };
    let nb = (row_bytes / bytes).min(y.len());
    let low = _mm256_set1_epi8(0x0F);
    let five = _mm256_set1_epi8(0x10);
    for r in 0..out.len() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut k = KQuantSum::default();
        for i in 0..nb {
            let b = &row[bytes * i..bytes * (i + 1)];
            let yb = &y[i];
            let scales = &b[4..16];
            // SAFETY: b[16..48] (Q5_K), b[qs..qs + 128] and yb.qs hold 32, 128 and 256 bytes;
            // unaligned loads.
            let acc = unsafe {
                let qh = if FIVE { _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i) } else { low };
                let mut acc = _mm256_setzero_si256();
                let mut per_sb = [0i32; 4];
                for c in 0..4 {
                    let before = acc;
                    let v = _mm256_loadu_si256(b.as_ptr().add(qs + 32 * c) as *const __m256i);
                    let y0 = _mm256_loadu_si256(yb.qs.as_ptr().add(64 * c) as *const __m256i);
                    let y1 = _mm256_loadu_si256(yb.qs.as_ptr().add(64 * c + 32) as *const __m256i);
                    let mut q0 = _mm256_and_si256(v, low);
                    let mut q1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    if FIVE {
                        // the fifth bit of sub-block j is bit j of qh[l]: 0x10 where it is set
                        let (m0, m1) = (_mm256_set1_epi8(1i8 << (2 * c)), _mm256_set1_epi8((1u8 << (2 * c + 1)) as i8));
                        q0 = _mm256_or_si256(
                            q0,
                            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m0), m0), five),
                        );
                        q1 = _mm256_or_si256(
                            q1,
                            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m1), m1), five),
                        );
                    }
                    let s0 = _mm256_set1_epi16(i16::from(scale_min_k4(2 * c, scales).0));
                    let s1 = _mm256_set1_epi16(i16::from(scale_min_k4(2 * c + 1, scales).0));
                    acc = _mm256_add_epi32(acc, scaled_dot32(q0, y0, s0));
                    acc = _mm256_add_epi32(acc, scaled_dot32(q1, y1, s1));
                    if MODE == REPACK_GEMM {
                        per_sb[c] = hsum_i32(_mm256_sub_epi32(acc, before));
                    }
                }
                (acc, per_sb)
            };
            let (acc, per_sb) = acc;
            let mut lanes = [0i32; 8];
            // SAFETY: `lanes` holds 8 i32.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc) };
            k.add::<FIVE, MODE>(b, yb, &lanes, &per_sb);
        }
        out[r] = k.finish::<MODE>();
    }
}

/// The float side of a Q4_K / Q5_K row · Q8_K row as ggml computes it, super-block by
/// super-block from the eight exact i32 lanes of `Σ sc·q·y` (lane `l`: bytes `4l..4l+4` of
/// every 32-element chunk) and the mins' `Σ m·bsum`.
#[derive(Default)]
struct KQuantSum {
    /// `vec_dot`: eight lanes of `fma(d, lane, acc)`, `d = y.d · f16(x.d)`.
    acc: [f32; 8],
    /// `vec_dot_q5_K_q8_K`: `Σ (−y.d · f16(x.dmin)) · M` (contracted to an FMA).
    summs: f32,
    /// `vec_dot_q4_K_q8_K`: four lanes of `fma(−y.d · f16(x.dmin), m·bsum pairs, acc_m)`.
    acc_m: [f32; 4],
    /// The tiled kernel: `fma(fma(−dmin, M, S · d), y.d, sum)` per super-block.
    tiled: f32,
    /// The repacked Q4_K kernels (`gemv`/`gemm_q4_K_8x8_q8_K`): `fma(S, d · y.d, acc)` and
    /// `fma(M, dmin · y.d, acc_min)`, then `acc − acc_min`.
    rep: [f32; 2],
}

/// Which ggml kernel a K-quant product follows (a const parameter of the kernels here).
pub const VEC_DOT: u8 = 0;
pub const TILED: u8 = 1;
pub const REPACK: u8 = 2;
/// `gemm_q4_K_8x8_q8_K` (groups of 4 activation rows): as [`REPACK`] but one FMA per pair of
/// sub-blocks (64 elements), not per super-block.
pub const REPACK_GEMM: u8 = 3;

impl KQuantSum {
    #[inline(always)]
    fn add<const FIVE: bool, const MODE: u8>(&mut self, b: &[u8], yb: &BlockQ8K, lanes: &[i32; 8], per_sb: &[i32; 4]) {
        let scales = &b[4..16];
        let (xd, xdmin) = (f16_at(b, 0), f16_at(b, 2));
        if MODE == TILED {
            let s: i32 = lanes.iter().sum();
            let m = mins_dot_bsums(scales, &yb.bsums);
            self.tiled = (-xdmin).mul_add(m as f32, s as f32 * xd).mul_add(yb.d, self.tiled);
            return;
        }
        if MODE == REPACK_GEMM {
            let (d, dm) = (xd * yb.d, xdmin * yb.d);
            for (c, &sc) in per_sb.iter().enumerate() {
                let m: i32 = (2 * c..2 * c + 2)
                    .map(|j| {
                        i32::from(scale_min_k4(j, scales).1) * (i32::from(yb.bsums[2 * j]) + i32::from(yb.bsums[2 * j + 1]))
                    })
                    .sum();
                self.rep[0] = (sc as f32).mul_add(d, self.rep[0]);
                self.rep[1] = (m as f32).mul_add(dm, self.rep[1]);
            }
            return;
        }
        if MODE == REPACK {
            let s: i32 = lanes.iter().sum();
            let m = mins_dot_bsums(scales, &yb.bsums);
            self.rep[0] = (s as f32).mul_add(xd * yb.d, self.rep[0]);
            self.rep[1] = (m as f32).mul_add(xdmin * yb.d, self.rep[1]);
            return;
        }
        let d = yb.d * xd;
        for l in 0..8 {
            self.acc[l] = d.mul_add(lanes[l] as f32, self.acc[l]);
        }
        let dmin = -yb.d * xdmin;
        if FIVE {
            self.summs = dmin.mul_add(mins_dot_bsums(scales, &yb.bsums) as f32, self.summs);
        } else {
            for i in 0..4 {
                let pair = |j: usize| {
                    i32::from(scale_min_k4(j, scales).1) * (i32::from(yb.bsums[2 * j]) + i32::from(yb.bsums[2 * j + 1]))
                };
                self.acc_m[i] = dmin.mul_add((pair(2 * i) + pair(2 * i + 1)) as f32, self.acc_m[i]);
            }
        }
    }

    #[inline(always)]
    fn finish<const MODE: u8>(&self) -> f32 {
        if MODE == TILED {
            return self.tiled;
        }
        if MODE == REPACK || MODE == REPACK_GEMM {
            return self.rep[0] - self.rep[1];
        }
        let m = (self.acc_m[0] + self.acc_m[2]) + (self.acc_m[1] + self.acc_m[3]);
        hsum8(&self.acc) + (self.summs + m)
    }
}

/// [`dot_q6_k`] over rows: `Σ_g sc_g·Σ(q − 32)·y` as `Σ_g sc_g·Σq·y − 32·Σ_g sc_g·bsum_g`
/// (`q` unsigned in AVX2, the Q8_K block sums for the offset), the same exact `i32` and the
/// same float step, so the same bits.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_q6_k_avx2<const TILE: bool>(w: &[u8], row_bytes: usize, y: &[BlockQ8K], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = (row_bytes / 210).min(y.len());
    let low = _mm256_set1_epi8(0x0F);
    let two = _mm256_set1_epi8(0x03);
    for r in 0..out.len() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut sumf = 0.0f32;
        let mut facc = _mm256_setzero_ps();
        for i in 0..nb {
            let b = &row[210 * i..210 * i + 210];
            let yb = &y[i];
            let scales = &b[192..208];
            // SAFETY: b[0..192] and yb.qs hold 192 and 256 bytes; unaligned loads.
            let lanes = unsafe {
                let mut acc = _mm256_setzero_si256();
                for h in 0..2 {
                    let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h) as *const __m256i);
                    for k in 0..4 {
                        let ql = _mm256_loadu_si256(b.as_ptr().add(64 * h + 32 * (k % 2)) as *const __m256i);
                        let nib = if k < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
                        let hi = match k {
                            0 => qh,
                            1 => _mm256_srli_epi16(qh, 2),
                            2 => _mm256_srli_epi16(qh, 4),
                            _ => _mm256_srli_epi16(qh, 6),
                        };
                        let q = _mm256_or_si256(
                            _mm256_and_si256(nib, low),
                            _mm256_slli_epi16(_mm256_and_si256(hi, two), 4),
                        );
                        let i0 = 128 * h + 32 * k;
                        let yv = _mm256_loadu_si256(yb.qs.as_ptr().add(i0) as *const __m256i);
                        let sc = _mm256_set_m128i(
                            _mm_set1_epi16(i16::from(scales[i0 / 16 + 1] as i8)),
                            _mm_set1_epi16(i16::from(scales[i0 / 16] as i8)),
                        );
                        acc = _mm256_add_epi32(acc, scaled_dot32(q, yv, sc));
                    }
                }
                acc
            };
            let sub = q6_k_bias_lanes(scales, &yb.bsums);
            if TILE {
                // SAFETY: AVX2 (the caller's target features).
                let isum = unsafe { hsum_i32(lanes) } - sub.iter().sum::<i32>();
                sumf = (isum as f32 * f16_at(b, 208)).mul_add(yb.d, sumf);
            } else {
                // SAFETY: as above; `sub` holds 8 i32.
                unsafe {
                    let l = _mm256_sub_epi32(lanes, _mm256_loadu_si256(sub.as_ptr() as *const __m256i));
                    facc = _mm256_fmadd_ps(_mm256_set1_ps(yb.d * f16_at(b, 208)), _mm256_cvtepi32_ps(l), facc);
                }
            }
        }
        out[r] = if TILE {
            sumf
        } else {
            let mut l = [0.0f32; 8];
            // SAFETY: `l` holds 8 f32.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), facc) };
            hsum8(&l)
        };
    }
}

/// The `−32` of Q6_K's quants as ggml's AVX2 `vec_dot_q6_K_q8_K` takes it off, per i32 lane:
/// lane `l` gets `32 · (sc[2l]·bsum[2l] + sc[2l+1]·bsum[2l+1])`.
#[inline(always)]
fn q6_k_bias_lanes(scales: &[u8], bsums: &[i16; 16]) -> [i32; 8] {
    std::array::from_fn(|l| {
        32 * (i32::from(scales[2 * l] as i8) * i32::from(bsums[2 * l])
            + i32::from(scales[2 * l + 1] as i8) * i32::from(bsums[2 * l + 1]))
    })
}

/// `Σ a[i]·b[i]` over 32 signed bytes, exact in i32.
#[inline(always)]
fn isum32(a: &[i8; 32], b: &[i8; 32]) -> i32 {
    let mut s = 0i32;
    for i in 0..32 {
        s += i32::from(a[i]) * i32::from(b[i]);
    }
    s
}

// ---- 32-element blocks against Q8_0 / Q8_1 ------------------------------------------

/// Q8_0 (34 bytes: f16 d, 32 × i8) · Q8_0: `Σ_b Σq·(dx·dy)`.
#[inline(always)]
fn dot_q8_0(w: &[u8], y: &[BlockQ8_0]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (b, yb) in w.as_chunks::<34>().0.iter().zip(y) {
        let d = f16_at(b, 0) * yb.d;
        for (l, a) in acc.iter_mut().enumerate() {
            let mut s = 0i32;
            for j in 4 * l..4 * l + 4 {
                s += i32::from(b[2 + j] as i8) * i32::from(yb.qs[j]);
            }
            *a = d.mul_add(s as f32, *a);
        }
    }
    hsum8(&acc)
}

/// Q4_0 (18 bytes: f16 d, 16 bytes of nibbles; element j the low nibble of byte j, element
/// j + 16 its high nibble; value q − 8) · Q8_0.
#[inline(always)]
fn dot_q4_0(w: &[u8], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (b, yb) in w.as_chunks::<18>().0.iter().zip(y) {
        let q: [i8; 32] = std::array::from_fn(|j| ((b[2 + j % 16] >> (4 * (j / 16))) & 0x0F) as i8 - 8);
        sumf += isum32(&q, &yb.qs) as f32 * (f16_at(b, 0) * yb.d);
    }
    sumf
}

/// The fifth bit of element `j` of a Q5 block, shifted to bit 4.
#[inline(always)]
fn q5_bit(qh: u32, j: usize) -> u8 {
    (((qh >> j) & 1) as u8) << 4
}

/// Q5_0 (22 bytes: f16 d, u32 high bits, 16 bytes of nibbles; value q − 16) · Q8_0.
#[inline(always)]
fn dot_q5_0(w: &[u8], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (b, yb) in w.as_chunks::<22>().0.iter().zip(y) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let q: [i8; 32] =
            std::array::from_fn(|j| (((b[6 + j % 16] >> (4 * (j / 16))) & 0x0F) | q5_bit(qh, j)) as i8 - 16);
        sumf += isum32(&q, &yb.qs) as f32 * (f16_at(b, 0) * yb.d);
    }
    sumf
}

/// Q4_1 (20 bytes: f16 d, f16 m, nibbles; value d·q + m) · Q8_1: `(dx·dy)·Σq + mx·sy`.
#[inline(always)]
fn dot_q4_1(w: &[u8], y: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0.0f32;
    for (b, yb) in w.as_chunks::<20>().0.iter().zip(y) {
        let q: [i8; 32] = std::array::from_fn(|j| ((b[4 + j % 16] >> (4 * (j / 16))) & 0x0F) as i8);
        let isum = isum32(&q, &yb.qs);
        sumf += (f16_at(b, 0) * yb.d) * isum as f32 + f16_at(b, 2) * yb.s;
    }
    sumf
}

/// Q5_1 (24 bytes: f16 d, f16 m, u32 high bits, nibbles) · Q8_1, as Q4_1.
#[inline(always)]
fn dot_q5_1(w: &[u8], y: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0.0f32;
    for (b, yb) in w.as_chunks::<24>().0.iter().zip(y) {
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let q: [i8; 32] = std::array::from_fn(|j| (((b[8 + j % 16] >> (4 * (j / 16))) & 0x0F) | q5_bit(qh, j)) as i8);
        let isum = isum32(&q, &yb.qs);
        sumf += (f16_at(b, 0) * yb.d) * isum as f32 + f16_at(b, 2) * yb.s;
    }
    sumf
}

// ---- K-quants against Q8_K -------------------------------------------------------------

/// `Σ_j min_j · (bsums[2j] + bsums[2j+1])` of a Q4_K/Q5_K super-block, exact.
#[inline(always)]
fn mins_dot_bsums(scales: &[u8], bsums: &[i16; 16]) -> i32 {
    (0..8).map(|j| i32::from(scale_min_k4(j, scales).1) * (i32::from(bsums[2 * j]) + i32::from(bsums[2 * j + 1]))).sum()
}

/// Q4_K (144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of
/// nibbles; sub-block 2c the low nibbles of bytes 32c..32c+32, 2c+1 their high nibbles) ·
/// Q8_K: `d·Σ_j sc_j·Σq − dmin·Σ_j m_j·bsum_j` with `d = f16(x.d)·y.d`.
#[inline(always)]
fn dot_q4_k<const MODE: u8>(w: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut k = KQuantSum::default();
    for (b, yb) in w.as_chunks::<144>().0.iter().zip(y) {
        let scales = &b[4..16];
        let qs = &b[16..144];
        let (mut lanes, mut per_sb) = ([0i32; 8], [0i32; 4]);
        for j in 0..8 {
            let (c, shift) = (j / 2, 4 * (j % 2));
            let sc = i32::from(scale_min_k4(j, scales).0);
            for p in 0..32 {
                let v = sc * i32::from((qs[32 * c + p] >> shift) & 0x0F) * i32::from(yb.qs[32 * j + p]);
                lanes[p / 4] += v;
                per_sb[c] += v;
            }
        }
        k.add::<false, MODE>(b, yb, &lanes, &per_sb);
    }
    k.finish::<MODE>()
}

/// Q5_K (176 bytes: f16 d, f16 dmin, 12 bytes of scales, 32 bytes of high bits, 128 bytes of
/// nibbles; bit j of qh[l] is the fifth bit of element l of sub-block j) · Q8_K, as Q4_K.
#[inline(always)]
fn dot_q5_k<const MODE: u8>(w: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut k = KQuantSum::default();
    for (b, yb) in w.as_chunks::<176>().0.iter().zip(y) {
        let scales = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..176];
        let (mut lanes, mut per_sb) = ([0i32; 8], [0i32; 4]);
        for j in 0..8 {
            let (c, shift) = (j / 2, 4 * (j % 2));
            let sc = i32::from(scale_min_k4(j, scales).0);
            for p in 0..32 {
                let q = i32::from(((qs[32 * c + p] >> shift) & 0x0F) | (((qh[p] >> j) & 1) << 4));
                let v = sc * q * i32::from(yb.qs[32 * j + p]);
                lanes[p / 4] += v;
                per_sb[c] += v;
            }
        }
        k.add::<true, MODE>(b, yb, &lanes, &per_sb);
    }
    k.finish::<MODE>()
}

/// Q6_K (210 bytes: 128 bytes of low nibbles, 64 of 2-bit highs, 16 × i8 scales, f16 d;
/// in half h, element 32k + l takes nibble k/2 of ql[64h + 32(k%2) + l] and bits 2k..2k+2
/// of qh[32h + l]; value q − 32; 16 elements share a scale) · Q8_K: `d·Σ_g sc_g·Σq`.
#[inline(always)]
fn dot_q6_k<const TILE: bool>(w: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut sumf = 0.0f32;
    let mut acc = [0.0f32; 8];
    for (b, yb) in w.as_chunks::<210>().0.iter().zip(y) {
        let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
        // ggml's eight i32 lanes: lane l holds bytes 4l..4l+4 of every 32-element chunk
        let mut lanes = [0i32; 8];
        for h in 0..2 {
            for k in 0..4 {
                let shift = 4 * (k / 2);
                let ql = &ql[64 * h + 32 * (k % 2)..64 * h + 32 * (k % 2) + 32];
                let qh = &qh[32 * h..32 * h + 32];
                let i0 = 128 * h + 32 * k;
                for p in 0..32 {
                    let q = i32::from(((ql[p] >> shift) & 0x0F) | (((qh[p] >> (2 * k)) & 3) << 4));
                    let e = i0 + p;
                    lanes[p / 4] += i32::from(scales[e / 16] as i8) * q * i32::from(yb.qs[e]);
                }
            }
        }
        let sub = q6_k_bias_lanes(scales, &yb.bsums);
        if TILE {
            let isum = lanes.iter().sum::<i32>() - sub.iter().sum::<i32>();
            sumf = (isum as f32 * f16_at(b, 208)).mul_add(yb.d, sumf);
        } else {
            let d = yb.d * f16_at(b, 208);
            for l in 0..8 {
                acc[l] = d.mul_add((lanes[l] - sub[l]) as f32, acc[l]);
            }
        }
    }
    if TILE { sumf } else { hsum8(&acc) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gguf::quants;

    /// Pseudo-random values in about [-scale, scale].
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        values(n, seed, 1.0).iter().map(|v| ((v + 1.0) * 127.9) as u8).collect()
    }

    /// Random weight blocks of `ty` with sane f16 scales.
    fn weight_row(ty: GgmlType, k: usize, seed: u64) -> Vec<u8> {
        let (bs, ts) = ty.block_layout();
        let (bs, ts) = (bs as usize, ts as usize);
        let mut w = bytes(k / bs * ts, seed);
        let half = |v: f32| f16::from_f32(v).to_bits().to_le_bytes();
        for b in w.chunks_exact_mut(ts) {
            match ty {
                GgmlType::Q6K => b[208..210].copy_from_slice(&half(0.01)),
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => {
                    b[0..2].copy_from_slice(&half(0.02));
                    b[2..4].copy_from_slice(&half(-0.03));
                }
                _ => b[0..2].copy_from_slice(&half(0.05)),
            }
        }
        w
    }

    #[test]
    fn quantizers_match_their_definitions() {
        let x = values(256, 7, 3.0);
        let b = quantize_block_q8_0(x[..32].try_into().unwrap());
        let amax = x[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(b.d, f16::from_f32(amax / 127.0).to_f32());
        assert!(b.qs.iter().any(|&q| q == 127 || q == -127));
        // round half to even: 0.5 and 2.5 at id = 1 (amax = 127)
        let mut h = [0.0f32; 32];
        h[0] = 127.0;
        h[1] = 0.5;
        h[2] = 2.5;
        h[3] = -1.5;
        assert_eq!(&quantize_block_q8_0(&h).qs[..4], &[127, 0, 2, -2]);
        let k = quantize_block_q8_k(x[..].try_into().unwrap());
        let imax = x.iter().enumerate().fold(0, |m, (i, v)| if v.abs() > x[m].abs() { i } else { m });
        assert_eq!(k.qs[imax], -127);
        assert_eq!(k.bsums[3], k.qs[48..64].iter().map(|&q| q as i16).sum::<i16>());
        assert_eq!(quantize_block_q8_k(&[0.0; 256]).d, 0.0);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-3.5), -4);
    }

    /// Every dot product equals the f64 sum of the dequantized weights times the
    /// dequantized activations, within the f32 rounding of the block terms.
    #[test]
    fn dot_products_are_dequantized_dot_products() {
        let k = 512;
        let x = values(k, 3, 2.0);
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let vdt = VecDotType::of(ty).unwrap();
            let a = QuantRows::quantize(vdt, &x, k);
            let w = weight_row(ty, k, 11);
            let mut wf = vec![0f32; k];
            quants::dequantize_seq(ty, &w, &mut wf).unwrap();
            let xf: Vec<f32> = match &a {
                QuantRows::Q8_0(b) => b.iter().flat_map(|b| b.qs.map(|q| q as f32 * b.d)).collect(),
                QuantRows::Q8_1(b) => b.iter().flat_map(|b| b.qs.map(|q| q as f32 * b.d)).collect(),
                QuantRows::Q8K(b) => b.iter().flat_map(|b| b.qs.map(|q| q as f32 * b.d)).collect(),
            };
            let want: f64 = wf.iter().zip(&xf).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = wf.iter().zip(&xf).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let row = a.row(0, k / vdt.block_size());
            let got = vec_dot(ty, &w, row, SimdLevel::Portable).unwrap();
            // Q4_1/Q5_1 use s = f16(d·Σq) for the offset term: f16 rounding of that term
            let tol = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) { 2e-3 } else { 1e-5 };
            assert!((got as f64 - want).abs() <= tol * mag, "{ty}: {got} vs {want} (Σ|terms| {mag})");
            for simd in [SimdLevel::Avx2, SimdLevel::Avx512Vnni] {
                if simd == SimdLevel::Avx512Vnni && SimdLevel::detect() != SimdLevel::Avx512Vnni {
                    continue;
                }
                if simd == SimdLevel::Avx2 && SimdLevel::detect() == SimdLevel::Portable {
                    continue;
                }
                assert_eq!(vec_dot(ty, &w, row, simd).unwrap().to_bits(), got.to_bits(), "{ty} {simd:?}");
            }
        }
        let a = QuantRows::quantize(VecDotType::Q8_0, &x, k);
        assert!(vec_dot(GgmlType::Q4K, &weight_row(GgmlType::Q4K, k, 1), a.row(0, 16), SimdLevel::Portable).is_err());
    }
}
