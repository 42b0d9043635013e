//! `runner serve`: the dashboard, the JSON API and `/metrics` (and, beside them, the GitHub
//! webhook and an embedded worker of the job queue).
//!
//! Settings: `--listen` (`PARITYBENCH_LISTEN`, default `127.0.0.1:8080`), `--db`
//! (`PARITYBENCH_DB`), `PARITYBENCH_SERVE_TOKEN` (the bearer token writes need; at least
//! 16 characters), `PARITYBENCH_PUBLIC_READS` (`false` makes reads need the token too).

use std::path::PathBuf;

use anyhow::Context;

use super::Outcome;
use crate::config::Config;
use crate::queue::{
    webhook::{self, WebhookState},
    worker,
};
use crate::service::{self, AppState, ServeConfig, Token};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The address to listen on.
    #[arg(long, value_name = "ADDR", env = "PARITYBENCH_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The database URL (default: the SQLite file in the data directory).
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// A TOML configuration file (engines, paths); `PARITYBENCH_*` variables override it.
    #[arg(long, value_name = "FILE", env = "PARITYBENCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Serve only: no embedded worker (queued jobs wait for `runner work` elsewhere).
    #[arg(long)]
    pub no_worker: bool,
}

/// The serve settings from the environment.
fn serve_config() -> anyhow::Result<ServeConfig> {
    let mut cfg = ServeConfig::default();
    if let Ok(t) = std::env::var("PARITYBENCH_SERVE_TOKEN") {
        cfg.token = Some(Token::parse(&t).context("PARITYBENCH_SERVE_TOKEN")?);
    }
    if let Ok(v) = std::env::var("PARITYBENCH_PUBLIC_READS") {
        cfg.public_reads = match v.as_str() {
            "1" | "true" | "yes" => true,
            "0" | "false" | "no" => false,
            _ => anyhow::bail!("PARITYBENCH_PUBLIC_READS = `{v}`: expected true or false"),
        };
    }
    if !cfg.public_reads && cfg.token.is_none() {
        anyhow::bail!("PARITYBENCH_PUBLIC_READS=false needs PARITYBENCH_SERVE_TOKEN: nobody could read");
    }
    Ok(cfg)
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let cfg = Config::load(args.config.as_deref()).context("reading the configuration")?;
    let serve = serve_config()?;
    let url = args.db.clone().unwrap_or_else(|| cfg.db_url());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let store = crate::store::connect(&url).await.context("opening the database")?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr().context("the listening address")?;
        let worker_config = std::sync::Arc::new(cfg.clone());
        let hook = WebhookState {
            store: store.clone(),
            github: cfg.github.clone(),
            suite: cfg.suite.clone(),
            max_attempts: cfg.queue.max_attempts,
        };
        let state = AppState::new(store.clone(), cfg, serve);
        let app = service::router(state).merge(webhook::router(hook));
        // One shutdown for the server and the embedded worker: the worker finishes the job
        // under way (its lease would hand it to another worker otherwise), then stops.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let worker = (!args.no_worker).then(|| {
            let mut rx = stop_rx.clone();
            tokio::spawn(worker::run(store, worker_config, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }))
        });
        eprintln!(
            "paritybench: serving on http://{addr} (database {}; {})",
            crate::store::redact(&url),
            if worker.is_some() { "embedded worker on" } else { "no worker" }
        );
        let shutdown = async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        };
        service::launch(listener, app, shutdown).await.context("serving")?;
        if let Some(w) = worker {
            w.await.context("the embedded worker panicked")?.context("the embedded worker")?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(Outcome::Passed)
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
