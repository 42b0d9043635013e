//! Per-position logit metrics: the row kernels and their application to a prompt.
//!
//! A row is one scored position's logits, `V` values (151,936 for Qwen). The kernels are
//! free functions over `&[f32]` slices straight from the memory map, so they can be measured
//! alone (a criterion bench) and never allocate:
//! - [`row_diff`]: one pass for `Σ(a−b)²`, `Σa²`, `Σb²`, `Σab`, `max|a−b|`, both maxima and
//!   the non-finite counts;
//! - [`row_kld`]: one pass for `KL(ref ‖ engine)` (log-softmax of both sides in f64, written
//!   so that tiny divergences keep their digits; exponentials from [`super::exp`]);
//! - [`top_k`]: one pass for the `K` largest values and their ids;
//! - [`row_scan`]: [`row_diff`] and both [`top_k`]s fused into one pass, so [`row_metrics`]
//!   reads each row from memory once and computes the KLD from cache.
//!
//! Accumulation is f64 in `LANES` independent accumulators combined in a fixed order (the
//! compiler may vectorise them; the order of additions never depends on threads). `a` is
//! always the engine under test, `b` the reference.
//!
//! Rows may be stored as f32, f16 or bf16 ([`Logit`]): the kernels read them straight from
//! the map and widen `BLOCK` elements at a time into a stack buffer (exact: widening loses
//! nothing), so a half-precision dump is never converted row by row into a heap copy, and
//! the metrics of an f16 row equal those of the same values stored as f32, bit for bit.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use super::{exp, stats};

/// Independent accumulators per kernel pass (a fixed order of additions that vectorises).
const LANES: usize = 8;

/// Elements per block: lane accumulators restart every block and are added into running
/// totals, so rounding error grows with `BLOCK/LANES + n/BLOCK` additions, not `n/LANES`.
const BLOCK: usize = 512;

/// The largest top-k this module computes (top-10 overlap is the widest metric).
pub const TOP_K: usize = 10;

/// A pass over two rows: `step` sees element pairs with their lane, `flush` ends a block.
trait LaneKernel {
    fn step(&mut self, lane: usize, x: f32, y: f32);
    fn flush(&mut self);
}

/// An element type a dump stores logits in. The kernels see f32: [`Logit::widen`] gives a
/// block as f32, borrowed when it already is, converted into a stack buffer otherwise.
pub trait Logit: Copy + Send + Sync + 'static {
    /// `src` (at most `BLOCK` elements) as f32.
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32; BLOCK]) -> &'a [f32];
    /// One value as f32 (exact).
    fn to_f32(self) -> f32;
}

impl Logit for f32 {
    #[inline(always)]
    fn widen<'a>(src: &'a [f32], _buf: &'a mut [f32; BLOCK]) -> &'a [f32] {
        src
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Logit for f16 {
    /// F16C eight at a time where the CPU has it (exact, like every f16 → f32 conversion),
    /// half's slice conversion elsewhere.
    #[inline(always)]
    fn widen<'a>(src: &'a [f16], buf: &'a mut [f32; BLOCK]) -> &'a [f32] {
        let out = &mut buf[..src.len()];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU supports F16C (and so AVX), checked just above.
            unsafe { widen_f16c(src, out) };
            return out;
        }
        src.convert_to_f32_slice(out);
        out
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// `out[i] = src[i]` as f32, eight at a time with `vcvtph2ps` (half's own slice conversion
/// goes four at a time through a call per chunk: it doubled the time of the f16 kernels).
///
/// # Safety
/// The CPU must support F16C and AVX; `out` must be as long as `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(src: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    assert_eq!(src.len(), out.len(), "widen_f16c: lengths differ");
    let mut so = src.chunks_exact(8).zip(out.chunks_exact_mut(8));
    for (s, o) in &mut so {
        // SAFETY: `s` holds 8 f16 (16 bytes, one unaligned 128-bit load) and `o` 8 f32 (one
        // unaligned 256-bit store).
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast::<__m128i>()))) };
    }
    let n = src.len() / 8 * 8;
    for (s, o) in src[n..].iter().zip(&mut out[n..]) {
        *o = s.to_f32();
    }
}

impl Logit for bf16 {
    #[inline(always)]
    fn widen<'a>(src: &'a [bf16], buf: &'a mut [f32; BLOCK]) -> &'a [f32] {
        let out = &mut buf[..src.len()];
        src.convert_to_f32_slice(out);
        out
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Feeds two equally long rows to a kernel block by block, lane by lane, in a fixed order.
#[inline(always)]
fn run_lanes<K: LaneKernel, A: Logit, B: Logit>(k: &mut K, a: &[A], b: &[B]) {
    // [BLOCK] f32 views of the current block of each side (unused for f32 rows)
    let (mut buf_a, mut buf_b) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
    for (ca, cb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        run_block(k, A::widen(ca, &mut buf_a), B::widen(cb, &mut buf_b));
    }
}

/// One block (at most `BLOCK` pairs): element `i` goes to lane `i % LANES`, then the flush.
#[inline(always)]
fn run_block<K: LaneKernel>(k: &mut K, ba: &[f32], bb: &[f32]) {
    let split = ba.len() / LANES * LANES;
    for (xs, ys) in ba[..split].chunks_exact(LANES).zip(bb[..split].chunks_exact(LANES)) {
        for j in 0..LANES {
            k.step(j, xs[j], ys[j]);
        }
    }
    for (j, (&x, &y)) in ba[split..].iter().zip(&bb[split..]).enumerate() {
        k.step(j, x, y);
    }
    k.flush();
}

/// Lane accumulators combined in a fixed order: pairwise, lane 0 first.
fn fold_sum(lanes: &[f64; LANES]) -> f64 {
    let mut s = *lanes;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            s[j] += s[j + w];
        }
    }
    s[0]
}

/// Adds a block's lane sums into the running lane totals and clears them.
#[inline(always)]
fn drain(total: &mut [f64; LANES], block: &mut [f64; LANES]) {
    for j in 0..LANES {
        total[j] += block[j];
        block[j] = 0.0;
    }
}

/// Sums of one pass over a pair of rows, all in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowDiff {
    /// `Σ(a−b)²`
    pub dd: f64,
    /// `Σa²`
    pub aa: f64,
    /// `Σb²`
    pub bb: f64,
    /// `Σab`
    pub ab: f64,
    /// `max|a−b|` over the finite pairs.
    pub max_abs: f64,
    /// Largest finite value of `a` (−∞ if none).
    pub max_a: f32,
    /// Largest finite value of `b` (−∞ if none).
    pub max_b: f32,
    /// NaN or ±∞ values in `a`.
    pub nonfinite_a: u32,
    /// NaN or ±∞ values in `b`.
    pub nonfinite_b: u32,
}

/// Lane state of [`row_diff`]: block sums `[LANES]` and running totals `[LANES]`.
struct DiffLanes {
    dd: [f64; LANES],
    aa: [f64; LANES],
    bb: [f64; LANES],
    ab: [f64; LANES],
    tot: [[f64; LANES]; 4],
    mx: [f64; LANES],
    ma: [f32; LANES],
    mb: [f32; LANES],
    na: [u32; LANES],
    nb: [u32; LANES],
}

impl LaneKernel for DiffLanes {
    #[inline(always)]
    fn step(&mut self, j: usize, x: f32, y: f32) {
        let (xd, yd) = (f64::from(x), f64::from(y));
        let d = xd - yd;
        self.dd[j] += d * d;
        self.aa[j] += xd * xd;
        self.bb[j] += yd * yd;
        self.ab[j] += xd * yd;
        // f64::max / f32::max ignore NaN, so the extremes are over finite values; the
        // counts make a row with NaN fail anyway.
        self.mx[j] = self.mx[j].max(d.abs());
        self.ma[j] = self.ma[j].max(if x.is_finite() { x } else { f32::NEG_INFINITY });
        self.mb[j] = self.mb[j].max(if y.is_finite() { y } else { f32::NEG_INFINITY });
        self.na[j] += u32::from(!x.is_finite());
        self.nb[j] += u32::from(!y.is_finite());
    }
    #[inline(always)]
    fn flush(&mut self) {
        let [dd, aa, bb, ab] = &mut self.tot;
        drain(dd, &mut self.dd);
        drain(aa, &mut self.aa);
        drain(bb, &mut self.bb);
        drain(ab, &mut self.ab);
    }
}

/// One pass over two equally long rows: the sums behind rel-L2, cosine and NMSE, the
/// largest absolute difference, both maxima (for the log-sum-exps) and non-finite counts.
///
/// Panics if the rows differ in length (callers check shapes first).
pub fn row_diff<A: Logit, B: Logit>(a: &[A], b: &[B]) -> RowDiff {
    assert_eq!(a.len(), b.len(), "row_diff on rows of different lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { row_diff_avx2(a, b) };
    }
    row_diff_body(a, b)
}

/// [`row_diff`] compiled for AVX2: the same operations in the same order (no FMA), so the
/// same bits, four f64 lanes at a time.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_diff_avx2<A: Logit, B: Logit>(a: &[A], b: &[B]) -> RowDiff {
    row_diff_body(a, b)
}

#[inline(always)]
fn row_diff_body<A: Logit, B: Logit>(a: &[A], b: &[B]) -> RowDiff {
    let mut k = DiffLanes::new();
    run_lanes(&mut k, a, b);
    k.finish()
}

impl DiffLanes {
    fn new() -> DiffLanes {
        DiffLanes {
            dd: [0.0; LANES],
            aa: [0.0; LANES],
            bb: [0.0; LANES],
            ab: [0.0; LANES],
            tot: [[0.0; LANES]; 4],
            mx: [0.0; LANES],
            ma: [f32::NEG_INFINITY; LANES],
            mb: [f32::NEG_INFINITY; LANES],
            na: [0; LANES],
            nb: [0; LANES],
        }
    }

    fn finish(&self) -> RowDiff {
        RowDiff {
            dd: fold_sum(&self.tot[0]),
            aa: fold_sum(&self.tot[1]),
            bb: fold_sum(&self.tot[2]),
            ab: fold_sum(&self.tot[3]),
            max_abs: self.mx.iter().copied().fold(0.0, f64::max),
            max_a: self.ma.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            max_b: self.mb.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            nonfinite_a: self.na.iter().sum(),
            nonfinite_b: self.nb.iter().sum(),
        }
    }
}

/// Everything of a row pair but its KLD in one pass: [`row_diff`] and the [`top_k`] of each
/// side, block by block, so that each row is read from memory once (the KLD pass that
/// follows in [`row_metrics`] finds both rows in cache: 2 × 600 KB for Qwen's f32 rows).
/// The same results, bit for bit, as the three separate passes.
pub fn row_scan<A: Logit, B: Logit>(a: &[A], b: &[B]) -> (RowDiff, TopK, TopK) {
    assert_eq!(a.len(), b.len(), "row_scan on rows of different lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        return unsafe { row_scan_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { row_scan_avx2(a, b) };
    }
    row_scan_body(a, b)
}

/// [`row_scan`] compiled for AVX-512F (no FMA: the same operations, the same bits).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn row_scan_avx512<A: Logit, B: Logit>(a: &[A], b: &[B]) -> (RowDiff, TopK, TopK) {
    row_scan_body(a, b)
}

/// [`row_scan`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_scan_avx2<A: Logit, B: Logit>(a: &[A], b: &[B]) -> (RowDiff, TopK, TopK) {
    row_scan_body(a, b)
}

#[inline(always)]
fn row_scan_body<A: Logit, B: Logit>(a: &[A], b: &[B]) -> (RowDiff, TopK, TopK) {
    let mut k = DiffLanes::new();
    let (mut ta, mut tb) = (TopKScan::new(), TopKScan::new());
    let (mut buf_a, mut buf_b) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
    for (blk, (ca, cb)) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate() {
        let (ba, bb) = (A::widen(ca, &mut buf_a), B::widen(cb, &mut buf_b));
        run_block(&mut k, ba, bb);
        ta.block(blk * BLOCK, ba);
        tb.block(blk * BLOCK, bb);
    }
    (k.finish(), ta.t, tb.t)
}

/// Lane state of [`row_kld`]: block sums `[LANES]` of `Σ e_i`, `Σ e_i·expm1(δ_i)`, `Σ e_i·δ_i`
/// and their running totals.
struct KldLanes {
    ma: f64,
    mb: f64,
    /// `max a − max b`
    c: f64,
    zb: [f64; LANES],
    d: [f64; LANES],
    mu: [f64; LANES],
    tot: [[f64; LANES]; 3],
}

impl LaneKernel for KldLanes {
    #[inline(always)]
    fn step(&mut self, j: usize, x: f32, y: f32) {
        let (xd, yd) = (f64::from(x), f64::from(y));
        let dl = (xd - yd) - self.c;
        let eb = exp::exp_nonpositive(yd - self.mb);
        // e^(a−max a) − e^(b−max b) = eb·expm1(δ): no cancellation when the rows agree; where
        // δ is so large that eb may have underflowed, the difference itself (no cancellation)
        let d = if dl > exp::EXPM1_MAX { exp::exp_nonpositive(xd - self.ma) - eb } else { eb * exp::expm1_bounded(dl) };
        self.zb[j] += eb;
        self.d[j] += d;
        self.mu[j] = eb.mul_add(dl, self.mu[j]);
    }
    #[inline(always)]
    fn flush(&mut self) {
        let [zb, d, mu] = &mut self.tot;
        drain(zb, &mut self.zb);
        drain(d, &mut self.d);
        drain(mu, &mut self.mu);
    }
}

/// `KL(p ‖ q)` with `p = softmax(b)` (the reference) and `q = softmax(a)` (the engine),
/// from one pass over both rows, in f64.
///
/// With `δ_i = (a_i − b_i) − (max a − max b)` (the log-ratio `log(q_i/p_i)` up to a constant)
/// and `e_i = exp(b_i − max b)`:
/// `KL = log Σ p_i e^(δ_i) − Σ p_i δ_i = log1p(D/Z) − M/Z`, with `Z = Σ e_i`,
/// `D = Σ e_i·expm1(δ_i)` and `M = Σ e_i·δ_i`.
/// Both terms are of the size of `δ`, not of the log-sum-exps (≈ 12 for Qwen's vocabulary), so
/// the cancellation that leaves a KLD of 1e-11 between two f32 references costs digits in
/// proportion to `δ` only: the result keeps about `1e-16·|δ|` absolute resolution where the
/// textbook `Σ p (b − a) − LSE_b + LSE_a` keeps about 1e-15. Identical rows give exactly 0;
/// rows that differ by rounding may give a rounding-size negative number, reported as it is.
/// `max_a` / `max_b` are the rows' maxima ([`row_diff`]); the rows must be finite (a row
/// with a non-finite value has no KLD: the caller reports NaN).
pub fn row_kld<A: Logit, B: Logit>(a: &[A], b: &[B], max_a: f32, max_b: f32) -> f64 {
    assert_eq!(a.len(), b.len(), "row_kld on rows of different lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
        return unsafe { avx512::row_kld(a, b, max_a, max_b) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { row_kld_avx2(a, b, max_a, max_b) };
    }
    row_kld_body(a, b, max_a, max_b)
}

/// [`row_kld`] compiled for AVX2 and FMA: the same operations in the same order; the
/// `mul_add`s become one instruction each (elsewhere libm's correctly rounded `fma`: the same
/// bits, slower).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_kld_avx2<A: Logit, B: Logit>(a: &[A], b: &[B], max_a: f32, max_b: f32) -> f64 {
    row_kld_body(a, b, max_a, max_b)
}

#[inline(always)]
fn row_kld_body<A: Logit, B: Logit>(a: &[A], b: &[B], max_a: f32, max_b: f32) -> f64 {
    let (ma, mb) = (f64::from(max_a), f64::from(max_b));
    let mut k =
        KldLanes { ma, mb, c: ma - mb, zb: [0.0; LANES], d: [0.0; LANES], mu: [0.0; LANES], tot: [[0.0; LANES]; 3] };
    run_lanes(&mut k, a, b);
    kld_from_sums(fold_sum(&k.tot[0]), fold_sum(&k.tot[1]), fold_sum(&k.tot[2]))
}

/// `log1p(D/Z) − M/Z` (see [`row_kld`]).
fn kld_from_sums(z: f64, d: f64, m: f64) -> f64 {
    (d / z).ln_1p() - m / z
}

/// [`row_kld`] with AVX-512F intrinsics: the eight lanes of [`KldLanes`] in one register, the
/// same operations in the same order (the same bits), the exponentials of [`exp::avx512`].
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, LANES, Logit, exp, fold_sum, kld_from_sums};

    /// The row-wide constants of one KLD pass.
    #[derive(Clone, Copy)]
    struct Consts {
        t: exp::avx512::Tables,
        ma: __m512d,
        mb: __m512d,
        c: __m512d,
    }

    /// `(e, e·expm1(δ) or its replacement, δ)` of eight element pairs, as in
    /// [`super::KldLanes::step`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn terms(xa: __m512d, xb: __m512d, k: Consts) -> (__m512d, __m512d, __m512d) {
        let dl = _mm512_sub_pd(_mm512_sub_pd(xa, xb), k.c);
        let eb = exp::avx512::exp_nonpositive(_mm512_sub_pd(xb, k.mb), k.t);
        let di = _mm512_mul_pd(eb, exp::avx512::expm1_bounded(dl, k.t));
        let wide = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(dl, _mm512_set1_pd(exp::EXPM1_MAX));
        if wide == 0 {
            return (eb, di, dl);
        }
        let ea = exp::avx512::exp_nonpositive(_mm512_sub_pd(xa, k.ma), k.t);
        (eb, _mm512_mask_blend_pd(wide, di, _mm512_sub_pd(ea, eb)), dl)
    }

    /// # Safety
    /// The CPU must support AVX-512F and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn row_kld<A: Logit, B: Logit>(a: &[A], b: &[B], max_a: f32, max_b: f32) -> f64 {
        let (ma, mb) = (f64::from(max_a), f64::from(max_b));
        let k = Consts {
            t: exp::avx512::Tables::new(),
            ma: _mm512_set1_pd(ma),
            mb: _mm512_set1_pd(mb),
            c: _mm512_set1_pd(ma - mb),
        };
        let wide = |s: &[f32]| {
            // SAFETY: `s` holds 8 f32 (a `chunks_exact(8)` chunk or the padded tail), what
            // one 256-bit load reads.
            _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(s.as_ptr()) })
        };
        let mut tot = [_mm512_setzero_pd(); 3];
        let (mut buf_a, mut buf_b) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
        for (ca, cb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
            let (ba, bb) = (A::widen(ca, &mut buf_a), B::widen(cb, &mut buf_b));
            let (mut zb, mut d, mut mu) = (_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd());
            let (xs, ys) = (ba.chunks_exact(LANES), bb.chunks_exact(LANES));
            let (rest_a, rest_b) = (xs.remainder(), ys.remainder());
            for (x, y) in xs.zip(ys) {
                let (eb, di, dl) = terms(wide(x), wide(y), k);
                zb = _mm512_add_pd(zb, eb);
                d = _mm512_add_pd(d, di);
                mu = _mm512_fmadd_pd(eb, dl, mu);
            }
            if !rest_a.is_empty() {
                // the last elements of the row go to lanes 0.., the other lanes are left as they are
                let n = rest_a.len();
                let (mut pa, mut pb) = ([0.0f32; LANES], [0.0f32; LANES]);
                pa[..n].copy_from_slice(rest_a);
                pb[..n].copy_from_slice(rest_b);
                let lanes: __mmask8 = (1u8 << n) - 1;
                let (eb, di, dl) = terms(wide(&pa), wide(&pb), k);
                zb = _mm512_mask_add_pd(zb, lanes, zb, eb);
                d = _mm512_mask_add_pd(d, lanes, d, di);
                mu = _mm512_mask3_fmadd_pd(eb, dl, mu, lanes);
            }
            tot[0] = _mm512_add_pd(tot[0], zb);
            tot[1] = _mm512_add_pd(tot[1], d);
            tot[2] = _mm512_add_pd(tot[2], mu);
        }
        let mut sums = [[0.0f64; LANES]; 3];
        for (s, v) in sums.iter_mut().zip(tot) {
            // SAFETY: `s` holds 8 f64, what one 512-bit store writes.
            unsafe { _mm512_storeu_pd(s.as_mut_ptr(), v) };
        }
        kld_from_sums(fold_sum(&sums[0]), fold_sum(&sums[1]), fold_sum(&sums[2]))
    }
}

/// The `K` largest values of a row and their ids, descending; ties go to the lower id and
/// NaN is never chosen. `len < K` only for rows shorter than `K` (or mostly NaN).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopK {
    pub ids: [u32; TOP_K],
    pub vals: [f32; TOP_K],
    pub len: usize,
}

impl TopK {
    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.len]
    }
    pub fn vals(&self) -> &[f32] {
        &self.vals[..self.len]
    }

    /// Inserts `(id, v)` keeping the order; `v` must beat the current last entry.
    #[inline]
    fn insert(&mut self, id: u32, v: f32) {
        // first slot holding a strictly smaller value: equal values keep the earlier id first
        let mut j = self.len.min(TOP_K - 1);
        while j > 0 && self.vals[j - 1] < v {
            j -= 1;
        }
        let end = self.len.min(TOP_K - 1);
        self.ids.copy_within(j..end, j + 1);
        self.vals.copy_within(j..end, j + 1);
        self.ids[j] = id;
        self.vals[j] = v;
        self.len = (self.len + 1).min(TOP_K);
    }
}

/// One pass for the [`TOP_K`] largest values of a row. Chunks of 16 are first tested
/// against the current K-th value (a test that vectorises), so on a typical row nearly
/// every chunk is skipped after the first few.
pub fn top_k<E: Logit>(row: &[E]) -> TopK {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { top_k_avx2(row) };
    }
    top_k_body(row)
}

/// [`top_k`] compiled for AVX2 (the chunk test becomes two vector compares).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn top_k_avx2<E: Logit>(row: &[E]) -> TopK {
    top_k_body(row)
}

#[inline(always)]
fn top_k_body<E: Logit>(row: &[E]) -> TopK {
    let mut scan = TopKScan::new();
    let mut buf = [0.0f32; BLOCK]; // [BLOCK] the current block as f32 (unused for f32 rows)
    for (blk, block) in row.chunks(BLOCK).enumerate() {
        scan.block(blk * BLOCK, E::widen(block, &mut buf));
    }
    scan.t
}

/// The running top-k of a row read block by block, and the value to beat once it is full.
struct TopKScan {
    t: TopK,
    thresh: f32,
}

impl TopKScan {
    fn new() -> TopKScan {
        TopKScan { t: TopK { ids: [0; TOP_K], vals: [f32::NEG_INFINITY; TOP_K], len: 0 }, thresh: f32::NEG_INFINITY }
    }

    /// The next block of the row, starting at element `base`.
    #[inline(always)]
    fn block(&mut self, base: usize, block: &[f32]) {
        const CHUNK: usize = 16;
        const _: () = assert!(BLOCK.is_multiple_of(CHUNK), "chunks must not straddle blocks");
        let t = &mut self.t;
        for (c, chunk) in block.chunks(CHUNK).enumerate() {
            let full = t.len == TOP_K;
            if full && !chunk.iter().fold(false, |any, &x| any | (x > self.thresh)) {
                continue;
            }
            let base = base + c * CHUNK;
            for (i, &x) in chunk.iter().enumerate() {
                let take = if t.len == TOP_K { x > self.thresh } else { !x.is_nan() };
                if take {
                    t.insert((base + i) as u32, x);
                    if t.len == TOP_K {
                        self.thresh = t.vals[TOP_K - 1];
                    }
                }
            }
        }
    }
}

/// Everything measured at one scored position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowMetrics {
    pub rel_l2: f64,
    pub cosine: f64,
    pub nmse: f64,
    pub max_abs: f64,
    pub kld: f64,
    /// The raw sums, kept for pooled (whole-tensor) metrics.
    pub dd: f64,
    pub bb: f64,
    pub nonfinite_a: u32,
    pub nonfinite_b: u32,
    pub top_a: TopK,
    pub top_b: TopK,
}

/// All full-logit metrics of one position. A row with a non-finite value on either side
/// gets NaN for every value metric (its counts say why); its top-k skip NaN.
pub fn row_metrics<A: Logit, B: Logit>(a: &[A], b: &[B]) -> RowMetrics {
    let (d, top_a, top_b) = row_scan(a, b);
    let finite = d.nonfinite_a == 0 && d.nonfinite_b == 0;
    let nan_unless = |v: f64| if finite { v } else { f64::NAN };
    let kld = if finite { row_kld(a, b, d.max_a, d.max_b) } else { f64::NAN };
    RowMetrics {
        rel_l2: nan_unless(stats::rel_l2(d.dd, d.bb)),
        cosine: nan_unless(stats::cosine(d.aa, d.bb, d.ab)),
        nmse: nan_unless(stats::nmse(d.dd, d.bb)),
        max_abs: nan_unless(d.max_abs),
        kld,
        dd: d.dd,
        bb: d.bb,
        nonfinite_a: d.nonfinite_a,
        nonfinite_b: d.nonfinite_b,
        top_a,
        top_b,
    }
}

/// The top-k at one position from either side: computed from logits, or given by a
/// top-k-only dump (`top_ids`, optional `top_probs`). Fixed size: no allocation per row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankedIds {
    /// Descending; the first `len` are valid (at most [`TOP_K`] are kept).
    ids: [u32; TOP_K],
    len: usize,
    /// `logit(top-1) − logit(top-i)` for each kept id (0 for the first; infinite where not
    /// known), when the margin is known: from logits, or `ln p₁ − ln pᵢ` from probabilities
    /// (softmax keeps logit differences).
    gaps: Option<[f64; TOP_K]>,
}

impl RankedIds {
    /// The first [`TOP_K`] of `ids` (descending) with the reference margin, if known, and
    /// no gaps below the second.
    pub fn new(ids: &[u32], margin: Option<f64>) -> RankedIds {
        let len = ids.len().min(TOP_K);
        let gaps = margin.map(|m| {
            let mut g = [f64::INFINITY; TOP_K];
            (g[0], g[1]) = (0.0, m);
            g
        });
        let mut r = RankedIds { ids: [0; TOP_K], len, gaps };
        r.ids[..len].copy_from_slice(&ids[..len]);
        r
    }
    /// The first [`TOP_K`] of `ids` (descending) with each one's gap to the first (no margin,
    /// and so no gaps, below two).
    pub fn with_gaps(ids: &[u32], gaps: &[f64]) -> RankedIds {
        let mut r = RankedIds::new(ids, None);
        let n = r.len.min(gaps.len());
        if n >= 2 {
            let mut g = [f64::INFINITY; TOP_K];
            g[..n].copy_from_slice(&gaps[..n]);
            r.gaps = Some(g);
        }
        r
    }
    pub fn from_topk(t: &TopK) -> RankedIds {
        let mut gaps = [0.0; TOP_K];
        for (g, v) in gaps.iter_mut().zip(&t.vals[..t.len]) {
            *g = f64::from(t.vals[0]) - f64::from(*v);
        }
        RankedIds::with_gaps(t.ids(), &gaps[..t.len])
    }
    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.len]
    }
    pub fn top1(&self) -> Option<u32> {
        self.ids().first().copied()
    }
    /// `logit(top-1) − logit(top-2)`, when known.
    pub fn margin(&self) -> Option<f64> {
        self.gaps.map(|g| g[1])
    }
    /// Whether `id` is tied with this ranking's top-1: within `threshold` of it, among the
    /// kept ids (an unknown gap is infinite: never a tie).
    fn tied_with_top1(&self, id: u32, threshold: f64) -> bool {
        match self.ids().iter().position(|&x| x == id) {
            Some(0) => true,
            Some(r) => self.gaps.is_some_and(|g| g[r] <= threshold),
            None => false,
        }
    }
}

/// Top-k agreement at one position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TopkAgreement {
    pub top1: bool,
    /// `None` when the reference's margin is unknown.
    pub top1_margin_aware: Option<bool>,
    /// `None` when either side has fewer than 5 ids.
    pub top5_overlap: Option<f64>,
    /// `None` when either side has fewer than 10 ids.
    pub top10_overlap: Option<f64>,
}

/// Compares the engine's ranking `a` with the reference's `b`. Margin-aware top-1: where the
/// reference's top-1/top-2 margin exceeds `tie_threshold` the top-1 must match; elsewhere
/// (a tie) the engine's top-1 must be one of the tokens tied with the reference's top-1, those
/// within `tie_threshold` of it in the reference's own logits: its top-2, and any below
/// that are as close (a three- or five-way near-tie has as many right answers).
pub fn topk_agreement(a: &RankedIds, b: &RankedIds, tie_threshold: f64) -> TopkAgreement {
    let top1 = matches!((a.top1(), b.top1()), (Some(x), Some(y)) if x == y);
    let top1_margin_aware = match (b.margin(), a.top1()) {
        (Some(m), Some(_)) if m > tie_threshold => Some(top1),
        (Some(_), Some(x)) => Some(b.tied_with_top1(x, tie_threshold)),
        (Some(_), None) => Some(false),
        (None, _) => None,
    };
    TopkAgreement {
        top1,
        top1_margin_aware,
        top5_overlap: overlap(a.ids(), b.ids(), 5),
        top10_overlap: overlap(a.ids(), b.ids(), 10),
    }
}

/// `|top_k(a) ∩ top_k(b)| / k`, or `None` when either side has fewer than `k` ids.
pub fn overlap(a: &[u32], b: &[u32], k: usize) -> Option<f64> {
    if a.len() < k || b.len() < k {
        return None;
    }
    let common = a[..k].iter().filter(|x| b[..k].contains(x)).count();
    Some(common as f64 / k as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random row (xorshift), values in about [-8, 8].
    fn row(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 16.0 - 8.0) as f32
            })
            .collect()
    }

    /// Neumaier-compensated sum: the accurate reference the kernels are checked against.
    fn exact_sum(xs: impl Iterator<Item = f64>) -> f64 {
        let (mut s, mut c) = (0.0f64, 0.0f64);
        for x in xs {
            let t = s + x;
            c += if s.abs() >= x.abs() { (s - t) + x } else { (x - t) + s };
            s = t;
        }
        s + c
    }

    /// `Σ p_i (log p_i − log q_i)` straight from the definition, libm exp/ln, compensated sums.
    fn naive_kld(a: &[f32], b: &[f32]) -> f64 {
        let lse = |x: &[f32]| {
            let m = x.iter().map(|&v| f64::from(v)).fold(f64::NEG_INFINITY, f64::max);
            m + exact_sum(x.iter().map(|&v| (f64::from(v) - m).exp())).ln()
        };
        let (la, lb) = (lse(a), lse(b));
        exact_sum(a.iter().zip(b).map(|(&x, &y)| {
            let lp = f64::from(y) - lb;
            let lq = f64::from(x) - la;
            lp.exp() * (lp - lq)
        }))
    }

    #[test]
    fn row_diff_matches_f64_formulas() {
        for n in [1usize, 7, 8, 9, 1000, 4099] {
            let a = row(1, n);
            let b = row(2, n);
            let d = row_diff(&a, &b);
            let f = |x: f32| f64::from(x);
            let dd: f64 = a.iter().zip(&b).map(|(&x, &y)| (f(x) - f(y)).powi(2)).sum();
            let aa: f64 = a.iter().map(|&x| f(x) * f(x)).sum();
            let bb: f64 = b.iter().map(|&y| f(y) * f(y)).sum();
            let ab: f64 = a.iter().zip(&b).map(|(&x, &y)| f(x) * f(y)).sum();
            let mx = a.iter().zip(&b).map(|(&x, &y)| (f(x) - f(y)).abs()).fold(0.0, f64::max);
            assert!((d.dd - dd).abs() <= 1e-12 * dd, "n={n}");
            assert!((d.aa - aa).abs() <= 1e-12 * aa);
            assert!((d.bb - bb).abs() <= 1e-12 * bb);
            assert!((d.ab - ab).abs() <= 1e-12 * aa.max(bb));
            assert_eq!(d.max_abs, mx);
            assert_eq!(d.max_a, a.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            assert_eq!(d.max_b, b.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            assert_eq!((d.nonfinite_a, d.nonfinite_b), (0, 0));
            let m = row_metrics(&a, &b);
            assert!((m.rel_l2 - (dd / bb).sqrt()).abs() <= 1e-12 * m.rel_l2);
            assert!((m.cosine - ab / (aa.sqrt() * bb.sqrt())).abs() <= 1e-12);
            assert!((m.nmse - dd / bb).abs() <= 1e-12 * m.nmse);
        }
    }

    /// A row pair for the path tests: `b` = `a` + noise, and a few tokens where the engine is
    /// far above the reference (the `δ > EXPM1_MAX` lanes of the KLD kernel).
    fn path_pair(n: usize) -> (Vec<f32>, Vec<f32>) {
        let a = row(20, n);
        let mut b: Vec<f32> = row(21, n).iter().zip(&a).map(|(e, x)| x + 0.1 * e).collect();
        for i in (3..n).step_by(97) {
            b[i] = a[i] - 50.0;
        }
        (a, b)
    }

    #[test]
    fn simd_and_generic_paths_give_the_same_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            for n in [5usize, 1000, 1003, 4099, 151_936] {
                let (a, b) = path_pair(n);
                let g = row_diff_body(&a, &b);
                // SAFETY: AVX2 is present (checked above).
                let v = unsafe { row_diff_avx2(&a, &b) };
                assert_eq!(g, v);
                let gs = row_scan_body(&a, &b);
                // SAFETY: AVX2 is present (checked above).
                assert_eq!(gs, unsafe { row_scan_avx2(&a, &b) });
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F is present (checked above).
                    assert_eq!(gs, unsafe { row_scan_avx512(&a, &b) });
                }
                if std::arch::is_x86_feature_detected!("fma") {
                    let gk = row_kld_body(&a, &b, g.max_a, g.max_b);
                    // SAFETY: AVX2 and FMA are present (checked above).
                    let vk = unsafe { row_kld_avx2(&a, &b, g.max_a, g.max_b) };
                    assert_eq!(gk.to_bits(), vk.to_bits(), "avx2 n={n}");
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: AVX-512F and FMA are present (checked above).
                        let wk = unsafe { avx512::row_kld(&a, &b, g.max_a, g.max_b) };
                        assert_eq!(gk.to_bits(), wk.to_bits(), "avx512 n={n}");
                        let (a16, b16): (Vec<f16>, Vec<f16>) = (
                            a.iter().map(|&x| f16::from_f32(x)).collect(),
                            b.iter().map(|&x| f16::from_f32(x)).collect(),
                        );
                        let d16 = row_diff_body(&a16, &b16);
                        // SAFETY: AVX-512F and FMA are present (checked above).
                        let wk16 = unsafe { avx512::row_kld(&a16, &b16, d16.max_a, d16.max_b) };
                        assert_eq!(row_kld_body(&a16, &b16, d16.max_a, d16.max_b).to_bits(), wk16.to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn the_fused_scan_gives_the_bits_of_the_separate_passes() {
        for n in [1usize, 7, 16, 17, 511, 512, 513, 4099, 151_936] {
            let (mut a, b) = path_pair(n);
            // compared through Debug, which prints NaN sums as NaN (== would call them different)
            let same = |x: (RowDiff, TopK, TopK), y: (RowDiff, TopK, TopK)| format!("{x:?}") == format!("{y:?}");
            assert!(same(row_scan(&a, &b), (row_diff(&a, &b), top_k(&a), top_k(&b))), "n={n}");
            let (a16, b16): (Vec<f16>, Vec<f16>) =
                (a.iter().map(|&x| f16::from_f32(x)).collect(), b.iter().map(|&x| f16::from_f32(x)).collect());
            assert!(same(row_scan(&a16, &b16), (row_diff(&a16, &b16), top_k(&a16), top_k(&b16))), "f16 n={n}");
            a[n / 2] = f32::NAN;
            a[n - 1] = f32::INFINITY;
            assert!(same(row_scan(&a, &b), (row_diff(&a, &b), top_k(&a), top_k(&b))), "non-finite n={n}");
            let m = row_metrics(&a, &b);
            assert_eq!((m.top_a, m.top_b), (top_k(&a), top_k(&b)));
        }
    }

    #[test]
    fn half_rows_give_the_bits_of_their_f32_values() {
        // rows stored as f16/bf16 are widened block by block inside the kernels: the metrics
        // must be those of the same values stored as f32, bit for bit, also for mixed pairs
        for n in [5usize, 513, 151_936] {
            let a = row(30, n);
            let b: Vec<f32> = row(31, n).iter().zip(&a).map(|(e, x)| x + 0.1 * e).collect();
            let (a16, b16): (Vec<f16>, Vec<f16>) =
                (a.iter().map(|&x| f16::from_f32(x)).collect(), b.iter().map(|&x| f16::from_f32(x)).collect());
            let (a16w, b16w): (Vec<f32>, Vec<f32>) =
                (a16.iter().map(|x| x.to_f32()).collect(), b16.iter().map(|x| x.to_f32()).collect());
            assert_eq!(row_metrics(&a16, &b16), row_metrics(&a16w, &b16w), "f16/f16 n={n}");
            assert_eq!(row_metrics(&a, &b16), row_metrics(&a, &b16w), "f32/f16 n={n}");
            assert_eq!(row_metrics(&a16, &b), row_metrics(&a16w, &b), "f16/f32 n={n}");
            let bb: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
            let bbw: Vec<f32> = bb.iter().map(|x| x.to_f32()).collect();
            assert_eq!(row_metrics(&a, &bb), row_metrics(&a, &bbw), "f32/bf16 n={n}");
            assert_eq!(top_k(&a16), top_k(&a16w), "top_k f16 n={n}");
        }
    }

    #[test]
    fn identical_rows_give_exact_zeros() {
        let a = row(3, 151_936);
        let m = row_metrics(&a, &a);
        assert_eq!((m.rel_l2, m.nmse, m.max_abs, m.kld, m.cosine), (0.0, 0.0, 0.0, 0.0, 1.0));
        assert_eq!(m.top_a, m.top_b);
    }

    #[test]
    fn kld_by_hand() {
        // p = softmax([0, ln 3]) = [1/4, 3/4]; q = softmax([0, 0]) = [1/2, 1/2]
        // KL(p‖q) = 1/4·ln(1/2) + 3/4·ln(3/2)
        let b = [0.0f32, 3.0f32.ln()];
        let a = [0.0f32, 0.0];
        let want = 0.25 * (0.5f64).ln() + 0.75 * (1.5f64).ln();
        // the f32 ln 3 is rounded: recompute the exact expectation with it
        let l3 = f64::from(3.0f32.ln());
        let p1 = l3.exp() / (1.0 + l3.exp());
        let exact = (1.0 - p1) * ((1.0 - p1) / 0.5).ln() + p1 * (p1 / 0.5).ln();
        let got = row_metrics(&a, &b).kld;
        assert!((got - exact).abs() < 1e-15, "{got} vs {exact}");
        assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        // KL is not symmetric: the reference is b
        let rev = row_metrics(&b, &a).kld;
        assert!((rev - (0.5 * (0.5 / (1.0 - p1)).ln() + 0.5 * (0.5 / p1).ln())).abs() < 1e-15);
        // a constant shift of the engine's logits changes nothing
        let shifted: Vec<f32> = b.iter().map(|x| x + 5.0).collect();
        assert!(row_metrics(&shifted, &b).kld.abs() < 1e-15);
    }

    #[test]
    fn kld_matches_the_direct_formula() {
        for (n, scale) in [(10usize, 1.0f32), (5000, 1.0), (151_936, 0.01), (151_936, 2.0)] {
            let b = row(4, n);
            let noise = row(5, n);
            let a: Vec<f32> = b.iter().zip(&noise).map(|(&y, &e)| y + scale * e).collect();
            let got = row_metrics(&a, &b).kld;
            let want = naive_kld(&a, &b);
            assert!((got - want).abs() <= 1e-12 * want.max(1e-3), "n={n} scale={scale}: {got:e} vs {want:e}");
            assert!(got > 0.0);
        }
    }

    /// `KL(softmax b ‖ softmax a)` from the identity `KL = log E_p[e^δ] − E_p[δ]`,
    /// `δ = (a − b) − (max a − max b)`, with libm's `exp`, `expm1`, `ln_1p` and compensated
    /// sums: an independent evaluation (other exponentials, other summation) that keeps the
    /// resolution of tiny divergences.
    fn exact_kld(a: &[f32], b: &[f32]) -> f64 {
        let max = |x: &[f32]| x.iter().map(|&v| f64::from(v)).fold(f64::NEG_INFINITY, f64::max);
        let (ma, mb) = (max(a), max(b));
        let e: Vec<f64> = b.iter().map(|&y| (f64::from(y) - mb).exp()).collect();
        let dl: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)) - (ma - mb)).collect();
        let z = exact_sum(e.iter().copied());
        // e·expm1(δ) = e^(a − max a) − e: the product where e may have underflowed (δ large) is
        // replaced by the difference, which does not cancel there
        let d = exact_sum(
            a.iter()
                .zip(e.iter().zip(&dl))
                .map(|(&x, (e, d))| if *d > 30.0 { (f64::from(x) - ma).exp() - e } else { e * d.exp_m1() }),
        );
        let m = exact_sum(e.iter().zip(&dl).map(|(e, d)| e * d));
        (d / z).ln_1p() - m / z
    }

    #[test]
    fn kld_keeps_its_resolution_at_tiny_divergences() {
        // b on a grid of 2^-10 in (−8, 8), a = b + ε on every third token (exact in f32 for
        // ε = 2^-20): q ∝ p·e^(ε·1_S), so KL = ln(1 + P·expm1(ε)) − P·ε with P = p(S), about
        // P(1−P)ε²/2 ≈ 1e-13. The textbook Σ p (b − a) − LSE_b + LSE_a loses ~1e-15 to the
        // cancellation of the log-sum-exps (2 % here, with libm and compensated sums); this
        // kernel agrees to 1e-10 and must to 1e-6.
        let n = 151_936;
        let b: Vec<f32> = row(40, n).iter().map(|&x| (x * 1024.0).round() / 1024.0).collect();
        for eps in [2f32.powi(-20), 2f32.powi(-17), 2f32.powi(-12)] {
            let a: Vec<f32> = b.iter().enumerate().map(|(i, &y)| if i % 3 == 0 { y + eps } else { y }).collect();
            assert!(
                a.iter()
                    .zip(&b)
                    .enumerate()
                    .all(|(i, (&x, &y))| f64::from(x) - f64::from(y) == if i % 3 == 0 { f64::from(eps) } else { 0.0 })
            );
            let mb = b.iter().map(|&v| f64::from(v)).fold(f64::NEG_INFINITY, f64::max);
            let z = exact_sum(b.iter().map(|&y| (f64::from(y) - mb).exp()));
            let zs = exact_sum(b.iter().step_by(3).map(|&y| (f64::from(y) - mb).exp()));
            let (p, e) = (zs / z, f64::from(eps));
            let want = (p * e.exp_m1()).ln_1p() - p * e;
            let got = row_metrics(&a, &b).kld;
            assert!(((got - want) / want).abs() < 1e-6, "ε = {eps:e}: {got:e} vs {want:e}");
            assert!(((exact_kld(&a, &b) - want) / want).abs() < 1e-6, "the reference itself");
        }
    }

    #[test]
    fn kld_of_two_dumps_differing_by_tiny_noise_matches_the_exact_reference() {
        // two f32 references that differ by a few ulp per logit: KLD ≈ 1e-10 (scale 4e-6) and
        // ≈ 1e-12 (scale 4e-7, mostly one-ulp differences). The textbook formula, even with
        // libm and compensated sums, is 1e-5 and 3e-4 off here; this kernel ~1e-10.
        for scale in [4e-6f32, 4e-7] {
            let b = row(41, 151_936);
            let a: Vec<f32> =
                b.iter().zip(row(42, 151_936)).map(|(&y, e)| y + scale * e / 8.0 * y.abs().max(1.0)).collect();
            let (got, want) = (row_metrics(&a, &b).kld, exact_kld(&a, &b));
            assert!(want > 0.0 && want < 1e-9, "scale {scale:e}: {want:e}");
            assert!(((got - want) / want).abs() < 1e-6, "scale {scale:e}: {got:e} vs {want:e}");
        }
    }

    #[test]
    fn kld_where_the_engine_puts_mass_the_reference_has_not() {
        // reference logits 60 below the engine's on some tokens: δ > EXPM1_MAX, where the
        // kernel takes the difference of the two exponentials; and a reference token so low
        // (−800) that its probability underflows to 0 in f64
        let b = row(43, 5000);
        let mut a = b.clone();
        let mut b2 = b.clone();
        for i in (0..5000).step_by(50) {
            b2[i] = b[i] - 60.0;
            a[i] = b[i] + 0.5;
        }
        b2[7] = -800.0;
        let (got, want) = (row_metrics(&a, &b2).kld, naive_kld(&a, &b2));
        assert!(((got - want) / want).abs() < 1e-12, "{got:e} vs {want:e}");
        assert!(((got - exact_kld(&a, &b2)) / want).abs() < 1e-12);
    }

    #[test]
    fn nonfinite_rows_are_counted_and_nan() {
        let mut a = row(6, 100);
        let b = row(7, 100);
        a[17] = f32::NAN;
        a[40] = f32::INFINITY;
        let m = row_metrics(&a, &b);
        assert_eq!((m.nonfinite_a, m.nonfinite_b), (2, 0));
        assert!(m.rel_l2.is_nan() && m.cosine.is_nan() && m.kld.is_nan() && m.max_abs.is_nan() && m.nmse.is_nan());
        assert!(!m.top_a.ids().contains(&17));
        assert_eq!(m.top_a.ids[0], 40); // +inf is the largest value
        let m = row_metrics(&b, &a);
        assert_eq!((m.nonfinite_a, m.nonfinite_b), (0, 2));
    }

    #[test]
    fn top_k_matches_a_sort() {
        for (seed, n) in [(8u64, 3usize), (9, 10), (10, 11), (11, 151_936), (12, 33)] {
            let mut r = row(seed, n);
            // quantise so that ties occur
            for x in &mut r {
                *x = (*x * 2.0).round();
            }
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|&i, &j| r[j].total_cmp(&r[i]).then(i.cmp(&j)));
            let want: Vec<u32> = idx.iter().take(TOP_K).map(|&i| i as u32).collect();
            let t = top_k(&r);
            assert_eq!(t.ids(), &want[..], "seed {seed} n {n}");
            assert_eq!(t.len, n.min(TOP_K));
        }
    }

    #[test]
    fn agreement_rules() {
        let r = RankedIds::new;
        let reference = r(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], Some(0.5));
        let same = topk_agreement(&reference, &reference, 1e-3);
        assert_eq!(
            same,
            TopkAgreement {
                top1: true,
                top1_margin_aware: Some(true),
                top5_overlap: Some(1.0),
                top10_overlap: Some(1.0)
            }
        );
        let swapped = r(&[2, 1, 3, 4, 50, 6, 7, 8, 9, 10], None);
        let g = topk_agreement(&swapped, &reference, 1e-3);
        assert_eq!(
            g,
            TopkAgreement {
                top1: false,
                top1_margin_aware: Some(false),
                top5_overlap: Some(0.8),
                top10_overlap: Some(0.9)
            }
        );
        // a near tie in the reference: the engine's token in the reference's top-2 is enough
        let tie = r(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], Some(1e-4));
        assert_eq!(topk_agreement(&swapped, &tie, 1e-3).top1_margin_aware, Some(true));
        let third = r(&[3, 1, 2], None);
        assert_eq!(topk_agreement(&third, &tie, 1e-3).top1_margin_aware, Some(false));
        // a three-way near-tie (gaps known): the third is right too, the fourth is not
        let gaps = [0.0, 2e-4, 6e-4, 2e-3, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0];
        let three_way = RankedIds::with_gaps(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &gaps);
        assert_eq!(three_way.margin(), Some(2e-4));
        assert_eq!(topk_agreement(&third, &three_way, 1e-3).top1_margin_aware, Some(true));
        let fourth = r(&[4, 1, 2], None);
        assert_eq!(topk_agreement(&fourth, &three_way, 1e-3).top1_margin_aware, Some(false));
        // no tie at all: only the top-1, however close the third is to the second
        let clear = RankedIds::with_gaps(&[1, 2, 3], &[0.0, 0.5, 0.5001]);
        assert_eq!(topk_agreement(&third, &clear, 1e-3).top1_margin_aware, Some(false));
        assert_eq!(topk_agreement(&swapped, &clear, 1e-3).top1_margin_aware, Some(false));
        // from logits: the gaps are the reference's logit differences
        let t = top_k(&[0.0f32, 5.0, 4.9995, 4.9991, 1.0]);
        let ranked = RankedIds::from_topk(&t);
        assert_eq!(ranked.ids()[..3], [1, 2, 3]);
        let engine = r(&[3, 1], None);
        assert_eq!(topk_agreement(&engine, &ranked, 1e-3).top1_margin_aware, Some(true));
        assert_eq!(topk_agreement(&engine, &ranked, 5e-4).top1_margin_aware, Some(false));
        // short lists: overlaps absent, unknown margin: margin-aware absent
        let short = r(&[1, 2, 3], None);
        let g = topk_agreement(&reference, &short, 1e-3);
        assert_eq!(g, TopkAgreement { top1: true, top1_margin_aware: None, top5_overlap: None, top10_overlap: None });
    }
}
