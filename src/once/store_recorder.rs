//! The [`Recorder`] of `runner once` on the real [`Store`]: SQLite by default, PostgreSQL
//! for a shared deployment, picked from the `--db` URL.
//!
//! `create_run` upserts the engine and the commit (with its generation number) and records
//! the run as `running` before the engine starts; `finish_run` writes everything the run
//! measured in the store's single transaction. The store keys series by (model, reference);
//! a run in incremental mode is a series of its own, so its reference is stored as
//! `<ref-id>/incremental` (prefill keeps the plain id).
//!
//! NOT YET COMPILED on this branch: it needs `src/store` and `src/contracts` (branch
//! `store`). It was built and the `tests/once.rs` suite passed through it on a scratch tree
//! holding both. Wiring, once they are in: `pub mod store_recorder;` in `once/mod.rs`, and
//! `open_recorder` returns `StoreRecorder::connect(&db.unwrap_or(cfg.db_url()), &cfg.data_dir)`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::record::{self, NewRunRecord, RecordError, Recorder, RunRecord, RunResults};
use crate::contracts::{ContractRef, Outcome, Severity};
use crate::store::{self, CommitSha, DeviceFingerprint, JobId, NewCommit, NewRun, RunId, RunStatus, Store, Trigger};

/// Records runs in a [`Store`], driving its async API from this synchronous command.
pub struct StoreRecorder {
    store: Arc<dyn Store>,
    rt: Exec,
    data_dir: PathBuf,
    trigger: Trigger,
    /// The job attempt (job, attempt token) the runs belong to, for the job queue's worker.
    attempt: Option<(JobId, String)>,
}

impl StoreRecorder {
    /// Opens (and migrates) the database at `url`; run directories go under `data_dir/runs`.
    pub fn connect(url: &str, data_dir: &Path) -> Result<StoreRecorder, RecordError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| RecordError::Io { path: data_dir.to_path_buf(), source })?;
        let store = rt.block_on(store::connect(url)).map_err(|e| RecordError::Store(e.to_string()))?;
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

fn err(e: impl std::fmt::Display) -> RecordError {
    RecordError::Store(e.to_string())
}

/// The reference name a series is stored under: `<ref-id>` for prefill, `<ref-id>/<mode>`
/// for other modes.
pub fn series_reference(reference: &str, mode: &str) -> String {
    if mode == "prefill" { reference.to_string() } else { format!("{reference}/{mode}") }
}

fn contract_ref(c: &record::ContractId) -> ContractRef {
    ContractRef { id: c.id.clone(), version: c.version.clone(), sha256: c.sha256.clone() }
}

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
    fn create_run(&mut self, run: &NewRunRecord) -> Result<i64, RecordError> {
        let store = self.store.clone();
        let sha = CommitSha::parse(&run.commit_sha).map_err(err)?;
        let (trigger, attempt) = (self.trigger, self.attempt.clone());
        self.rt.block_on(async move {
            let engine = store.upsert_engine(&run.engine, run.repo.as_deref()).await.map_err(err)?;
            let commit = NewCommit {
                sha,
                generation: run.generation,
                committed_at: None,
                title: Some(run.commit_title.clone()),
            };
            let commit = store.upsert_commit(engine.id, &commit).await.map_err(err)?;
            let new = NewRun {
                engine_id: engine.id,
                commit_id: commit.id,
                status: RunStatus::Running,
                trigger,
                suite: run.suite.clone(),
                device: device(&run.device_key),
                host: run.host.clone(),
                fixture_ids: run.fixture_ids.clone(),
                contracts: run.contracts.iter().map(contract_ref).collect(),
                log_path: None,
                job_id: None,
            };
            let id = store.create_run(&new).await.map_err(err)?;
            if let Some((job, token)) = &attempt
                && !store.bind_run_to_attempt(id, *job, token).await.map_err(err)?
            {
                let lost = store::StoreError::LeaseLost { run: id, job: *job };
                let _ = store.finish_run(id, &store::RunResults::errored(lost.to_string())).await;
                return Err(err(lost));
            }
            Ok(id.0)
        })
    }

    fn finish_run(&mut self, id: i64, r: &RunResults) -> Result<(), RecordError> {
        let status = match r.status {
            record::Status::Running => return Err(err("a run cannot be finished as running")),
            record::Status::Passed => RunStatus::Passed,
            record::Status::Failed => RunStatus::Failed,
            record::Status::Errored => RunStatus::Errored,
        };
        let mut series: Vec<store::SeriesSubject> = Vec::new();
        let mut add_series = |model: &str, reference: &str, mode: &str| {
            let Some(s) = r.series.iter().find(|s| s.model == model && s.reference == reference) else { return };
            let subject = store::SeriesSubject {
                model: s.model.clone(),
                model_sha256: s.model_sha256.clone(),
                reference: series_reference(reference, mode),
                fixture_id: s.fixture_id.clone(),
            };
            if !series.contains(&subject) {
                series.push(subject);
            }
        };
        for m in &r.measurements {
            add_series(&m.model, &m.reference, &m.mode);
        }
        for l in &r.layers {
            add_series(&l.model, &l.reference, &l.mode);
        }
        let results = store::RunResults {
            status,
            error: r.error.clone(),
            timings: r.timings.clone(),
            series,
            measurements: r
                .measurements
                .iter()
                .map(|m| store::Measurement {
                    model: m.model.clone(),
                    reference: series_reference(&m.reference, &m.mode),
                    prompt: m.prompt.clone(),
                    metric: m.metric.clone(),
                    statistic: m.statistic.clone(),
                    value: m.value,
                })
                .collect(),
            layers: r
                .layers
                .iter()
                .map(|l| store::LayerParity {
                    model: l.model.clone(),
                    reference: series_reference(&l.reference, &l.mode),
                    prompt: l.prompt.clone(),
                    capture: l.capture.clone(),
                    layer: l.layer,
                    rel_l2: l.rel_l2,
                    cosine: l.cosine,
                })
                .collect(),
            verdicts: r
                .verdicts
                .iter()
                .map(|v| store::StoredVerdict {
                    contract: contract_ref(&v.contract),
                    gate_id: v.gate_id.clone(),
                    metric: v.metric.clone(),
                    reduction: v.reduction.clone(),
                    comparison: v.comparison.clone(),
                    threshold: v.threshold,
                    floor: v.floor,
                    observed: v.observed,
                    n_samples: v.n_samples,
                    outcome: Outcome::parse(&v.outcome).unwrap_or(Outcome::Failed),
                    passed: v.passed,
                    severity: Severity::parse(&v.severity).unwrap_or(Severity::Error),
                    model: v.model.clone(),
                    reference: series_reference(&v.reference, v.mode.as_deref().unwrap_or("prefill")),
                    prompt: v.prompt.clone(),
                    dtype: v.dtype.clone(),
                    mode: v.mode.clone(),
                    detail: v.detail.clone(),
                })
                .collect(),
        };
        let store = self.store.clone();
        self.rt.block_on(async move { store.finish_run(RunId(id), &results).await.map_err(err) })
    }

    fn run_dir(&self, id: i64) -> PathBuf {
        self.data_dir.join("runs").join(id.to_string())
    }

    fn runs(&mut self) -> Result<Vec<RunRecord>, RecordError> {
        let store = self.store.clone();
        let details = self.rt.block_on(async move {
            let mut runs = store.recent_runs(i64::MAX).await.map_err(err)?;
            runs.sort_by_key(|r| r.id);
            let mut out = Vec::with_capacity(runs.len());
            for r in runs {
                out.push(store.run_details(r.id).await.map_err(err)?.ok_or(RecordError::NotFound { id: r.id.0 })?);
            }
            Ok::<_, RecordError>(out)
        })?;
        Ok(details.into_iter().map(|d| self.to_record(d)).collect())
    }
}

/// `<ref-id>/<mode>` back into `(ref-id, mode)`.
fn split_reference(stored: &str) -> (String, String) {
    match stored.rsplit_once('/') {
        Some((r, m)) if m == "incremental" => (r.to_string(), m.to_string()),
        _ => (stored.to_string(), "prefill".to_string()),
    }
}

impl StoreRecorder {
    fn to_record(&self, d: store::RunDetails) -> RunRecord {
        let run = &d.run;
        let status = match run.status {
            RunStatus::Passed => record::Status::Passed,
            RunStatus::Failed => record::Status::Failed,
            RunStatus::Errored => record::Status::Errored,
            RunStatus::Queued | RunStatus::Running => record::Status::Running,
        };
        let dir = self.run_dir(run.id.0);
        let mut logs: Vec<String> = walk(&dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "stdout" || e == "stderr"))
            .filter_map(|p| p.strip_prefix(&dir).ok().map(|p| p.display().to_string()))
            .collect();
        logs.sort();
        let finished = run.status.is_finished();
        RunRecord {
            id: run.id.0,
            status,
            created_utc: run.created_at.to_rfc3339(),
            finished_utc: run.finished_at.map(|t| t.to_rfc3339()),
            run: NewRunRecord {
                engine: run.engine.clone(),
                repo: None,
                commit_sha: run.commit_sha.to_string(),
                generation: run.generation,
                commit_title: String::new(),
                suite: run.suite.clone(),
                device_key: run.device.key(),
                host: run.host.clone(),
                fixture_ids: run.fixture_ids.clone(),
                contracts: run
                    .contracts
                    .iter()
                    .map(|c| record::ContractId {
                        id: c.id.clone(),
                        version: c.version.clone(),
                        sha256: c.sha256.clone(),
                    })
                    .collect(),
            },
            results: finished.then(|| RunResults {
                status,
                error: run.error.clone(),
                timings: run.timings.clone(),
                series: d
                    .series
                    .iter()
                    .map(|s| record::SeriesSubject {
                        model: s.model.clone(),
                        model_sha256: s.model_sha256.clone(),
                        reference: split_reference(&s.reference).0,
                        fixture_id: s.fixture_id.clone(),
                    })
                    .collect(),
                measurements: d
                    .measurements
                    .iter()
                    .map(|m| {
                        let (reference, mode) = split_reference(&m.reference);
                        record::Measurement {
                            model: m.model.clone(),
                            reference,
                            mode,
                            prompt: m.prompt.clone(),
                            metric: m.metric.clone(),
                            statistic: m.statistic.clone(),
                            value: m.value,
                        }
                    })
                    .collect(),
                layers: d
                    .layers
                    .iter()
                    .map(|l| {
                        let (reference, mode) = split_reference(&l.reference);
                        record::LayerParity {
                            model: l.model.clone(),
                            reference,
                            mode,
                            prompt: l.prompt.clone(),
                            capture: l.capture.clone(),
                            layer: l.layer,
                            rel_l2: l.rel_l2,
                            cosine: l.cosine,
                        }
                    })
                    .collect(),
                verdicts: d
                    .verdicts
                    .iter()
                    .map(|v| record::VerdictRecord {
                        contract: record::ContractId {
                            id: v.contract.id.clone(),
                            version: v.contract.version.clone(),
                            sha256: v.contract.sha256.clone(),
                        },
                        gate_id: v.gate_id.clone(),
                        metric: v.metric.clone(),
                        reduction: v.reduction.clone(),
                        comparison: v.comparison.clone(),
                        threshold: v.threshold,
                        floor: v.floor,
                        observed: v.observed,
                        n_samples: v.n_samples,
                        outcome: v.outcome.as_str().into(),
                        passed: v.passed,
                        severity: v.severity.as_str().into(),
                        model: v.model.clone(),
                        reference: split_reference(&v.reference).0,
                        prompt: v.prompt.clone(),
                        dtype: v.dtype.clone(),
                        mode: v.mode.clone(),
                        detail: v.detail.clone(),
                    })
                    .collect(),
                logs,
            }),
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
    }
    out
}
