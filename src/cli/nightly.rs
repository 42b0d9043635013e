//! `runner nightly`: resolve each configured branch head, queue it (or run it here, with
//! `[nightly] mode = "run"`), and report what happened to each.
//!
//! Exit codes: 0 every head was queued, measured before, or measured and passed; 1 a head
//! measured here failed a gate; 2 a head could not be resolved, queued or measured.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::Outcome;
use crate::config::{Config, NightlyMode};
use crate::queue::nightly::{self, Action};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TOML configuration file ([nightly], engines); `PARITYBENCH_*` override it.
    #[arg(long, value_name = "FILE", env = "PARITYBENCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The database URL (default: the configured one, else the SQLite file in the data directory).
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// Run each head here instead of queueing it (overrides `[nightly] mode`).
    #[arg(long)]
    pub run: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let mut cfg = Config::load(args.config.as_deref()).context("reading the configuration")?;
    if let Some(db) = &args.db {
        cfg.db = Some(crate::config::Secret::new(db.clone()));
    }
    let mode = if args.run { NightlyMode::Run } else { cfg.nightly.mode };
    let cwd = std::env::current_dir().context("the current directory")?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let items = rt.block_on(async {
        let url = cfg.db_url();
        let store = crate::store::connect(&url).await.context("opening the database")?;
        let items = match mode {
            NightlyMode::Queue => nightly::queue_all(store.as_ref(), &cfg, &cwd).await?,
            NightlyMode::Run => nightly::run_all(store, Arc::new(cfg.clone()), &cwd).await?,
        };
        anyhow::Ok(items)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&items).context("serializing the report")?);
    } else {
        print!("{}", nightly::render(&items));
    }
    let failed = |a: &Action| matches!(a, Action::Failed { .. } | Action::Measured { error: Some(_), .. });
    if let Some(i) = items.iter().find(|i| failed(&i.action)) {
        let n = items.iter().filter(|i| failed(&i.action)).count();
        anyhow::bail!("{n} of {} branch head(s) could not be measured (first: {} {})", items.len(), i.engine, i.branch);
    }
    if items.iter().any(|i| matches!(&i.action, Action::Measured { status, .. } if status == "failed")) {
        return Ok(Outcome::GateFailed);
    }
    Ok(Outcome::Passed)
}
