//! Where a run is recorded: created before the engine starts (so a crash still leaves a
//! record), finished with everything it measured in one step (so nothing is half-written).
//!
//! [`Recorder`] is the narrow seam `runner once` needs; its shapes mirror `store::NewRun` /
//! `store::RunResults` field for field; [`super::store_recorder::StoreRecorder`] maps them
//! onto the real `Store` (SQLite or PostgreSQL).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Why a run could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("run {id} does not exist")]
    NotFound { id: i64 },
    #[error("database: {0}")]
    Store(String),
}

/// What a run is recorded with before it starts (mirrors `store::NewRun`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewRunRecord {
    pub engine: String,
    pub repo: Option<String>,
    pub commit_sha: String,
    pub generation: i64,
    pub commit_title: String,
    pub suite: String,
    /// `cpu|<model name>` or `cuda|<gpu>|driver=..`.
    pub device_key: String,
    pub host: Option<String>,
    pub fixture_ids: Vec<String>,
    /// `id@version#sha256` of every contract the run is judged by.
    pub contracts: Vec<ContractId>,
}

/// Identity of a contract as a run records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContractId {
    pub id: String,
    pub version: String,
    pub sha256: String,
}

/// `passed`, `failed` or `errored` (mirrors `store::RunStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Passed,
    Failed,
    Errored,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Passed => "passed",
            Status::Failed => "failed",
            Status::Errored => "errored",
        }
    }
}

/// One number a run measured (mirrors `store::Measurement`); `prompt: None` pools prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub model: String,
    pub reference: String,
    pub mode: String,
    pub prompt: Option<String>,
    pub metric: String,
    pub statistic: String,
    #[serde(with = "crate::metrics::report::num")]
    pub value: f64,
}

/// rel-L2 and cosine of one capture point at one layer (mirrors `store::LayerParity`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerParity {
    pub model: String,
    pub reference: String,
    pub mode: String,
    pub prompt: Option<String>,
    pub capture: String,
    pub layer: i64,
    #[serde(with = "crate::metrics::report::num")]
    pub rel_l2: f64,
    #[serde(with = "crate::metrics::report::num")]
    pub cosine: f64,
}

/// One gate judged on one subject (mirrors `store::StoredVerdict`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictRecord {
    pub contract: ContractId,
    pub gate_id: String,
    pub metric: String,
    pub reduction: String,
    pub comparison: String,
    #[serde(with = "crate::metrics::report::num")]
    pub threshold: f64,
    pub floor: Option<f64>,
    #[serde(with = "crate::metrics::report::num_opt", default)]
    pub observed: Option<f64>,
    pub n_samples: i64,
    /// `passed`, `failed`, `missing`.
    pub outcome: String,
    pub passed: bool,
    /// `error` or `warning`.
    pub severity: String,
    pub model: String,
    pub reference: String,
    pub prompt: Option<String>,
    pub dtype: Option<String>,
    pub mode: Option<String>,
    pub detail: Option<String>,
}

impl VerdictRecord {
    /// An error-severity gate that did not pass fails the run.
    pub fn blocks(&self) -> bool {
        self.severity == "error" && !self.passed
    }
}

/// A (model, reference) pair measured: one point of one series (mirrors `store::SeriesSubject`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesSubject {
    pub model: String,
    pub model_sha256: String,
    pub reference: String,
    pub fixture_id: String,
}

/// Everything a finished run writes, at once (mirrors `store::RunResults`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResults {
    pub status: Status,
    pub error: Option<String>,
    /// Phase -> milliseconds.
    pub timings: BTreeMap<String, f64>,
    pub series: Vec<SeriesSubject>,
    pub measurements: Vec<Measurement>,
    pub layers: Vec<LayerParity>,
    pub verdicts: Vec<VerdictRecord>,
    /// Log files kept (adapter stdout/stderr, build log), relative to the run directory.
    pub logs: Vec<String>,
}

/// A run as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: i64,
    pub status: Status,
    pub created_utc: String,
    pub finished_utc: Option<String>,
    pub run: NewRunRecord,
    pub results: Option<RunResults>,
}

/// The seam onto the store.
pub trait Recorder {
    /// Records a run as `running` before the engine starts; returns its id.
    fn create_run(&mut self, run: &NewRunRecord) -> Result<i64, RecordError>;
    /// Writes status, error, timings, measurements, layers and verdicts in one step.
    fn finish_run(&mut self, id: i64, results: &RunResults) -> Result<(), RecordError>;
    /// Where the run's files (requests, dumps, logs) go.
    fn run_dir(&self, id: i64) -> PathBuf;
    /// Every recorded run, oldest first, as recorded (for tests and `runner` reports).
    fn runs(&mut self) -> Result<Vec<RunRecord>, RecordError>;
}
