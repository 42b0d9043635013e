//! The JSON API: the same views as the pages, plus the two writes (queue a run,
//! acknowledge a regression), which need the bearer token.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use serde::Deserialize;

use super::pages::{CompareQuery, TrendQuery};
use super::views::{self, Compare, Overview, RunView, Trend};
use super::{ApiError, AppState, auth};
use crate::queue::{QueueOptions, RunJob};
use crate::store::{Enqueued, Run, RunId, SeriesId, Trigger};

pub async fn overview(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Overview>, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    Ok(Json(views::overview(&state).await?))
}

pub async fn trend(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<TrendQuery>,
) -> Result<Json<Trend>, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    Ok(Json(views::trend(&state, SeriesId(id), q.metric, q.statistic).await?))
}

pub async fn run(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<RunView>, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    Ok(Json(views::run(&state, RunId(id)).await?))
}

pub async fn compare(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<CompareQuery>,
) -> Result<Json<Compare>, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    Ok(Json(views::compare(&state, RunId(q.a), RunId(q.b)).await?))
}

#[derive(Debug, Deserialize)]
pub struct RecentQuery {
    pub limit: Option<i64>,
}

pub async fn recent_runs(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<RecentQuery>,
) -> Result<Json<Vec<Run>>, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    Ok(Json(state.store.recent_runs(limit).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueRun {
    /// A revision (a sha, a tag, a branch); the worker resolves it.
    pub commit: String,
    pub engine: Option<String>,
    pub suite: Option<String>,
    #[serde(default)]
    pub priority: i64,
    /// Measure again even when this commit was measured already.
    #[serde(default)]
    pub force: bool,
}

/// A revision a worker may hand to `git rev-parse`: no option-like or control characters.
fn check_revision(rev: &str) -> Result<(), ApiError> {
    let ok = !rev.is_empty()
        && rev.len() <= 255
        && !rev.starts_with('-')
        && rev.chars().all(|c| c.is_ascii_graphic() && !matches!(c, '\\' | '`' | '$' | ';' | '|' | '&'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest {
            field: "commit",
            value: rev.chars().take(80).collect(),
            expected: "a revision: a sha, a tag or a branch name",
        })
    }
}

pub async fn queue_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<QueueRun>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    auth::require_write(&state.serve, &headers)?;
    check_revision(&req.commit)?;
    let engine = req.engine.unwrap_or_else(|| state.config.default_engine.clone());
    if !state.config.engines.contains_key(&engine) {
        return Err(ApiError::BadRequest {
            field: "engine",
            value: engine,
            expected: "an engine of the configuration",
        });
    }
    let suite = req.suite.unwrap_or_else(|| state.config.suite.clone());
    // Resolved here, once, in the engine's repository: the queue holds full shas only.
    let (config, target) =
        (state.config.clone(), crate::queue::nightly::Target { engine: engine.clone(), branch: req.commit.clone() });
    let cwd = std::env::current_dir().unwrap_or_else(|_| std::path::PathBuf::from("."));
    let resolved = tokio::task::spawn_blocking(move || crate::queue::nightly::resolve(&config, &cwd, &target))
        .await
        .map_err(|e| ApiError::Task(format!("resolving the revision: {e}")))?
        .map_err(|_| ApiError::BadRequest {
            field: "commit",
            value: req.commit.chars().take(80).collect(),
            expected: "a commit of the engine's repository (a sha, a tag or a branch)",
        })?;
    let job = RunJob {
        engine: engine.clone(),
        commit: crate::store::CommitSha::parse(resolved.sha.as_str())?,
        suite,
        trigger: Trigger::Api,
        force: req.force,
        status: None,
        reason: Some("queued through the API".into()),
    };
    let opts = QueueOptions { priority: req.priority, max_attempts: state.config.queue.max_attempts, device: None };
    let (id, duplicate) = match crate::queue::enqueue_run(state.store.as_ref(), &job, opts).await? {
        Enqueued::New(id) => (id, false),
        Enqueued::Duplicate(id) => (id, true),
    };
    tracing::info!(job = id.0, engine = %engine, commit = %req.commit, "queued a run through the API");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "job_id": id, "duplicate": duplicate, "commit": resolved.sha.as_str() })),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub by: Option<String>,
    pub note: Option<String>,
}

pub async fn ack_regression(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((series, run)): Path<(i64, i64)>,
    body: Option<Json<Ack>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    auth::require_write(&state.serve, &headers)?;
    let ack = body.map(|Json(a)| a).unwrap_or_default();
    let reg = state
        .store
        .regression(SeriesId(series))
        .await?
        .ok_or(ApiError::NotFound { what: "open regression of series", id: series.to_string() })?;
    if reg.first_bad.run_id != RunId(run) {
        return Err(ApiError::BadRequest {
            field: "run",
            value: run.to_string(),
            expected: "the first failing run of the series' regression",
        });
    }
    let by = ack.by.unwrap_or_else(|| "api".into());
    let new = state.store.ack_regression(SeriesId(series), RunId(run), &by, ack.note.as_deref(), Utc::now()).await?;
    Ok(Json(serde_json::json!({ "acknowledged": true, "new": new })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions() {
        assert!(check_revision("main").is_ok());
        assert!(check_revision(&"a".repeat(40)).is_ok());
        assert!(check_revision("v1.2^{commit}").is_ok());
        assert!(check_revision("--upload-pack=x").is_err());
        assert!(check_revision("a b").is_err());
        assert!(check_revision("$(id)").is_err());
        assert!(check_revision("").is_err());
    }
}
