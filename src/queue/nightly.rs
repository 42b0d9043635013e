//! `runner nightly`: the configured branch heads of every engine, measured once a night.
//!
//! Each `[nightly] branches` entry (engine -> branches; default: the default engine's
//! `HEAD`) is resolved once to a full sha — through the engine's repository, fetched first
//! when it is a URL — and then, by `[nightly] mode`, either queued as a job for the fleet of
//! `runner work` (`queue`, the default) or measured here, one after the other (`run`). A head
//! already measured (or already queued) is not measured again: a quiet branch costs
//! nothing. The report lists every branch with what happened to it.

use std::path::Path;

use serde::Serialize;

use super::{QueueOptions, RunJob, enqueue_run};
use crate::config::Config;
use crate::once::git::{self, ResolvedCommit};
use crate::store::{CommitSha, Enqueued, Store, StoreError, Trigger};

/// One branch of one engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub engine: String,
    pub branch: String,
}

/// What happened to a branch head.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Queued {
        job: i64,
    },
    AlreadyQueued {
        job: i64,
    },
    AlreadyMeasured {
        run: i64,
    },
    /// Measured here (`mode = "run"`).
    Measured {
        run: i64,
        status: String,
        error: Option<String>,
    },
    /// The head could not be resolved or measured.
    Failed {
        error: String,
    },
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub engine: String,
    pub branch: String,
    pub commit: Option<String>,
    #[serde(flatten)]
    pub action: Action,
}

/// The targets of `[nightly]`.
pub fn targets(cfg: &Config) -> Vec<Target> {
    if cfg.nightly.branches.is_empty() {
        return vec![Target { engine: cfg.default_engine.clone(), branch: "HEAD".to_string() }];
    }
    cfg.nightly
        .branches
        .iter()
        .flat_map(|(engine, branches)| branches.iter().map(|b| Target { engine: engine.clone(), branch: b.clone() }))
        .collect()
}

/// The head of `t.branch` in its engine's repository (fetched first when remote).
pub fn resolve(cfg: &Config, cwd: &Path, t: &Target) -> Result<ResolvedCommit, String> {
    let engine = cfg.engines.get(&t.engine).ok_or_else(|| format!("unknown engine `{}`", t.engine))?;
    let repo = match &engine.repo {
        Some(r) => git::local_repo(r, &engine.name, &cfg.cache_dir),
        None => git::toplevel(cwd),
    }
    .map_err(|e| e.to_string())?;
    git::resolve(&repo, &t.branch).map_err(|e| e.to_string())
}

/// Queues the head of every target; heads measured before are reported, not queued.
pub async fn queue_all(store: &dyn Store, cfg: &Config, cwd: &Path) -> Result<Vec<Item>, StoreError> {
    let mut items = Vec::new();
    for t in targets(cfg) {
        let head = match resolve(cfg, cwd, &t) {
            Ok(h) => h,
            Err(error) => {
                items.push(Item { engine: t.engine, branch: t.branch, commit: None, action: Action::Failed { error } });
                continue;
            }
        };
        let sha = CommitSha::parse(head.sha.as_str())?;
        let device = cfg.nightly.device.as_deref();
        let action = match measured(store, cfg, &t.engine, &sha).await? {
            Some(run) => Action::AlreadyMeasured { run },
            None => {
                let job = RunJob {
                    engine: t.engine.clone(),
                    commit: sha.clone(),
                    suite: cfg.suite.clone(),
                    trigger: Trigger::Nightly,
                    force: false,
                    status: None,
                    reason: Some(format!("nightly: head of {}", t.branch)),
                };
                let opts = QueueOptions { priority: 0, max_attempts: cfg.queue.max_attempts, device };
                match enqueue_run(store, &job, opts).await? {
                    Enqueued::New(id) => Action::Queued { job: id.0 },
                    Enqueued::Duplicate(id) => Action::AlreadyQueued { job: id.0 },
                }
            }
        };
        items.push(Item { engine: t.engine, branch: t.branch, commit: Some(sha.to_string()), action });
    }
    Ok(items)
}

/// The passed or failed run of this head on this machine's device, if any.
pub async fn measured(
    store: &dyn Store,
    cfg: &Config,
    engine: &str,
    sha: &CommitSha,
) -> Result<Option<i64>, StoreError> {
    let device = cfg.engines.get(engine).map_or("cpu", |e| e.device.as_str());
    let key = crate::once::device_key(device);
    Ok(store.measured_run(engine, sha, &cfg.suite, &key).await?.map(|r| r.0))
}

/// The report as a table.
pub fn render(items: &[Item]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{:<14} {:<20} {:<12}  what happened", "engine", "branch", "commit");
    for i in items {
        let what = match &i.action {
            Action::Queued { job } => format!("queued as job {job}"),
            Action::AlreadyQueued { job } => format!("already queued (job {job})"),
            Action::AlreadyMeasured { run } => format!("already measured (run {run})"),
            Action::Measured { run, status, error } => match error {
                Some(e) => format!("run {run}: {status}: {}", e.lines().next().unwrap_or_default()),
                None => format!("run {run}: {status}"),
            },
            Action::Failed { error } => format!("could not run: {error}"),
        };
        let commit = i.commit.as_deref().map_or("-", |c| &c[..12.min(c.len())]);
        let _ = writeln!(s, "{:<14} {:<20} {:<12}  {what}", i.engine, i.branch, commit);
    }
    s
}

/// Measures the head of every target here, one after the other (`mode = "run"`); heads
/// measured before are reported, not measured again.
pub async fn run_all(
    store: std::sync::Arc<dyn Store>,
    cfg: std::sync::Arc<Config>,
    cwd: &Path,
) -> Result<Vec<Item>, StoreError> {
    use crate::once::store_recorder::StoreRecorder;
    let mut items = Vec::new();
    for t in targets(&cfg) {
        let head = match resolve(&cfg, cwd, &t) {
            Ok(h) => h,
            Err(error) => {
                items.push(Item { engine: t.engine, branch: t.branch, commit: None, action: Action::Failed { error } });
                continue;
            }
        };
        let sha = CommitSha::parse(head.sha.as_str())?;
        let action = match measured(store.as_ref(), &cfg, &t.engine, &sha).await? {
            Some(run) => Action::AlreadyMeasured { run },
            None => {
                let (store, cfg, cwd) = (std::sync::Arc::clone(&store), std::sync::Arc::clone(&cfg), cwd.to_path_buf());
                let args = crate::once::OnceArgs {
                    rev: sha.to_string(),
                    engine: Some(t.engine.clone()),
                    suite: Some(cfg.suite.clone()),
                };
                let handle = tokio::runtime::Handle::current();
                let outcome = tokio::task::spawn_blocking(move || {
                    let mut rec = StoreRecorder::on_store(store, handle, &cfg.data_dir).with_trigger(Trigger::Nightly);
                    crate::once::run(&cfg, &args, &cwd, &mut rec, &crate::once::Quiet).map_err(|e| format!("{e}"))
                })
                .await
                .unwrap_or_else(|e| Err(format!("the run panicked: {e}")));
                match outcome {
                    Ok(o) => Action::Measured { run: o.run_id, status: o.status.as_str().to_string(), error: o.error },
                    Err(error) => Action::Failed { error },
                }
            }
        };
        items.push(Item { engine: t.engine, branch: t.branch, commit: Some(sha.to_string()), action });
    }
    Ok(items)
}
