//! The comparison report: per prompt (with compact per-position arrays), per layer, overall;
//! the named metric samples a contract is evaluated on; and the human-readable table.
//!
//! Non-finite numbers are kept (they fail every gate): in JSON they are written as the
//! strings `"NaN"`, `"Infinity"`, `"-Infinity"` (JSON has no such numbers) and read back as
//! themselves, so a report round-trips exactly.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::protocol::CapturePoint;

use super::layers::DivergenceRule;

/// Version of the report's JSON layout.
pub const REPORT_SCHEMA: u32 = 1;

/// Metric names of [`Report::samples`] (one value per scored position unless noted).
pub mod names {
    pub const REL_L2: &str = "logits.rel_l2";
    pub const COSINE: &str = "logits.cosine";
    pub const NMSE: &str = "logits.nmse";
    pub const MAX_ABS: &str = "logits.max_abs";
    pub const KLD: &str = "kld";
    /// 1.0 where the top-1 ids agree, else 0.0.
    pub const TOP1: &str = "top1";
    /// 1.0 / 0.0 under the margin-aware rule.
    pub const TOP1_MARGIN_AWARE: &str = "top1_margin_aware";
    pub const TOP5_OVERLAP: &str = "top5_overlap";
    pub const TOP10_OVERLAP: &str = "top10_overlap";
    /// One value per prompt with generated tokens.
    pub const GREEDY_MATCH_LEN: &str = "greedy_match_len";
    /// One value per compared prompt: non-finite values on either side, every tensor.
    pub const NONFINITE: &str = "nonfinite";
    /// Per (capture, layer): one value per prompt, over the whole `[P, ·]` tensor.
    pub const LAYER_REL_L2: &str = "layer.rel_l2";
    pub const LAYER_COSINE: &str = "layer.cosine";
    /// Per (`moe_topk_ids`, layer): fraction of positions choosing the same expert set.
    pub const LAYER_EXPERT_SET_AGREEMENT: &str = "layer.expert_set_agreement";
    /// One value per prompt: 1.0 when both dumps hold the same layers of every capture point
    /// they both record (and the same layer count), else 0.0.
    pub const LAYER_COUNT_PARITY: &str = "layer.count_parity";
    /// One value per prompt the engine tokenized: 1.0 when its own ids for the prompt text
    /// equal the reference's ids, else 0.0.
    pub const TOKENIZER_PARITY: &str = "tokenizer_parity";
}

/// Which dump a statement is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Engine,
    Reference,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Engine => "engine",
            Side::Reference => "reference",
        }
    }
}

/// A whole comparison of an engine's dump (A) with a reference dump (B).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    pub engine: DumpSummary,
    pub reference: DumpSummary,
    pub settings: Settings,
    /// Prompts finished in both dumps, in the reference's request order.
    pub prompts: Vec<PromptReport>,
    /// Prompts requested by either dump but not finished in both.
    pub missing: Vec<MissingPrompt>,
    pub overall: Overall,
    /// Every tensor holding NaN or ±∞, with where.
    pub nonfinite: Vec<NonFinite>,
}

/// What a report needs to know about one dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DumpSummary {
    pub dir: String,
    pub engine: String,
    pub version: String,
    pub backend: String,
    pub device: String,
    pub quant: String,
    pub compute_dtype: String,
    /// The manifest was marked complete.
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub prompts_requested: usize,
    pub prompts_finished: usize,
}

/// The settings the report was computed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Reference top-1/top-2 logit margin at or below which a position counts as a tie.
    #[serde(with = "num")]
    pub tie_threshold: f64,
    /// How the first divergent layer is found.
    pub divergence: DivergenceRule,
    /// Logits rel-L2 above which a position is listed as deviating.
    #[serde(with = "num")]
    pub deviation_threshold: f64,
    #[serde(with = "num")]
    pub wilson_z: f64,
}

/// Where a prompt stands in one dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptState {
    Finished,
    /// Requested, never finished (the engine died or stopped first).
    NotFinished,
    /// Not in this dump's request.
    NotRequested,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MissingPrompt {
    pub id: String,
    pub engine: PromptState,
    pub reference: PromptState,
}

/// One prompt finished in both dumps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptReport {
    pub id: String,
    pub n_tokens: usize,
    /// `[P]` absolute positions scored (identical in both dumps).
    pub positions: Vec<i32>,
    /// Full-logit metrics per position; absent when either dump lacks full logits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<LogitSeries>,
    /// Top-k agreement per position; absent when either dump has neither logits nor top-k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topk: Option<TopkSeries>,
    pub summary: Summary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greedy: Option<Greedy>,
    /// Capture tensors present in both dumps, in forward order.
    pub layers: Vec<LayerComparison>,
    /// Capture tensors present in one dump only.
    pub absent: Vec<AbsentCapture>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_divergent: Option<DivergentPoint>,
    /// Positions whose logits rel-L2 exceeds the deviation threshold (or, without full
    /// logits, whose top-1 differs), ascending.
    pub deviating_positions: Vec<i32>,
    /// Whether both dumps recorded the same layers; absent when they share no capture point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count_parity: Option<CountParity>,
    /// The engine's own tokenization of the prompt text equals the reference's token ids
    /// (the engine's `tokenizer_match`; the ids themselves are checked equal before any
    /// metric). Absent when the engine did not tokenize the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_match: Option<bool>,
}

/// Layer count parity of one prompt: the seeds once compared statistics over different
/// sample counts; here every capture point both dumps record must cover the same layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountParity {
    pub parity: bool,
    /// `model.n_layers` of each manifest, when given.
    pub engine_layers: Option<u32>,
    pub reference_layers: Option<u32>,
    /// Capture points recorded by both whose layer lists differ: `attn_out: engine [0, 1], reference [0, 1, 2]`.
    pub mismatched: Vec<String>,
}

/// `[P]` arrays, one entry per scored position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogitSeries {
    #[serde(with = "num_vec")]
    pub rel_l2: Vec<f64>,
    #[serde(with = "num_vec")]
    pub cosine: Vec<f64>,
    #[serde(with = "num_vec")]
    pub nmse: Vec<f64>,
    #[serde(with = "num_vec")]
    pub max_abs: Vec<f64>,
    /// KL(reference ‖ engine), nats.
    #[serde(with = "num_vec")]
    pub kld: Vec<f64>,
    pub nonfinite_engine: Vec<u32>,
    pub nonfinite_reference: Vec<u32>,
    /// rel-L2 over the whole `[P, V]` tensor.
    #[serde(with = "num")]
    pub rel_l2_pooled: f64,
}

/// `[P]` arrays of top-k agreement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopkSeries {
    pub engine_top1: Vec<i64>,
    pub reference_top1: Vec<i64>,
    /// Reference top-1 minus top-2 logit; absent when the reference gives ids only.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "num_vec_opt")]
    pub reference_margin: Option<Vec<f64>>,
    pub top1: Vec<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_margin_aware: Option<Vec<bool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top5_overlap: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top10_overlap: Option<Vec<f64>>,
}

/// A rate with its Wilson lower bound.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub hits: u64,
    pub n: u64,
    pub rate: f64,
    pub wilson_lower: f64,
}

/// KL(reference ‖ engine) over positions; nearest-rank percentiles (see `stats`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KldStats {
    #[serde(with = "num")]
    pub mean: f64,
    #[serde(with = "num")]
    pub median: f64,
    #[serde(with = "num")]
    pub p99: f64,
    #[serde(with = "num")]
    pub max: f64,
}

/// Aggregates over a set of positions (one prompt, or all). Full-logit fields are absent
/// when full logits are; every float field is NaN when any of its samples is non-finite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Summary {
    pub n_positions: usize,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "num_opt")]
    pub cosine_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "num_opt")]
    pub cosine_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "num_opt")]
    pub rel_l2_max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "num_opt")]
    pub rel_l2_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "num_opt")]
    pub nmse_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "num_opt")]
    pub max_abs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kld: Option<KldStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_margin_aware: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top5_overlap_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top10_overlap_mean: Option<f64>,
    /// Non-finite values on either side, in every compared tensor.
    pub nonfinite: u64,
}

/// Greedy continuation agreement of one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Greedy {
    /// Leading generated tokens that agree.
    pub match_len: u32,
    /// The first step where they differ (including one side stopping early); absent when
    /// the continuations are identical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_divergent_step: Option<u32>,
    pub engine_len: u32,
    pub reference_len: u32,
}

/// Greedy agreement over all prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GreedySummary {
    pub prompts: usize,
    /// Prompts whose continuations are identical.
    pub full_matches: usize,
    pub min_match_len: u32,
    pub mean_match_len: f64,
}

/// One capture tensor compared between the dumps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerComparison {
    pub tensor: String,
    pub capture: CapturePoint,
    pub layer: u32,
    /// `[P, ·]`
    pub shape: Vec<usize>,
    pub values: LayerValues,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerValues {
    Float(FloatLayer),
    ExpertIds(ExpertAgreement),
}

/// Float capture metrics over the raw `[P, ·]` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FloatLayer {
    #[serde(with = "num")]
    pub rel_l2: f64,
    #[serde(with = "num")]
    pub cosine: f64,
    /// The lowest per-position cosine and its absolute position.
    #[serde(with = "num")]
    pub worst_cosine: f64,
    pub worst_position: i32,
    pub nonfinite_engine: u64,
    pub nonfinite_reference: u64,
    /// `Σ(a−b)², Σa², Σb², Σab` in f64, for pooling over prompts.
    pub sums: Sums,
}

/// f64 sums behind rel-L2 and cosine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Sums {
    #[serde(with = "num")]
    pub dd: f64,
    #[serde(with = "num")]
    pub aa: f64,
    #[serde(with = "num")]
    pub bb: f64,
    #[serde(with = "num")]
    pub ab: f64,
}

impl Sums {
    pub fn add(&mut self, o: &Sums) {
        self.dd += o.dd;
        self.aa += o.aa;
        self.bb += o.bb;
        self.ab += o.ab;
    }
}

/// `moe_topk_ids` agreement: positions choosing the same set of experts, and the same
/// experts in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExpertAgreement {
    pub n_positions: u64,
    pub set_matches: u64,
    pub ordered_matches: u64,
    pub set_agreement: f64,
    pub ordered_agreement: f64,
}

impl ExpertAgreement {
    pub fn new(n_positions: u64, set_matches: u64, ordered_matches: u64) -> ExpertAgreement {
        let frac = |k: u64| if n_positions == 0 { 1.0 } else { k as f64 / n_positions as f64 };
        ExpertAgreement {
            n_positions,
            set_matches,
            ordered_matches,
            set_agreement: frac(set_matches),
            ordered_agreement: frac(ordered_matches),
        }
    }
}

/// A capture tensor held by one dump only: reported, not an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbsentCapture {
    pub tensor: String,
    /// The dump that lacks it.
    pub absent_in: Side,
    /// Why, when that dump's manifest says (`captures.absent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// The first point in forward order whose rel-L2 exceeds its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DivergentPoint {
    /// `hidden.{capture}.{layer}` or `logits`.
    pub tensor: String,
    #[serde(with = "num")]
    pub rel_l2: f64,
    #[serde(with = "num")]
    pub threshold: f64,
    /// `noise_floor` (k × the measured floor) or `absolute` (no floor for this point).
    pub rule: String,
}

/// Aggregates over every compared prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overall {
    pub prompts_compared: usize,
    pub prompts_missing: usize,
    pub summary: Summary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greedy: Option<GreedySummary>,
    /// Per capture tensor, pooled over prompts, in forward order.
    pub layers: Vec<LayerSummary>,
    /// From the pooled rel-L2 of each point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_divergent: Option<DivergentPoint>,
}

/// One capture tensor over every prompt holding it in both dumps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSummary {
    pub tensor: String,
    pub capture: CapturePoint,
    pub layer: u32,
    pub prompts: usize,
    pub values: LayerSummaryValues,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerSummaryValues {
    Float {
        /// From the summed `Σ(a−b)²` and `Σb²` of every prompt.
        #[serde(with = "num")]
        rel_l2: f64,
        #[serde(with = "num")]
        cosine: f64,
        /// The largest per-prompt rel-L2.
        #[serde(with = "num")]
        rel_l2_max: f64,
        /// The lowest per-position cosine anywhere, with its prompt and position.
        #[serde(with = "num")]
        worst_cosine: f64,
        worst_prompt: String,
        worst_position: i32,
    },
    ExpertIds(ExpertAgreement),
}

/// A tensor holding non-finite values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NonFinite {
    pub prompt: String,
    pub tensor: String,
    pub side: Side,
    pub count: u64,
    /// Absolute positions (rows) holding at least one.
    pub positions: Vec<i32>,
}

/// A named metric, optionally of one capture tensor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SampleKey {
    pub metric: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CapturePoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
}

impl SampleKey {
    pub fn metric(name: &str) -> SampleKey {
        SampleKey { metric: name.to_string(), capture: None, layer: None }
    }
    pub fn layer(name: &str, capture: CapturePoint, layer: u32) -> SampleKey {
        SampleKey { metric: name.to_string(), capture: Some(capture), layer: Some(layer) }
    }
}

/// Metric sample vectors, by name (see [`names`]). A metric the dumps cannot give (e.g.
/// full-logit metrics against a top-k-only reference) is absent, never empty.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Samples {
    map: BTreeMap<SampleKey, Vec<f64>>,
}

impl Samples {
    /// The samples of a model-wide metric.
    pub fn get(&self, metric: &str) -> Option<&[f64]> {
        self.map.get(&SampleKey::metric(metric)).map(Vec::as_slice)
    }
    /// The samples of a per-layer metric.
    pub fn layer(&self, metric: &str, capture: CapturePoint, layer: u32) -> Option<&[f64]> {
        self.map.get(&SampleKey::layer(metric, capture, layer)).map(Vec::as_slice)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&SampleKey, &[f64])> {
        self.map.iter().map(|(k, v)| (k, v.as_slice()))
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn extend(&mut self, key: SampleKey, values: impl IntoIterator<Item = f64>) {
        self.map.entry(key).or_default().extend(values);
    }
    fn merge(&mut self, other: Samples) {
        for (k, v) in other.map {
            self.extend(k, v);
        }
    }
}

impl PromptReport {
    /// This prompt's samples: per position for logit and top-k metrics, one value for
    /// greedy, non-finite and each layer metric.
    pub fn samples(&self) -> Samples {
        let mut s = Samples::default();
        if let Some(l) = &self.logits {
            s.extend(SampleKey::metric(names::REL_L2), l.rel_l2.iter().copied());
            s.extend(SampleKey::metric(names::COSINE), l.cosine.iter().copied());
            s.extend(SampleKey::metric(names::NMSE), l.nmse.iter().copied());
            s.extend(SampleKey::metric(names::MAX_ABS), l.max_abs.iter().copied());
            s.extend(SampleKey::metric(names::KLD), l.kld.iter().copied());
        }
        if let Some(t) = &self.topk {
            let bits = |v: &[bool]| v.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect::<Vec<_>>();
            s.extend(SampleKey::metric(names::TOP1), bits(&t.top1));
            if let Some(m) = &t.top1_margin_aware {
                s.extend(SampleKey::metric(names::TOP1_MARGIN_AWARE), bits(m));
            }
            if let Some(o) = &t.top5_overlap {
                s.extend(SampleKey::metric(names::TOP5_OVERLAP), o.iter().copied());
            }
            if let Some(o) = &t.top10_overlap {
                s.extend(SampleKey::metric(names::TOP10_OVERLAP), o.iter().copied());
            }
        }
        if let Some(g) = &self.greedy {
            s.extend(SampleKey::metric(names::GREEDY_MATCH_LEN), [f64::from(g.match_len)]);
        }
        s.extend(SampleKey::metric(names::NONFINITE), [self.summary.nonfinite as f64]);
        if let Some(c) = &self.count_parity {
            s.extend(SampleKey::metric(names::LAYER_COUNT_PARITY), [if c.parity { 1.0 } else { 0.0 }]);
        }
        if let Some(t) = self.tokenizer_match {
            s.extend(SampleKey::metric(names::TOKENIZER_PARITY), [if t { 1.0 } else { 0.0 }]);
        }
        for l in &self.layers {
            match &l.values {
                LayerValues::Float(f) => {
                    s.extend(SampleKey::layer(names::LAYER_REL_L2, l.capture, l.layer), [f.rel_l2]);
                    s.extend(SampleKey::layer(names::LAYER_COSINE, l.capture, l.layer), [f.cosine]);
                }
                LayerValues::ExpertIds(e) => {
                    s.extend(
                        SampleKey::layer(names::LAYER_EXPERT_SET_AGREEMENT, l.capture, l.layer),
                        [e.set_agreement],
                    );
                }
            }
        }
        s
    }
}

impl Report {
    /// Every prompt's samples concatenated in prompt order (the order of `prompts`).
    pub fn samples(&self) -> Samples {
        let mut s = Samples::default();
        for p in &self.prompts {
            s.merge(p.samples());
        }
        s
    }

    /// Non-finite values anywhere, both sides.
    pub fn nonfinite_total(&self) -> u64 {
        self.nonfinite.iter().map(|n| n.count).sum()
    }

    /// One line per tensor holding non-finite values: which prompt, tensor, side, positions.
    pub fn nonfinite_lines(&self) -> Vec<String> {
        self.nonfinite
            .iter()
            .map(|n| {
                format!(
                    "prompt {:?}: {} of the {} holds {} non-finite value(s) at position(s) {}",
                    n.prompt,
                    n.tensor,
                    n.side.as_str(),
                    n.count,
                    list_positions(&n.positions, 12)
                )
            })
            .collect()
    }

    /// The human-readable report: a table per prompt, the overall line, missing prompts,
    /// deviating positions and non-finite values.
    pub fn render_text(&self) -> String {
        let mut o = String::new();
        let e = &self.engine;
        let r = &self.reference;
        let _ = writeln!(
            o,
            "engine:    {} ({} {}, {} on {}) {}",
            e.dir,
            e.engine,
            e.version,
            e.quant,
            e.backend,
            completeness(e)
        );
        let _ = writeln!(
            o,
            "reference: {} ({} {}, {} on {}) {}",
            r.dir,
            r.engine,
            r.version,
            r.quant,
            r.backend,
            completeness(r)
        );
        let _ = writeln!(o);
        let header = format!(
            "{:<16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>15} {:>15} {:>8}  {}",
            "prompt",
            "pos",
            "min cos",
            "max relL2",
            "KLD mean",
            "KLD p99",
            "top-1",
            "margin top-1",
            "greedy",
            "first divergent"
        );
        let _ = writeln!(o, "{header}");
        for p in &self.prompts {
            let greedy = match &p.greedy {
                Some(g) => format!("{}/{}", g.match_len, g.reference_len),
                None => "-".into(),
            };
            let div = p.first_divergent.as_ref().map_or("none".to_string(), |d| d.tensor.clone());
            let _ = writeln!(o, "{}", summary_row(&p.id, &p.summary, &greedy, &div));
        }
        let ov = &self.overall;
        let greedy = match &ov.greedy {
            Some(g) => format!("{}/{} full", g.full_matches, g.prompts),
            None => "-".into(),
        };
        let div = ov.first_divergent.as_ref().map_or("none".to_string(), |d| d.tensor.clone());
        let _ = writeln!(o, "{}", summary_row("overall", &ov.summary, &greedy, &div));
        if let Some(k) = &ov.summary.kld {
            let _ = writeln!(
                o,
                "KLD overall: mean {} median {} p99 {} max {}",
                sci(k.mean),
                sci(k.median),
                sci(k.p99),
                sci(k.max)
            );
        }
        if let Some(t) = &ov.summary.top1 {
            let _ = writeln!(
                o,
                "top-1 overall: {}/{} = {:.2}% (Wilson lower bound {:.2}%, z = {})",
                t.hits,
                t.n,
                100.0 * t.rate,
                100.0 * t.wilson_lower,
                self.settings.wilson_z
            );
        }
        if ov.summary.cosine_min.is_none() {
            let _ = writeln!(o, "full-logit metrics: absent (a dump holds top-k ids only)");
        }
        let _ = writeln!(o, "first divergent layer rule: {}", self.settings.divergence.describe());
        if let Some(d) = &ov.first_divergent {
            let _ = writeln!(
                o,
                "first divergent point overall: {} (rel-L2 {} > {} by the {} rule)",
                d.tensor,
                sci(d.rel_l2),
                sci(d.threshold),
                d.rule
            );
        }

        let deviating: Vec<&PromptReport> = self.prompts.iter().filter(|p| !p.deviating_positions.is_empty()).collect();
        let _ = writeln!(o);
        if deviating.is_empty() {
            let _ = writeln!(
                o,
                "deviating positions: none (logits rel-L2 ≤ {} everywhere)",
                sci(self.settings.deviation_threshold)
            );
        } else {
            let _ = writeln!(
                o,
                "deviating positions (logits rel-L2 > {}, or top-1 differs without full logits):",
                sci(self.settings.deviation_threshold)
            );
            for p in deviating {
                let _ = writeln!(
                    o,
                    "  {}: {} position(s): {}",
                    p.id,
                    p.deviating_positions.len(),
                    list_positions(&p.deviating_positions, 20)
                );
                for line in worst_positions(p, 5) {
                    let _ = writeln!(o, "    {line}");
                }
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "{}", self.parity_line());
        for p in &self.prompts {
            if let Some(c) = p.count_parity.as_ref().filter(|c| !c.parity) {
                let layers = |n: Option<u32>| n.map_or("?".to_string(), |n| n.to_string());
                let _ = writeln!(
                    o,
                    "  {}: LAYER COUNTS DIFFER: engine {} layers, reference {}; {}",
                    p.id,
                    layers(c.engine_layers),
                    layers(c.reference_layers),
                    if c.mismatched.is_empty() { "-".to_string() } else { c.mismatched.join("; ") }
                );
            }
            if p.tokenizer_match == Some(false) {
                let _ = writeln!(o, "  {}: TOKENIZER MISMATCH: the engine's ids for the prompt text differ", p.id);
            }
        }
        if !self.missing.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "missing prompts ({}), not compared:", self.missing.len());
            for m in &self.missing {
                let _ = writeln!(o, "  {}: engine {}, reference {}", m.id, state(m.engine), state(m.reference));
            }
        }
        if !self.nonfinite.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "NON-FINITE VALUES ({} in all): every gate fails", self.nonfinite_total());
            for line in self.nonfinite_lines() {
                let _ = writeln!(o, "  {line}");
            }
        }
        o
    }
}

impl Report {
    /// `layer count parity: 10/10 prompts; tokenizer parity: 9/10 prompts (1 not tokenized)`.
    pub fn parity_line(&self) -> String {
        let n = self.prompts.len();
        let count = |f: &dyn Fn(&PromptReport) -> Option<bool>| {
            let judged: Vec<bool> = self.prompts.iter().filter_map(f).collect();
            let ok = judged.iter().filter(|&&b| b).count();
            match n - judged.len() {
                0 => format!("{ok}/{n} prompts"),
                k => format!("{ok}/{} prompts ({k} not judged)", judged.len()),
            }
        };
        format!(
            "layer count parity: {}; tokenizer parity: {}",
            count(&|p| p.count_parity.as_ref().map(|c| c.parity)),
            count(&|p| p.tokenizer_match)
        )
    }
}

fn completeness(d: &DumpSummary) -> String {
    let mut s = if d.complete {
        format!("complete, {} prompts", d.prompts_finished)
    } else {
        format!("INCOMPLETE: {} of {} prompts finished", d.prompts_finished, d.prompts_requested)
    };
    if let Some(e) = &d.error {
        let _ = write!(s, "; error: {e}");
    }
    s
}

fn state(s: PromptState) -> &'static str {
    match s {
        PromptState::Finished => "finished",
        PromptState::NotFinished => "did not finish it",
        PromptState::NotRequested => "was not asked for it",
    }
}

fn summary_row(name: &str, s: &Summary, greedy: &str, div: &str) -> String {
    let opt = |v: Option<f64>, f: fn(f64) -> String| v.map_or("-".to_string(), f);
    let rate = |r: &Option<Rate>| r.map_or("-".to_string(), |r| format!("{}/{} {:.1}%", r.hits, r.n, 100.0 * r.rate));
    format!(
        "{:<16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>15} {:>15} {:>8}  {}",
        truncate(name, 16),
        s.n_positions,
        opt(s.cosine_min, |v| format!("{v:.6}")),
        opt(s.rel_l2_max, sci),
        opt(s.kld.map(|k| k.mean), sci),
        opt(s.kld.map(|k| k.p99), sci),
        rate(&s.top1),
        rate(&s.top1_margin_aware),
        greedy,
        div
    )
}

/// The worst deviating positions of a prompt with their values, by rel-L2 (top-1 when
/// there are no full logits).
fn worst_positions(p: &PromptReport, n: usize) -> Vec<String> {
    let row_of = |pos: i32| p.positions.iter().position(|&x| x == pos);
    let mut rows: Vec<usize> = p.deviating_positions.iter().filter_map(|&pos| row_of(pos)).collect();
    if let Some(l) = &p.logits {
        rows.sort_by(|&i, &j| l.rel_l2[j].total_cmp(&l.rel_l2[i]).then(i.cmp(&j)));
    }
    rows.iter()
        .take(n)
        .map(|&i| {
            let mut s = format!("position {}:", p.positions[i]);
            if let Some(l) = &p.logits {
                let _ = write!(
                    s,
                    " rel-L2 {} cos {:.6} KLD {} max|Δ| {}",
                    sci(l.rel_l2[i]),
                    l.cosine[i],
                    sci(l.kld[i]),
                    sci(l.max_abs[i])
                );
            }
            if let Some(t) = &p.topk {
                let _ = write!(s, " top-1 engine {} reference {}", t.engine_top1[i], t.reference_top1[i]);
            }
            s
        })
        .collect()
}

fn list_positions(v: &[i32], max: usize) -> String {
    let mut s = v.iter().take(max).map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    if v.len() > max {
        let _ = write!(s, ", … ({} more)", v.len() - max);
    }
    s
}

fn sci(v: f64) -> String {
    if v == 0.0 { "0".to_string() } else { format!("{v:.3e}") }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { s.chars().take(n - 1).chain(['…']).collect() }
}

/// f64 that may be non-finite: a JSON number, or `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub(crate) mod num {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("Infinity")
        } else {
            s.serialize_str("-Infinity")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Num(v) => Ok(v),
            Repr::Text(t) => match t.as_str() {
                "NaN" => Ok(f64::NAN),
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                other => {
                    Err(serde::de::Error::custom(format!("expected a number, \"NaN\" or \"±Infinity\", got {other:?}")))
                }
            },
        }
    }

    /// A wrapper that (de)serializes through this module.
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Num(#[serde(with = "self")] pub f64);
}

pub(crate) mod num_opt {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::num::Num;

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        v.map(Num).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(Option::<Num>::deserialize(d)?.map(|n| n.0))
    }
}

pub(crate) mod num_vec {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    use super::num::Num;

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for &x in v {
            seq.serialize_element(&Num(x))?;
        }
        seq.end()
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Num>::deserialize(d)?.into_iter().map(|n| n.0).collect())
    }
}

pub(crate) mod num_vec_opt {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::num::Num;

    pub fn serialize<S: Serializer>(v: &Option<Vec<f64>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref().map(|v| v.iter().map(|&x| Num(x)).collect::<Vec<_>>()).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
        Ok(Option::<Vec<Num>>::deserialize(d)?.map(|v| v.into_iter().map(|n| n.0).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_numbers_round_trip() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct T {
            #[serde(with = "num_vec")]
            v: Vec<f64>,
            #[serde(with = "num_opt")]
            o: Option<f64>,
        }
        let t = T { v: vec![1.5, f64::INFINITY, f64::NEG_INFINITY, 0.1], o: Some(f64::NAN) };
        let s = serde_json::to_string(&t).unwrap();
        assert_eq!(s, r#"{"v":[1.5,"Infinity","-Infinity",0.1],"o":"NaN"}"#);
        let back: T = serde_json::from_str(&s).unwrap();
        assert_eq!(back.v, t.v);
        assert!(back.o.unwrap().is_nan());
        assert!(serde_json::from_str::<T>(r#"{"v":["nan"],"o":null}"#).is_err());
    }
}
