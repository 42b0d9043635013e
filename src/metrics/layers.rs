//! Per-layer metrics: capture tensors compared raw at identical positions, the forward
//! order of capture points, noise floors, and the first divergent layer.
//!
//! A float capture `[P, H]` gets rel-L2 and cosine over the whole tensor (f64 sums in row
//! order) and its worst per-position cosine; `moe_topk_ids` `[P, k]` gets the fraction of
//! positions choosing the same expert set (and the same ordered list). The first divergent
//! layer is the first point in forward order whose rel-L2 exceeds `k ×` the noise floor
//! measured between two references (e.g. HF eager vs SDPA), or an absolute threshold where
//! no floor is known.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::protocol::{CapturePoint, TensorView};

use super::logits::row_diff;
use super::report::{ExpertAgreement, FloatLayer, Sums};
use super::{MetricsError, stats};
use super::{StoredRows, on_rows};

/// Where a capture point sits in a forward pass: `embed`, then per layer `attn_norm`,
/// `attn_out`, `ffn_norm`, `moe_router`, `moe_topk_ids`, `ffn_out`, `layer_out`, then
/// `final_norm`. Sorting by this key lists tensors in the order they are computed.
pub fn forward_key(capture: CapturePoint, layer: u32) -> (u8, u32, u8) {
    match capture {
        CapturePoint::Embed => (0, 0, 0),
        CapturePoint::AttnNorm => (1, layer, 0),
        CapturePoint::AttnOut => (1, layer, 1),
        CapturePoint::FfnNorm => (1, layer, 2),
        CapturePoint::MoeRouter => (1, layer, 3),
        CapturePoint::MoeTopkIds => (1, layer, 4),
        CapturePoint::FfnOut => (1, layer, 5),
        CapturePoint::LayerOut => (1, layer, 6),
        CapturePoint::FinalNorm => (2, layer, 0),
    }
}

/// Compares two float capture tensors of the same shape `[P, H]`, rows in order.
/// `positions` are the absolute positions of the rows (for naming the worst one).
/// Panics if the shapes differ (callers check first and report the tensor).
pub fn float_layer(a: &TensorView<'_>, b: &TensorView<'_>, positions: &[i32]) -> FloatLayer {
    assert_eq!(a.shape, b.shape, "float_layer on tensors of different shapes");
    let mut sums = Sums::default();
    let mut worst = (f64::INFINITY, 0usize);
    let (mut na, mut nb) = (0u64, 0u64);
    let (mut buf_a, mut buf_b) = (Vec::new(), Vec::new());
    let (sa, sb) = (StoredRows::new(a), StoredRows::new(b));
    for i in 0..a.rows() {
        let d = on_rows!(sa.row(i, &mut buf_a), sb.row(i, &mut buf_b), |x, y| row_diff(x, y));
        sums.add(&Sums { dd: d.dd, aa: d.aa, bb: d.bb, ab: d.ab });
        na += u64::from(d.nonfinite_a);
        nb += u64::from(d.nonfinite_b);
        let cos = if d.nonfinite_a + d.nonfinite_b > 0 { f64::NAN } else { stats::cosine(d.aa, d.bb, d.ab) };
        // the first NaN row is the worst; otherwise the first row of the lowest cosine
        if !worst.0.is_nan() && (cos.is_nan() || cos < worst.0) {
            worst = (cos, i);
        }
    }
    let finite = na + nb == 0;
    let nan_unless = |v: f64| if finite { v } else { f64::NAN };
    if a.rows() == 0 {
        worst.0 = 1.0;
    }
    FloatLayer {
        rel_l2: nan_unless(stats::rel_l2(sums.dd, sums.bb)),
        cosine: nan_unless(stats::cosine(sums.aa, sums.bb, sums.ab)),
        worst_cosine: worst.0,
        worst_position: positions.get(worst.1).copied().unwrap_or(-1),
        nonfinite_engine: na,
        nonfinite_reference: nb,
        sums,
    }
}

/// Absolute positions of the rows of a float tensor that hold a non-finite value.
pub fn nonfinite_rows(t: &TensorView<'_>, positions: &[i32]) -> Vec<i32> {
    let mut buf = Vec::new();
    (0..t.rows())
        .filter(|&i| t.row_f32(i, &mut buf).iter().any(|x| !x.is_finite()))
        .map(|i| positions.get(i).copied().unwrap_or(i as i32))
        .collect()
}

/// `moe_topk_ids` agreement of two `[P, k]` id tensors (row-major, same `k`): positions
/// whose chosen expert sets are equal, and those whose ordered lists are equal.
pub fn expert_agreement(a: &[i32], b: &[i32], k: usize) -> ExpertAgreement {
    assert_eq!(a.len(), b.len(), "expert_agreement on tensors of different sizes");
    if k == 0 {
        return ExpertAgreement::new((a.len()) as u64, 0, 0);
    }
    let (mut set, mut ordered) = (0u64, 0u64);
    let (mut sa, mut sb) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for (ra, rb) in a.chunks_exact(k).zip(b.chunks_exact(k)) {
        if ra == rb {
            ordered += 1;
            set += 1;
            continue;
        }
        sa.clear();
        sa.extend_from_slice(ra);
        sa.sort_unstable();
        sb.clear();
        sb.extend_from_slice(rb);
        sb.sort_unstable();
        set += u64::from(sa == sb);
    }
    ExpertAgreement::new((a.len() / k) as u64, set, ordered)
}

/// Noise floors measured at fixture time between two references of the same dtype: the
/// rel-L2 at which two correct implementations already disagree, per capture and layer.
///
/// JSON: `{"description": "...", "references": ["A", "B"], "logits": 1e-6,
/// "captures": {"attn_out": {"0": 2e-7, "1": 3e-7}, ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoiseFloors {
    /// Which two references the floors came from, and how.
    pub description: String,
    /// The two reference dumps (directories or fixture ids).
    #[serde(default)]
    pub references: Vec<String>,
    /// rel-L2 floor of the logits.
    pub logits: f64,
    /// capture -> layer -> rel-L2 floor.
    #[serde(default)]
    pub captures: BTreeMap<CapturePoint, BTreeMap<u32, f64>>,
    /// Mean KL(B ‖ A) of the logits over every scored position, for floor-relative `kld`
    /// gates with reduction `mean`. `None` in files written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kld_mean: Option<f64>,
}

impl NoiseFloors {
    pub fn load(path: &Path) -> Result<NoiseFloors, MetricsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| MetricsError::Floors { path: path.to_path_buf(), message: e.to_string() })?;
        let f: NoiseFloors = serde_json::from_str(&text)
            .map_err(|e| MetricsError::Floors { path: path.to_path_buf(), message: e.to_string() })?;
        f.check().map_err(|message| MetricsError::Floors { path: path.to_path_buf(), message })?;
        Ok(f)
    }

    pub fn save(&self, path: &Path) -> Result<(), MetricsError> {
        let text = serde_json::to_string_pretty(self).expect("floors always serialize");
        std::fs::write(path, text)
            .map_err(|e| MetricsError::Floors { path: path.to_path_buf(), message: e.to_string() })
    }

    fn check(&self) -> Result<(), String> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !ok(self.logits) {
            return Err(format!("`logits` floor {} is not a finite non-negative number", self.logits));
        }
        if let Some(k) = self.kld_mean.filter(|&k| !ok(k)) {
            return Err(format!("`kld_mean` floor {k} is not a finite non-negative number"));
        }
        for (c, layers) in &self.captures {
            for (l, &v) in layers {
                if !ok(v) {
                    return Err(format!("floor of {} is {v}, not a finite non-negative number", c.tensor_name(*l)));
                }
            }
        }
        Ok(())
    }

    /// The floor of one capture tensor, when measured.
    pub fn capture(&self, capture: CapturePoint, layer: u32) -> Option<f64> {
        self.captures.get(&capture)?.get(&layer).copied()
    }

    /// Floors from a comparison of two references: per capture tensor the largest
    /// per-prompt rel-L2, and the largest logits rel-L2 over every position.
    pub fn from_report(report: &super::Report, description: String) -> NoiseFloors {
        let mut captures: BTreeMap<CapturePoint, BTreeMap<u32, f64>> = BTreeMap::new();
        let mut logits = 0.0f64;
        for p in &report.prompts {
            if let Some(l) = &p.logits {
                logits = l.rel_l2.iter().copied().fold(logits, f64::max);
            }
            for c in &p.layers {
                if let super::report::LayerValues::Float(f) = &c.values {
                    let e = captures.entry(c.capture).or_default().entry(c.layer).or_insert(0.0);
                    *e = e.max(f.rel_l2);
                }
            }
        }
        NoiseFloors {
            description,
            references: vec![report.engine.dir.clone(), report.reference.dir.clone()],
            logits,
            captures,
            kld_mean: report.overall.summary.kld.as_ref().map(|k| k.mean),
        }
    }
}

/// A point of the forward pass for [`DivergenceRule::first_divergent`]: the capture and
/// layer (`None` for the logits), the tensor name, its rel-L2.
pub type Point<'a> = (Option<(CapturePoint, u32)>, &'a str, f64);

/// How the first divergent layer is decided. Externally tagged in JSON
/// (`{"absolute": {...}}`): an internally tagged enum would buffer its content, and the
/// integer layer keys of [`NoiseFloors`] do not survive that buffering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DivergenceRule {
    /// rel-L2 > `k × max(floor, min_floor)`; points without a measured floor fall back to
    /// `fallback_threshold`.
    NoiseFloor { k: f64, min_floor: f64, fallback_threshold: f64, floors: NoiseFloors },
    /// rel-L2 > `threshold` (no floors given).
    Absolute { threshold: f64 },
}

impl DivergenceRule {
    /// The threshold of one point and the rule that gave it. `capture = None` is the logits.
    pub fn threshold(&self, capture: Option<(CapturePoint, u32)>) -> (f64, &'static str) {
        match self {
            DivergenceRule::Absolute { threshold } => (*threshold, "absolute"),
            DivergenceRule::NoiseFloor { k, min_floor, fallback_threshold, floors } => {
                let floor = match capture {
                    None => Some(floors.logits),
                    Some((c, l)) => floors.capture(c, l),
                };
                match floor {
                    Some(f) => (k * f.max(*min_floor), "noise_floor"),
                    None => (*fallback_threshold, "absolute"),
                }
            }
        }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            DivergenceRule::Absolute { threshold } => {
                format!("absolute: rel-L2 > {threshold:e} (no noise floors given; pass --floors)")
            }
            DivergenceRule::NoiseFloor { k, min_floor, fallback_threshold, floors } => format!(
                "noise floor: rel-L2 > {k} × max(floor, {min_floor:e}); floors from {}; points without a floor: rel-L2 > {fallback_threshold:e}",
                floors.description
            ),
        }
    }

    /// The first point whose rel-L2 exceeds its threshold; `points` must be in forward
    /// order, `capture = None` (the logits) last. A non-finite rel-L2 always exceeds.
    pub fn first_divergent<'a>(
        &self,
        points: impl IntoIterator<Item = Point<'a>>,
    ) -> Option<super::report::DivergentPoint> {
        points.into_iter().find_map(|(cap, tensor, rel_l2)| {
            let (threshold, rule) = self.threshold(cap);
            stats::exceeds(rel_l2, threshold).then(|| super::report::DivergentPoint {
                tensor: tensor.to_string(),
                rel_l2,
                threshold,
                rule: rule.to_string(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_order() {
        let mut pts = [
            (CapturePoint::FinalNorm, 0),
            (CapturePoint::LayerOut, 1),
            (CapturePoint::AttnNorm, 1),
            (CapturePoint::FfnOut, 0),
            (CapturePoint::Embed, 0),
            (CapturePoint::MoeRouter, 0),
            (CapturePoint::AttnOut, 10),
            (CapturePoint::AttnOut, 2),
        ];
        pts.sort_by_key(|&(c, l)| forward_key(c, l));
        let names: Vec<String> = pts.iter().map(|&(c, l)| c.tensor_name(l)).collect();
        assert_eq!(
            names,
            [
                "hidden.embed.0",
                "hidden.moe_router.0",
                "hidden.ffn_out.0",
                "hidden.attn_norm.1",
                "hidden.layer_out.1",
                "hidden.attn_out.2",
                "hidden.attn_out.10",
                "hidden.final_norm.0"
            ]
        );
    }

    #[test]
    fn expert_sets_and_order() {
        // rows: same order; same set other order; different set
        let a = [1, 2, 3, 4, 5, 6];
        let b = [1, 2, 4, 3, 5, 7];
        let g = expert_agreement(&a, &b, 2);
        assert_eq!((g.n_positions, g.set_matches, g.ordered_matches), (3, 2, 1));
        assert!((g.set_agreement - 2.0 / 3.0).abs() < 1e-15);
        assert!((g.ordered_agreement - 1.0 / 3.0).abs() < 1e-15);
    }

    fn floors() -> NoiseFloors {
        let mut captures = BTreeMap::new();
        captures.insert(CapturePoint::AttnOut, BTreeMap::from([(0u32, 1e-5), (1, 0.0)]));
        NoiseFloors { description: "eager vs sdpa".into(), references: vec![], logits: 2e-5, captures, kld_mean: None }
    }

    #[test]
    fn thresholds_by_rule() {
        let r = DivergenceRule::NoiseFloor { k: 10.0, min_floor: 1e-6, fallback_threshold: 1e-3, floors: floors() };
        assert_eq!(r.threshold(Some((CapturePoint::AttnOut, 0))), (10.0 * 1e-5, "noise_floor"));
        // a zero floor is lifted to the minimum so f32 rounding is not flagged
        assert_eq!(r.threshold(Some((CapturePoint::AttnOut, 1))), (10.0 * 1e-6, "noise_floor"));
        assert_eq!(r.threshold(Some((CapturePoint::FfnOut, 0))), (1e-3, "absolute"));
        assert_eq!(r.threshold(None), (10.0 * 2e-5, "noise_floor"));
        let pts = [
            (Some((CapturePoint::AttnOut, 0)), "hidden.attn_out.0", 9e-5),
            (Some((CapturePoint::AttnOut, 1)), "hidden.attn_out.1", 2e-5),
            (None, "logits", 1.0),
        ];
        let d = r.first_divergent(pts).unwrap();
        assert_eq!((d.tensor.as_str(), d.rule.as_str()), ("hidden.attn_out.1", "noise_floor"));
        let abs = DivergenceRule::Absolute { threshold: 1e-3 };
        assert_eq!(abs.first_divergent(pts).unwrap().tensor, "logits");
        let nan = [(Some((CapturePoint::Embed, 0)), "hidden.embed.0", f64::NAN)];
        assert_eq!(abs.first_divergent(nan).unwrap().tensor, "hidden.embed.0");
        assert!(abs.first_divergent([(None, "logits", 1e-3)]).is_none());
    }

    #[test]
    fn floors_file_round_trips_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("floors.json");
        floors().save(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"attn_out\"") && text.contains("\"0\""), "{text}");
        assert_eq!(NoiseFloors::load(&p).unwrap(), floors());
        std::fs::write(&p, r#"{"description":"x","logits":-1}"#).unwrap();
        let e = NoiseFloors::load(&p).unwrap_err().to_string();
        assert!(e.contains("floors.json") && e.contains("logits"), "{e}");
        std::fs::write(&p, r#"{"description":"x","logits":0,"captures":{"attn_outt":{}}}"#).unwrap();
        let e = NoiseFloors::load(&p).unwrap_err().to_string();
        assert!(e.contains("attn_outt"), "{e}");
    }
}
