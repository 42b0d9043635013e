//! `runner work`: a worker on a GPU box, claiming queued jobs that match its device and
//! running each through `runner once`'s code path, until SIGINT or SIGTERM (the job under
//! way is finished first; a worker killed outright loses nothing — its lease expires and
//! another worker takes the job).
//!
//! Exit codes: 0 stopped cleanly (or, with `--drain`, the queue is empty); 2 could not run
//! (a bad configuration, an unreachable database).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::Outcome;
use crate::config::Config;
use crate::queue::worker::{Tick, Worker, WorkerOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The database holding the queue (default: the configured one, else the SQLite file
    /// in the data directory); `postgres://…` for a fleet.
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// A TOML configuration file (engines, [queue], [github]); `PARITYBENCH_*` override it.
    #[arg(long, value_name = "FILE", env = "PARITYBENCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// This machine's device fingerprint key (default: `[queue] device`, else detected).
    #[arg(long, value_name = "KEY")]
    pub device: Option<String>,
    /// The name leases are held under (default: host-pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Run the jobs that are due, then exit instead of waiting for more.
    #[arg(long)]
    pub drain: bool,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let mut cfg = Config::load(args.config.as_deref()).context("reading the configuration")?;
    if let Some(db) = &args.db {
        cfg.db = Some(crate::config::Secret::new(db.clone()));
    }
    if args.device.is_some() {
        cfg.queue.device = args.device.clone();
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let url = cfg.db_url();
        let store = crate::store::connect(&url).await.context("opening the database")?;
        let cwd = std::env::current_dir().context("the current directory")?;
        let mut opts = WorkerOptions::from_config(&cfg, cwd);
        if let Some(n) = args.name {
            opts.name = n;
        }
        eprintln!("worker {} on {} (device {})", opts.name, crate::store::redact(&url), opts.device_key);
        let mut worker = Worker::new(store, Arc::new(cfg), opts);
        if args.drain {
            while worker.try_run_one().await? != Tick::Empty {}
            worker.drain_posts(std::time::Duration::from_secs(30)).await;
        } else {
            worker.run(shutdown_signal()).await?;
        }
        Ok(Outcome::Passed)
    })
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
