//! The worker: claims queued jobs matching its device, runs each through `runner once`'s
//! code path, and keeps its lease alive while it does.
//!
//! One loop serves both `runner work` (a GPU box of a fleet) and the worker embedded in
//! `runner serve`. Jobs run at least once; what keeps that safe:
//!
//! 1. a claim holds a lease with an attempt token; a heartbeat task renews it every
//!    `queue.heartbeat_s` while the run goes on;
//! 2. the run is recorded bound to that attempt: once the lease is lost (the worker died,
//!    hung or was paused past it), the next claim's sweep finishes the stale run as
//!    `errored`, and the store refuses any later write from the old attempt
//!    ([`StoreError::LeaseLost`]) — a worker that wakes up cannot overwrite the newer one;
//! 3. an attempt that could not run (a git failure, a database error) is retried with
//!    exponential backoff up to the job's `max_attempts`; the last failure leaves an
//!    `errored` run holding the cause, so a gap on the dashboard always says why;
//! 4. a measurement of the same (engine, commit, suite, device) that already passed or
//!    failed is not repeated unless the job is forced.
//!
//! [`Worker::try_run_one`] runs at most one job and says [`Tick::Empty`] when there was
//! none, so tests drain the queue without sleeping.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;

use super::status::{CommitState, StatusPoster};
use super::{RUN_JOB, RunJob, backoff};
use crate::config::Config;
use crate::once::store_recorder::StoreRecorder;
use crate::once::{self, OnceArgs, OnceError};
use crate::store::{
    ClaimedJob, CommitSha, DeviceFingerprint, JobId, NewCommit, NewRun, RunId, RunResults, RunStatus, Store, StoreError,
};

/// Why the worker loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the job queue")]
    Store(#[from] StoreError),
}

/// What one turn of the loop did.
#[derive(Debug, Clone, PartialEq)]
pub enum Tick {
    /// No job was due.
    Empty,
    /// A job was taken and handled.
    Ran { job: JobId, outcome: JobOutcome },
}

/// How a job attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Measured (passed, failed or errored) and the job is done.
    Measured { run: RunId, status: RunStatus },
    /// Measured before by `run`; not repeated.
    AlreadyMeasured { run: RunId },
    /// The attempt failed; the job is queued again after a backoff.
    Retry { error: String, after: Duration },
    /// The last attempt failed: the job is dead and `run` records the cause.
    GaveUp { error: String, run: Option<RunId> },
    /// The lease was lost (taken over) during the attempt; nothing of it was kept.
    LeaseLost { error: String },
}

/// Settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The name leases are held under (`host-pid` by default).
    pub name: String,
    /// This machine's device fingerprint key: only jobs that may run here are claimed.
    pub device_key: String,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub poll: Duration,
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// The directory the engines' git checkouts are resolved from (an engine without a
    /// `repo` is the repository holding it).
    pub cwd: PathBuf,
}

impl WorkerOptions {
    /// From `[queue]`, with the device detected when not configured.
    pub fn from_config(cfg: &Config, cwd: PathBuf) -> WorkerOptions {
        let host = crate::once::owner::hostname().unwrap_or_else(|| "worker".to_string());
        let q = &cfg.queue;
        WorkerOptions {
            name: format!("{host}-{}", std::process::id()),
            device_key: super::detect_device(q.device.as_deref()),
            lease: Duration::from_secs_f64(q.lease_s),
            heartbeat: Duration::from_secs_f64(q.heartbeat_s),
            poll: Duration::from_secs_f64(q.poll_s),
            backoff: Duration::from_secs_f64(q.backoff_s),
            backoff_max: Duration::from_secs_f64(q.backoff_max_s),
            cwd,
        }
    }
}

/// A worker bound to a store and a configuration.
pub struct Worker {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    opts: WorkerOptions,
    poster: Option<Arc<StatusPoster>>,
    posts: tokio::task::JoinSet<()>,
}

/// The loop of `runner work` and of `runner serve`'s embedded worker: claim, run, repeat,
/// until `shutdown` resolves (checked between jobs; a job under way is finished first).
pub async fn run(
    store: Arc<dyn Store>,
    config: Arc<Config>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let opts = WorkerOptions::from_config(&config, cwd);
    Worker::new(store, config, opts).run(shutdown).await
}

impl Worker {
    pub fn new(store: Arc<dyn Store>, config: Arc<Config>, opts: WorkerOptions) -> Worker {
        let poster = StatusPoster::from_config(&config.github).map(Arc::new);
        Worker { store, config, opts, poster, posts: tokio::task::JoinSet::new() }
    }

    pub fn options(&self) -> &WorkerOptions {
        &self.opts
    }

    /// Claims and runs jobs until `shutdown` resolves; waits for the queue while idle.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> Result<(), WorkerError> {
        tokio::pin!(shutdown);
        tracing::info!(worker = %self.opts.name, device = %self.opts.device_key, "worker started");
        loop {
            // Checked between jobs only: a job under way is finished, never cut off.
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = std::future::ready(()) => {}
            }
            if self.try_run_one().await? == Tick::Empty {
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(self.opts.poll) => {}
                }
            }
        }
        tracing::info!(worker = %self.opts.name, "worker stopping");
        self.drain_posts(Duration::from_secs(30)).await;
        Ok(())
    }

    /// Waits (at most `limit`) for the commit statuses still being posted.
    pub async fn drain_posts(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async { while self.posts.join_next().await.is_some() {} }).await;
    }

    /// Claims one due job that may run on this device and handles it.
    pub async fn try_run_one(&mut self) -> Result<Tick, WorkerError> {
        while self.posts.try_join_next().is_some() {}
        let kinds = [RUN_JOB.to_string()];
        let Some(job) = self
            .store
            .claim_job_for(&self.opts.name, &kinds, Some(&self.opts.device_key), self.opts.lease, Utc::now())
            .await?
        else {
            return Ok(Tick::Empty);
        };
        tracing::info!(job = %job.id, attempt = job.attempt, worker = %self.opts.name, "job claimed");
        let outcome = self.handle(&job).await?;
        match &outcome {
            JobOutcome::Measured { run, status } => {
                tracing::info!(job = %job.id, run = %run, status = status.as_str(), "job done")
            }
            JobOutcome::AlreadyMeasured { run } => {
                tracing::info!(job = %job.id, run = %run, "already measured; job done")
            }
            JobOutcome::Retry { error, after } => {
                tracing::warn!(job = %job.id, attempt = job.attempt, retry_in_s = after.as_secs(), error = %error, "job attempt failed")
            }
            JobOutcome::GaveUp { error, .. } => {
                tracing::error!(job = %job.id, attempts = job.attempt, error = %error, "job given up")
            }
            JobOutcome::LeaseLost { error } => {
                tracing::warn!(job = %job.id, error = %error, "lease lost; the newer attempt owns the job")
            }
        }
        Ok(Tick::Ran { job: job.id, outcome })
    }

    async fn handle(&mut self, job: &ClaimedJob) -> Result<JobOutcome, WorkerError> {
        let payload: RunJob = match serde_json::from_value(job.payload.clone()) {
            Ok(p) => p,
            Err(e) => return self.failed(job, None, format!("job {} has a bad payload: {e}", job.id)).await,
        };
        let Some(engine) = self.config.engines.get(&payload.engine).cloned() else {
            let known = self.config.engines.keys().cloned().collect::<Vec<_>>().join(", ");
            let error =
                format!("engine `{}` is not configured on worker {} (known: {known})", payload.engine, self.opts.name);
            return self.failed(job, Some(&payload), error).await;
        };

        // 1. not twice
        let run_device = once::device_key(&engine.device);
        if !payload.force
            && let Some(run) =
                self.store.measured_run(&payload.engine, &payload.commit, &payload.suite, &run_device).await?
        {
            self.store.complete_job(job.id, &job.token, Utc::now()).await?;
            return Ok(JobOutcome::AlreadyMeasured { run });
        }
        self.post(&payload, CommitState::Pending, None, "measuring");

        // 2. the run, with the lease kept alive beside it
        let lost = Arc::new(AtomicBool::new(false));
        let beat = tokio::spawn(heartbeat(
            Arc::clone(&self.store),
            job.id,
            job.token.clone(),
            self.opts.lease,
            self.opts.heartbeat,
            Arc::clone(&lost),
        ));
        let result = self.measure(job, &payload).await;
        beat.abort();

        // 3. what it means for the job
        match result {
            Ok(o) => {
                if !self.store.complete_job(job.id, &job.token, Utc::now()).await? {
                    tracing::warn!(job = %job.id, run = o.run_id, "the run was recorded but the lease had expired");
                }
                let (state, text) = match o.status {
                    RunStatus::Passed => (CommitState::Success, "every gate passed".to_string()),
                    RunStatus::Failed => {
                        let n = o.verdicts.iter().filter(|v| v.blocks()).count();
                        (CommitState::Failure, format!("{n} gate(s) failed"))
                    }
                    RunStatus::Errored | RunStatus::Queued | RunStatus::Running => {
                        (CommitState::Error, format!("the run errored: {}", o.error.as_deref().unwrap_or("unknown")))
                    }
                };
                self.post(&payload, state, Some(RunId(o.run_id)), &text);
                Ok(JobOutcome::Measured { run: RunId(o.run_id), status: o.status })
            }
            Err(e) if is_lease_lost(&e) || lost.load(Ordering::SeqCst) => {
                Ok(JobOutcome::LeaseLost { error: error_chain(&e) })
            }
            Err(e) => self.failed(job, Some(&payload), error_chain(&e)).await,
        }
    }

    /// `runner once` for the job, in a thread that may block.
    async fn measure(&self, job: &ClaimedJob, p: &RunJob) -> Result<once::OnceOutcome, OnceError> {
        let (store, config, cwd) = (Arc::clone(&self.store), Arc::clone(&self.config), self.opts.cwd.clone());
        let args = OnceArgs { rev: p.commit.to_string(), engine: Some(p.engine.clone()), suite: Some(p.suite.clone()) };
        let (id, token, trigger) = (job.id, job.token.clone(), p.trigger);
        let handle = tokio::runtime::Handle::current();
        let joined = tokio::task::spawn_blocking(move || {
            let mut recorder =
                StoreRecorder::on_store(store, handle, &config.data_dir).with_trigger(trigger).for_attempt(id, &token);
            once::run(&config, &args, &cwd, &mut recorder, &once::Quiet)
        })
        .await;
        joined.unwrap_or_else(|e| Err(OnceError::Record(crate::once::record::RecordError::Panicked(e.to_string()))))
    }

    /// A failed attempt: retried after a backoff, or — the last one — an errored run with
    /// the cause and a dead job.
    async fn failed(&mut self, job: &ClaimedJob, p: Option<&RunJob>, error: String) -> Result<JobOutcome, WorkerError> {
        let now = Utc::now();
        if job.attempt < job.max_attempts {
            let after = backoff(job.attempt, self.opts.backoff, self.opts.backoff_max);
            let retry_at = now + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
            if !self.store.fail_job(job.id, &job.token, &error, retry_at, now).await? {
                return Ok(JobOutcome::LeaseLost { error });
            }
            return Ok(JobOutcome::Retry { error, after });
        }
        let cause = format!("gave up after {} attempt(s); the last failed with: {error}", job.attempt);
        let run = match p {
            Some(p) => match self.errored_run(job, p, &cause).await {
                Ok(run) => run,
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "could not record the errored run");
                    None
                }
            },
            None => None,
        };
        if !self.store.fail_job(job.id, &job.token, &cause, now, now).await? {
            return Ok(JobOutcome::LeaseLost { error: cause });
        }
        if let Some(p) = p {
            self.post(p, CommitState::Error, run, &cause);
        }
        Ok(JobOutcome::GaveUp { error: cause, run })
    }

    /// An `errored` run of the job's commit holding why it could not be measured.
    async fn errored_run(&self, job: &ClaimedJob, p: &RunJob, cause: &str) -> Result<Option<RunId>, StoreError> {
        let engine = self.store.upsert_engine(&p.engine, None).await?;
        let commit = match self.store.commit_by_sha(engine.id, &p.commit).await? {
            Some(c) => c,
            // Unknown commit (it may not even resolve): generation 0 until a run resolves it.
            None => self.store.upsert_commit(engine.id, &new_commit(&p.commit)).await?,
        };
        let device = self.config.engines.get(&p.engine).map_or("cpu", |e| e.device.as_str());
        let new = NewRun {
            engine_id: engine.id,
            commit_id: commit.id,
            status: RunStatus::Running,
            trigger: p.trigger,
            suite: p.suite.clone(),
            device: fingerprint(&once::device_key(device)),
            host: Some(self.opts.name.clone()),
            owner: None,
            fixture_ids: Vec::new(),
            contracts: Vec::new(),
            log_path: None,
            job_id: Some(job.id),
        };
        let run = self.store.create_run(&new).await?;
        if !self.store.bind_run_to_attempt(run, job.id, &job.token).await? {
            self.store.finish_run(run, &RunResults::errored(cause)).await?;
            return Ok(None);
        }
        self.store.finish_run(run, &RunResults::errored(cause)).await?;
        Ok(Some(run))
    }

    fn post(&mut self, p: &RunJob, state: CommitState, run: Option<RunId>, text: &str) {
        let (Some(poster), Some(target)) = (&self.poster, &p.status) else { return };
        let status = poster.status(&p.engine, state, run, text);
        let poster = Arc::clone(poster);
        let target = target.clone();
        self.posts.spawn(async move { poster.post_logged(&target, &status).await });
    }
}

fn new_commit(sha: &CommitSha) -> NewCommit {
    NewCommit { sha: sha.clone(), generation: 0, committed_at: None, title: None }
}

/// `kind|name|driver=…|cuda=…` back into its parts.
fn fingerprint(key: &str) -> DeviceFingerprint {
    let mut parts = key.split('|');
    let mut d = DeviceFingerprint {
        kind: parts.next().unwrap_or("cpu").to_string(),
        name: parts.next().unwrap_or_default().to_string(),
        driver: None,
        cuda: None,
    };
    for p in parts {
        if let Some(v) = p.strip_prefix("driver=") {
            d.driver = Some(v.to_string());
        } else if let Some(v) = p.strip_prefix("cuda=") {
            d.cuda = Some(v.to_string());
        }
    }
    d
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// True when `runner once` stopped because the store refused a write of a lost attempt.
fn is_lease_lost(e: &OnceError) -> bool {
    error_chain(e).contains("lost its lease")
}

/// Renews the lease every `every` until aborted; sets `lost` and stops when it was lost.
async fn heartbeat(
    store: Arc<dyn Store>,
    job: JobId,
    token: String,
    lease: Duration,
    every: Duration,
    lost: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match store.heartbeat_job(job, &token, lease, Utc::now()).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(job = %job, "heartbeat refused: the lease was lost");
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => tracing::warn!(job = %job, error = %e, "heartbeat failed; will try again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_back() {
        let d = fingerprint("cuda|NVIDIA H100|driver=550.54|cuda=12.4");
        assert_eq!(d.key(), "cuda|NVIDIA H100|driver=550.54|cuda=12.4");
        assert_eq!(fingerprint("cpu|AMD EPYC").key(), "cpu|AMD EPYC");
    }
}
