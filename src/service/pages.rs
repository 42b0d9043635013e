//! The HTML pages: each handler builds its view ([`super::views`]) and renders the askama
//! template of the same name.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Html;
use serde::Deserialize;

use super::views::{self, Compare, Overview, RunSeriesBlock, RunView, Trend};
use super::{ApiError, AppState, auth, charts};
use crate::store::{RunId, SeriesId};

/// Number formatting shared by the templates.
trait Fmt {
    fn num(&self, x: &f64) -> String {
        views::num(*x)
    }
    fn opt(&self, x: &Option<f64>) -> String {
        x.map(views::num).unwrap_or_else(|| "—".into())
    }
    fn ms(&self, x: &f64) -> String {
        if x.is_finite() { format!("{:.0} ms", x) } else { "—".into() }
    }
    fn enc(&self, s: &str) -> String {
        views::enc(s)
    }
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    v: Overview,
}

#[derive(Template)]
#[template(path = "trend.html")]
struct TrendPage {
    t: Trend,
    chart: String,
}
impl Fmt for TrendPage {}

#[derive(Template)]
#[template(path = "run.html")]
struct RunPage {
    v: RunView,
}
impl Fmt for RunPage {}
impl RunPage {
    fn layer_chart(&self, b: &RunSeriesBlock) -> String {
        charts::layers(b)
    }
}

#[derive(Template)]
#[template(path = "compare.html")]
struct ComparePage {
    c: Compare,
}
impl Fmt for ComparePage {}

pub async fn overview(State(state): State<AppState>, headers: HeaderMap) -> Result<Html<String>, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    let v = views::overview(&state).await?;
    Ok(Html(OverviewPage { v }.render()?))
}

#[derive(Debug, Deserialize)]
pub struct TrendQuery {
    pub metric: Option<String>,
    pub statistic: Option<String>,
}

pub async fn trend(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<TrendQuery>,
) -> Result<Html<String>, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    let t = views::trend(&state, SeriesId(id), q.metric, q.statistic).await?;
    let chart = charts::trend(&t);
    Ok(Html(TrendPage { t, chart }.render()?))
}

pub async fn run(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Html<String>, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    let v = views::run(&state, RunId(id)).await?;
    Ok(Html(RunPage { v }.render()?))
}

#[derive(Debug, Deserialize)]
pub struct CompareQuery {
    pub a: i64,
    pub b: i64,
}

pub async fn compare(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<CompareQuery>,
) -> Result<Html<String>, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    let c = views::compare(&state, RunId(q.a), RunId(q.b)).await?;
    Ok(Html(ComparePage { c }.render()?))
}
