//! The f64 exponentials of the KLD kernel: `exp` on `[−708, 0]` and `expm1` on `[−708, 30]`,
//! table-driven and branch-free, written twice with the same operations in the same order —
//! scalar ([`exp_nonpositive`], [`expm1_bounded`]: portable, and vectorisable) and with
//! AVX-512F intrinsics ([`avx512`], eight lanes) — so that every path gives the same bits.
//!
//! Method (the table-driven form of fdlibm/glibc, with `N = 16` table entries):
//! - reduction: `x = (16·e + j)·ln2/16 + r` with `k = 16·e + j = round(x·16/ln2)`, `j` in
//!   `0..16`, `|r| ≤ ln2/32 ≈ 0.0217`; `k` comes from adding 1.5·2^52 (the low bits of the sum
//!   are `k`), `r = x − k·L_HI − k·L_LO` in two fused multiply-adds (`L_HI + L_LO = ln2/16` to
//!   about 2^-115);
//! - `expm1(r) ≈ q = r + r²·(1/2! + r/3! + … + r⁵/7!)`: the Taylor polynomial of degree 7,
//!   whose truncation error is below `r⁸/8! ≤ 5.6e-17·|r|` — half an ulp of `q` at the edge of
//!   the range, far less inside;
//! - `2^(j/16) = T_HI[j] + T_LO[j]` (a double-double table, the values of glibc's `exp`
//!   tables), `2^e` built from its exponent bits;
//! - `exp(x) = 2^e·(T_HI + (T_HI·q + T_LO))` and `expm1(x) = (S_HI − 1) + (S_HI·q + S_LO)` with
//!   `S = 2^e·T` (`S_HI − 1` is exact near 0, so `expm1` keeps its relative accuracy for tiny
//!   `x`, where `k = 0` and the result is `q` itself).
//!
//! - `expm1` of a small `x` (`|x| ≤ 1/16`) skips all of it: its Taylor polynomial of degree 9.
//!
//! Accuracy, measured against libm over the whole ranges by the tests below: at most 1 ulp
//! from glibc's `exp`/`expm1` for both (the tests allow 2: libm itself is within one ulp of
//! the exact value, not exact). A polynomial one degree shorter is 135 ulp off in `expm1`. On the AVX-512 path the table lookup is one
//! `vpermi2pd` per table (sixteen entries in two registers) instead of a load.

/// `16/ln 2`.
const N_LOG2E: f64 = f64::from_bits(0x4037_1547_652B_82FE);
/// `ln2/16` rounded to f64, and the rest.
const L_HI: f64 = f64::from_bits(0x3FA6_2E42_FEFA_39EF);
const L_LO: f64 = f64::from_bits(0x3C3A_BC9E_3B39_803F);
/// 1.5·2^52: adding it rounds to an integer held in the low mantissa bits.
const SHIFTER: f64 = 6_755_399_441_055_744.0;
/// `(bits(t) >> 4) + ADJ = e + 1023` (wrapping), for `t = SHIFTER + k`, `e = ⌊k/16⌋`: the
/// shifter's bits are a multiple of 16.
const ADJ: u64 = 1023u64.wrapping_sub(0x4338_0000_0000_0000u64 >> 4);

/// Below this `exp` returns 0 (the terms it sums are relative to 1, the row's largest).
pub const EXP_MIN: f64 = -708.0;
/// `expm1`'s inputs are clamped to `[EXP_MIN, EXPM1_MAX]`.
pub const EXPM1_MAX: f64 = 30.0;

/// `2^(j/16)` rounded to f64 …
const T_HI: [f64; 16] = [
    f64::from_bits(0x3FF0_0000_0000_0000),
    f64::from_bits(0x3FF0_B558_6CF9_890F),
    f64::from_bits(0x3FF1_72B8_3C7D_517B),
    f64::from_bits(0x3FF2_387A_6E75_6238),
    f64::from_bits(0x3FF3_06FE_0A31_B715),
    f64::from_bits(0x3FF3_DEA6_4C12_3422),
    f64::from_bits(0x3FF4_BFDA_D536_2A27),
    f64::from_bits(0x3FF5_AB07_DD48_5429),
    f64::from_bits(0x3FF6_A09E_667F_3BCD),
    f64::from_bits(0x3FF7_A114_73EB_0187),
    f64::from_bits(0x3FF8_ACE5_422A_A0DB),
    f64::from_bits(0x3FF9_C491_82A3_F090),
    f64::from_bits(0x3FFA_E89F_995A_D3AD),
    f64::from_bits(0x3FFC_199B_DD85_529C),
    f64::from_bits(0x3FFD_5818_DCFB_A487),
    f64::from_bits(0x3FFE_A4AF_A2A4_90DA),
];
/// … and `2^(j/16) − T_HI[j]` rounded to f64.
const T_LO: [f64; 16] = [
    0.0,
    f64::from_bits(0x3C98_A62E_4ADC_610B),
    f64::from_bits(0xBC81_9041_B9D7_8A76),
    f64::from_bits(0x3C99_B07E_B6C7_0573),
    f64::from_bits(0x3C86_F46A_D231_82E4),
    f64::from_bits(0x3C8A_DA09_11F0_9EBC),
    f64::from_bits(0x3C7D_4397_AFEC_42E2),
    f64::from_bits(0x3C96_324C_0546_47AD),
    f64::from_bits(0xBC9B_DD34_13B2_6456),
    f64::from_bits(0xBC84_1577_EE04_992F),
    f64::from_bits(0x3C96_E9F1_5686_4B27),
    f64::from_bits(0x3C7C_7C46_B071_F2BE),
    f64::from_bits(0x3C97_A1CD_345D_CC81),
    f64::from_bits(0x3C81_1065_8950_48DD),
    f64::from_bits(0x3C82_ED02_D75B_3707),
    f64::from_bits(0xBC9E_9C23_179C_2893),
];
/// Taylor coefficients `1/n!`, n = 2..=7.
const C2: f64 = 1.0 / 2.0;
const C3: f64 = 1.0 / 6.0;
const C4: f64 = 1.0 / 24.0;
const C5: f64 = 1.0 / 120.0;
const C6: f64 = 1.0 / 720.0;
const C7: f64 = 1.0 / 5040.0;

/// The reduction of `x` (in `[EXP_MIN, EXPM1_MAX]`): `(q, j, 2^e)` with `exp(x) =
/// 2^e·2^(j/16)·(1 + q)`.
#[inline(always)]
fn reduce(x: f64) -> (f64, usize, f64) {
    let t = x.mul_add(N_LOG2E, SHIFTER);
    let kf = t - SHIFTER;
    let r = (-kf).mul_add(L_LO, (-kf).mul_add(L_HI, x));
    let bits = t.to_bits();
    let scale = f64::from_bits((bits >> 4).wrapping_add(ADJ) << 52);
    let r2 = r * r;
    let mut p = C7.mul_add(r, C6);
    p = p.mul_add(r, C5);
    p = p.mul_add(r, C4);
    p = p.mul_add(r, C3);
    p = p.mul_add(r, C2);
    (p.mul_add(r2, r), (bits & 15) as usize, scale)
}

/// `exp(x)` for `x ≤ 0`, within 1 ulp of libm; 0 below [`EXP_MIN`] (those terms are below
/// 1e-307 of the largest term of a row, which is 1).
///
/// Every step is a fused multiply-add where one is written (one instruction with FMA, libm's
/// correctly rounded `fma` elsewhere: the same bits on every path).
#[inline(always)]
pub fn exp_nonpositive(x: f64) -> f64 {
    let under = x < EXP_MIN;
    let (q, j, scale) = reduce(x.max(EXP_MIN));
    let v = T_HI[j] + T_HI[j].mul_add(q, T_LO[j]);
    if under { 0.0 } else { v * scale }
}

/// `expm1(x) = eˣ − 1` for `x` clamped to `[EXP_MIN, EXPM1_MAX]`, within 1 ulp of libm there
/// (relative to the result: tiny `x` give `x + x²/2 + …` to full precision).
///
/// For `|x| ≤ SMALL` (two rows that agree: nearly every element of a parity comparison) the
/// Taylor polynomial of degree 9 without reduction (truncation below `x⁹/10! ≤ 4e-18·|x|`),
/// about half the instructions of the table path.
#[inline(always)]
pub fn expm1_bounded(x: f64) -> f64 {
    if x.abs() <= SMALL { expm1_small(x) } else { expm1_table(x) }
}

/// `|x|` up to which [`expm1_bounded`] sums its Taylor series directly.
pub const SMALL: f64 = 0.0625;
/// `1/n!`, n = 8, 9.
const C8: f64 = 1.0 / 40_320.0;
const C9: f64 = 1.0 / 362_880.0;

#[inline(always)]
fn expm1_small(x: f64) -> f64 {
    let x2 = x * x;
    let mut p = C9.mul_add(x, C8);
    p = p.mul_add(x, C7);
    p = p.mul_add(x, C6);
    p = p.mul_add(x, C5);
    p = p.mul_add(x, C4);
    p = p.mul_add(x, C3);
    p = p.mul_add(x, C2);
    p.mul_add(x2, x)
}

#[inline(always)]
fn expm1_table(x: f64) -> f64 {
    let (q, j, scale) = reduce(x.clamp(EXP_MIN, EXPM1_MAX));
    let hi = T_HI[j] * scale;
    let lo = T_LO[j] * scale;
    (hi - 1.0) + hi.mul_add(q, lo)
}

/// The same functions on eight lanes with AVX-512F: the same operations in the same order as
/// the scalar ones (so the same bits), the table lookups done by `vpermi2pd`.
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use std::arch::x86_64::*;

    use super::*;

    /// The two tables, each in two registers (entries 0–7 and 8–15).
    #[derive(Clone, Copy)]
    pub struct Tables {
        hi: (__m512d, __m512d),
        lo: (__m512d, __m512d),
    }

    impl Tables {
        /// # Safety
        /// The CPU must support AVX-512F (as for every function of this module).
        #[target_feature(enable = "avx512f")]
        pub fn new() -> Tables {
            let reg = |t: &[f64; 16], at: usize| {
                // SAFETY: `t` has 16 elements, so `at..at + 8` (at = 0 or 8) is in bounds.
                unsafe { _mm512_loadu_pd(t.as_ptr().add(at)) }
            };
            Tables { hi: (reg(&T_HI, 0), reg(&T_HI, 8)), lo: (reg(&T_LO, 0), reg(&T_LO, 8)) }
        }
    }

    /// [`super::reduce`] on eight lanes: `(q, T_HI[j], T_LO[j], 2^e)`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn reduce(x: __m512d, t: Tables) -> (__m512d, __m512d, __m512d, __m512d) {
        let shifter = _mm512_set1_pd(SHIFTER);
        let tk = _mm512_fmadd_pd(x, _mm512_set1_pd(N_LOG2E), shifter);
        let kf = _mm512_sub_pd(tk, shifter);
        // fnmadd(a, b, c) = −(a·b) + c, rounded once: the bits of (−a).mul_add(b, c)
        let r = _mm512_fnmadd_pd(kf, _mm512_set1_pd(L_LO), _mm512_fnmadd_pd(kf, _mm512_set1_pd(L_HI), x));
        let bits = _mm512_castpd_si512(tk);
        let e = _mm512_add_epi64(_mm512_srli_epi64::<4>(bits), _mm512_set1_epi64(ADJ as i64));
        let scale = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(e));
        // vpermi2pd reads the low four bits of each index lane: j
        let th = _mm512_permutex2var_pd(t.hi.0, bits, t.hi.1);
        let tl = _mm512_permutex2var_pd(t.lo.0, bits, t.lo.1);
        let r2 = _mm512_mul_pd(r, r);
        let mut p = _mm512_fmadd_pd(_mm512_set1_pd(C7), r, _mm512_set1_pd(C6));
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(C5));
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(C4));
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(C3));
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(C2));
        (_mm512_fmadd_pd(p, r2, r), th, tl, scale)
    }

    /// [`super::exp_nonpositive`] on eight lanes (finite inputs).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub fn exp_nonpositive(x: __m512d, t: Tables) -> __m512d {
        let min = _mm512_set1_pd(EXP_MIN);
        let keep = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(x, min);
        let (q, th, tl, scale) = reduce(_mm512_max_pd(x, min), t);
        let v = _mm512_add_pd(th, _mm512_fmadd_pd(th, q, tl));
        _mm512_maskz_mul_pd(keep, v, scale)
    }

    /// [`super::expm1_bounded`] on eight lanes (finite inputs): the Taylor form on every lane,
    /// and the table form only when a lane needs it.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub fn expm1_bounded(x: __m512d, t: Tables) -> __m512d {
        let small = _mm512_cmp_pd_mask::<_CMP_LE_OQ>(_mm512_abs_pd(x), _mm512_set1_pd(SMALL));
        let x2 = _mm512_mul_pd(x, x);
        let mut p = _mm512_fmadd_pd(_mm512_set1_pd(C9), x, _mm512_set1_pd(C8));
        for c in [C7, C6, C5, C4, C3, C2] {
            p = _mm512_fmadd_pd(p, x, _mm512_set1_pd(c));
        }
        let taylor = _mm512_fmadd_pd(p, x2, x);
        if small == 0xFF {
            return taylor;
        }
        let xc = _mm512_min_pd(_mm512_max_pd(x, _mm512_set1_pd(EXP_MIN)), _mm512_set1_pd(EXPM1_MAX));
        let (q, th, tl, scale) = reduce(xc, t);
        let hi = _mm512_mul_pd(th, scale);
        let lo = _mm512_mul_pd(tl, scale);
        let table = _mm512_add_pd(_mm512_sub_pd(hi, _mm512_set1_pd(1.0)), _mm512_fmadd_pd(hi, q, lo));
        _mm512_mask_blend_pd(small, table, taylor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in ulps between two positive or two negative finite f64 (0 when equal).
    fn ulps(a: f64, b: f64) -> u64 {
        if a == b {
            return 0;
        }
        assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a:e} vs {b:e}");
        (a.abs().to_bits() as i64 - b.abs().to_bits() as i64).unsigned_abs()
    }

    /// Arguments covering `[lo, hi]`: a fine even grid (finer near zero), every reduction boundary `(k ± ½)·ln2/16`
    /// near zero and near both ends, and tiny magnitudes.
    fn arguments(lo: f64, hi: f64) -> Vec<f64> {
        let mut xs = Vec::new();
        let n = 2_000_000;
        for i in 0..=n {
            xs.push(lo + (hi - lo) * (i as f64 / n as f64));
        }
        // finer near zero: the Taylor path of expm1 and its edges
        for i in -200_000..=200_000 {
            xs.push(2.0 * SMALL * (i as f64 / 200_000.0));
        }
        let step = std::f64::consts::LN_2 / 16.0;
        for k in (-40..40).chain(-16_350..-16_300).chain(680..700) {
            let edge = (k as f64 + 0.5) * step;
            for d in [-1e-12, 0.0, 1e-12] {
                xs.push(edge + d);
            }
        }
        for x in [SMALL, -SMALL] {
            xs.extend([x, x * (1.0 + 1e-15), x * (1.0 - 1e-15)]);
        }
        for e in -300..0 {
            let v = 10f64.powi(e);
            xs.extend([v, -v]);
        }
        xs.retain(|&x| (lo..=hi).contains(&x));
        xs
    }

    #[test]
    fn exp_is_within_2_ulp_of_libm_on_its_range() {
        let mut worst = (0, 0.0);
        for x in arguments(EXP_MIN, 0.0) {
            let u = ulps(exp_nonpositive(x), x.exp());
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {:e}", worst.0, worst.1);
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(-708.5), 0.0);
        assert_eq!(exp_nonpositive(-1e300), 0.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
    }

    #[test]
    fn expm1_is_within_2_ulp_of_libm_on_its_range() {
        let mut worst = (0, 0.0);
        for x in arguments(EXP_MIN, EXPM1_MAX) {
            let (got, want) = (expm1_bounded(x), x.exp_m1());
            let u = ulps(got, want);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {:e}", worst.0, worst.1);
        assert_eq!(expm1_bounded(0.0), 0.0);
        assert_eq!(expm1_bounded(1e-300), 1e-300);
        assert_eq!(expm1_bounded(-800.0), -1.0);
        assert_eq!(expm1_bounded(1e9), expm1_bounded(EXPM1_MAX));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_lanes_give_the_scalar_bits() {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        /// Both functions on eight lanes (`exp` of `min(x, 0)`).
        #[target_feature(enable = "avx512f")]
        fn lanes(xs: &[f64; 8]) -> ([f64; 8], [f64; 8]) {
            let t = avx512::Tables::new();
            let (mut e, mut m) = ([0.0; 8], [0.0; 8]);
            // SAFETY: the three arrays hold 8 f64, what one 512-bit load or store moves.
            unsafe {
                let v = _mm512_loadu_pd(xs.as_ptr());
                _mm512_storeu_pd(e.as_mut_ptr(), avx512::exp_nonpositive(_mm512_min_pd(v, _mm512_setzero_pd()), t));
                _mm512_storeu_pd(m.as_mut_ptr(), avx512::expm1_bounded(v, t));
            }
            (e, m)
        }
        let mut xs = arguments(EXP_MIN, EXPM1_MAX);
        xs.extend([-1e300, -708.0001, EXP_MIN, 1e9]);
        for chunk in xs.chunks_exact(8) {
            let x: [f64; 8] = chunk.try_into().expect("8 lanes");
            // SAFETY: AVX-512F is present (checked above).
            let (e, m) = unsafe { lanes(&x) };
            for i in 0..8 {
                assert_eq!(e[i].to_bits(), exp_nonpositive(x[i].min(0.0)).to_bits(), "exp({:e})", x[i]);
                assert_eq!(m[i].to_bits(), expm1_bounded(x[i]).to_bits(), "expm1({:e})", x[i]);
            }
        }
    }
}
