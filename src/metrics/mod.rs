//! Metrics between two dumps (SPEC "Metrics"): f64 accumulation, fixed-order reductions.
//!
//! [`compare`] matches the prompts of an engine's dump (A) and a reference dump (B) by id,
//! refuses pairs whose token ids or positions differ (a number computed from misaligned
//! tensors would be a lie), and measures every position, capture tensor and greedy
//! continuation. Work is spread with rayon across prompts, positions and tensors, but every
//! result is collected in index order and reduced sequentially in f64, so the same dumps give
//! a bit-identical [`Report`] whatever the number of threads.
//!
//! - [`logits`] — per-position kernels (rel-L2, cosine, NMSE, max |Δ|, KLD, top-k)
//! - [`exp`] — the f64 exponentials of the KLD kernel (table-driven, scalar and AVX-512)
//! - [`layers`] — capture tensors, noise floors, the first divergent layer
//! - [`stats`] — reductions (nearest-rank percentiles, Wilson bound)
//! - [`report`] — the report, its metric samples and its text form

pub mod exp;
pub mod layers;
pub mod logits;
pub mod report;
pub mod stats;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rayon::prelude::*;

use crate::protocol::{CapturePoint, Dump, Manifest, ProtocolError, ShardTensors, TensorView};

/// Calls `$f(x, y)` with the two [`Row`]s as slices of their own element types (one
/// monomorphised kernel per pair of stored types).
macro_rules! on_rows {
    ($a:expr, $b:expr, |$x:ident, $y:ident| $body:expr) => {{
        use $crate::metrics::Row;
        match ($a, $b) {
            (Row::F32($x), Row::F32($y)) => $body,
            (Row::F32($x), Row::F16($y)) => $body,
            (Row::F32($x), Row::Bf16($y)) => $body,
            (Row::F16($x), Row::F32($y)) => $body,
            (Row::F16($x), Row::F16($y)) => $body,
            (Row::F16($x), Row::Bf16($y)) => $body,
            (Row::Bf16($x), Row::F32($y)) => $body,
            (Row::Bf16($x), Row::F16($y)) => $body,
            (Row::Bf16($x), Row::Bf16($y)) => $body,
        }
    }};
}
pub(crate) use on_rows;

/// Calls `$f(x)` with a [`Row`] as a slice of its own element type.
macro_rules! on_row {
    ($a:expr, |$x:ident| $body:expr) => {{
        use $crate::metrics::Row;
        match $a {
            Row::F32($x) => $body,
            Row::F16($x) => $body,
            Row::Bf16($x) => $body,
        }
    }};
}

pub use layers::{DivergenceRule, NoiseFloors};
use logits::{Logit, RankedIds, RowMetrics};
use report::{
    AbsentCapture, DumpSummary, ExpertAgreement, Greedy, GreedySummary, KldStats, LayerSummary, LayerSummaryValues,
    LogitSeries, NonFinite, Overall, Rate, Settings, Sums, TopkSeries,
};
pub use report::{
    CountParity, DivergentPoint, LayerComparison, LayerValues, MissingPrompt, PromptReport, PromptState, Report,
    SampleKey, Samples, Side, Summary, names,
};

/// Why two dumps could not be compared. Every variant names the prompt and tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(
        "prompt {prompt:?}: token_ids differ at index {index}: engine has {}, reference has {} \
         (engine {engine_len} tokens, reference {reference_len}); refusing to compare different inputs",
        show(.engine), show(.reference)
    )]
    TokenIdsDiffer {
        prompt: String,
        index: usize,
        engine: Option<i32>,
        reference: Option<i32>,
        engine_len: usize,
        reference_len: usize,
    },
    #[error(
        "prompt {prompt:?}: scored positions differ at index {index}: engine has position {}, reference has {} \
         (engine {engine_len} positions, reference {reference_len}); refusing to compare different positions",
        show(.engine), show(.reference)
    )]
    PositionsDiffer {
        prompt: String,
        index: usize,
        engine: Option<i32>,
        reference: Option<i32>,
        engine_len: usize,
        reference_len: usize,
    },
    #[error(
        "prompt {prompt:?}: tensor `{tensor}` has shape {engine:?} in the engine's dump and {reference:?} in the reference"
    )]
    ShapeMismatch { prompt: String, tensor: String, engine: Vec<usize>, reference: Vec<usize> },
    #[error("prompt {prompt:?}: `{tensor}` in {}: entry [{row}][{col}] = {value} is not a token id", path.display())]
    BadTokenId { prompt: String, path: PathBuf, tensor: String, row: usize, col: usize, value: i32 },
    #[error(
        "no prompt is finished in both dumps (engine {} finished {engine_finished}, reference {} finished {reference_finished})",
        engine.display(), reference.display()
    )]
    NothingToCompare { engine: PathBuf, reference: PathBuf, engine_finished: usize, reference_finished: usize },
    #[error("noise floors {}: {message}", path.display())]
    Floors { path: PathBuf, message: String },
}

fn show(v: &Option<i32>) -> String {
    v.map_or_else(|| "nothing (it ends here)".to_string(), |x| x.to_string())
}

/// Settings of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Reference top-1/top-2 logit margin at or below which a position is a tie.
    pub tie_threshold: f64,
    /// rel-L2 that flags a point as divergent when no noise floor is known.
    pub layer_threshold: f64,
    pub floors: Option<NoiseFloors>,
    /// Multiple of the noise floor that flags a point.
    pub floor_k: f64,
    /// Floors below this are raised to it (a zero floor must not flag f32 rounding).
    pub min_floor: f64,
}

impl Default for Options {
    fn default() -> Options {
        Options { tie_threshold: 1e-3, layer_threshold: 1e-3, floors: None, floor_k: 10.0, min_floor: 1e-6 }
    }
}

impl Options {
    pub fn rule(&self) -> DivergenceRule {
        match &self.floors {
            Some(f) => DivergenceRule::NoiseFloor {
                k: self.floor_k,
                min_floor: self.min_floor,
                fallback_threshold: self.layer_threshold,
                floors: f.clone(),
            },
            None => DivergenceRule::Absolute { threshold: self.layer_threshold },
        }
    }
}

/// Compares an engine's dump (`engine`, A) with a reference dump (`reference`, B).
///
/// Either dump may be incomplete: prompts finished in both are compared, the rest are
/// listed as missing. Errors (refusals): token ids or positions that differ, tensors whose
/// shapes differ, an unreadable shard, no prompt finished in both.
pub fn compare(engine: &Dump, reference: &Dump, opts: &Options) -> Result<Report, MetricsError> {
    let (compared, missing) = plan(&engine.manifest, &reference.manifest);
    if compared.is_empty() {
        return Err(MetricsError::NothingToCompare {
            engine: engine.dir.clone(),
            reference: reference.dir.clone(),
            engine_finished: engine.manifest.prompts.len(),
            reference_finished: reference.manifest.prompts.len(),
        });
    }
    let rule = opts.rule();
    let ctx = Ctx { engine, reference, opts, rule: &rule };
    // collected in prompt order; the first error in that order is the one reported
    let outcomes: Vec<Result<PromptOutcome, MetricsError>> =
        compared.par_iter().map(|id| compare_prompt(&ctx, id)).collect();
    let outcomes = outcomes.into_iter().collect::<Result<Vec<_>, _>>()?;

    let overall = overall(&outcomes, &rule, missing.len());
    let mut prompts = Vec::with_capacity(outcomes.len());
    let mut nonfinite = Vec::new();
    for o in outcomes {
        prompts.push(o.report);
        nonfinite.extend(o.nonfinite);
    }
    Ok(Report {
        schema: report::REPORT_SCHEMA,
        engine: dump_summary(engine),
        reference: dump_summary(reference),
        settings: Settings {
            tie_threshold: opts.tie_threshold,
            deviation_threshold: rule.threshold(None).0,
            divergence: rule,
            wilson_z: stats::WILSON_Z,
        },
        prompts,
        missing,
        overall,
        nonfinite,
    })
}

/// Which prompts to compare (finished in both), and which are missing, in the reference's
/// request order followed by what only the engine knows.
fn plan(a: &Manifest, b: &Manifest) -> (Vec<String>, Vec<MissingPrompt>) {
    let mut order: Vec<&str> = Vec::new();
    let mut seen = BTreeSet::new();
    let ids = b.prompt_ids.iter().chain(b.prompts.iter().map(|p| &p.id));
    let ids = ids.chain(a.prompt_ids.iter()).chain(a.prompts.iter().map(|p| &p.id));
    for id in ids {
        if seen.insert(id.as_str()) {
            order.push(id);
        }
    }
    let state = |m: &Manifest, id: &str| {
        if m.prompt(id).is_some() {
            PromptState::Finished
        } else if m.prompt_ids.iter().any(|p| p == id) {
            PromptState::NotFinished
        } else {
            PromptState::NotRequested
        }
    };
    let mut compared = Vec::new();
    let mut missing = Vec::new();
    for id in order {
        let (ea, eb) = (state(a, id), state(b, id));
        if ea == PromptState::Finished && eb == PromptState::Finished {
            compared.push(id.to_string());
        } else {
            missing.push(MissingPrompt { id: id.to_string(), engine: ea, reference: eb });
        }
    }
    (compared, missing)
}

fn dump_summary(d: &Dump) -> DumpSummary {
    let m = &d.manifest;
    DumpSummary {
        dir: d.dir.display().to_string(),
        engine: m.engine.name.clone(),
        version: m.engine.version.clone(),
        backend: m.engine.backend.clone(),
        device: m.engine.device.clone(),
        quant: m.model.quant.clone(),
        compute_dtype: m.model.compute_dtype.clone(),
        complete: m.complete,
        error: m.error.clone(),
        prompts_requested: m.prompt_ids.len(),
        prompts_finished: m.prompts.len(),
    }
}

struct Ctx<'a> {
    engine: &'a Dump,
    reference: &'a Dump,
    opts: &'a Options,
    rule: &'a DivergenceRule,
}

/// One compared prompt, with what the overall section pools.
struct PromptOutcome {
    report: PromptReport,
    nonfinite: Vec<NonFinite>,
    /// `(Σ(a−b)², Σb²)` over the logits, when both dumps hold them.
    logit_sums: Option<(f64, f64)>,
}

fn compare_prompt(ctx: &Ctx<'_>, id: &str) -> Result<PromptOutcome, MetricsError> {
    let sa = ctx.engine.shard(id)?;
    let sb = ctx.reference.shard(id)?;
    let ids_a = sa.token_ids()?;
    let ids_b = sb.token_ids()?;
    if let Some((index, engine, reference)) = first_difference(&ids_a, &ids_b) {
        return Err(MetricsError::TokenIdsDiffer {
            prompt: id.into(),
            index,
            engine,
            reference,
            engine_len: ids_a.len(),
            reference_len: ids_b.len(),
        });
    }
    let pos_a = sa.positions()?;
    let pos_b = sb.positions()?;
    if let Some((index, engine, reference)) = first_difference(&pos_a, &pos_b) {
        return Err(MetricsError::PositionsDiffer {
            prompt: id.into(),
            index,
            engine,
            reference,
            engine_len: pos_a.len(),
            reference_len: pos_b.len(),
        });
    }
    let positions: Vec<i32> = pos_a.to_vec();
    let mut nonfinite = Vec::new();

    let (logits, topk, logit_sums) = compare_outputs(ctx, id, &sa, &sb, &positions, &mut nonfinite)?;
    let (layers, absent, layer_nonfinite) = compare_layers(ctx, id, &sa, &sb, &positions)?;
    nonfinite.extend(layer_nonfinite);
    let greedy = greedy(&sa.generated()?, &sb.generated()?);

    let mut points: Vec<layers::Point<'_>> = layers
        .iter()
        .filter_map(|l| match &l.values {
            LayerValues::Float(f) => Some((Some((l.capture, l.layer)), l.tensor.as_str(), f.rel_l2)),
            LayerValues::ExpertIds(_) => None,
        })
        .collect();
    if let Some(l) = &logits {
        points.push((None, "logits", l.rel_l2_pooled));
    }
    let first_divergent = ctx.rule.first_divergent(points);

    let threshold = ctx.rule.threshold(None).0;
    let deviating_positions = match (&logits, &topk) {
        (Some(l), _) => select(&positions, l.rel_l2.iter().map(|&x| stats::exceeds(x, threshold))),
        (None, Some(t)) => select(&positions, t.top1.iter().map(|&m| !m)),
        (None, None) => Vec::new(),
    };
    let count_parity = count_parity(&ctx.engine.manifest, &ctx.reference.manifest, &sa, &sb);
    let tokenizer_match = ctx.engine.manifest.prompt(id).and_then(|p| p.tokenizer_match);
    let n_nonfinite = nonfinite.iter().map(|n| n.count).sum();
    let summary = summarize(logits.as_slice(), topk.as_slice(), positions.len(), n_nonfinite);
    Ok(PromptOutcome {
        report: PromptReport {
            id: id.into(),
            n_tokens: ids_a.len(),
            positions,
            logits,
            topk,
            summary,
            greedy,
            layers,
            absent,
            first_divergent,
            deviating_positions,
            count_parity,
            tokenizer_match,
        },
        nonfinite,
        logit_sums,
    })
}

/// Layer count parity of one prompt: the manifests' layer counts agree (where both give
/// one) and every capture point recorded in both shards covers the same layers. `None` when
/// the shards share no capture point (nothing to judge). Row counts need no check here: a
/// tensor whose shape differs is refused by [`compare`].
fn count_parity(ea: &Manifest, eb: &Manifest, sa: &ShardTensors, sb: &ShardTensors) -> Option<report::CountParity> {
    let by_point = |s: &ShardTensors| {
        let mut m: BTreeMap<CapturePoint, Vec<u32>> = BTreeMap::new();
        for (c, l, _) in s.captures() {
            m.entry(c).or_default().push(l);
        }
        m.values_mut().for_each(|v| v.sort_unstable());
        m
    };
    let (la, lb) = (by_point(sa), by_point(sb));
    let shared: Vec<CapturePoint> = la.keys().filter(|c| lb.contains_key(c)).copied().collect();
    if shared.is_empty() {
        return None;
    }
    let mismatched: Vec<String> = shared
        .iter()
        .filter(|c| la[c] != lb[c])
        .map(|c| format!("{}: engine {:?}, reference {:?}", c.as_str(), la[c], lb[c]))
        .collect();
    let (na, nb) = (ea.model.n_layers, eb.model.n_layers);
    let layers_agree = match (na, nb) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    Some(report::CountParity {
        parity: layers_agree && mismatched.is_empty(),
        engine_layers: na,
        reference_layers: nb,
        mismatched,
    })
}

/// The first index where two id lists differ (including one ending first).
fn first_difference(a: &[i32], b: &[i32]) -> Option<(usize, Option<i32>, Option<i32>)> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)).map(|i| (i, a.get(i).copied(), b.get(i).copied()))
}

fn select(positions: &[i32], flags: impl Iterator<Item = bool>) -> Vec<i32> {
    positions.iter().zip(flags).filter(|(_, f)| *f).map(|(&p, _)| p).collect()
}

/// What one dump gives for the next-token prediction at each position.
enum Output<'a> {
    Logits(TensorView<'a>),
    TopIds { ids: Cow<'a, [i32]>, k: usize, probs: Option<TensorView<'a>> },
    Nothing,
}

fn output<'a>(s: &'a ShardTensors) -> Result<Output<'a>, MetricsError> {
    if s.has("logits") {
        return Ok(Output::Logits(s.logits()?));
    }
    if s.has("top_ids") {
        let t = s.get("top_ids")?;
        let k = t.cols();
        let ids = t.to_i32().expect("validated as I32");
        let probs = if s.has("top_probs") { Some(s.get("top_probs")?) } else { None };
        return Ok(Output::TopIds { ids, k, probs });
    }
    Ok(Output::Nothing)
}

type OutputMetrics = (Option<LogitSeries>, Option<TopkSeries>, Option<(f64, f64)>);

/// Logit and top-k metrics of one prompt.
fn compare_outputs(
    ctx: &Ctx<'_>,
    id: &str,
    sa: &ShardTensors,
    sb: &ShardTensors,
    positions: &[i32],
    nonfinite: &mut Vec<NonFinite>,
) -> Result<OutputMetrics, MetricsError> {
    let (oa, ob) = (output(sa)?, output(sb)?);
    if let (Output::Logits(la), Output::Logits(lb)) = (&oa, &ob) {
        if la.shape != lb.shape {
            return Err(MetricsError::ShapeMismatch {
                prompt: id.into(),
                tensor: "logits".into(),
                engine: la.shape.to_vec(),
                reference: lb.shape.to_vec(),
            });
        }
        let rows = logit_rows(la, lb);
        push_nonfinite(nonfinite, id, "logits", Side::Engine, positions, rows.iter().map(|r| r.nonfinite_a));
        push_nonfinite(nonfinite, id, "logits", Side::Reference, positions, rows.iter().map(|r| r.nonfinite_b));
        let (mut dd, mut bb) = (0.0f64, 0.0f64);
        for r in &rows {
            dd += r.dd;
            bb += r.bb;
        }
        let any_nonfinite = rows.iter().any(|r| r.nonfinite_a + r.nonfinite_b > 0);
        let series = LogitSeries {
            rel_l2: rows.iter().map(|r| r.rel_l2).collect(),
            cosine: rows.iter().map(|r| r.cosine).collect(),
            nmse: rows.iter().map(|r| r.nmse).collect(),
            max_abs: rows.iter().map(|r| r.max_abs).collect(),
            kld: rows.iter().map(|r| r.kld).collect(),
            nonfinite_engine: rows.iter().map(|r| r.nonfinite_a).collect(),
            nonfinite_reference: rows.iter().map(|r| r.nonfinite_b).collect(),
            rel_l2_pooled: if any_nonfinite { f64::NAN } else { stats::rel_l2(dd, bb) },
        };
        let ra: Vec<RankedIds> = rows.iter().map(|r| RankedIds::from_topk(&r.top_a)).collect();
        let rb: Vec<RankedIds> = rows.iter().map(|r| RankedIds::from_topk(&r.top_b)).collect();
        let topk = topk_series(&ra, &rb, ctx.opts.tie_threshold);
        return Ok((Some(series), Some(topk), Some((dd, bb))));
    }
    let ra = rankings(id, sa, &oa, Side::Engine, positions, nonfinite)?;
    let rb = rankings(id, sb, &ob, Side::Reference, positions, nonfinite)?;
    let topk = match (ra, rb) {
        (Some(ra), Some(rb)) => Some(topk_series(&ra, &rb, ctx.opts.tie_threshold)),
        _ => None,
    };
    Ok((None, topk, None))
}

/// Every position's full-logit metrics, rows in parallel, collected in row order. Rows are
/// read in their stored type (f32, f16, bf16) straight from the map.
pub fn logit_rows(a: &TensorView<'_>, b: &TensorView<'_>) -> Vec<RowMetrics> {
    let (sa, sb) = (StoredRows::new(a), StoredRows::new(b));
    (0..a.rows())
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(buf_a, buf_b), i| on_rows!(sa.row(i, buf_a), sb.row(i, buf_b), |x, y| logits::row_metrics(x, y)),
        )
        .collect()
}

/// A float tensor's rows in the type they are stored in, where the mapped bytes can be
/// borrowed as that type (aligned); anything else is widened row by row through
/// [`TensorView::row_f32`].
#[derive(Clone, Copy)]
pub enum StoredRows<'a> {
    F32(&'a [f32], usize),
    F16(&'a [half::f16], usize),
    Bf16(&'a [half::bf16], usize),
    Other(TensorView<'a>),
}

/// One row of a [`StoredRows`].
pub enum Row<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    Bf16(&'a [half::bf16]),
}

impl<'a> StoredRows<'a> {
    pub fn new(v: &TensorView<'a>) -> StoredRows<'a> {
        let (bytes, cols) = (v.bytes(), v.cols());
        let typed = match v.dtype {
            crate::protocol::Dtype::F32 => bytemuck::try_cast_slice(bytes).ok().map(|s| StoredRows::F32(s, cols)),
            crate::protocol::Dtype::F16 => bytemuck::try_cast_slice(bytes).ok().map(|s| StoredRows::F16(s, cols)),
            crate::protocol::Dtype::Bf16 => bytemuck::try_cast_slice(bytes).ok().map(|s| StoredRows::Bf16(s, cols)),
            crate::protocol::Dtype::I32 => None,
        };
        typed.unwrap_or(StoredRows::Other(*v))
    }

    /// Row `i`; `buf` holds it when it must be converted.
    pub fn row<'b>(&'b self, i: usize, buf: &'b mut Vec<f32>) -> Row<'b> {
        match *self {
            StoredRows::F32(s, c) => Row::F32(&s[i * c..(i + 1) * c]),
            StoredRows::F16(s, c) => Row::F16(&s[i * c..(i + 1) * c]),
            StoredRows::Bf16(s, c) => Row::Bf16(&s[i * c..(i + 1) * c]),
            StoredRows::Other(ref v) => Row::F32(v.row_f32(i, buf)),
        }
    }
}

/// One side's ranking per position, from its logits or its top-k ids.
fn rankings(
    id: &str,
    shard: &ShardTensors,
    out: &Output<'_>,
    side: Side,
    positions: &[i32],
    nonfinite: &mut Vec<NonFinite>,
) -> Result<Option<Vec<RankedIds>>, MetricsError> {
    match out {
        Output::Nothing => Ok(None),
        Output::Logits(l) => {
            let stored = StoredRows::new(l);
            let rows: Vec<(RankedIds, u32)> = (0..l.rows())
                .into_par_iter()
                .map_init(Vec::new, |buf, i| {
                    on_row!(stored.row(i, buf), |row| {
                        let bad = row.iter().filter(|x| !Logit::to_f32(**x).is_finite()).count() as u32;
                        (RankedIds::from_topk(&logits::top_k(row)), bad)
                    })
                })
                .collect();
            push_nonfinite(nonfinite, id, "logits", side, positions, rows.iter().map(|r| r.1));
            Ok(Some(rows.into_iter().map(|r| r.0).collect()))
        }
        Output::TopIds { ids, k, probs } => {
            let k = *k;
            let probs = probs.map(|p| p.to_f32());
            if let Some(p) = &probs {
                let per_row = (0..positions.len())
                    .map(|i| p[i * k..(i + 1) * k].iter().filter(|x| !x.is_finite()).count() as u32);
                push_nonfinite(nonfinite, id, "top_probs", side, positions, per_row);
            }
            let mut out = Vec::with_capacity(positions.len());
            let mut row_ids = Vec::with_capacity(k);
            for i in 0..positions.len() {
                row_ids.clear();
                for (col, &v) in ids[i * k..(i + 1) * k].iter().enumerate() {
                    let id = u32::try_from(v).map_err(|_| MetricsError::BadTokenId {
                        prompt: id.into(),
                        path: shard.path.clone(),
                        tensor: "top_ids".into(),
                        row: i,
                        col,
                        value: v,
                    })?;
                    row_ids.push(id);
                }
                out.push(match &probs {
                    Some(p) => {
                        let row = &p[i * k..(i + 1) * k];
                        let gaps: Vec<f64> = row.iter().map(|&q| f64::from(row[0]).ln() - f64::from(q).ln()).collect();
                        RankedIds::with_gaps(&row_ids, &gaps)
                    }
                    None => RankedIds::new(&row_ids, None),
                });
            }
            Ok(Some(out))
        }
    }
}

fn push_nonfinite(
    out: &mut Vec<NonFinite>,
    prompt: &str,
    tensor: &str,
    side: Side,
    positions: &[i32],
    per_row: impl Iterator<Item = u32> + Clone,
) {
    let count: u64 = per_row.clone().map(u64::from).sum();
    if count > 0 {
        let pos = select(positions, per_row.map(|n| n > 0));
        out.push(NonFinite { prompt: prompt.into(), tensor: tensor.into(), side, count, positions: pos });
    }
}

fn topk_series(a: &[RankedIds], b: &[RankedIds], tie_threshold: f64) -> TopkSeries {
    let g: Vec<logits::TopkAgreement> =
        a.iter().zip(b).map(|(x, y)| logits::topk_agreement(x, y, tie_threshold)).collect();
    let top1_id = |r: &RankedIds| r.top1().map_or(-1, i64::from);
    TopkSeries {
        engine_top1: a.iter().map(top1_id).collect(),
        reference_top1: b.iter().map(top1_id).collect(),
        reference_margin: b.iter().map(|r| r.margin()).collect(),
        top1: g.iter().map(|x| x.top1).collect(),
        top1_margin_aware: g.iter().map(|x| x.top1_margin_aware).collect(),
        top5_overlap: g.iter().map(|x| x.top5_overlap).collect(),
        top10_overlap: g.iter().map(|x| x.top10_overlap).collect(),
    }
}

type LayerMetrics = (Vec<LayerComparison>, Vec<AbsentCapture>, Vec<NonFinite>);

/// Every capture tensor of one prompt: compared where both dumps hold it, reported absent
/// where one does not.
fn compare_layers(
    ctx: &Ctx<'_>,
    id: &str,
    sa: &ShardTensors,
    sb: &ShardTensors,
    positions: &[i32],
) -> Result<LayerMetrics, MetricsError> {
    let in_a: BTreeSet<(CapturePoint, u32)> = sa.captures().into_iter().map(|(c, l, _)| (c, l)).collect();
    let in_b: BTreeSet<(CapturePoint, u32)> = sb.captures().into_iter().map(|(c, l, _)| (c, l)).collect();
    let mut all: Vec<(CapturePoint, u32)> = in_a.union(&in_b).copied().collect();
    all.sort_by_key(|&(c, l)| layers::forward_key(c, l));

    let mut absent = Vec::new();
    let mut both = Vec::new();
    for (c, l) in all {
        let why = |d: &Dump| d.manifest.captures.absent.get(c.as_str()).cloned();
        match (in_a.contains(&(c, l)), in_b.contains(&(c, l))) {
            (true, true) => both.push((c, l)),
            (false, _) => {
                absent.push(AbsentCapture { tensor: c.tensor_name(l), absent_in: Side::Engine, why: why(ctx.engine) })
            }
            (_, false) => absent.push(AbsentCapture {
                tensor: c.tensor_name(l),
                absent_in: Side::Reference,
                why: why(ctx.reference),
            }),
        }
    }
    let results: Vec<Result<(LayerComparison, Vec<NonFinite>), MetricsError>> =
        both.par_iter().map(|&(c, l)| compare_capture(id, sa, sb, c, l, positions)).collect();
    let mut out = Vec::with_capacity(results.len());
    let mut nonfinite = Vec::new();
    for r in results {
        let (cmp, nf) = r?;
        out.push(cmp);
        nonfinite.extend(nf);
    }
    Ok((out, absent, nonfinite))
}

fn compare_capture(
    id: &str,
    sa: &ShardTensors,
    sb: &ShardTensors,
    capture: CapturePoint,
    layer: u32,
    positions: &[i32],
) -> Result<(LayerComparison, Vec<NonFinite>), MetricsError> {
    let name = capture.tensor_name(layer);
    let (a, b) = (sa.get(&name)?, sb.get(&name)?);
    if a.shape != b.shape {
        return Err(MetricsError::ShapeMismatch {
            prompt: id.into(),
            tensor: name,
            engine: a.shape.to_vec(),
            reference: b.shape.to_vec(),
        });
    }
    let mut nonfinite = Vec::new();
    let values = if capture == CapturePoint::MoeTopkIds {
        let (ia, ib) = (a.to_i32().expect("validated as I32"), b.to_i32().expect("validated as I32"));
        LayerValues::ExpertIds(layers::expert_agreement(&ia, &ib, a.cols()))
    } else {
        let f = layers::float_layer(&a, &b, positions);
        for (side, n, t) in [(Side::Engine, f.nonfinite_engine, &a), (Side::Reference, f.nonfinite_reference, &b)] {
            if n > 0 {
                let pos = layers::nonfinite_rows(t, positions);
                nonfinite.push(NonFinite { prompt: id.into(), tensor: name.clone(), side, count: n, positions: pos });
            }
        }
        LayerValues::Float(f)
    };
    Ok((LayerComparison { tensor: name, capture, layer, shape: a.shape.to_vec(), values }, nonfinite))
}

/// Greedy agreement: the leading tokens that agree and the first step that differs.
fn greedy(a: &[i32], b: &[i32]) -> Option<Greedy> {
    if a.is_empty() && b.is_empty() {
        return None;
    }
    let match_len = a.iter().zip(b).take_while(|(x, y)| x == y).count() as u32;
    let first_divergent_step = first_difference(a, b).map(|(i, _, _)| i as u32);
    Some(Greedy { match_len, first_divergent_step, engine_len: a.len() as u32, reference_len: b.len() as u32 })
}

/// Aggregates over the positions of the given series (concatenated in order).
fn summarize(logits: &[LogitSeries], topk: &[TopkSeries], n_positions: usize, nonfinite: u64) -> Summary {
    let cat = |f: fn(&LogitSeries) -> &Vec<f64>| logits.iter().flat_map(|l| f(l).iter().copied()).collect::<Vec<f64>>();
    let mut s = Summary { n_positions, nonfinite, ..Summary::default() };
    if !logits.is_empty() {
        let cos = cat(|l| &l.cosine);
        let rel = cat(|l| &l.rel_l2);
        s.cosine_min = stats::min(&cos);
        s.cosine_mean = stats::mean(&cos);
        s.rel_l2_max = stats::max(&rel);
        s.rel_l2_mean = stats::mean(&rel);
        s.nmse_mean = stats::mean(&cat(|l| &l.nmse));
        s.max_abs = stats::max(&cat(|l| &l.max_abs));
        s.kld = stats::distribution(&cat(|l| &l.kld)).map(|d| KldStats {
            mean: d.mean,
            median: d.median,
            p99: d.p99,
            max: d.max,
        });
    }
    if !topk.is_empty() {
        s.top1 = Some(rate(topk.iter().flat_map(|t| t.top1.iter().copied())));
        let aware: Vec<&Vec<bool>> = topk.iter().filter_map(|t| t.top1_margin_aware.as_ref()).collect();
        if !aware.is_empty() {
            s.top1_margin_aware = Some(rate(aware.into_iter().flatten().copied()));
        }
        let mean_of = |f: fn(&TopkSeries) -> Option<&Vec<f64>>| {
            let v: Vec<f64> = topk.iter().filter_map(f).flatten().copied().collect();
            stats::mean(&v)
        };
        s.top5_overlap_mean = mean_of(|t| t.top5_overlap.as_ref());
        s.top10_overlap_mean = mean_of(|t| t.top10_overlap.as_ref());
    }
    s
}

fn rate(hits: impl Iterator<Item = bool>) -> Rate {
    let (mut h, mut n) = (0u64, 0u64);
    for x in hits {
        h += u64::from(x);
        n += 1;
    }
    Rate {
        hits: h,
        n,
        rate: if n == 0 { 0.0 } else { h as f64 / n as f64 },
        wilson_lower: stats::wilson_lower(h, n, stats::WILSON_Z).unwrap_or(0.0),
    }
}

/// The overall section: every prompt's positions together, layers pooled over prompts.
fn overall(outcomes: &[PromptOutcome], rule: &DivergenceRule, prompts_missing: usize) -> Overall {
    let logits: Vec<LogitSeries> = outcomes.iter().filter_map(|o| o.report.logits.clone()).collect();
    let topk: Vec<TopkSeries> = outcomes.iter().filter_map(|o| o.report.topk.clone()).collect();
    let n_positions = outcomes.iter().map(|o| o.report.positions.len()).sum();
    let nonfinite = outcomes.iter().map(|o| o.report.summary.nonfinite).sum();
    let summary = summarize(&logits, &topk, n_positions, nonfinite);

    let greedy: Vec<Greedy> = outcomes.iter().filter_map(|o| o.report.greedy).collect();
    let greedy = (!greedy.is_empty()).then(|| GreedySummary {
        prompts: greedy.len(),
        full_matches: greedy.iter().filter(|g| g.first_divergent_step.is_none()).count(),
        min_match_len: greedy.iter().map(|g| g.match_len).min().unwrap_or(0),
        mean_match_len: stats::mean(&greedy.iter().map(|g| f64::from(g.match_len)).collect::<Vec<_>>()).unwrap_or(0.0),
    });

    let layers = pooled_layers(outcomes);
    let mut points: Vec<layers::Point<'_>> = layers
        .iter()
        .filter_map(|l| match &l.values {
            LayerSummaryValues::Float { rel_l2, .. } => Some((Some((l.capture, l.layer)), l.tensor.as_str(), *rel_l2)),
            LayerSummaryValues::ExpertIds(_) => None,
        })
        .collect();
    let sums: Vec<(f64, f64)> = outcomes.iter().filter_map(|o| o.logit_sums).collect();
    if !sums.is_empty() {
        let any_nonfinite = logits.iter().any(|l| l.rel_l2_pooled.is_nan());
        let (mut dd, mut bb) = (0.0f64, 0.0f64);
        for (d, b) in sums {
            dd += d;
            bb += b;
        }
        points.push((None, "logits", if any_nonfinite { f64::NAN } else { stats::rel_l2(dd, bb) }));
    }
    let first_divergent = rule.first_divergent(points);
    Overall { prompts_compared: outcomes.len(), prompts_missing, summary, greedy, layers, first_divergent }
}

/// Capture tensors pooled over prompts, in forward order.
fn pooled_layers(outcomes: &[PromptOutcome]) -> Vec<LayerSummary> {
    struct Acc<'a> {
        capture: CapturePoint,
        layer: u32,
        prompts: usize,
        floats: Vec<(&'a str, &'a report::FloatLayer)>,
        ids: Vec<ExpertAgreement>,
    }
    let mut by: BTreeMap<((u8, u32, u8), String), Acc<'_>> = BTreeMap::new();
    for o in outcomes {
        for l in &o.report.layers {
            let acc = by.entry((layers::forward_key(l.capture, l.layer), l.tensor.clone())).or_insert(Acc {
                capture: l.capture,
                layer: l.layer,
                prompts: 0,
                floats: Vec::new(),
                ids: Vec::new(),
            });
            acc.prompts += 1;
            match &l.values {
                LayerValues::Float(f) => acc.floats.push((o.report.id.as_str(), f)),
                LayerValues::ExpertIds(e) => acc.ids.push(*e),
            }
        }
    }
    by.into_iter()
        .map(|((_, tensor), acc)| {
            let values = if acc.floats.is_empty() {
                let n = acc.ids.iter().map(|e| e.n_positions).sum();
                let set = acc.ids.iter().map(|e| e.set_matches).sum();
                let ordered = acc.ids.iter().map(|e| e.ordered_matches).sum();
                LayerSummaryValues::ExpertIds(ExpertAgreement::new(n, set, ordered))
            } else {
                let mut sums = Sums::default();
                for (_, f) in &acc.floats {
                    sums.add(&f.sums);
                }
                let finite = acc.floats.iter().all(|(_, f)| f.nonfinite_engine + f.nonfinite_reference == 0);
                let per_prompt: Vec<f64> = acc.floats.iter().map(|(_, f)| f.rel_l2).collect();
                // the first NaN, else the first lowest
                let mut worst = (acc.floats[0].0, acc.floats[0].1);
                for &(p, f) in &acc.floats[1..] {
                    if !worst.1.worst_cosine.is_nan()
                        && (f.worst_cosine.is_nan() || f.worst_cosine < worst.1.worst_cosine)
                    {
                        worst = (p, f);
                    }
                }
                LayerSummaryValues::Float {
                    rel_l2: if finite { stats::rel_l2(sums.dd, sums.bb) } else { f64::NAN },
                    cosine: if finite { stats::cosine(sums.aa, sums.bb, sums.ab) } else { f64::NAN },
                    rel_l2_max: stats::max(&per_prompt).unwrap_or(f64::NAN),
                    worst_cosine: worst.1.worst_cosine,
                    worst_prompt: worst.0.to_string(),
                    worst_position: worst.1.worst_position,
                }
            };
            LayerSummary { tensor, capture: acc.capture, layer: acc.layer, prompts: acc.prompts, values }
        })
        .collect()
}
