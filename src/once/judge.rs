//! Judging what a run measured against contracts: the seam onto `src/contracts`.
//!
//! `runner once` hands [`Subject`]s (samples by metric name, per model × reference × mode)
//! to [`Contracts::evaluate`] and stores the verdicts. Until `src/contracts` is merged this
//! file reads the same YAML form (`id`, `version`, `gates: [{id, metric, reduction,
//! comparison, value, severity, scope}]`) and applies the same rules (NaN fails every gate, no
//! samples is `missing`, never a pass); wiring the real module replaces [`Contracts::load`]
//! and [`Contracts::evaluate`] with `contracts::Contract::load` / `Contract::evaluate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::record::{ContractId, VerdictRecord};

/// Metric names a gate may name (as `src/contracts` spells them).
pub const METRICS: &[&str] = &[
    "logits.rel_l2", "logits.cosine", "logits.nmse", "logits.max_abs", "kld", "top1", "top1_margin_aware",
    "top5_overlap", "top10_overlap", "greedy_match_len", "nonfinite", "layer.rel_l2", "layer.cosine",
    "layer.count_parity", "tokenizer_parity", "prefill_tok_s", "decode_tok_s", "ttft_ms", "load_ms", "peak_rss_bytes",
];
const REDUCTIONS: &[&str] = &["min", "max", "mean", "median", "p99", "wilson_lower", "all", "count"];
const COMPARISONS: &[&str] = &[">", ">=", "<", "<=", "=="];

#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: gate `{gate}`: unknown {what} `{got}` (did you mean `{closest}`?)", path.display())]
    Unknown { path: PathBuf, gate: String, what: &'static str, got: String, closest: String },
}

/// What one engine run measured against one reference for one model and mode.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub engine: String,
    pub model: String,
    pub reference: String,
    pub dtype: Option<String>,
    pub mode: Option<String>,
    pub samples: BTreeMap<String, Vec<f64>>,
    pub noise_floors: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
struct File {
    id: String,
    version: serde_yaml_ng::Value,
    #[serde(default)]
    #[allow(dead_code, reason = "read for completeness; shown by the real contracts module")]
    description: Option<String>,
    gates: Vec<RawGate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    id: String,
    #[serde(default)]
    #[allow(dead_code, reason = "documentation of the gate")]
    description: Option<String>,
    metric: String,
    reduction: String,
    comparison: String,
    value: RawValue,
    #[serde(default = "error_severity")]
    severity: String,
    #[serde(default)]
    scope: BTreeMap<String, String>,
}

fn error_severity() -> String {
    "error".into()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawValue {
    Abs(f64),
    Floor { floor_multiple: f64 },
}

/// One contract file.
#[derive(Debug)]
pub struct Contract {
    pub id: ContractId,
    gates: Vec<RawGate>,
}

/// Every contract a run is judged by.
#[derive(Debug, Default)]
pub struct Contracts {
    pub contracts: Vec<Contract>,
}

impl Contracts {
    /// Reads contract files; a directory contributes its `*.yaml`/`*.yml` files, sorted.
    pub fn load(paths: &[PathBuf]) -> Result<Contracts, ContractError> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                let rd = std::fs::read_dir(p).map_err(|source| ContractError::Io { path: p.clone(), source })?;
                let mut v: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| matches!(f.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                    .collect();
                v.sort();
                files.extend(v);
            } else {
                files.push(p.clone());
            }
        }
        let contracts = files.iter().map(|f| load_one(f)).collect::<Result<_, _>>()?;
        Ok(Contracts { contracts })
    }

    pub fn ids(&self) -> Vec<ContractId> {
        self.contracts.iter().map(|c| c.id.clone()).collect()
    }

    /// Every gate on every subject in its scope, contracts and gates in file order.
    pub fn evaluate(&self, subjects: &[Subject]) -> Vec<VerdictRecord> {
        let mut out = Vec::new();
        for c in &self.contracts {
            for g in &c.gates {
                for s in subjects.iter().filter(|s| in_scope(g, s)) {
                    out.push(judge(&c.id, g, s));
                }
            }
        }
        out
    }
}

fn load_one(path: &Path) -> Result<Contract, ContractError> {
    let bytes = std::fs::read(path).map_err(|source| ContractError::Io { path: path.into(), source })?;
    let f: File = serde_yaml_ng::from_slice(&bytes).map_err(|e| ContractError::Parse { path: path.into(), message: e.to_string() })?;
    for g in &f.gates {
        let check = |what: &'static str, got: &str, valid: &[&str]| {
            if valid.contains(&got) {
                Ok(())
            } else {
                Err(ContractError::Unknown { path: path.into(), gate: g.id.clone(), what, got: got.into(), closest: closest(got, valid) })
            }
        };
        check("metric", &g.metric, METRICS)?;
        check("reduction", &g.reduction, REDUCTIONS)?;
        check("comparison", &g.comparison, COMPARISONS)?;
        check("severity", &g.severity, &["error", "warning"])?;
        for k in g.scope.keys() {
            check("scope key", k, &["engine", "model", "reference", "dtype", "mode"])?;
        }
    }
    let version = match &f.version {
        serde_yaml_ng::Value::String(s) => s.clone(),
        v => serde_yaml_ng::to_string(v).unwrap_or_default().trim().to_string(),
    };
    let id = ContractId { id: f.id, version, sha256: crate::protocol::sha256_hex(&bytes) };
    Ok(Contract { id, gates: f.gates })
}

fn closest(got: &str, valid: &[&str]) -> String {
    valid.iter().min_by_key(|v| levenshtein(got, v)).map(|s| s.to_string()).unwrap_or_default()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn in_scope(g: &RawGate, s: &Subject) -> bool {
    g.scope.iter().all(|(k, pat)| {
        let v = match k.as_str() {
            "engine" => Some(s.engine.as_str()),
            "model" => Some(s.model.as_str()),
            "reference" => Some(s.reference.as_str()),
            "dtype" => s.dtype.as_deref(),
            "mode" => s.mode.as_deref(),
            _ => None,
        };
        v.is_some_and(|v| glob(&pat.to_lowercase(), &v.to_lowercase()))
    })
}

/// `*`, `?` and `{a,b}` over a whole name.
fn glob(pat: &str, s: &str) -> bool {
    if let (Some(open), Some(close)) = (pat.find('{'), pat.find('}'))
        && open < close
    {
        return pat[open + 1..close].split(',').any(|alt| glob(&format!("{}{alt}{}", &pat[..open], &pat[close + 1..]), s));
    }
    fn m(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], s) || (!s.is_empty() && m(p, &s[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &s[1..]),
            _ => false,
        }
    }
    m(pat.as_bytes(), s.as_bytes())
}

fn holds(cmp: &str, x: f64, t: f64) -> bool {
    match cmp {
        ">" => x > t,
        ">=" => x >= t,
        "<" => x < t,
        "<=" => x <= t,
        _ => x == t,
    }
}

fn judge(contract: &ContractId, g: &RawGate, s: &Subject) -> VerdictRecord {
    let samples = s.samples.get(&g.metric).map(Vec::as_slice).unwrap_or(&[]);
    let (threshold, floor) = match g.value {
        RawValue::Abs(v) => (v, None),
        RawValue::Floor { floor_multiple: k } => match s.noise_floors.get(&g.metric) {
            Some(&f) => (k * f, Some(f)),
            None => (f64::NAN, None),
        },
    };
    let mut v = VerdictRecord {
        contract: contract.clone(),
        gate_id: g.id.clone(),
        metric: g.metric.clone(),
        reduction: g.reduction.clone(),
        comparison: g.comparison.clone(),
        threshold,
        floor,
        observed: None,
        n_samples: samples.len() as i64,
        outcome: "missing".into(),
        passed: false,
        severity: g.severity.clone(),
        model: s.model.clone(),
        reference: s.reference.clone(),
        prompt: None,
        dtype: s.dtype.clone(),
        mode: s.mode.clone(),
        detail: None,
    };
    if threshold.is_nan() {
        v.detail = Some(format!("no noise floor for {} in the fixture", g.metric));
        return v;
    }
    if samples.is_empty() && g.reduction != "count" {
        v.detail = Some(format!("no samples of {}", g.metric));
        return v;
    }
    let nan = samples.iter().filter(|x| x.is_nan()).count();
    let observed = if nan > 0 && g.reduction != "count" {
        f64::NAN
    } else {
        match g.reduction.as_str() {
            "min" | "all" if g.comparison.starts_with('>') => samples.iter().copied().fold(f64::INFINITY, f64::min),
            "max" | "all" if g.comparison.starts_with('<') => samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            "min" => samples.iter().copied().fold(f64::INFINITY, f64::min),
            "max" => samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            "all" => samples.iter().copied().find(|&x| x != threshold).unwrap_or(threshold),
            "mean" => samples.iter().sum::<f64>() / samples.len() as f64,
            "median" => quantile(samples, 0.5),
            "p99" => quantile(samples, 0.99),
            "count" => samples.len() as f64,
            _ => {
                let k = samples.iter().filter(|&&x| x == 1.0).count();
                crate::metrics::stats::wilson_lower(k as u64, samples.len() as u64, 1.959_963_984_540_054).unwrap_or(f64::NAN)
            }
        }
    };
    v.observed = Some(observed);
    v.passed = !observed.is_nan() && holds(&g.comparison, observed, threshold);
    v.outcome = if v.passed { "passed" } else { "failed" }.into();
    if nan > 0 {
        v.detail = Some(format!("{nan} of {} samples are NaN", samples.len()));
    }
    v
}

/// Type-7 quantile (numpy's default).
fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let h = (s.len() - 1) as f64 * q;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    s[lo] + (h - lo as f64) * (s[hi] - s[lo])
}
