//! The [`Recorder`] of `runner once` on the real [`Store`]: SQLite by default, PostgreSQL
//! for a shared deployment, picked from the `--db` URL.
//!
//! `create_run` upserts the engine and the commit (with its generation number) and records
//! the run as `running` before the engine starts; `finish_run` writes everything the run
//! measured in the store's single transaction.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::owner::Owner;
use super::record::{Abandoned, RecordError, Recorder, RunDetails, RunResults, RunStart};
use crate::store::{self, CommitSha, DeviceFingerprint, JobId, NewCommit, NewRun, RunId, RunStatus, Store, Trigger};

/// Records runs in a [`Store`], driving its async API from this synchronous command.
pub struct StoreRecorder {
    store: Arc<dyn Store>,
    rt: Exec,
    data_dir: PathBuf,
    trigger: Trigger,
    /// The job attempt (job, attempt token) every run is bound to, when a worker runs it.
    attempt: Option<(JobId, String)>,
}

impl StoreRecorder {
    /// Opens (and migrates) the database at `url`; run directories go under `data_dir/runs`.
    pub fn connect(url: &str, data_dir: &Path) -> Result<StoreRecorder, RecordError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| RecordError::Io { path: data_dir.to_path_buf(), source })?;
        let store = rt.block_on(store::connect(url))?;
        Ok(StoreRecorder {
            store,
            rt: Exec::Own(rt),
            data_dir: data_dir.to_path_buf(),
            trigger: Trigger::Cli,
            attempt: None,
        })
    }

    /// Records into an open `store` driven by the runtime of `handle`, from a thread that may
    /// block (the job queue's worker calls `runner once`'s code in `spawn_blocking`).
    pub fn on_store(store: Arc<dyn Store>, handle: tokio::runtime::Handle, data_dir: &Path) -> StoreRecorder {
        StoreRecorder {
            store,
            rt: Exec::Handle(handle),
            data_dir: data_dir.to_path_buf(),
            trigger: Trigger::Cli,
            attempt: None,
        }
    }

    /// Records runs as started by `trigger` (default: the command line).
    pub fn with_trigger(mut self, trigger: Trigger) -> StoreRecorder {
        self.trigger = trigger;
        self
    }

    /// Ties every run to the job attempt holding `token`: the store refuses its results once
    /// that attempt has lost the job's lease.
    pub fn for_attempt(mut self, job: JobId, token: &str) -> StoreRecorder {
        self.attempt = Some((job, token.to_string()));
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// The runtime the store's futures are driven on: this recorder's own (the `runner once`
/// command), or the caller's (a worker thread of the service).
enum Exec {
    Own(tokio::runtime::Runtime),
    Handle(tokio::runtime::Handle),
}

impl Exec {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            Exec::Own(rt) => rt.block_on(f),
            Exec::Handle(h) => h.block_on(f),
        }
    }
}

/// `cpu|<name>` or `cuda|<name>|driver=..|cuda=..` back into a fingerprint.
fn device(key: &str) -> DeviceFingerprint {
    let mut parts = key.split('|');
    let kind = parts.next().unwrap_or("cpu").to_string();
    let name = parts.next().unwrap_or_default().to_string();
    let mut d = DeviceFingerprint { kind, name, driver: None, cuda: None };
    for p in parts {
        if let Some(v) = p.strip_prefix("driver=") {
            d.driver = Some(v.into());
        } else if let Some(v) = p.strip_prefix("cuda=") {
            d.cuda = Some(v.into());
        }
    }
    d
}

impl Recorder for StoreRecorder {
    fn create_run(&mut self, run: &RunStart) -> Result<i64, RecordError> {
        let store = self.store.clone();
        let sha = CommitSha::parse(&run.commit_sha)?;
        let (trigger, attempt) = (self.trigger, self.attempt.clone());
        let id = self.rt.block_on(async move {
            let engine = store.upsert_engine(&run.engine, run.repo.as_deref()).await?;
            let commit = NewCommit {
                sha,
                generation: run.generation,
                committed_at: None,
                title: Some(run.commit_title.clone()),
            };
            let commit = store.upsert_commit(engine.id, &commit).await?;
            let new = NewRun {
                engine_id: engine.id,
                commit_id: commit.id,
                status: RunStatus::Running,
                trigger,
                suite: run.suite.clone(),
                device: device(&run.device_key),
                host: run.host.clone(),
                owner: run.owner.clone(),
                fixture_ids: run.fixture_ids.clone(),
                contracts: run.contracts.clone(),
                log_path: None,
                job_id: None,
            };
            let id = store.create_run(&new).await?;
            if let Some((job, token)) = &attempt
                && !store.bind_run_to_attempt(id, *job, token).await?
            {
                let lost = store::StoreError::LeaseLost { run: id, job: *job };
                let _ = store.finish_run(id, &store::RunResults::errored(lost.to_string())).await;
                return Err(RecordError::Store(lost));
            }
            Ok::<_, RecordError>(id)
        })?;
        Ok(id.0)
    }

    fn finish_run(&mut self, id: i64, r: &RunResults) -> Result<(), RecordError> {
        let store = self.store.clone();
        Ok(self.rt.block_on(async move { store.finish_run(RunId(id), r).await })?)
    }

    fn sweep_abandoned(&mut self, host: &str) -> Result<Vec<Abandoned>, RecordError> {
        let store = self.store.clone();
        let host = host.to_string();
        self.rt.block_on(async move {
            let mut swept = Vec::new();
            for run in store.running_owned_runs(&host).await? {
                let Some(owner) = run.owner.as_deref().and_then(Owner::parse) else { continue };
                if owner.alive() != Some(false) {
                    continue;
                }
                let error = format!(
                    "abandoned: the runner that ran it (pid {} on {host}) ended without finishing it (killed or \
                     crashed); finished by runner once (pid {}) at {}",
                    owner.pid,
                    std::process::id(),
                    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
                );
                match store.finish_run(run.id, &RunResults::errored(error)).await {
                    Ok(()) => swept.push(Abandoned { run: run.id.0, pid: owner.pid }),
                    // finished meanwhile by someone else: nothing left to do
                    Err(store::StoreError::InvalidTransition { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(swept)
        })
    }

    fn run_dir(&self, id: i64) -> PathBuf {
        self.data_dir.join("runs").join(id.to_string())
    }

    fn runs(&mut self) -> Result<Vec<RunDetails>, RecordError> {
        let store = self.store.clone();
        self.rt.block_on(async move {
            let mut runs = store.recent_runs(i64::MAX).await?;
            runs.sort_by_key(|r| r.id);
            let mut out = Vec::with_capacity(runs.len());
            for r in runs {
                out.push(store.run_details(r.id).await?.ok_or(RecordError::NotFound { id: r.id.0 })?);
            }
            Ok::<_, RecordError>(out)
        })
    }
}
