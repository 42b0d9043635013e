//! Where a run is recorded: created before the engine starts (so a crash still leaves a
//! record), finished with everything it measured in one step (so nothing is half-written).
//!
//! The run and measurement types are the store's own ([`crate::store`]); this module adds
//! only what `runner once` knows before a run has database ids ([`RunStart`]) and the
//! narrow synchronous seam [`Recorder`] that [`super::store_recorder::StoreRecorder`]
//! implements on the real `Store` (SQLite or PostgreSQL).
//!
//! The store keys series by (model, reference); a run in incremental mode is a series of its
//! own, so its reference is stored as `<ref-id>/incremental` ([`series_reference`]).

use std::path::{Path, PathBuf};

pub use crate::contracts::ContractRef;
pub use crate::store::{LayerParity, Measurement, RunDetails, RunResults, RunStatus, SeriesSubject, StoredVerdict};

/// Why a run could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("run {id} does not exist")]
    NotFound { id: i64 },
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the run panicked: {0}")]
    Panicked(String),
}

/// What a run is recorded with before it starts (the store's `NewRun` less the ids the
/// store gives the engine and the commit).
#[derive(Debug, Clone)]
pub struct RunStart {
    pub engine: String,
    pub repo: Option<String>,
    pub commit_sha: String,
    pub generation: i64,
    pub commit_title: String,
    pub suite: String,
    /// `cpu|<model name>` or `cuda|<gpu>|driver=..`.
    pub device_key: String,
    pub host: Option<String>,
    /// This process ([`super::owner::Owner`]), so a later run can tell if it died.
    pub owner: Option<String>,
    pub fixture_ids: Vec<String>,
    /// Every contract the run is judged by.
    pub contracts: Vec<ContractRef>,
}

/// The seam onto the store.
pub trait Recorder {
    /// Records a run as `running` before the engine starts; returns its id.
    fn create_run(&mut self, run: &RunStart) -> Result<i64, RecordError>;
    /// Writes status, error, timings, measurements, layers and verdicts in one transaction.
    fn finish_run(&mut self, id: i64, results: &RunResults) -> Result<(), RecordError>;
    /// Where the run's files (requests, dumps, logs) go.
    fn run_dir(&self, id: i64) -> PathBuf;
    /// Every recorded run with what it measured, oldest first.
    fn runs(&mut self) -> Result<Vec<RunDetails>, RecordError>;
    /// Finishes as errored every run still `running` on `host` whose owning process is
    /// certainly gone; returns them.
    fn sweep_abandoned(&mut self, host: &str) -> Result<Vec<Abandoned>, RecordError>;
}

/// A run whose runner died before finishing it, finished as errored by a later one.
#[derive(Debug, Clone, PartialEq)]
pub struct Abandoned {
    pub run: i64,
    pub pid: u32,
}

/// The reference name a series is stored under: `<ref-id>` for prefill, `<ref-id>/<mode>`
/// for other modes.
pub fn series_reference(reference: &str, mode: &str) -> String {
    if mode == "prefill" { reference.to_string() } else { format!("{reference}/{mode}") }
}

/// `<ref-id>/<mode>` back into `(ref-id, mode)`.
pub fn split_reference(stored: &str) -> (&str, &str) {
    match stored.rsplit_once('/') {
        Some((r, m)) if m == "incremental" => (r, m),
        _ => (stored, "prefill"),
    }
}

/// The log files a run kept (engine and build stdout/stderr), relative to its directory,
/// sorted.
pub fn run_logs(run_dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() { walk(&p, out) } else { out.push(p) }
            }
        }
    }
    let mut files = Vec::new();
    walk(run_dir, &mut files);
    let mut logs: Vec<String> = files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "stdout" || e == "stderr"))
        .filter_map(|p| p.strip_prefix(run_dir).ok().map(|p| p.display().to_string()))
        .collect();
    logs.sort();
    logs
}
