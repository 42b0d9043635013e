//! Per-position logit metrics: the row kernels and their application to a prompt.
//!
//! A row is one scored position's logits, `V` values (151,936 for Qwen). The kernels are
//! free functions over `&[f32]` slices straight from the memory map, so they can be measured
//! alone (a criterion bench) and never allocate:
//! - [`row_diff`]: one pass for `Σ(a−b)²`, `Σa²`, `Σb²`, `Σab`, `max|a−b|`, both maxima and
//!   the non-finite counts;
//! - [`row_kld`]: one pass for both log-sum-exps and `KL(ref ‖ engine)`;
//! - [`top_k`]: one pass for the `K` largest values and their ids.
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

use super::stats;

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
    /// half's slice conversion: F16C eight at a time where the CPU has it.
    #[inline(always)]
    fn widen<'a>(src: &'a [f16], buf: &'a mut [f32; BLOCK]) -> &'a [f32] {
        let out = &mut buf[..src.len()];
        src.convert_to_f32_slice(out);
        out
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
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
        let (ba, bb) = (A::widen(ca, &mut buf_a), B::widen(cb, &mut buf_b));
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
    let mut k = DiffLanes {
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
    };
    run_lanes(&mut k, a, b);
    RowDiff {
        dd: fold_sum(&k.tot[0]),
        aa: fold_sum(&k.tot[1]),
        bb: fold_sum(&k.tot[2]),
        ab: fold_sum(&k.tot[3]),
        max_abs: k.mx.iter().copied().fold(0.0, f64::max),
        max_a: k.ma.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        max_b: k.mb.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        nonfinite_a: k.na.iter().sum(),
        nonfinite_b: k.nb.iter().sum(),
    }
}

/// Lane state of [`row_kld`].
struct KldLanes {
    ma: f64,
    mb: f64,
    za: [f64; LANES],
    zb: [f64; LANES],
    s: [f64; LANES],
    tot: [[f64; LANES]; 3],
}

impl LaneKernel for KldLanes {
    #[inline(always)]
    fn step(&mut self, j: usize, x: f32, y: f32) {
        let (xd, yd) = (f64::from(x), f64::from(y));
        let ea = exp_nonpositive(xd - self.ma);
        let eb = exp_nonpositive(yd - self.mb);
        self.za[j] += ea;
        self.zb[j] += eb;
        self.s[j] += eb * (yd - xd);
    }
    #[inline(always)]
    fn flush(&mut self) {
        let [za, zb, s] = &mut self.tot;
        drain(za, &mut self.za);
        drain(zb, &mut self.zb);
        drain(s, &mut self.s);
    }
}

/// `KL(p ‖ q)` with `p = softmax(b)` (the reference) and `q = softmax(a)` (the engine),
/// from one pass over both rows, in f64.
///
/// With `Z_x = Σ exp(x_i − max x)` and `LSE_x = max x + ln Z_x`:
/// `KL = Σ p_i (b_i − a_i) − LSE_b + LSE_a = S / Z_b + (max a − max b) + (ln Z_a − ln Z_b)`
/// where `S = Σ exp(b_i − max b)(b_i − a_i)`. Identical rows give exactly 0; differences
/// of rounding size may give a rounding-size negative number, which is reported as it is.
/// `max_a` / `max_b` are the rows' maxima ([`row_diff`]); the rows must be finite (a row
/// with a non-finite value has no KLD: the caller reports NaN).
pub fn row_kld<A: Logit, B: Logit>(a: &[A], b: &[B], max_a: f32, max_b: f32) -> f64 {
    assert_eq!(a.len(), b.len(), "row_kld on rows of different lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
        return unsafe { row_kld_avx512(a, b, max_a, max_b) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { row_kld_avx2(a, b, max_a, max_b) };
    }
    row_kld_body(a, b, max_a, max_b)
}

/// [`row_kld`] compiled for AVX-512F: the eight lanes in one register and 32 registers, so
/// the exponential's constants stay in registers. Same operations and order: the same bits.
///
/// # Safety
/// The CPU must support AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn row_kld_avx512<A: Logit, B: Logit>(a: &[A], b: &[B], max_a: f32, max_b: f32) -> f64 {
    row_kld_body(a, b, max_a, max_b)
}

/// [`row_kld`] compiled for AVX2 and FMA: the same operations in the same order; the
/// exponential's `mul_add`s become one instruction each (elsewhere libm's correctly rounded
/// `fma`: the same bits, slower).
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
    let mut k = KldLanes { ma, mb, za: [0.0; LANES], zb: [0.0; LANES], s: [0.0; LANES], tot: [[0.0; LANES]; 3] };
    run_lanes(&mut k, a, b);
    let (za, zb, s) = (fold_sum(&k.tot[0]), fold_sum(&k.tot[1]), fold_sum(&k.tot[2]));
    s / zb + (ma - mb) + (za.ln() - zb.ln())
}

/// `exp(x)` for `x ≤ 0` in f64, branch-free so that a loop of it vectorises (the libm call
/// does not). Range reduction `x = k·ln2 + r`, `|r| ≤ ln2/2`, a degree-13 Taylor polynomial
/// for `exp(r)` (truncation below 1e-17), and `2^k` built from its bits. Within 2 ulp of
/// `f64::exp` over `[−708, 0]`; below −708 it returns 0 (those terms are below 1e-307 of
/// the largest term, which is 1).
#[inline(always)]
pub fn exp_nonpositive(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // ln 2 split as in fdlibm: the high part has 32 trailing zero bits, so k·LN2_HI is exact
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    const SHIFTER: f64 = 6_755_399_441_055_744.0; // 1.5·2^52: adding it rounds to an integer
    let underflow = x < -708.0;
    let x = if underflow { -708.0 } else { x };
    // every step a fused multiply-add (one rounding): half the instructions where the CPU
    // has FMA, and the same bits where it has not (libm's fma is correctly rounded)
    let t = x.mul_add(LOG2E, SHIFTER);
    let kf = t - SHIFTER;
    let k = (t.to_bits() as i64).wrapping_sub(SHIFTER.to_bits() as i64); // = kf as an integer
    let r = (-kf).mul_add(LN2_LO, (-kf).mul_add(LN2_HI, x));
    // Horner for Σ r^n/n!, n = 0..=13
    let mut p: f64 = 1.0 / 6_227_020_800.0;
    p = p.mul_add(r, 1.0 / 479_001_600.0);
    p = p.mul_add(r, 1.0 / 39_916_800.0);
    p = p.mul_add(r, 1.0 / 3_628_800.0);
    p = p.mul_add(r, 1.0 / 362_880.0);
    p = p.mul_add(r, 1.0 / 40_320.0);
    p = p.mul_add(r, 1.0 / 5_040.0);
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    let scale = f64::from_bits(((k + 1023) << 52) as u64);
    if underflow { 0.0 } else { p * scale }
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
    const CHUNK: usize = 16;
    const _: () = assert!(BLOCK % CHUNK == 0, "chunks must not straddle blocks");
    let mut t = TopK { ids: [0; TOP_K], vals: [f32::NEG_INFINITY; TOP_K], len: 0 };
    let mut thresh = f32::NEG_INFINITY;
    let mut buf = [0.0f32; BLOCK]; // [BLOCK] the current block as f32 (unused for f32 rows)
    for (blk, block) in row.chunks(BLOCK).enumerate() {
        let block = E::widen(block, &mut buf);
        for (c, chunk) in block.chunks(CHUNK).enumerate() {
            let full = t.len == TOP_K;
            if full && !chunk.iter().fold(false, |any, &x| any | (x > thresh)) {
                continue;
            }
            let base = blk * BLOCK + c * CHUNK;
            for (i, &x) in chunk.iter().enumerate() {
                let take = if t.len == TOP_K { x > thresh } else { !x.is_nan() };
                if take {
                    t.insert((base + i) as u32, x);
                    if t.len == TOP_K {
                        thresh = t.vals[TOP_K - 1];
                    }
                }
            }
        }
    }
    t
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
    let d = row_diff(a, b);
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
        top_a: top_k(a),
        top_b: top_k(b),
    }
}

/// The top-k at one position from either side: computed from logits, or given by a
/// top-k-only dump (`top_ids`, optional `top_probs`). Fixed size: no allocation per row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankedIds {
    /// Descending; the first `len` are valid (at most [`TOP_K`] are kept).
    ids: [u32; TOP_K],
    len: usize,
    /// `logit(top-1) − logit(top-2)`, when known: from logits, or `ln p₁ − ln p₂` from
    /// probabilities (softmax keeps logit differences).
    pub margin: Option<f64>,
}

impl RankedIds {
    /// The first [`TOP_K`] of `ids` (descending) with the reference margin, if known.
    pub fn new(ids: &[u32], margin: Option<f64>) -> RankedIds {
        let len = ids.len().min(TOP_K);
        let mut r = RankedIds { ids: [0; TOP_K], len, margin };
        r.ids[..len].copy_from_slice(&ids[..len]);
        r
    }
    pub fn from_topk(t: &TopK) -> RankedIds {
        let margin = (t.len >= 2).then(|| f64::from(t.vals[0]) - f64::from(t.vals[1]));
        RankedIds::new(t.ids(), margin)
    }
    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.len]
    }
    pub fn top1(&self) -> Option<u32> {
        self.ids().first().copied()
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
/// the engine's top-1 must be among the reference's top-2.
pub fn topk_agreement(a: &RankedIds, b: &RankedIds, tie_threshold: f64) -> TopkAgreement {
    let top1 = matches!((a.top1(), b.top1()), (Some(x), Some(y)) if x == y);
    let top1_margin_aware = match (b.margin, a.top1()) {
        (Some(m), Some(_)) if m > tie_threshold => Some(top1),
        (Some(_), Some(x)) => Some(b.ids().iter().take(2).any(|&y| y == x)),
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
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -708.0f64;
        while x <= 0.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        for x in [0.0, -1e-300, -1e-10, -0.346, -0.347, -std::f64::consts::LN_2 / 2.0, -700.5] {
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 4.5e-16, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-800.0), 0.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
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

    #[test]
    fn avx2_and_generic_paths_give_the_same_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            for n in [5usize, 1000, 151_936] {
                let a = row(20, n);
                let b: Vec<f32> = row(21, n).iter().zip(&a).map(|(e, x)| x + 0.1 * e).collect();
                let g = row_diff_body(&a, &b);
                // SAFETY: AVX2 is present (checked above).
                let v = unsafe { row_diff_avx2(&a, &b) };
                assert_eq!(g, v);
                if std::arch::is_x86_feature_detected!("fma") {
                    let gk = row_kld_body(&a, &b, g.max_a, g.max_b);
                    // SAFETY: AVX2 and FMA are present (checked above).
                    let vk = unsafe { row_kld_avx2(&a, &b, g.max_a, g.max_b) };
                    assert_eq!(gk.to_bits(), vk.to_bits());
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: AVX-512F and FMA are present (checked above).
                        let wk = unsafe { row_kld_avx512(&a, &b, g.max_a, g.max_b) };
                        assert_eq!(gk.to_bits(), wk.to_bits());
                    }
                }
            }
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
        // short lists: overlaps absent, unknown margin: margin-aware absent
        let short = r(&[1, 2, 3], None);
        let g = topk_agreement(&reference, &short, 1e-3);
        assert_eq!(g, TopkAgreement { top1: true, top1_margin_aware: None, top5_overlap: None, top10_overlap: None });
    }
}
