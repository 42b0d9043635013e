//! What each page shows, built once from the Store and rendered twice: as HTML (the askama
//! templates) and as JSON (the API). A view holds plain data; charts are drawn from it by
//! [`super::charts`] and are not part of the JSON.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{ApiError, AppState};
use crate::store::{
    LayerParity, Measurement, Regression, RunDetails, RunId, RunStatus, Series, SeriesId, SeriesLatest, StoredVerdict,
    TrendPoint,
};

/// green / red / stale / errored, as the overview colours a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SeriesState {
    Green,
    Red,
    Errored,
    Stale,
}

impl SeriesState {
    pub fn as_str(self) -> &'static str {
        match self {
            SeriesState::Green => "green",
            SeriesState::Red => "red",
            SeriesState::Errored => "errored",
            SeriesState::Stale => "stale",
        }
    }
}

/// A series as one line of a table.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesRow {
    pub series_id: SeriesId,
    pub engine: String,
    pub model: String,
    pub reference: String,
    pub device: String,
    pub fixture_id: String,
    pub contract_key: String,
    pub state: SeriesState,
    /// Why stale, when it is.
    pub stale_reason: Option<String>,
    pub run_id: RunId,
    pub status: RunStatus,
    pub commit: String,
    pub generation: i64,
    pub finished_at: Option<DateTime<Utc>>,
    pub failed_gates: i64,
}

impl SeriesRow {
    pub fn commit_short(&self) -> &str {
        short(&self.commit)
    }
    pub fn fixture_short(&self) -> &str {
        short(&self.fixture_id)
    }
    pub fn age(&self) -> String {
        self.finished_at.map(|t| age(Utc::now() - t)).unwrap_or_else(|| "—".into())
    }
}

/// A red series with the commit range in which it turned red.
#[derive(Debug, Clone, Serialize)]
pub struct RegressionView {
    pub series: SeriesRow,
    pub last_good_run: Option<RunId>,
    pub last_good_commit: Option<String>,
    pub first_bad_run: RunId,
    pub first_bad_commit: String,
    /// `last_good..first_bad` (git's range syntax), or the first bad commit alone.
    pub range: String,
    pub acknowledged_by: Option<String>,
    pub acknowledged_note: Option<String>,
    pub repro: String,
}

impl RegressionView {
    pub fn compare_href(&self) -> Option<String> {
        self.last_good_run.map(|g| format!("/compare?a={g}&b={}", self.first_bad_run))
    }
}

/// The front page.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    pub generated_at: DateTime<Utc>,
    pub regressions: Vec<RegressionView>,
    pub acknowledged: Vec<RegressionView>,
    pub series: Vec<SeriesRow>,
    pub green: usize,
    pub red: usize,
    pub errored: usize,
    pub stale: usize,
}

pub fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

/// `3d 4h`, `12m`, `40s`.
pub fn age(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The one-line command that measures a commit again.
pub fn repro(engine: &str, commit: &str, suite: &str) -> String {
    format!("runner once --commit {commit} --engine {engine} --suite {suite}")
}

fn row_of(l: &SeriesLatest, head: &BTreeMap<i64, i64>, state: &AppState, now: DateTime<Utc>) -> SeriesRow {
    let s = &l.series;
    let r = &l.latest;
    let mut st = match (r.status, r.failed_gates) {
        (RunStatus::Errored, _) => SeriesState::Errored,
        (_, n) if n > 0 => SeriesState::Red,
        _ => SeriesState::Green,
    };
    let mut stale_reason = None;
    if st == SeriesState::Green {
        let engine_head = head.get(&s.engine_id.0).copied().unwrap_or(r.generation);
        let too_old = r.finished_at.is_some_and(|t| (now - t).to_std().is_ok_and(|d| d > state.serve.stale_after));
        if r.generation < engine_head {
            stale_reason = Some(format!("latest point at generation {}; the engine has {engine_head}", r.generation));
        } else if too_old {
            stale_reason = Some(format!("no run for {}", r.finished_at.map(|t| age(now - t)).unwrap_or_default()));
        }
        if stale_reason.is_some() {
            st = SeriesState::Stale;
        }
    }
    SeriesRow {
        series_id: s.id,
        engine: s.engine.clone(),
        model: s.model.clone(),
        reference: s.reference.clone(),
        device: s.device_key.clone(),
        fixture_id: s.fixture_id.clone(),
        contract_key: s.contract_key.clone(),
        state: st,
        stale_reason,
        run_id: r.run_id,
        status: r.status,
        commit: r.commit_sha.to_string(),
        generation: r.generation,
        finished_at: r.finished_at,
        failed_gates: r.failed_gates,
    }
}

fn regression_view(row: &SeriesRow, reg: &Regression, suite: &str) -> RegressionView {
    let last_good_commit = reg.last_good.as_ref().map(|g| g.commit_sha.to_string());
    let first_bad_commit = reg.first_bad.commit_sha.to_string();
    let range = match &last_good_commit {
        Some(g) => format!("{}..{}", short(g), short(&first_bad_commit)),
        None => short(&first_bad_commit).to_string(),
    };
    RegressionView {
        series: row.clone(),
        last_good_run: reg.last_good.as_ref().map(|g| g.run_id),
        last_good_commit,
        first_bad_run: reg.first_bad.run_id,
        repro: repro(&row.engine, &first_bad_commit, suite),
        first_bad_commit,
        range,
        acknowledged_by: reg.acknowledged.as_ref().map(|a| a.by.clone()),
        acknowledged_note: reg.acknowledged.as_ref().and_then(|a| a.note.clone()),
    }
}

pub async fn overview(state: &AppState) -> Result<Overview, ApiError> {
    let now = Utc::now();
    let latest = state.store.latest_per_series(None).await?;
    // The newest generation measured per engine: a series behind it is stale.
    let mut head: BTreeMap<i64, i64> = BTreeMap::new();
    for l in &latest {
        let h = head.entry(l.series.engine_id.0).or_insert(l.latest.generation);
        *h = (*h).max(l.latest.generation);
    }
    let series: Vec<SeriesRow> = latest.iter().map(|l| row_of(l, &head, state, now)).collect();
    let (mut regressions, mut acknowledged) = (Vec::new(), Vec::new());
    for row in series.iter().filter(|r| matches!(r.state, SeriesState::Red | SeriesState::Errored)) {
        if let Some(reg) = state.store.regression(row.series_id).await? {
            let v = regression_view(row, &reg, &state.config.suite);
            if reg.acknowledged.is_some() { acknowledged.push(v) } else { regressions.push(v) }
        }
    }
    let count = |s: SeriesState| series.iter().filter(|r| r.state == s).count();
    Ok(Overview {
        generated_at: now,
        green: count(SeriesState::Green),
        red: count(SeriesState::Red),
        errored: count(SeriesState::Errored),
        stale: count(SeriesState::Stale),
        regressions,
        acknowledged,
        series,
    })
}

/// One point of a trend chart.
#[derive(Debug, Clone, Serialize)]
pub struct TrendPointView {
    pub run_id: RunId,
    pub commit: String,
    pub generation: i64,
    pub value: f64,
    /// The spread band (tok/s: min and max over the repeats), when measured.
    pub low: Option<f64>,
    pub high: Option<f64>,
    /// The run failed a gate on this metric.
    pub failed: bool,
    /// Index into `segments`.
    pub segment: usize,
}

/// A stretch of the chart measured under one series key.
#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    pub series_id: SeriesId,
    pub device: String,
    pub fixture_id: String,
    pub contract_key: String,
    /// What changed from the previous segment.
    pub change: Option<String>,
}

/// A contract threshold drawn into the chart.
#[derive(Debug, Clone, Serialize)]
pub struct GateLine {
    pub gate_id: String,
    pub comparison: String,
    pub threshold: f64,
    pub severity: String,
}

/// A link to switch the chart.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub label: String,
    pub href: String,
    pub selected: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trend {
    pub series: Series,
    pub metric: String,
    pub statistic: String,
    pub points: Vec<TrendPointView>,
    pub segments: Vec<Segment>,
    pub gates: Vec<GateLine>,
    pub metrics: Vec<Choice>,
    pub other_series: Vec<Choice>,
    pub capped_at: usize,
}

impl Trend {
    pub fn failing(&self) -> usize {
        self.points.iter().filter(|p| p.failed).count()
    }
    pub fn last(&self) -> Option<&TrendPointView> {
        self.points.last()
    }
}

/// The statistics that bound a tok/s band, when measured.
fn spread_of(metric: &str, statistic: &str) -> Option<(&'static str, &'static str)> {
    (metric.ends_with("tok_s") && statistic == "median").then_some(("min", "max"))
}

/// A default metric: the first gate's metric and reduction that the series measured, else
/// the first measured pair.
fn default_metric(pairs: &[(String, String)], verdicts: &[StoredVerdict]) -> Option<(String, String)> {
    verdicts
        .iter()
        .map(|v| (v.metric.clone(), v.reduction.clone()))
        .find(|p| pairs.contains(p))
        .or_else(|| pairs.first().cloned())
}

pub async fn trend(
    state: &AppState,
    id: SeriesId,
    metric: Option<String>,
    statistic: Option<String>,
) -> Result<Trend, ApiError> {
    let store = &state.store;
    let series = store.series(id).await?.ok_or(ApiError::NotFound { what: "series", id: id.to_string() })?;
    let cap = state.serve.trend_points;
    let latest = store.series_runs(id, 1).await?;
    let (pairs, verdicts) = match latest.last() {
        Some(l) => (store.run_series_metrics(l.run_id, id).await?, store.run_series_verdicts(l.run_id, id).await?),
        None => (Vec::new(), Vec::new()),
    };
    let (metric, statistic) = match (metric, statistic) {
        (Some(m), Some(s)) => (m, s),
        (Some(m), None) => {
            let s = pairs.iter().find(|(pm, _)| *pm == m).map(|(_, s)| s.clone()).unwrap_or_else(|| "value".into());
            (m, s)
        }
        _ => default_metric(&pairs, &verdicts).unwrap_or_else(|| ("logits.cosine".into(), "min".into())),
    };

    // The lineage of the series: series of the same engine × model × reference that came
    // before or after it (their commits do not overlap), as segments of one chart. Series
    // measured side by side (two devices at once) are separate lines, not segments.
    let related = store.related_series(id).await?;
    let mut fetched: Vec<(&Series, Vec<TrendPoint>)> = Vec::new();
    for s in &related {
        let mut pts = store.series_trend(s.id, &metric, &statistic, cap as i64).await?;
        if pts.is_empty() {
            pts = store.series_verdict_trend(s.id, &metric, &statistic, cap as i64).await?;
        }
        if !pts.is_empty() || s.id == id {
            fetched.push((s, pts));
        }
    }
    let span = |pts: &[TrendPoint]| (pts.first().map(|p| p.generation), pts.last().map(|p| p.generation));
    let me = fetched.iter().position(|(s, _)| s.id == id).unwrap_or(0);
    let (mut lo, mut hi) = span(&fetched[me].1);
    let mut lineage = vec![me];
    for i in (0..me).rev() {
        let (a, b) = span(&fetched[i].1);
        if let (Some(b), Some(l)) = (b, lo)
            && b <= l
        {
            lineage.insert(0, i);
            lo = a;
        }
    }
    for (i, (_, pts)) in fetched.iter().enumerate().skip(me + 1) {
        let (a, b) = span(pts);
        if let (Some(a), Some(h)) = (a, hi)
            && a >= h
        {
            lineage.push(i);
            hi = b;
        }
    }
    let mut points: Vec<(TrendPoint, usize, SeriesId)> = Vec::new();
    let mut segments: Vec<Segment> = Vec::new();
    for i in lineage {
        let (s, pts) = &fetched[i];
        let change = segments.last().map(|prev: &Segment| {
            let mut what = Vec::new();
            if prev.device != s.device_key {
                what.push("device");
            }
            if prev.fixture_id != s.fixture_id {
                what.push("fixture");
            }
            if prev.contract_key != s.contract_key {
                what.push("contract");
            }
            what.join(", ")
        });
        let seg = segments.len();
        segments.push(Segment {
            series_id: s.id,
            device: s.device_key.clone(),
            fixture_id: s.fixture_id.clone(),
            contract_key: s.contract_key.clone(),
            change,
        });
        points.extend(pts.iter().cloned().map(|p| (p, seg, s.id)));
    }
    points.sort_by_key(|(p, seg, _)| (p.generation, *seg, p.run_id));
    let skip = points.len().saturating_sub(cap);
    let points: Vec<(TrendPoint, usize, SeriesId)> = points.into_iter().skip(skip).collect();
    let min_gen = points.first().map(|(p, _, _)| p.generation).unwrap_or(0);

    let mut failing: HashSet<(SeriesId, RunId)> = HashSet::new();
    for s in &segments {
        for r in store.series_failing_runs(s.series_id, &metric, min_gen).await? {
            failing.insert((s.series_id, r));
        }
    }
    let mut bands: BTreeMap<(SeriesId, RunId), (Option<f64>, Option<f64>)> = BTreeMap::new();
    if let Some((lo, hi)) = spread_of(&metric, &statistic) {
        for s in &segments {
            for p in store.series_trend(s.series_id, &metric, lo, cap as i64).await? {
                bands.entry((s.series_id, p.run_id)).or_default().0 = Some(p.value);
            }
            for p in store.series_trend(s.series_id, &metric, hi, cap as i64).await? {
                bands.entry((s.series_id, p.run_id)).or_default().1 = Some(p.value);
            }
        }
    }
    let points = points
        .into_iter()
        .map(|(p, seg, sid)| {
            let (low, high) = bands.get(&(sid, p.run_id)).copied().unwrap_or((None, None));
            TrendPointView {
                run_id: p.run_id,
                commit: p.commit_sha.to_string(),
                generation: p.generation,
                value: p.value,
                low,
                high,
                failed: failing.contains(&(sid, p.run_id)),
                segment: seg,
            }
        })
        .collect();

    let mut seen = BTreeSet::new();
    let gates = verdicts
        .iter()
        .filter(|v| v.metric == metric && v.reduction == statistic && v.threshold.is_finite())
        .filter(|v| seen.insert((v.gate_id.clone(), v.threshold.to_bits())))
        .map(|v| GateLine {
            gate_id: format!("{}/{}", v.contract.id, v.gate_id),
            comparison: v.comparison.clone(),
            threshold: v.threshold,
            severity: v.severity.as_str().to_string(),
        })
        .collect();
    let mut choices = pairs.clone();
    for v in verdicts.iter().filter(|v| v.prompt.is_none()) {
        let p = (v.metric.clone(), v.reduction.clone());
        if !choices.contains(&p) {
            choices.push(p);
        }
    }
    let metrics = choices
        .iter()
        .map(|(m, s)| Choice {
            label: format!("{m} · {s}"),
            href: format!("/series/{id}?metric={}&statistic={}", enc(m), enc(s)),
            selected: *m == metric && *s == statistic,
        })
        .collect();
    let other_series = store
        .latest_per_series(Some(&series.engine))
        .await?
        .into_iter()
        .map(|l| Choice {
            label: format!("{} · {} · {}", l.series.model, l.series.reference, l.series.device_key),
            href: format!("/series/{}?metric={}&statistic={}", l.series.id, enc(&metric), enc(&statistic)),
            selected: l.series.id == id,
        })
        .collect();
    Ok(Trend { series, metric, statistic, points, segments, gates, metrics, other_series, capped_at: cap })
}

/// Percent-encodes a query value (metric names are plain, but a reference may hold `/`).
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One (model, reference) block of a run page.
#[derive(Debug, Clone, Serialize)]
pub struct RunSeriesBlock {
    pub series_id: Option<SeriesId>,
    pub model: String,
    pub reference: String,
    pub verdicts: Vec<StoredVerdict>,
    /// Pooled measurements (every prompt).
    pub pooled: Vec<Measurement>,
    /// Prompt -> metric -> value, for the per-prompt table.
    pub prompts: Vec<PromptRow>,
    pub prompt_columns: Vec<String>,
    /// Pooled (prompt-less) per-layer parity, in layer then capture order.
    pub layers: Vec<LayerParity>,
    /// The first layer whose cosine or rel-L2 is outside its gate.
    pub first_below_gate: Option<LayerMark>,
    pub layer_cosine_gate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptRow {
    pub prompt: String,
    pub values: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerMark {
    pub capture: String,
    pub layer: i64,
    pub cosine: f64,
    pub rel_l2: f64,
    pub gate: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub run: crate::store::Run,
    pub repro: String,
    pub blocks: Vec<RunSeriesBlock>,
    /// The detail record (argmax mismatches, continuations, logs), when available.
    pub detail: Option<super::detail::RunDetail>,
    /// Why there is no detail record.
    pub detail_missing: Option<String>,
}

/// The per-prompt table's columns (those the run measured).
const PROMPT_COLUMNS: &[(&str, &str)] = &[
    ("logits.cosine", "min"),
    ("logits.rel_l2", "max"),
    ("kl", "mean"),
    ("top1", "value"),
    ("greedy_match_len", "value"),
    ("prefill_tok_s", "median"),
    ("decode_tok_s", "median"),
];

fn block_of(d: &RunDetails, model: &str, reference: &str, series_id: Option<SeriesId>) -> RunSeriesBlock {
    let mine = |m: &str, r: &str| m == model && r == reference;
    let verdicts: Vec<StoredVerdict> = d.verdicts.iter().filter(|v| mine(&v.model, &v.reference)).cloned().collect();
    let pooled: Vec<Measurement> =
        d.measurements.iter().filter(|m| mine(&m.model, &m.reference) && m.prompt.is_none()).cloned().collect();
    let per_prompt: Vec<&Measurement> =
        d.measurements.iter().filter(|m| mine(&m.model, &m.reference) && m.prompt.is_some()).collect();
    let measured: BTreeSet<(&str, &str)> =
        per_prompt.iter().map(|m| (m.metric.as_str(), m.statistic.as_str())).collect();
    let columns: Vec<(&str, &str)> = PROMPT_COLUMNS.iter().copied().filter(|c| measured.contains(c)).collect();
    let mut prompts: Vec<String> = Vec::new();
    for m in &per_prompt {
        let p = m.prompt.clone().unwrap_or_default();
        if !prompts.contains(&p) {
            prompts.push(p);
        }
    }
    let prompt_rows = prompts
        .iter()
        .map(|p| PromptRow {
            prompt: p.clone(),
            values: columns
                .iter()
                .map(|(metric, stat)| {
                    per_prompt
                        .iter()
                        .find(|m| m.prompt.as_deref() == Some(p) && m.metric == *metric && m.statistic == *stat)
                        .map(|m| m.value)
                })
                .collect(),
        })
        .collect();
    let mut layers: Vec<LayerParity> =
        d.layers.iter().filter(|l| mine(&l.model, &l.reference) && l.prompt.is_none()).cloned().collect();
    layers.sort_by(|a, b| a.layer.cmp(&b.layer).then_with(|| capture_rank(&a.capture).cmp(&capture_rank(&b.capture))));
    let gate = |metric: &str| verdicts.iter().find(|v| v.metric == metric && v.threshold.is_finite());
    let cos_gate = gate("layer.cosine").cloned();
    let rel_gate = gate("layer.rel_l2").cloned();
    let first_below_gate = layers.iter().find_map(|l| {
        if let Some(g) = &cos_gate
            && !passes(l.cosine, &g.comparison, g.threshold)
        {
            return Some(LayerMark {
                capture: l.capture.clone(),
                layer: l.layer,
                cosine: l.cosine,
                rel_l2: l.rel_l2,
                gate: format!("cosine {} {}", g.comparison, g.threshold),
            });
        }
        if let Some(g) = &rel_gate
            && !passes(l.rel_l2, &g.comparison, g.threshold)
        {
            return Some(LayerMark {
                capture: l.capture.clone(),
                layer: l.layer,
                cosine: l.cosine,
                rel_l2: l.rel_l2,
                gate: format!("rel_l2 {} {:e}", g.comparison, g.threshold),
            });
        }
        None
    });
    RunSeriesBlock {
        series_id,
        model: model.to_string(),
        reference: reference.to_string(),
        verdicts,
        pooled,
        prompts: prompt_rows,
        prompt_columns: columns.iter().map(|(m, s)| format!("{m} {s}")).collect(),
        layer_cosine_gate: cos_gate.as_ref().map(|g| g.threshold),
        layers,
        first_below_gate,
    }
}

/// Whether `x` satisfies `x <cmp> threshold`; NaN never does.
pub fn passes(x: f64, cmp: &str, threshold: f64) -> bool {
    match cmp {
        ">" => x > threshold,
        ">=" => x >= threshold,
        "<" => x < threshold,
        "<=" => x <= threshold,
        "==" => x == threshold,
        _ => false,
    }
}

/// Capture points in the order data flows through a layer.
pub fn capture_rank(c: &str) -> usize {
    const ORDER: &[&str] =
        &["embed", "attn_norm", "attn_out", "ffn_norm", "moe_router", "ffn_out", "layer_out", "final_norm"];
    ORDER.iter().position(|x| *x == c).unwrap_or(ORDER.len())
}

pub fn run_blocks(d: &RunDetails) -> Vec<RunSeriesBlock> {
    let mut keys: Vec<(String, String, Option<SeriesId>)> =
        d.series.iter().map(|s| (s.model.clone(), s.reference.clone(), Some(s.id))).collect();
    for m in &d.measurements {
        if !keys.iter().any(|(a, b, _)| *a == m.model && *b == m.reference) {
            keys.push((m.model.clone(), m.reference.clone(), None));
        }
    }
    keys.iter().map(|(m, r, s)| block_of(d, m, r, *s)).collect()
}

pub async fn run(state: &AppState, id: RunId) -> Result<RunView, ApiError> {
    let d = state.store.run_details(id).await?.ok_or(ApiError::NotFound { what: "run", id: id.to_string() })?;
    let (detail, detail_missing) = match super::detail::load_or_build(state, &d).await {
        Ok(detail) => (Some(detail), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(RunView {
        repro: repro(&d.run.engine, d.run.commit_sha.as_str(), &d.run.suite),
        blocks: run_blocks(&d),
        run: d.run,
        detail,
        detail_missing,
    })
}

/// One number of two runs side by side.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    pub model: String,
    pub reference: String,
    pub metric: String,
    pub statistic: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    pub delta: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareVerdict {
    pub gate: String,
    pub model: String,
    pub reference: String,
    pub mode: Option<String>,
    pub a: Option<String>,
    pub b: Option<String>,
    pub changed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Compare {
    pub a: crate::store::Run,
    pub b: crate::store::Run,
    pub rows: Vec<CompareRow>,
    pub verdicts: Vec<CompareVerdict>,
}

pub async fn compare(state: &AppState, a: RunId, b: RunId) -> Result<Compare, ApiError> {
    let get = |id: RunId| async move {
        state.store.run_details(id).await?.ok_or(ApiError::NotFound { what: "run", id: id.to_string() })
    };
    let (da, db) = (get(a).await?, get(b).await?);
    type Key = (String, String, String, String);
    let key = |m: &Measurement| (m.model.clone(), m.reference.clone(), m.metric.clone(), m.statistic.clone());
    let mut table: BTreeMap<Key, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for m in da.measurements.iter().filter(|m| m.prompt.is_none()) {
        table.entry(key(m)).or_default().0 = Some(m.value);
    }
    for m in db.measurements.iter().filter(|m| m.prompt.is_none()) {
        table.entry(key(m)).or_default().1 = Some(m.value);
    }
    let rows = table
        .into_iter()
        .map(|((model, reference, metric, statistic), (a, b))| CompareRow {
            delta: a.zip(b).map(|(a, b)| b - a),
            model,
            reference,
            metric,
            statistic,
            a,
            b,
        })
        .collect();
    type VKey = (String, String, String, Option<String>);
    let vkey = |v: &StoredVerdict| {
        (format!("{}/{}", v.contract.id, v.gate_id), v.model.clone(), v.reference.clone(), v.mode.clone())
    };
    let mut vs: BTreeMap<VKey, (Option<String>, Option<String>)> = BTreeMap::new();
    for v in da.verdicts.iter().filter(|v| v.prompt.is_none()) {
        vs.entry(vkey(v)).or_default().0 = Some(v.outcome.as_str().to_string());
    }
    for v in db.verdicts.iter().filter(|v| v.prompt.is_none()) {
        vs.entry(vkey(v)).or_default().1 = Some(v.outcome.as_str().to_string());
    }
    let verdicts = vs
        .into_iter()
        .map(|((gate, model, reference, mode), (a, b))| CompareVerdict {
            changed: a != b,
            gate,
            model,
            reference,
            mode,
            a,
            b,
        })
        .collect();
    Ok(Compare { a: da.run, b: db.run, rows, verdicts })
}

/// A number for a table: 6 significant digits, scientific when small.
pub fn num(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x == 0.0 || (1e-3..1e6).contains(&x.abs()) {
        let s = format!("{x:.6}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        format!("{x:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_ages_read_well() {
        assert_eq!(num(0.999912345), "0.999912");
        assert_eq!(num(1.0e-7), "1.000e-7");
        assert_eq!(num(f64::NAN), "NaN");
        assert_eq!(num(12.5), "12.5");
        assert_eq!(age(chrono::TimeDelta::seconds(3 * 86400 + 7200)), "3d 2h");
        assert_eq!(enc("hf-fp32/incremental"), "hf-fp32%2Fincremental");
    }

    #[test]
    fn gates_compare_like_contracts() {
        assert!(passes(0.9999, ">", 0.999));
        assert!(!passes(f64::NAN, "<", 1.0));
        assert!(!passes(1e-3, "<", 1e-4));
        assert!(capture_rank("attn_out") < capture_rank("layer_out"));
    }
}
