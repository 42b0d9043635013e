//! `runner serve`: the dashboard, the JSON API and `/metrics`, over one axum router.
//!
//! Everything a browser or an API client sees lives here. Each page is built once as a
//! serializable view ([`views`]) and then rendered two ways: HTML through the askama
//! templates in `templates/` (charts drawn server-side as SVG by [`charts`], so there is no
//! front-end build) and JSON under `/api/...` — the API shows exactly what the pages show.
//!
//! Access ([`auth`]): reads are open by default (`public_reads`), writes (queue a run,
//! acknowledge a regression) need the bearer token; the token is never logged or rendered.
//!
//! The server is built as [`router`] + [`launch`] so tests bind port 0 and so that other
//! routers (the GitHub webhook) can be merged beside it and an embedded worker spawned next
//! to it (see `src/cli/serve.rs`).

mod api;
pub mod auth;
pub mod charts;
pub mod detail;
mod error;
mod pages;
mod prom;
pub mod seed;
pub mod views;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};

use crate::config::Config;
use crate::store::Store;

pub use auth::Token;
pub use error::ApiError;

/// How the server behaves (defaults, then the TOML file, then `PARITYBENCH_*` variables;
/// see `src/cli/serve.rs`).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Whether reading pages and the API needs no token (default true).
    pub public_reads: bool,
    /// The bearer token writes need (and reads, when they are not public). No token: writes
    /// are refused.
    pub token: Option<Token>,
    /// A series whose latest run finished longer ago than this is stale.
    pub stale_after: Duration,
    /// The most points a trend shows.
    pub trend_points: usize,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            public_reads: true,
            token: None,
            stale_after: Duration::from_secs(7 * 24 * 3600),
            trend_points: 1000,
        }
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// Where runs keep their dumps and logs (`data_dir/runs/<id>`) and where the reference
    /// dumps and tokenizers are (`cache_dir/fixtures`).
    pub config: Arc<Config>,
    pub serve: Arc<ServeConfig>,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, config: Config, serve: ServeConfig) -> AppState {
        AppState { store, config: Arc::new(config), serve: Arc::new(serve) }
    }
}

/// Every page, API route and `/metrics`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/series/{id}", get(pages::trend))
        .route("/runs/{id}", get(pages::run))
        .route("/compare", get(pages::compare))
        .route("/api/overview", get(api::overview))
        .route("/api/series/{id}/trend", get(api::trend))
        .route("/api/runs/{id}", get(api::run))
        .route("/api/compare", get(api::compare))
        .route("/api/runs", get(api::recent_runs).post(api::queue_run))
        .route("/api/regressions/{series}/{run}/ack", post(api::ack_regression))
        .route("/metrics", get(prom::metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` completes, then finishes the requests in
/// flight.
pub async fn launch(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
