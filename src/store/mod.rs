//! The Store: where runs, what they measured and how they were judged are kept.
//!
//! One [`Store`] trait with two backends picked from the `--db` URL: SQLite (the embedded
//! default, one file in a data directory; `sqlite://path`, `sqlite:path` or a plain path)
//! and PostgreSQL (`postgres://…`, for a shared deployment and a fleet of runners). Both run
//! the same SQL text (runtime `query` + `bind`; there is no database at build time) over the
//! schema in `migrations/<backend>/`, applied on connect.
//!
//! The life of a run: [`Store::create_run`] records it (status `running`, or `queued` for
//! the job queue) before the engine starts, so a crash still leaves a record; then
//! [`Store::finish_run`] writes its status, error, timings, measurements, per-layer parity
//! and verdicts in ONE transaction, so nothing is ever half-written. A run contributes a
//! point to one [`Series`] per (model, reference): engine × model sha256 × reference ×
//! device fingerprint × fixture id × contract versions; a new device, fixture or contract
//! version starts a new series, and trends are ordered by git generation number.
//!
//! The job queue of `runner serve` / `runner work` lives in the same database: jobs with a
//! kind, a JSON payload, a priority, attempts, a lease with heartbeats and an attempt token
//! (PostgreSQL claims with `FOR UPDATE SKIP LOCKED`, SQLite inside an immediate transaction),
//! and the device they must run on. A run made by a job attempt is bound to that attempt
//! ([`Store::bind_run_to_attempt`]): when the lease expires, the next claim finishes the run
//! as `errored`, and [`Store::finish_run`] refuses the old attempt's results
//! ([`StoreError::LeaseLost`]). GitHub webhook deliveries are recorded with the jobs they
//! queue, in one transaction, so a redelivery queues nothing ([`Store::accept_delivery`]).
//!
//! Values that are NaN are stored as NULL (SQLite cannot store NaN) and read back as NaN.

mod common;
mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::contracts::{self, ContractRef, Outcome, Severity};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// Row id of an engine.
    EngineId
);
id_type!(
    /// Row id of a commit.
    CommitId
);
id_type!(
    /// Row id of a run.
    RunId
);
id_type!(
    /// Row id of a series.
    SeriesId
);
id_type!(
    /// Row id of a job.
    JobId
);

/// A full git object name: 40 (SHA-1) or 64 (SHA-256) lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommitSha(String);

impl CommitSha {
    pub fn parse(s: &str) -> Result<CommitSha, StoreError> {
        let ok = matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit());
        if ok {
            Ok(CommitSha(s.to_ascii_lowercase()))
        } else {
            Err(StoreError::Invalid {
                field: "commit sha",
                value: s.to_string(),
                expected: "40 or 64 hex digits (a full sha; resolve revisions with git rev-parse first)",
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 digits, for display.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl TryFrom<String> for CommitSha {
    type Error = StoreError;
    fn try_from(s: String) -> Result<CommitSha, StoreError> {
        CommitSha::parse(&s)
    }
}

impl From<CommitSha> for String {
    fn from(s: CommitSha) -> String {
        s.0
    }
}

impl fmt::Display for CommitSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Where a run is in its life.
    RunStatus {
        /// Waiting in the job queue.
        Queued = "queued",
        /// The engine is running (or the runner died while it was: see `started_at`).
        Running = "running",
        /// Every error-severity gate passed.
        Passed = "passed",
        /// At least one error-severity gate failed.
        Failed = "failed",
        /// The run could not be made (engine crash, timeout, bad fixture); what it finished
        /// is kept.
        Errored = "errored",
    }
}

impl RunStatus {
    /// Passed, failed or errored.
    pub fn is_finished(self) -> bool {
        matches!(self, RunStatus::Passed | RunStatus::Failed | RunStatus::Errored)
    }
}

text_enum! {
    /// What started a run.
    Trigger {
        /// `runner once` by a person.
        Cli = "cli",
        /// `runner nightly`.
        Nightly = "nightly",
        /// A GitHub push / merge webhook.
        Webhook = "webhook",
        /// A bisection of a flagged commit range.
        Bisect = "bisect",
        /// The JSON API.
        Api = "api",
    }
}

text_enum! {
    /// Where a job is in its life.
    JobStatus {
        Queued = "queued",
        Running = "running",
        Done = "done",
        /// Out of attempts; kept with its last error.
        Dead = "dead",
    }
}

/// What a run's device is: the key of comparable series. Series never mix devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceFingerprint {
    /// `cpu` or `cuda`.
    pub kind: String,
    /// The CPU model or the GPU name.
    pub name: String,
    /// The GPU driver version.
    pub driver: Option<String>,
    /// The CUDA version.
    pub cuda: Option<String>,
}

impl DeviceFingerprint {
    /// The canonical text the series are keyed by, e.g.
    /// `cuda|NVIDIA H100 80GB HBM3|driver=550.54.15|cuda=12.4`.
    pub fn key(&self) -> String {
        let mut k = format!("{}|{}", self.kind, self.name);
        if let Some(d) = &self.driver {
            k.push_str(&format!("|driver={d}"));
        }
        if let Some(c) = &self.cuda {
            k.push_str(&format!("|cuda={c}"));
        }
        k
    }
}

/// An engine measured by paritybench.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Engine {
    pub id: EngineId,
    pub name: String,
    pub repo_url: Option<String>,
}

/// A commit of an engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Commit {
    pub id: CommitId,
    pub engine_id: EngineId,
    pub sha: CommitSha,
    /// Git generation number: 1 + the largest generation of its parents (roots are 1).
    pub generation: i64,
    pub committed_at: Option<DateTime<Utc>>,
    pub title: Option<String>,
}

/// A commit to record (upserted by engine and sha).
#[derive(Debug, Clone)]
pub struct NewCommit {
    pub sha: CommitSha,
    pub generation: i64,
    pub committed_at: Option<DateTime<Utc>>,
    pub title: Option<String>,
}

/// A run to record before the engine starts.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub engine_id: EngineId,
    pub commit_id: CommitId,
    /// `Running` (`runner once`) or `Queued` (a job that will run later).
    pub status: RunStatus,
    pub trigger: Trigger,
    pub suite: String,
    pub device: DeviceFingerprint,
    pub host: Option<String>,
    /// The process running it on `host` (`runner once`; see [`crate::once::owner`]).
    pub owner: Option<String>,
    pub fixture_ids: Vec<String>,
    /// Every contract the run will be judged by.
    pub contracts: Vec<ContractRef>,
    pub log_path: Option<String>,
    pub job_id: Option<JobId>,
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    pub id: RunId,
    pub engine_id: EngineId,
    pub engine: String,
    pub commit_id: CommitId,
    pub commit_sha: CommitSha,
    pub generation: i64,
    pub status: RunStatus,
    pub trigger: Trigger,
    pub suite: String,
    pub device: DeviceFingerprint,
    pub host: Option<String>,
    /// The process that runs (or ran) it on `host`, for runs of `runner once`.
    pub owner: Option<String>,
    pub fixture_ids: Vec<String>,
    pub contracts: Vec<ContractRef>,
    /// Phase -> milliseconds (e.g. `engine`, `metrics`, `total`).
    pub timings: BTreeMap<String, f64>,
    pub log_path: Option<String>,
    /// Why the run errored (or any note the runner left).
    pub error: Option<String>,
    pub job_id: Option<JobId>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The (model, reference) pair a run measured: one point in one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct SeriesSubject {
    pub model: String,
    pub model_sha256: String,
    pub reference: String,
    /// The fixture (reference dump) id.
    pub fixture_id: String,
}

/// A comparable series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Series {
    pub id: SeriesId,
    pub engine_id: EngineId,
    pub engine: String,
    pub model: String,
    pub model_sha256: String,
    pub reference: String,
    pub device_key: String,
    pub fixture_id: String,
    /// `id@version` of every contract the runs were judged by, sorted, comma-separated.
    pub contract_key: String,
}

/// One number a run measured. `prompt: None` pools every prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    pub model: String,
    pub reference: String,
    pub prompt: Option<String>,
    /// A metric name as the metrics module spells it (`logits.rel_l2`, `decode_tok_s`, ...).
    pub metric: String,
    /// `mean`, `median`, `p99`, `max`, `wilson_lower`, `n`, `value`, ...
    pub statistic: String,
    pub value: f64,
}

/// Relative L2 error and cosine of one capture point at one layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerParity {
    pub model: String,
    pub reference: String,
    pub prompt: Option<String>,
    pub capture: String,
    pub layer: i64,
    pub rel_l2: f64,
    pub cosine: f64,
}

/// A verdict as stored: one gate of one contract on one subject of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredVerdict {
    pub contract: ContractRef,
    pub gate_id: String,
    pub metric: String,
    pub reduction: String,
    pub comparison: String,
    /// NaN when a floor-relative gate had no floor.
    pub threshold: f64,
    pub floor: Option<f64>,
    /// `None` when the outcome is `missing`.
    pub observed: Option<f64>,
    pub n_samples: i64,
    pub outcome: Outcome,
    pub passed: bool,
    pub severity: Severity,
    pub model: String,
    pub reference: String,
    pub prompt: Option<String>,
    pub dtype: Option<String>,
    pub mode: Option<String>,
    pub detail: Option<String>,
}

impl StoredVerdict {
    /// An error-severity gate that did not pass fails the run.
    pub fn blocks(&self) -> bool {
        self.severity == Severity::Error && !self.passed
    }
}

impl From<&contracts::Verdict> for StoredVerdict {
    fn from(v: &contracts::Verdict) -> StoredVerdict {
        StoredVerdict {
            contract: v.contract.clone(),
            gate_id: v.gate_id.clone(),
            metric: v.metric.as_str().to_string(),
            reduction: v.reduction.as_str().to_string(),
            comparison: v.comparison.as_str().to_string(),
            threshold: v.threshold,
            floor: v.floor,
            observed: v.observed,
            n_samples: v.n_samples as i64,
            outcome: v.outcome,
            passed: v.passed(),
            severity: v.severity,
            model: v.model.clone(),
            reference: v.reference.clone(),
            prompt: v.prompt.clone(),
            dtype: v.dtype.clone(),
            mode: v.mode.clone(),
            detail: v.detail.clone(),
        }
    }
}

/// Everything a finished run writes, in one transaction.
#[derive(Debug, Clone)]
pub struct RunResults {
    /// `Passed`, `Failed` or `Errored`.
    pub status: RunStatus,
    /// Why it errored (the cause chain), or `None`.
    pub error: Option<String>,
    pub timings: BTreeMap<String, f64>,
    /// The (model, reference) pairs measured; measurements, layers and verdicts are linked
    /// to the series of their (model, reference).
    pub series: Vec<SeriesSubject>,
    pub measurements: Vec<Measurement>,
    pub layers: Vec<LayerParity>,
    pub verdicts: Vec<StoredVerdict>,
}

impl RunResults {
    /// An errored run that measured nothing.
    pub fn errored(error: impl Into<String>) -> RunResults {
        RunResults {
            status: RunStatus::Errored,
            error: Some(error.into()),
            timings: BTreeMap::new(),
            series: Vec::new(),
            measurements: Vec::new(),
            layers: Vec::new(),
            verdicts: Vec::new(),
        }
    }
}

/// A run with everything it measured (the run page).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunDetails {
    pub run: Run,
    pub series: Vec<Series>,
    pub measurements: Vec<Measurement>,
    pub layers: Vec<LayerParity>,
    pub verdicts: Vec<StoredVerdict>,
}

/// A run as a point of a series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesRun {
    pub run_id: RunId,
    pub status: RunStatus,
    pub commit_sha: CommitSha,
    pub generation: i64,
    pub finished_at: Option<DateTime<Utc>>,
    /// Error-severity verdicts of this series in this run that did not pass.
    pub failed_gates: i64,
}

/// The latest run of one series (the dashboard's front page).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesLatest {
    pub series: Series,
    pub latest: SeriesRun,
}

/// One value of a metric along a series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendPoint {
    pub run_id: RunId,
    pub commit_sha: CommitSha,
    pub generation: i64,
    pub value: f64,
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: String,
    pub payload: serde_json::Value,
    /// Higher runs first.
    pub priority: i64,
    pub max_attempts: i64,
    pub run_after: DateTime<Utc>,
    /// A job with the same key is not enqueued twice (e.g. a GitHub delivery id).
    pub dedupe_key: Option<String>,
    /// The device the job must run on: `None` anywhere; a device kind (`cuda`, `cpu`) any
    /// device of that kind; a full [`DeviceFingerprint::key`] that device only.
    pub device_key: Option<String>,
}

/// What [`Store::enqueue_job`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    New(JobId),
    /// A job with the same dedupe key exists already.
    Duplicate(JobId),
}

/// A job a worker holds a lease on. Heartbeats, completion and failure must present the
/// attempt token: a worker whose lease was taken over cannot touch the job.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedJob {
    pub id: JobId,
    pub kind: String,
    pub payload: serde_json::Value,
    pub priority: i64,
    /// This attempt's number, from 1.
    pub attempt: i64,
    pub max_attempts: i64,
    pub token: String,
    pub lease_expires_at: DateTime<Utc>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: JobId,
    pub kind: String,
    pub payload: serde_json::Value,
    pub priority: i64,
    pub status: JobStatus,
    pub attempts: i64,
    pub max_attempts: i64,
    pub run_after: DateTime<Utc>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub worker: Option<String>,
    pub last_error: Option<String>,
    pub dedupe_key: Option<String>,
    /// See [`NewJob::device_key`].
    pub device_key: Option<String>,
}

/// A series whose latest point is red: the commit range in which it turned red.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Regression {
    pub series_id: SeriesId,
    /// The newest green point before the red ones (`None`: the series was never green).
    pub last_good: Option<SeriesRun>,
    /// The oldest red point after `last_good`.
    pub first_bad: SeriesRun,
    pub acknowledged: Option<Acknowledgement>,
}

/// Who acknowledged a regression, when, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Acknowledgement {
    pub by: String,
    pub note: Option<String>,
    pub at: DateTime<Utc>,
}

/// What `/metrics` exports: counts and ages read in one place.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceStats {
    /// Status -> number of runs.
    pub runs_by_status: BTreeMap<String, i64>,
    /// Status -> number of jobs.
    pub jobs_by_status: BTreeMap<String, i64>,
    /// When the oldest queued job was created.
    pub oldest_queued_job: Option<DateTime<Utc>>,
    /// Per series, when its newest passed run finished (`None`: never).
    pub last_success: Vec<(Series, Option<DateTime<Utc>>)>,
}

/// Which backend a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Everything that can go wrong in the store; each variant says what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL `{url}`: use sqlite://PATH, a plain file path, or postgres://...")]
    UnsupportedUrl { url: String },
    #[error("cannot open the database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("migrating the database {url}: {source}")]
    Migrate { url: String, source: sqlx::migrate::MigrateError },
    #[error("database error while {doing}: {source}")]
    Query { doing: &'static str, source: sqlx::Error },
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: i64 },
    #[error("run {run} is {from}; it cannot become {to}")]
    InvalidTransition { run: RunId, from: RunStatus, to: RunStatus },
    #[error("invalid {field} `{value}`: expected {expected}")]
    Invalid { field: &'static str, value: String, expected: &'static str },
    #[error("run {run} belongs to an attempt at job {job} that lost its lease; a newer attempt owns the job")]
    LeaseLost { run: RunId, job: JobId },
    #[error("stored {column} holds `{value}`, which this version cannot read")]
    Corrupt { column: &'static str, value: String },
}

/// Shorthand for mapping a sqlx error with what the store was doing.
pub(crate) fn query_err(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { doing, source }
}

/// The storage interface shared by every backend; see the module docs for the life of a run.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    fn backend(&self) -> Backend;

    /// The engine named `name`, created if new (a given `repo_url` replaces the stored one).
    async fn upsert_engine(&self, name: &str, repo_url: Option<&str>) -> Result<Engine, StoreError>;
    async fn engine_by_name(&self, name: &str) -> Result<Option<Engine>, StoreError>;

    /// The commit of `engine` with `c.sha`, created if new; generation, time and title are
    /// refreshed from `c`.
    async fn upsert_commit(&self, engine: EngineId, c: &NewCommit) -> Result<Commit, StoreError>;
    async fn commit_by_sha(&self, engine: EngineId, sha: &CommitSha) -> Result<Option<Commit>, StoreError>;

    /// Records a run before its engine starts (status `running` or `queued`).
    async fn create_run(&self, run: &NewRun) -> Result<RunId, StoreError>;
    /// Marks a queued run as running.
    async fn start_run(&self, id: RunId) -> Result<(), StoreError>;
    /// Writes a run's status, error, timings, series points, measurements, per-layer parity
    /// and verdicts in one transaction. The run must be queued or running; the status must
    /// be passed, failed or errored.
    async fn finish_run(&self, id: RunId, results: &RunResults) -> Result<(), StoreError>;
    async fn run(&self, id: RunId) -> Result<Option<Run>, StoreError>;
    /// A run with its series, measurements, layers and verdicts (in insertion order).
    async fn run_details(&self, id: RunId) -> Result<Option<RunDetails>, StoreError>;
    /// The newest runs, newest first.
    async fn recent_runs(&self, limit: i64) -> Result<Vec<Run>, StoreError>;
    /// The runs still `running` on `host` that a process owns (`runner once`; job attempts'
    /// runs have leases instead), oldest first.
    async fn running_owned_runs(&self, host: &str) -> Result<Vec<Run>, StoreError>;

    /// The latest run (highest commit generation, then newest) of every series, optionally
    /// of one engine.
    async fn latest_per_series(&self, engine: Option<&str>) -> Result<Vec<SeriesLatest>, StoreError>;
    async fn series(&self, id: SeriesId) -> Result<Option<Series>, StoreError>;
    /// The last `limit` runs of a series, in ascending commit generation.
    async fn series_runs(&self, id: SeriesId, limit: i64) -> Result<Vec<SeriesRun>, StoreError>;
    /// The pooled (prompt-less) value of `metric`/`statistic` over the last `limit` runs of a
    /// series, in ascending commit generation.
    async fn series_trend(
        &self,
        id: SeriesId,
        metric: &str,
        statistic: &str,
        limit: i64,
    ) -> Result<Vec<TrendPoint>, StoreError>;

    // Dashboard reads (and its two small writes) for `runner serve`.

    /// Every series of the same engine, model and reference as `id` (other devices,
    /// fixtures or contract versions), in creation order; `id` is among them.
    async fn related_series(&self, id: SeriesId) -> Result<Vec<Series>, StoreError>;
    /// The pooled (prompt-less) `(metric, statistic)` pairs a run measured in a series.
    async fn run_series_metrics(&self, run: RunId, series: SeriesId) -> Result<Vec<(String, String)>, StoreError>;
    /// A run's verdicts in one series.
    async fn run_series_verdicts(&self, run: RunId, series: SeriesId) -> Result<Vec<StoredVerdict>, StoreError>;
    /// The runs of a series at or above `min_generation` that failed a gate on `metric`.
    async fn series_failing_runs(
        &self,
        id: SeriesId,
        metric: &str,
        min_generation: i64,
    ) -> Result<Vec<RunId>, StoreError>;
    /// Like [`Store::series_trend`] for a gate's observed value (`metric`, `reduction`) when
    /// the metric is judged but not stored as a measurement (e.g. `greedy_match_len`).
    async fn series_verdict_trend(
        &self,
        id: SeriesId,
        metric: &str,
        reduction: &str,
        limit: i64,
    ) -> Result<Vec<TrendPoint>, StoreError>;
    /// The commit range in which a series turned red, when its latest point is red.
    async fn regression(&self, id: SeriesId) -> Result<Option<Regression>, StoreError>;
    /// Acknowledges the regression that starts at `run` in `series`; false when it already was.
    async fn ack_regression(
        &self,
        series: SeriesId,
        run: RunId,
        by: &str,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// A run's detail record (argmax mismatches, continuations, log tails), when written.
    async fn run_detail(&self, id: RunId) -> Result<Option<serde_json::Value>, StoreError>;
    /// Writes a run's detail record (replacing any earlier one).
    async fn put_run_detail(&self, id: RunId, detail: &serde_json::Value) -> Result<(), StoreError>;
    /// Counts and ages for `/metrics`.
    async fn service_stats(&self) -> Result<ServiceStats, StoreError>;

    /// Adds a job unless one with the same dedupe key exists.
    async fn enqueue_job(&self, job: &NewJob, now: DateTime<Utc>) -> Result<Enqueued, StoreError>;
    /// Claims the highest-priority due job (of `kinds`, or any when empty) for `lease`.
    /// Leases that expired first return their jobs to the queue (or kill them when out of
    /// attempts).
    async fn claim_job(
        &self,
        worker: &str,
        kinds: &[String],
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<ClaimedJob>, StoreError> {
        self.claim_job_for(worker, kinds, None, lease, now).await
    }
    /// [`Store::claim_job`] for a worker on the device `device_key` (a full fingerprint key):
    /// only jobs that may run there (see [`NewJob::device_key`]); `None` claims any job.
    /// Before claiming, the unfinished runs of every expired lease are finished as
    /// `errored` (the worker that held it is gone or paused), so they are never left
    /// `running` and their worker can no longer write to them.
    async fn claim_job_for(
        &self,
        worker: &str,
        kinds: &[String],
        device_key: Option<&str>,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<ClaimedJob>, StoreError>;
    /// Ties a run to the job attempt that holds `token`: from then on [`Store::finish_run`]
    /// refuses to write it ([`StoreError::LeaseLost`]) unless that attempt still holds the
    /// job. False when the attempt no longer holds the lease (nothing is changed).
    async fn bind_run_to_attempt(&self, run: RunId, job: JobId, token: &str) -> Result<bool, StoreError>;
    /// Records a webhook delivery and enqueues its jobs in one transaction; `None` (and
    /// nothing enqueued) when the delivery was seen before.
    async fn accept_delivery(
        &self,
        delivery_id: &str,
        event: &str,
        jobs: &[NewJob],
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<Enqueued>>, StoreError>;
    /// The newest passed or failed run of `engine` at `sha` on `suite` and device
    /// `device_key`: the measurement a job need not repeat.
    async fn measured_run(
        &self,
        engine: &str,
        sha: &CommitSha,
        suite: &str,
        device_key: &str,
    ) -> Result<Option<RunId>, StoreError>;
    /// Every run made by attempts at a job, oldest first.
    async fn job_runs(&self, job: JobId) -> Result<Vec<Run>, StoreError>;
    /// Extends a lease; false when the lease was lost (expired and taken over, or finished).
    async fn heartbeat_job(
        &self,
        id: JobId,
        token: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Marks a job done; false when the lease was lost.
    async fn complete_job(&self, id: JobId, token: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;
    /// Records a failed attempt: back to the queue at `retry_at`, or dead when out of
    /// attempts; false when the lease was lost.
    async fn fail_job(
        &self,
        id: JobId,
        token: &str,
        error: &str,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    async fn job(&self, id: JobId) -> Result<Option<Job>, StoreError>;
}

/// Opens the store a `--db` value names, creating the SQLite file (and its directory) if
/// needed, and applies pending migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url).await?))
    } else if let Some(target) = sqlite::target_of(url) {
        Ok(Arc::new(SqliteStore::connect(target).await?))
    } else {
        Err(StoreError::UnsupportedUrl { url: redact(url) })
    }
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Milliseconds since the epoch.
pub(crate) fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// NaN is stored as NULL (SQLite cannot store NaN); both backends do the same.
pub(crate) fn nan_to_null(x: f64) -> Option<f64> {
    (!x.is_nan()).then_some(x)
}

pub(crate) fn null_to_nan(x: Option<f64>) -> f64 {
    x.unwrap_or(f64::NAN)
}

/// The series key part that names the contracts: `id@version`, sorted, comma-separated.
pub fn contract_key(contracts: &[ContractRef]) -> String {
    let mut parts: Vec<String> = contracts.iter().map(|c| format!("{}@{}", c.id, c.version)).collect();
    parts.sort();
    parts.dedup();
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_sha_is_parsed() {
        let sha = "A".repeat(40);
        assert_eq!(CommitSha::parse(&sha).unwrap().as_str(), "a".repeat(40));
        assert!(CommitSha::parse(&"0".repeat(64)).is_ok());
        assert!(CommitSha::parse("HEAD").is_err());
        assert!(CommitSha::parse(&"g".repeat(40)).is_err());
        assert!(CommitSha::parse(&"0".repeat(41)).is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("/var/lib/pb.db"), "/var/lib/pb.db");
    }

    #[test]
    fn device_keys() {
        let cpu = DeviceFingerprint { kind: "cpu".into(), name: "AMD EPYC".into(), driver: None, cuda: None };
        assert_eq!(cpu.key(), "cpu|AMD EPYC");
        let gpu = DeviceFingerprint {
            kind: "cuda".into(),
            name: "NVIDIA H100".into(),
            driver: Some("550.54".into()),
            cuda: Some("12.4".into()),
        };
        assert_eq!(gpu.key(), "cuda|NVIDIA H100|driver=550.54|cuda=12.4");
    }

    #[test]
    fn contract_keys_are_sorted() {
        let c = |id: &str, v: &str| ContractRef { id: id.into(), version: v.into(), sha256: "x".into() };
        assert_eq!(contract_key(&[c("seed", "1"), c("builtin", "2")]), "builtin@2,seed@1");
    }
}
