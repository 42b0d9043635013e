//! Reductions of metric samples: mean, extremes, nearest-rank percentiles, the Wilson lower
//! bound of a rate.
//!
//! Every reduction runs sequentially over a slice in index order with f64 accumulators, so
//! the same samples give bit-identical results however they were computed. A non-finite
//! sample makes every statistic of its slice NaN: a NaN must fail a gate, never vanish into a
//! `max` that skips it.

/// z of the two-sided 95 % interval used for the Wilson bound.
pub const WILSON_Z: f64 = 1.96;

/// Arithmetic mean, summed in index order. `None` for no samples; NaN when any sample is
/// non-finite.
pub fn mean(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    if has_nonfinite(xs) {
        return Some(f64::NAN);
    }
    let mut sum = 0.0f64;
    for &x in xs {
        sum += x;
    }
    Some(sum / xs.len() as f64)
}

/// Smallest sample; NaN when any sample is non-finite.
pub fn min(xs: &[f64]) -> Option<f64> {
    extreme(xs, f64::min)
}

/// Largest sample; NaN when any sample is non-finite.
pub fn max(xs: &[f64]) -> Option<f64> {
    extreme(xs, f64::max)
}

fn extreme(xs: &[f64], pick: fn(f64, f64) -> f64) -> Option<f64> {
    let (&first, rest) = xs.split_first()?;
    if has_nonfinite(xs) {
        return Some(f64::NAN);
    }
    Some(rest.iter().fold(first, |m, &x| pick(m, x)))
}

/// Whether any sample is NaN or infinite.
pub fn has_nonfinite(xs: &[f64]) -> bool {
    xs.iter().any(|x| !x.is_finite())
}

/// The nearest-rank percentile of samples sorted ascending.
///
/// Definition: for `n` samples and `0 < p ≤ 100`, the value of rank `⌈p·n/100⌉` (1-based)
/// in ascending order; `p = 0` gives the minimum. `p` is resolved to 0.01 (it is rounded to
/// basis points and the rank computed in integers, so `p = 99` of 100 samples is exactly the
/// 99th value, never the 100th through a rounding of 0.99·100). The median is `p = 50`: for
/// an even count that is the lower of the two middle values, never an average, so every
/// percentile is one of the samples.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len() as u64;
    if n == 0 || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let bp = (p * 100.0).round() as u64; // basis points, 0..=10_000
    let rank = (bp * n).div_ceil(10_000).max(1); // 1-based
    Some(sorted[(rank - 1) as usize])
}

/// Mean, median, p99 and max of a sample vector (the KLD report of llama.cpp's
/// `--kl-divergence`, with nearest-rank percentiles). NaN throughout when any sample is
/// non-finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distribution {
    pub mean: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn distribution(xs: &[f64]) -> Option<Distribution> {
    if xs.is_empty() {
        return None;
    }
    if has_nonfinite(xs) {
        let nan = f64::NAN;
        return Some(Distribution { mean: nan, median: nan, p99: nan, max: nan });
    }
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Distribution {
        mean: mean(xs)?,
        median: percentile_sorted(&sorted, 50.0)?,
        p99: percentile_sorted(&sorted, 99.0)?,
        max: *sorted.last()?,
    })
}

/// Lower bound of the Wilson score interval for `hits` successes in `n` trials at `z`:
/// `(p̂ + z²/2n − z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)`. `None` for `n = 0`.
pub fn wilson_lower(hits: u64, n: u64, z: f64) -> Option<f64> {
    if n == 0 || hits > n {
        return None;
    }
    let n = n as f64;
    let p = hits as f64 / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some(((centre - spread) / (1.0 + z2 / n)).max(0.0))
}

/// Whether a value exceeds a threshold, a NaN value always exceeding (a NaN must flag).
pub fn exceeds(value: f64, threshold: f64) -> bool {
    value.is_nan() || value > threshold
}

/// `‖a−b‖ / ‖b‖` from the sums `Σ(a−b)²` and `Σb²`: 0 when both are 0, +∞ when only the
/// reference is 0.
pub fn rel_l2(dd: f64, bb: f64) -> f64 {
    if bb == 0.0 { if dd == 0.0 { 0.0 } else { f64::INFINITY } } else { (dd / bb).sqrt() }
}

/// `Σ(a−b)² / Σb²` (normalised MSE, as llama.cpp's `test-backend-ops` uses it): 0 when both
/// are 0, +∞ when only the reference is 0.
pub fn nmse(dd: f64, bb: f64) -> f64 {
    if bb == 0.0 { if dd == 0.0 { 0.0 } else { f64::INFINITY } } else { dd / bb }
}

/// `a·b / (‖a‖‖b‖)` from `Σa²`, `Σb²`, `Σab`: 1 when both vectors are zero, 0 when one is.
/// Computed as `ab / √(aa·bb)`, which is exactly 1 for identical vectors (IEEE: `√(x²) = x`).
pub fn cosine(aa: f64, bb: f64, ab: f64) -> f64 {
    if aa == 0.0 && bb == 0.0 {
        1.0
    } else if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa * bb).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_sorted(&xs, 99.0), Some(99.0));
        assert_eq!(percentile_sorted(&xs, 50.0), Some(50.0));
        assert_eq!(percentile_sorted(&xs, 100.0), Some(100.0));
        assert_eq!(percentile_sorted(&xs, 0.0), Some(1.0));
        assert_eq!(percentile_sorted(&xs, 99.9), Some(100.0));
        assert_eq!(percentile_sorted(&xs, 0.5), Some(1.0));
        assert_eq!(percentile_sorted(&xs, 1.01), Some(2.0));
        // 1000 samples: p99.9 is the 999th value (0.999·1000 = 999 exactly, not 1000)
        let ys: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile_sorted(&ys, 99.9), Some(999.0));
        // even count: the median is the lower middle value
        assert_eq!(percentile_sorted(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.0));
        assert_eq!(percentile_sorted(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        // few samples: p99 is the max
        assert_eq!(percentile_sorted(&[3.0, 7.0], 99.0), Some(7.0));
        assert_eq!(percentile_sorted(&[], 50.0), None);
        assert_eq!(percentile_sorted(&[1.0], 101.0), None);
    }

    #[test]
    fn distribution_of_samples() {
        let d = distribution(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(d, Distribution { mean: 2.5, median: 2.0, p99: 4.0, max: 4.0 });
        let d = distribution(&[1.0, f64::NAN]).unwrap();
        assert!(d.mean.is_nan() && d.median.is_nan() && d.p99.is_nan() && d.max.is_nan());
        assert!(distribution(&[]).is_none());
    }

    #[test]
    fn extremes_and_mean_do_not_skip_nan() {
        assert_eq!(max(&[1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(min(&[1.0, 3.0, -2.0]), Some(-2.0));
        assert_eq!(mean(&[1.0, 2.0]), Some(1.5));
        assert!(max(&[1.0, f64::NAN]).unwrap().is_nan());
        assert!(min(&[f64::INFINITY, 1.0]).unwrap().is_nan());
        assert!(mean(&[f64::NAN]).unwrap().is_nan());
        assert_eq!(mean(&[]), None);
    }

    #[test]
    fn wilson_known_values() {
        // 50/100: the textbook 95 % interval is [0.4038, 0.5962] (0.40382983 to 8 digits)
        let lo = wilson_lower(50, 100, WILSON_Z).unwrap();
        assert!((lo - 0.403_829_83).abs() < 1e-8, "{lo}");
        // n/n: the bound is n / (n + z²)
        let lo = wilson_lower(10, 10, WILSON_Z).unwrap();
        assert!((lo - 10.0 / (10.0 + WILSON_Z * WILSON_Z)).abs() < 1e-15, "{lo}");
        // 95/100 at 95 %: [0.8882, 0.9785] (0.88824803 to 8 digits)
        let lo = wilson_lower(95, 100, WILSON_Z).unwrap();
        assert!((lo - 0.888_248_03).abs() < 1e-8, "{lo}");
        assert_eq!(wilson_lower(0, 20, WILSON_Z), Some(0.0));
        assert_eq!(wilson_lower(0, 0, WILSON_Z), None);
        assert_eq!(wilson_lower(3, 2, WILSON_Z), None);
    }

    #[test]
    fn vector_metrics_edge_cases() {
        assert_eq!(rel_l2(0.0, 0.0), 0.0);
        assert_eq!(rel_l2(1.0, 0.0), f64::INFINITY);
        assert_eq!(rel_l2(4.0, 16.0), 0.5);
        assert_eq!(nmse(4.0, 16.0), 0.25);
        assert_eq!(cosine(0.0, 0.0, 0.0), 1.0);
        assert_eq!(cosine(1.0, 0.0, 0.0), 0.0);
        assert_eq!(cosine(4.0, 9.0, -6.0), -1.0);
        for x in [0.1f64, 3.7, 12345.678, 1e-30, 7.0e20] {
            assert_eq!(cosine(x, x, x), 1.0, "{x}");
        }
    }
}
