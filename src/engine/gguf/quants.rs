//! Dequantization of ggml block formats to f32, bit-identical to the reference in gguf-py
//! (`gguf-py/gguf/quants.py`, `dequantize_blocks` of each type), which is the spec here.
//!
//! Each type is a free function over whole blocks; blocks are independent, so the work is
//! split over rayon in fixed chunks and the result does not depend on scheduling.
//!
//! Rounding: every expression is evaluated with the same operations in the same order as
//! gguf-py's numpy code (f16 -> f32 widening is exact; an f32 multiply, then an f32 add or
//! subtract), and Rust never fuses `a * b + c` into an FMA. ggml's C (`dequantize_row_*` in
//! `ggml/src/ggml-quants.c`) computes the same expressions; compiled with `-march=native`, GCC
//! does fuse the offset types (Q4_1, Q5_1: `x*d + m`; Q4_K, Q5_K: `d1*q - m1`) into FMAs, yet
//! the results cannot differ: every product before an add is exact in f32 (an f16 scale has
//! 11 significant bits, a 6-bit sub-scale makes 17, a 4- or 5-bit quant at most 22 < 24), so
//! rounding once or twice gives the same float. Q6_K's `(d * sc) * q` can round, but has no
//! add. `tests/support/gguf_ggml_c_check.py` runs ggml's C both ways against gguf-py and
//! finds no difference on any of these types.

use half::f16;
use rayon::prelude::*;

use super::file::GgmlType;

/// Blocks handed to one rayon task: large enough to amortise scheduling, small enough to
/// balance a 2-core laptop and a 128-core server alike.
const BLOCKS_PER_TASK: usize = 256;

/// Why a byte buffer could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("dequantization of {0} is not supported")]
    Unsupported(GgmlType),
    #[error(
        "{ggml_type}: {n_bytes} bytes do not hold {n_elements} elements ({block_size} per block of {type_size} bytes)"
    )]
    SizeMismatch { ggml_type: GgmlType, n_bytes: usize, n_elements: usize, block_size: usize, type_size: usize },
}

/// Whether [`dequantize`] supports `ty`.
pub fn is_supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, F32 | F16 | Bf16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4K | Q5K | Q6K)
}

/// Dequantize `data` (whole blocks of `ty`) into `out` (one f32 per element), in parallel
/// chunks on the current rayon pool.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    dequantize_with(Exec::Parallel, ty, data, out)
}

/// [`dequantize`] on the calling thread only, for a few rows inside a kernel that is already
/// parallel (an embedding row, a block of weight rows). The same bits as [`dequantize`].
pub fn dequantize_seq(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    dequantize_with(Exec::Sequential, ty, data, out)
}

/// Where the blocks of one call are dequantized.
#[derive(Clone, Copy)]
enum Exec {
    Parallel,
    Sequential,
}

fn dequantize_with(exec: Exec, ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    if !is_supported(ty) {
        return Err(QuantError::Unsupported(ty));
    }
    let (block_size, type_size) = ty.block_layout();
    let (block_size, type_size) = (block_size as usize, type_size as usize);
    if !out.len().is_multiple_of(block_size) || data.len() != out.len() / block_size * type_size {
        return Err(QuantError::SizeMismatch {
            ggml_type: ty,
            n_bytes: data.len(),
            n_elements: out.len(),
            block_size,
            type_size,
        });
    }
    match ty {
        GgmlType::F32 => dequantize_f32(exec, data, out),
        GgmlType::F16 => dequantize_f16(exec, data, out),
        GgmlType::Bf16 => dequantize_bf16(exec, data, out),
        GgmlType::Q8_0 => dequantize_q8_0(exec, data, out),
        GgmlType::Q4_0 => dequantize_q4_0(exec, data, out),
        GgmlType::Q4_1 => dequantize_q4_1(exec, data, out),
        GgmlType::Q5_0 => dequantize_q5_0(exec, data, out),
        GgmlType::Q5_1 => dequantize_q5_1(exec, data, out),
        GgmlType::Q4K => dequantize_q4_k(exec, data, out),
        GgmlType::Q5K => dequantize_q5_k(exec, data, out),
        GgmlType::Q6K => dequantize_q6_k(exec, data, out),
        other => return Err(QuantError::Unsupported(other)),
    }
    Ok(())
}

/// Run `block` over every (bytes, values) block pair, in parallel chunks or in order. Trailing
/// bytes or values that do not form a whole block are left alone; [`dequantize_with`] checks
/// the sizes. Blocks are independent, so both ways give the same bits.
fn run_blocks<const TS: usize, const BS: usize>(
    exec: Exec,
    data: &[u8],
    out: &mut [f32],
    block: fn(&[u8; TS], &mut [f32; BS]),
) {
    let (blocks, _) = data.as_chunks::<TS>();
    let (values, _) = out.as_chunks_mut::<BS>();
    match exec {
        Exec::Parallel => {
            values.par_chunks_mut(BLOCKS_PER_TASK).zip(blocks.par_chunks(BLOCKS_PER_TASK)).for_each(|(vs, bs)| {
                for (v, b) in vs.iter_mut().zip(bs) {
                    block(b, v);
                }
            })
        }
        Exec::Sequential => {
            for (v, b) in values.iter_mut().zip(blocks) {
                block(b, v);
            }
        }
    }
}

/// f16 bits widened to f32, exactly as numpy's `astype(float32)`: every finite value and
/// infinity is exact; a NaN keeps its sign and payload (shifted up 13 bits) and is *not*
/// quieted. (x86's F16C `vcvtph2ps`, which `half` and ggml use, sets the quiet bit of a
/// signalling NaN; that is the only difference, and only for F16 tensors holding sNaNs.)
#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    if bits & 0x7C00 == 0x7C00 && bits & 0x03FF != 0 {
        let sign = u32::from(bits & 0x8000) << 16;
        return f32::from_bits(sign | 0x7F80_0000 | (u32::from(bits & 0x03FF) << 13));
    }
    f16::from_bits(bits).to_f32()
}

/// A little-endian f16 at `b[i..i + 2]`, widened to f32 (exact).
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

// ---- plain floats ---------------------------------------------------------------------

/// F32: the little-endian bits as they are (NaN payloads included).
fn dequantize_f32(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<4, 1>(exec, data, out, |b, v| v[0] = f32::from_le_bytes(*b));
}

/// F16: exact widening (gguf-py: `view(float16).astype(float32)`), NaN payloads included.
fn dequantize_f16(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<2, 1>(exec, data, out, |b, v| v[0] = f16_to_f32(u16::from_le_bytes(*b)));
}

/// BF16: the 16 bits become the high half of an f32 (gguf-py: `int16 -> int32 << 16`).
fn dequantize_bf16(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<2, 1>(exec, data, out, |b, v| v[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16));
}

// ---- 32-element blocks ----------------------------------------------------------------

/// Q8_0, 34 bytes: `d: f16, qs: [i8; 32]`; `y = qs * d`.
fn dequantize_q8_0(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<34, 32>(exec, data, out, |b, y| {
        let d = f16_at(b, 0);
        for (y, &q) in y.iter_mut().zip(&b[2..34]) {
            *y = f32::from(q as i8) * d;
        }
    });
}

/// Q4_0, 18 bytes: `d: f16, qs: [u8; 16]`; element j is the low nibble of qs[j], element
/// j + 16 the high nibble; `y = (q - 8) * d`.
fn dequantize_q4_0(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<18, 32>(exec, data, out, |b, y| {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        for j in 0..16 {
            y[j] = f32::from((qs[j] & 0x0F) as i8 - 8) * d;
            y[j + 16] = f32::from((qs[j] >> 4) as i8 - 8) * d;
        }
    });
}

/// Q4_1, 20 bytes: `d: f16, m: f16, qs: [u8; 16]`; `y = d * q + m` (two roundings).
fn dequantize_q4_1(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<20, 32>(exec, data, out, |b, y| {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qs = &b[4..20];
        for j in 0..16 {
            y[j] = d * f32::from(qs[j] & 0x0F) + m;
            y[j + 16] = d * f32::from(qs[j] >> 4) + m;
        }
    });
}

/// The fifth bit of element `j` of a Q5 block: bit j of the little-endian u32 `qh`.
#[inline(always)]
fn q5_high(qh: u32, j: usize) -> u8 {
    (((qh >> j) & 1) as u8) << 4
}

/// Q5_0, 22 bytes: `d: f16, qh: u32, qs: [u8; 16]`; `y = (q - 16) * d`.
fn dequantize_q5_0(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<22, 32>(exec, data, out, |b, y| {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        for j in 0..16 {
            y[j] = f32::from(((qs[j] & 0x0F) | q5_high(qh, j)) as i8 - 16) * d;
            y[j + 16] = f32::from(((qs[j] >> 4) | q5_high(qh, j + 16)) as i8 - 16) * d;
        }
    });
}

/// Q5_1, 24 bytes: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `y = d * q + m`.
fn dequantize_q5_1(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<24, 32>(exec, data, out, |b, y| {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        for j in 0..16 {
            y[j] = d * f32::from((qs[j] & 0x0F) | q5_high(qh, j)) + m;
            y[j + 16] = d * f32::from((qs[j] >> 4) | q5_high(qh, j + 16)) + m;
        }
    });
}

// ---- K-quants: 256-element super-blocks -----------------------------------------------

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K
/// (ggml's `get_scale_min_k4`; gguf-py's `Q4_K.get_scale_min`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Q4_K, 144 bytes: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Eight sub-blocks
/// of 32: sub-block 2c takes the low nibbles of qs[32c..32c+32], 2c+1 the high nibbles.
/// `y = (d * sc) * q - (dmin * m)`, each product rounded to f32 first.
fn dequantize_q4_k(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<144, 256>(exec, data, out, |b, y| {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let scales = &b[4..16];
        let qs = &b[16..144];
        for c in 0..4 {
            let q = &qs[32 * c..32 * c + 32];
            let (sc_lo, m_lo) = scale_min_k4(2 * c, scales);
            let (sc_hi, m_hi) = scale_min_k4(2 * c + 1, scales);
            let (d_lo, m_lo) = (d * f32::from(sc_lo), dmin * f32::from(m_lo));
            let (d_hi, m_hi) = (d * f32::from(sc_hi), dmin * f32::from(m_hi));
            let (y_lo, y_hi) = y[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                y_lo[l] = d_lo * f32::from(q[l] & 0x0F) - m_lo;
                y_hi[l] = d_hi * f32::from(q[l] >> 4) - m_hi;
            }
        }
    });
}

/// Q5_K, 176 bytes: `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`. As Q4_K,
/// with the fifth bit of element l of sub-block s in bit s of qh[l].
fn dequantize_q5_k(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<176, 256>(exec, data, out, |b, y| {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let scales = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..176];
        for c in 0..4 {
            let q = &qs[32 * c..32 * c + 32];
            let (s_lo, s_hi) = (2 * c, 2 * c + 1);
            let (sc_lo, m_lo) = scale_min_k4(s_lo, scales);
            let (sc_hi, m_hi) = scale_min_k4(s_hi, scales);
            let (d_lo, m_lo) = (d * f32::from(sc_lo), dmin * f32::from(m_lo));
            let (d_hi, m_hi) = (d * f32::from(sc_hi), dmin * f32::from(m_hi));
            let (y_lo, y_hi) = y[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                let h_lo = ((qh[l] >> s_lo) & 1) << 4;
                let h_hi = ((qh[l] >> s_hi) & 1) << 4;
                y_lo[l] = d_lo * f32::from((q[l] & 0x0F) | h_lo) - m_lo;
                y_hi[l] = d_hi * f32::from((q[l] >> 4) | h_hi) - m_hi;
            }
        }
    });
}

/// Q6_K, 210 bytes: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. Two halves of
/// 128 elements; in half h, element 32k + l (k = 0..4) takes nibble k / 2 of
/// ql[64h + 32(k % 2) + l] and bits 2k..2k+2 of qh[32h + l]; 16 elements share a scale.
/// `y = (d * scale) * (q - 32)`.
fn dequantize_q6_k(exec: Exec, data: &[u8], out: &mut [f32]) {
    run_blocks::<210, 256>(exec, data, out, |b, y| {
        let ql = &b[0..128];
        let qh = &b[128..192];
        let scales = &b[192..208];
        let d = f16_at(b, 208);
        for h in 0..2 {
            let ql = &ql[64 * h..64 * h + 64];
            let qh = &qh[32 * h..32 * h + 32];
            for k in 0..4 {
                let nibble_shift = 4 * (k / 2) as u32;
                let ql = &ql[32 * (k % 2)..32 * (k % 2) + 32];
                for l in 0..32 {
                    let i = 128 * h + 32 * k + l;
                    let lo = (ql[l] >> nibble_shift) & 0x0F;
                    let hi = ((qh[l] >> (2 * k)) & 3) << 4;
                    let q = (lo | hi) as i8 - 32;
                    let dl = d * f32::from(scales[i / 16] as i8);
                    y[i] = dl * f32::from(q);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One Q4_K block built by hand, checked against the formula written out longhand.
    #[test]
    fn q4_k_block_by_hand() {
        let mut b = [0u8; 144];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
        // sub-block 0: sc = 3, m = 5; sub-block 5: sc = 0b10_0001 = 33, m = 0b01_0010 = 18
        b[4] = 3;
        b[8] = 5;
        b[4 + 1] |= 0b10 << 6; // high bits of sc for j = 5 come from s[1] >> 6
        b[4 + 5] |= 0b01 << 6; // high bits of m for j = 5 come from s[5] >> 6
        b[4 + 9] = 0x21; // low nibble: sc low 4 bits (1), high nibble: m low 4 bits (2)
        for (i, q) in b[16..].iter_mut().enumerate() {
            *q = (i * 7 % 256) as u8;
        }
        let mut y = [0f32; 256];
        dequantize(GgmlType::Q4K, &b, &mut y).expect("sizes match");
        assert_eq!(scale_min_k4(5, &b[4..16]), (33, 18));
        assert_eq!(y[0], 0.5 * 3.0 * 0.0 - 0.25 * 5.0);
        let q = b[16 + 64 + 7] >> 4; // sub-block 5 = chunk 2 (bytes 64..96), high nibbles
        assert_eq!(y[160 + 7], 0.5 * 33.0 * f32::from(q) - 0.25 * 18.0);
    }

    /// Every f16 bit pattern: finite values equal `half`'s exact conversion; NaNs keep
    /// their payload unquieted, as numpy does (checked against numpy in tests/gguf.rs).
    #[test]
    fn f16_widening_is_exact_for_all_bit_patterns() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let f = f16_to_f32(bits);
            if h.is_nan() {
                assert!(f.is_nan());
                assert_eq!(f.to_bits() >> 31, u32::from(bits >> 15));
                assert_eq!(f.to_bits() & 0x007F_FFFF, u32::from(bits & 0x03FF) << 13, "{bits:#06x}");
            } else {
                assert_eq!(f.to_bits(), h.to_f32().to_bits(), "{bits:#06x}");
                assert_eq!(f64::from(f), h.to_f64(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn sizes_are_checked() {
        let mut y = [0f32; 32];
        let err = dequantize(GgmlType::Q8_0, &[0u8; 33], &mut y).unwrap_err();
        assert!(matches!(err, QuantError::SizeMismatch { n_bytes: 33, n_elements: 32, .. }), "{err}");
        assert_eq!(
            dequantize(GgmlType::Q3K, &[0u8; 110], &mut [0f32; 256]),
            Err(QuantError::Unsupported(GgmlType::Q3K))
        );
    }
}
