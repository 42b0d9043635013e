//! Judging metric samples against a contract's gates.
//!
//! The input is one [`Subject`] per (engine run × model × reference [× prompt]): the samples
//! of each metric (as the metrics module names them) and the noise floors stored with the
//! fixture. Each gate whose scope matches a subject gives one [`Verdict`]. Reductions run in
//! the samples' order with f64 accumulation, so the same samples always give the same
//! verdict. A NaN anywhere in the samples makes the observed value NaN, and NaN fails every
//! comparison; a gate with no samples, or a floor-relative gate with no floor, is
//! [`Outcome::Missing`] — never a pass.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Comparison, Contract, ContractRef, Gate, Metric, Reduction, Severity, Threshold};

/// The z of the Wilson score interval used by [`Reduction::WilsonLower`] (95 %, two-sided).
pub const WILSON_Z: f64 = 1.959_963_984_540_054;

/// What one engine run measured against one reference for one model (optionally one prompt).
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub engine: String,
    pub model: String,
    pub reference: String,
    /// Compute or weight dtype of the pair (`f32`, `f16`, `q8_0`, ...).
    pub dtype: Option<String>,
    /// `prefill` or `incremental`.
    pub mode: Option<String>,
    /// `None` when the samples pool every prompt.
    pub prompt: Option<String>,
    /// Samples of each metric, in a fixed order (prompt, then position).
    pub samples: BTreeMap<Metric, Vec<f64>>,
    /// The noise floor of each metric stored with the fixture.
    pub noise_floors: BTreeMap<Metric, f64>,
}

/// Whether a gate held for a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    /// No samples, or no noise floor for a floor-relative gate: not a pass.
    Missing,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Missing => "missing",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        [Outcome::Passed, Outcome::Failed, Outcome::Missing].into_iter().find(|o| o.as_str() == s)
    }
}

/// One gate judged on one subject.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub contract: ContractRef,
    pub gate_id: String,
    pub metric: Metric,
    pub reduction: Reduction,
    pub comparison: Comparison,
    /// The absolute threshold compared against (for a floor-relative gate: `k × floor`;
    /// NaN when the floor is missing).
    pub threshold: f64,
    /// The noise floor used, for floor-relative gates.
    pub floor: Option<f64>,
    /// The reduced samples; `None` when [`Outcome::Missing`].
    pub observed: Option<f64>,
    pub n_samples: usize,
    pub outcome: Outcome,
    pub severity: Severity,
    pub engine: String,
    pub model: String,
    pub reference: String,
    pub dtype: Option<String>,
    pub mode: Option<String>,
    pub prompt: Option<String>,
    /// Why it failed or is missing, when more can be said than the numbers.
    pub detail: Option<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Passed
    }

    /// True when this verdict fails the run (an error-severity gate that did not pass).
    pub fn blocks(&self) -> bool {
        self.severity == Severity::Error && !self.passed()
    }
}

/// Every verdict of one contract over a set of subjects.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub verdicts: Vec<Verdict>,
    /// Gates whose scope matched no subject (nothing was judged by them).
    pub unmatched_gates: Vec<String>,
}

impl Evaluation {
    /// True when no error-severity gate failed or lacked data.
    pub fn passed(&self) -> bool {
        !self.verdicts.iter().any(Verdict::blocks)
    }
}

impl Contract {
    /// Judges every gate on every subject in its scope, gates in file order, subjects in the
    /// order given.
    pub fn evaluate(&self, subjects: &[Subject]) -> Evaluation {
        let contract = self.reference();
        let mut eval = Evaluation::default();
        for gate in &self.gates {
            let mut matched = false;
            for s in subjects.iter().filter(|s| gate.scope.matches(s)) {
                matched = true;
                eval.verdicts.push(judge(&contract, gate, s));
            }
            if !matched {
                eval.unmatched_gates.push(gate.id.clone());
            }
        }
        eval
    }
}

/// One gate on one subject.
fn judge(contract: &ContractRef, gate: &Gate, s: &Subject) -> Verdict {
    let empty = Vec::new();
    let samples = s.samples.get(&gate.metric).unwrap_or(&empty);
    let (threshold, floor, floor_problem) = match gate.value {
        Threshold::Absolute(v) => (v, None, None),
        Threshold::FloorMultiple(k) => match s.noise_floors.get(&gate.metric) {
            Some(&f) if f.is_finite() && f >= 0.0 => (k * f, Some(f), None),
            Some(&f) => (f64::NAN, Some(f), Some(format!("invalid noise floor {f} for {}", gate.metric))),
            None => (f64::NAN, None, Some(format!("no noise floor for {} in the fixture", gate.metric))),
        },
    };
    let mut v = Verdict {
        contract: contract.clone(),
        gate_id: gate.id.clone(),
        metric: gate.metric,
        reduction: gate.reduction,
        comparison: gate.comparison,
        threshold,
        floor,
        observed: None,
        n_samples: samples.len(),
        outcome: Outcome::Missing,
        severity: gate.severity,
        engine: s.engine.clone(),
        model: s.model.clone(),
        reference: s.reference.clone(),
        dtype: s.dtype.clone(),
        mode: s.mode.clone(),
        prompt: s.prompt.clone(),
        detail: None,
    };
    if let Some(problem) = floor_problem {
        v.detail = Some(problem);
        return v;
    }
    if samples.is_empty() && gate.reduction != Reduction::Count {
        v.detail = Some(format!("no samples of {}", gate.metric));
        return v;
    }
    let nan = samples.iter().filter(|x| x.is_nan()).count();
    let (observed, passed, detail) = if gate.reduction == Reduction::All {
        all(samples, gate.comparison, threshold)
    } else {
        match reduce(gate.reduction, samples) {
            Ok(x) => (x, gate.comparison.holds(x, threshold), None),
            Err(why) => (f64::NAN, false, Some(why)),
        }
    };
    v.observed = Some(observed);
    v.outcome = if passed && !observed.is_nan() { Outcome::Passed } else { Outcome::Failed };
    v.detail = match (detail, nan) {
        (d, 0) => d,
        (Some(d), n) => Some(format!("{d}; {n} of {} samples are NaN", samples.len())),
        (None, n) => Some(format!("{n} of {} samples are NaN", samples.len())),
    };
    v
}

/// `all`: every sample must satisfy the comparison; the observed value is the worst sample
/// (the minimum for `>`/`>=`, the maximum for `<`/`<=`, the first unequal one for `==`).
fn all(samples: &[f64], cmp: Comparison, threshold: f64) -> (f64, bool, Option<String>) {
    let violations = samples.iter().filter(|&&x| !cmp.holds(x, threshold)).count();
    let worst = if samples.iter().any(|x| x.is_nan()) {
        f64::NAN
    } else {
        match cmp {
            Comparison::Gt | Comparison::Ge => samples.iter().copied().fold(f64::INFINITY, f64::min),
            Comparison::Lt | Comparison::Le => samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            Comparison::Eq => samples.iter().copied().find(|&x| x != threshold).unwrap_or(threshold),
        }
    };
    let detail = (violations > 0).then(|| format!("{violations} of {} samples violate", samples.len()));
    (worst, violations == 0, detail)
}

/// Reduces samples to one number (any reduction but `all`, which depends on the
/// comparison). A NaN sample gives NaN (except for `count`). `Err` says why the samples
/// cannot be reduced (no samples; non-0/1 samples for `wilson_lower`).
pub fn reduce(reduction: Reduction, samples: &[f64]) -> Result<f64, String> {
    if reduction == Reduction::Count {
        return Ok(samples.len() as f64);
    }
    if samples.is_empty() {
        return Err("no samples".into());
    }
    if samples.iter().any(|x| x.is_nan()) {
        return Ok(f64::NAN);
    }
    Ok(match reduction {
        Reduction::Min => samples.iter().copied().fold(f64::INFINITY, f64::min),
        Reduction::Max => samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Reduction::Mean => samples.iter().sum::<f64>() / samples.len() as f64,
        Reduction::Median => quantile(samples, 0.5),
        Reduction::P99 => quantile(samples, 0.99),
        Reduction::WilsonLower => {
            if let Some(bad) = samples.iter().find(|&&x| x != 0.0 && x != 1.0) {
                return Err(format!("wilson_lower needs 0/1 samples, got {bad}"));
            }
            let k = samples.iter().filter(|&&x| x == 1.0).count();
            wilson_lower(k, samples.len(), WILSON_Z)
        }
        Reduction::All | Reduction::Count => unreachable!("handled above"),
    })
}

/// Type-7 quantile (linear interpolation between order statistics; numpy's default) of
/// samples without NaN. `q` in [0, 1].
fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    let (a, b) = (sorted[lo], sorted[hi]);
    if lo == hi || a == b { a } else { a + (h - lo as f64) * (b - a) }
}

/// Lower bound of the Wilson score interval for `k` successes in `n` trials.
pub fn wilson_lower(k: usize, n: usize, z: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let margin = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - margin) / (1.0 + z2 / n)).max(0.0)
}
