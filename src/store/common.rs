//! The SQL text and the [`Store`](super::Store) implementation shared by both backends.
//!
//! Both dialects accept every statement here (`$N` placeholders, `RETURNING`,
//! `ON CONFLICT … DO UPDATE`, partial indexes), so the queries are written once. The Rust
//! around them is written once too, as the [`impl_store!`] macro instantiated for each
//! backend's concrete sqlx types (generic sqlx code over `Database` needs bounds on every
//! column type, which buries the SQL). Each backend supplies only what truly differs: how
//! it opens a write transaction (`BEGIN IMMEDIATE` on SQLite) and the row lock of a job
//! claim (`FOR UPDATE SKIP LOCKED` on PostgreSQL).

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::migrate::{Migration, MigrationType, Migrator};

/// Rows per multi-row INSERT: 1000 × 23 columns stays under SQLite's 32,766 bind variables
/// and PostgreSQL's 65,535.
pub(crate) const INSERT_CHUNK: usize = 1000;

/// A migrator over migrations embedded at build time (`(version, description, sql)`), so a
/// deployed binary needs no migrations folder beside it.
pub(crate) fn migrator(files: &'static [(i64, &'static str, &'static str)]) -> Migrator {
    let migrations = files
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(version, Cow::Borrowed(description), MigrationType::Simple, Cow::Borrowed(sql), false)
        })
        .collect::<Vec<_>>();
    Migrator { migrations: Cow::Owned(migrations), ignore_missing: false, locking: true, no_tx: false }
}

/// A fresh attempt token: unique per claim (worker, time, process, counter), hashed.
pub(crate) fn attempt_token(worker: &str, now_ms: i64) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let seed = format!("{worker}|{now_ms}|{nanos}|{}|{n}", std::process::id());
    crate::protocol::sha256_hex(seed.as_bytes())[..32].to_string()
}

pub(crate) const UPSERT_ENGINE: &str = "\
INSERT INTO engines (name, repo_url, created_ms) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE SET repo_url = COALESCE(excluded.repo_url, engines.repo_url)
RETURNING id, name, repo_url";

pub(crate) const ENGINE_BY_NAME: &str = "SELECT id, name, repo_url FROM engines WHERE name = $1";

pub(crate) const UPSERT_COMMIT: &str = "\
INSERT INTO commits (engine_id, sha, generation, committed_ms, title) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (engine_id, sha) DO UPDATE SET
    generation = excluded.generation,
    committed_ms = COALESCE(excluded.committed_ms, commits.committed_ms),
    title = COALESCE(excluded.title, commits.title)
RETURNING id, engine_id, sha, generation, committed_ms, title";

/// Keeps the generation copies of a commit's series points in step with the commit.
pub(crate) const SYNC_RUN_SERIES_GENERATION: &str = "\
UPDATE run_series SET generation = $1
WHERE generation <> $1 AND run_id IN (SELECT id FROM runs WHERE commit_id = $2)";

pub(crate) const COMMIT_BY_SHA: &str = "\
SELECT id, engine_id, sha, generation, committed_ms, title FROM commits WHERE engine_id = $1 AND sha = $2";

pub(crate) const COMMIT_ENGINE: &str = "SELECT engine_id FROM commits WHERE id = $1";

pub(crate) const INSERT_RUN: &str = "\
INSERT INTO runs (engine_id, commit_id, status, triggered_by, suite, device_kind, device_name,
                  device_driver, device_cuda, device_key, host, fixture_ids, contracts, timings,
                  log_path, job_id, created_ms, started_ms, owner)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
RETURNING id";

pub(crate) const START_RUN: &str = "\
UPDATE runs SET status = 'running', started_ms = $2 WHERE id = $1 AND status = 'queued'";

pub(crate) const RUN_STATUS: &str = "SELECT status FROM runs WHERE id = $1";

/// What finishing a run needs to know about it (read inside the write transaction).
pub(crate) const RUN_FOR_FINISH: &str = "\
SELECT r.status, r.engine_id, r.device_key, r.contracts, c.generation, r.job_id, r.attempt_token
FROM runs r JOIN commits c ON c.id = r.commit_id WHERE r.id = $1";

pub(crate) const UPSERT_SERIES: &str = "\
INSERT INTO series (engine_id, model, model_sha256, reference, device_key, fixture_id, contract_key, created_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (engine_id, model_sha256, reference, device_key, fixture_id, contract_key)
DO UPDATE SET model = series.model
RETURNING id";

pub(crate) const INSERT_RUN_SERIES: &str = "\
INSERT INTO run_series (run_id, series_id, generation) VALUES ($1, $2, $3)
ON CONFLICT (run_id, series_id) DO NOTHING";

pub(crate) const FINISH_RUN: &str = "\
UPDATE runs SET status = $2, error = $3, timings = $4, finished_ms = $5,
                started_ms = COALESCE(started_ms, $5)
WHERE id = $1 AND status IN ('queued', 'running')";

pub(crate) const INSERT_MEASUREMENTS: &str =
    "INSERT INTO measurements (run_id, series_id, model, reference, prompt, metric, statistic, value) ";

pub(crate) const INSERT_LAYERS: &str =
    "INSERT INTO layer_parity (run_id, series_id, model, reference, prompt, capture, layer, rel_l2, cosine) ";

pub(crate) const INSERT_VERDICTS: &str = "\
INSERT INTO verdicts (run_id, series_id, contract_id, contract_version, contract_sha256, gate_id,
                      metric, reduction, comparison, threshold, floor, observed, n_samples, outcome,
                      passed, severity, model, reference, prompt, dtype, mode, detail) ";

pub(crate) const SELECT_RUN: &str = "\
SELECT r.id, r.engine_id, e.name AS engine, r.commit_id, c.sha, c.generation, r.status,
       r.triggered_by, r.suite, r.device_kind, r.device_name, r.device_driver, r.device_cuda,
       r.host, r.fixture_ids, r.contracts, r.timings, r.log_path, r.error, r.job_id,
       r.created_ms, r.started_ms, r.finished_ms, r.owner
FROM runs r JOIN engines e ON e.id = r.engine_id JOIN commits c ON c.id = r.commit_id";

pub(crate) const SELECT_SERIES: &str = "\
SELECT s.id, s.engine_id, e.name AS engine, s.model, s.model_sha256, s.reference, s.device_key,
       s.fixture_id, s.contract_key
FROM series s JOIN engines e ON e.id = s.engine_id";

pub(crate) const SELECT_MEASUREMENTS: &str = "\
SELECT model, reference, prompt, metric, statistic, value FROM measurements WHERE run_id = $1 ORDER BY id";

pub(crate) const SELECT_LAYERS: &str = "\
SELECT model, reference, prompt, capture, layer, rel_l2, cosine FROM layer_parity WHERE run_id = $1 ORDER BY id";

pub(crate) const SELECT_VERDICTS: &str = "\
SELECT contract_id, contract_version, contract_sha256, gate_id, metric, reduction, comparison,
       threshold, floor, observed, n_samples, outcome, passed, severity, model, reference,
       prompt, dtype, mode, detail
FROM verdicts WHERE run_id = $1 ORDER BY id";

/// Error-severity verdicts of a series in a run that did not pass.
const FAILED_GATES: &str = "\
(SELECT COUNT(*) FROM verdicts v
 WHERE v.run_id = r.id AND v.series_id = rs.series_id AND v.severity = 'error' AND v.outcome <> 'passed')";

/// The latest point of each series: one backwards step on `run_series_by_generation` each.
pub(crate) fn latest_per_series() -> String {
    format!(
        "\
SELECT s.id, s.engine_id, e.name AS engine, s.model, s.model_sha256, s.reference, s.device_key,
       s.fixture_id, s.contract_key,
       r.id AS run_id, r.status, c.sha, c.generation, r.finished_ms, {FAILED_GATES} AS failed_gates
FROM series s
JOIN engines e ON e.id = s.engine_id
JOIN run_series rs ON rs.series_id = s.id AND rs.run_id = (
    SELECT rs2.run_id FROM run_series rs2 WHERE rs2.series_id = s.id
    ORDER BY rs2.generation DESC, rs2.run_id DESC LIMIT 1)
JOIN runs r ON r.id = rs.run_id
JOIN commits c ON c.id = r.commit_id
WHERE ($1 IS NULL OR e.name = $1)
ORDER BY e.name, s.model, s.reference, s.device_key, s.id"
    )
}

pub(crate) fn series_runs() -> String {
    format!(
        "\
SELECT r.id AS run_id, r.status, c.sha, c.generation, r.finished_ms, {FAILED_GATES} AS failed_gates
FROM run_series rs
JOIN runs r ON r.id = rs.run_id
JOIN commits c ON c.id = r.commit_id
WHERE rs.series_id = $1
ORDER BY rs.generation DESC, rs.run_id DESC
LIMIT $2"
    )
}

pub(crate) const SERIES_TREND: &str = "\
SELECT rs.run_id, c.sha, rs.generation, m.value
FROM run_series rs
JOIN runs r ON r.id = rs.run_id
JOIN commits c ON c.id = r.commit_id
JOIN measurements m ON m.run_id = rs.run_id AND m.series_id = rs.series_id
WHERE rs.series_id = $1 AND m.metric = $2 AND m.statistic = $3 AND m.prompt IS NULL
ORDER BY rs.generation DESC, rs.run_id DESC
LIMIT $4";

// Dashboard reads (runner serve).

pub(crate) const RELATED_SERIES: &str = "\
SELECT s.id, s.engine_id, e.name AS engine, s.model, s.model_sha256, s.reference, s.device_key,
       s.fixture_id, s.contract_key
FROM series s JOIN engines e ON e.id = s.engine_id
JOIN series me ON me.id = $1
WHERE s.engine_id = me.engine_id AND s.model = me.model AND s.reference = me.reference
ORDER BY s.id";

pub(crate) const RUN_SERIES_METRICS: &str = "\
SELECT DISTINCT metric, statistic FROM measurements
WHERE run_id = $1 AND series_id = $2 AND prompt IS NULL ORDER BY metric, statistic";

pub(crate) const RUN_SERIES_VERDICTS: &str = "\
SELECT contract_id, contract_version, contract_sha256, gate_id, metric, reduction, comparison,
       threshold, floor, observed, n_samples, outcome, passed, severity, model, reference,
       prompt, dtype, mode, detail
FROM verdicts WHERE run_id = $1 AND series_id = $2 ORDER BY id";

pub(crate) const SERIES_VERDICT_TREND: &str = "\
SELECT rs.run_id, c.sha, rs.generation, MIN(v.observed) AS value
FROM run_series rs
JOIN runs r ON r.id = rs.run_id
JOIN commits c ON c.id = r.commit_id
JOIN verdicts v ON v.run_id = rs.run_id AND v.series_id = rs.series_id
WHERE rs.series_id = $1 AND v.metric = $2 AND v.reduction = $3 AND v.prompt IS NULL
GROUP BY rs.run_id, c.sha, rs.generation
ORDER BY rs.generation DESC, rs.run_id DESC
LIMIT $4";

/// Uses the partial index `verdicts_by_series_metric` (failed or missing outcomes only).
pub(crate) const SERIES_FAILING_RUNS: &str = "\
SELECT DISTINCT v.run_id FROM verdicts v JOIN run_series rs ON rs.run_id = v.run_id AND rs.series_id = v.series_id
WHERE v.series_id = $1 AND v.metric = $2 AND v.outcome <> 'passed' AND rs.generation >= $3";

/// A series point is green when its run finished without erroring and no error-severity
/// gate of the series failed.
pub(crate) const LAST_GOOD: &str = "\
SELECT rs.generation, rs.run_id FROM run_series rs JOIN runs r ON r.id = rs.run_id
WHERE rs.series_id = $1 AND r.status IN ('passed', 'failed')
  AND NOT EXISTS (SELECT 1 FROM verdicts v WHERE v.run_id = rs.run_id AND v.series_id = rs.series_id
                  AND v.severity = 'error' AND v.outcome <> 'passed')
ORDER BY rs.generation DESC, rs.run_id DESC LIMIT 1";

pub(crate) fn first_after() -> String {
    format!(
        "\
SELECT r.id AS run_id, r.status, c.sha, c.generation, r.finished_ms, {FAILED_GATES} AS failed_gates
FROM run_series rs
JOIN runs r ON r.id = rs.run_id
JOIN commits c ON c.id = r.commit_id
WHERE rs.series_id = $1 AND (rs.generation > $2 OR (rs.generation = $2 AND rs.run_id > $3))
ORDER BY rs.generation, rs.run_id
LIMIT 1"
    )
}

pub(crate) fn series_run_by_id() -> String {
    format!(
        "\
SELECT r.id AS run_id, r.status, c.sha, c.generation, r.finished_ms, {FAILED_GATES} AS failed_gates
FROM run_series rs
JOIN runs r ON r.id = rs.run_id
JOIN commits c ON c.id = r.commit_id
WHERE rs.series_id = $1 AND rs.run_id = $2"
    )
}

pub(crate) const SELECT_ACK: &str = "\
SELECT acked_by, note, acked_ms FROM regression_acks WHERE series_id = $1 AND run_id = $2";

pub(crate) const INSERT_ACK: &str = "\
INSERT INTO regression_acks (series_id, run_id, acked_by, note, acked_ms) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (series_id, run_id) DO NOTHING";

pub(crate) const SELECT_RUN_DETAIL: &str = "SELECT detail FROM run_details WHERE run_id = $1";

pub(crate) const UPSERT_RUN_DETAIL: &str = "\
INSERT INTO run_details (run_id, detail, created_ms) VALUES ($1, $2, $3)
ON CONFLICT (run_id) DO UPDATE SET detail = excluded.detail, created_ms = excluded.created_ms";

pub(crate) const RUNS_BY_STATUS: &str = "SELECT status, COUNT(*) AS n FROM runs GROUP BY status";

pub(crate) const JOBS_BY_STATUS: &str = "SELECT status, COUNT(*) AS n FROM jobs GROUP BY status";

pub(crate) const OLDEST_QUEUED_JOB: &str = "SELECT MIN(created_ms) FROM jobs WHERE status = 'queued'";

/// The newest passed run of every series: one backwards walk of `run_series_by_generation`
/// per series until a passed run.
pub(crate) const LAST_SUCCESS: &str = "\
SELECT s.id, s.engine_id, e.name AS engine, s.model, s.model_sha256, s.reference, s.device_key,
       s.fixture_id, s.contract_key,
       (SELECT r.finished_ms FROM run_series rs JOIN runs r ON r.id = rs.run_id
        WHERE rs.series_id = s.id AND r.status = 'passed'
        ORDER BY rs.generation DESC, rs.run_id DESC LIMIT 1) AS last_success_ms
FROM series s JOIN engines e ON e.id = s.engine_id
ORDER BY s.id";

pub(crate) const ENQUEUE_JOB: &str = "\
INSERT INTO jobs (kind, payload, priority, status, attempts, max_attempts, run_after_ms, dedupe_key, created_ms,
                  device_key)
VALUES ($1, $2, $3, 'queued', 0, $4, $5, $6, $7, $8)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING id";

pub(crate) const JOB_BY_DEDUPE_KEY: &str = "SELECT id FROM jobs WHERE dedupe_key = $1";

/// The jobs whose lease expired, locked first (on PostgreSQL) so that a sweep and a run
/// being finished always take the job row before the run row and never deadlock.
pub(crate) const SWEEP_LOCK_EXPIRED: &str =
    "SELECT id FROM jobs WHERE status = 'running' AND lease_expires_ms < $1 ORDER BY id";

/// Finishes the unfinished runs of expired leases as errored: their worker is gone (or
/// paused) and must not be able to write them later.
pub(crate) const SWEEP_EXPIRED_RUNS: &str = "\
UPDATE runs SET
    status = 'errored',
    error = 'the worker lost its lease on job ' || CAST(job_id AS TEXT)
            || ' (lease expired: it died, hung or was paused); the job went back to the queue',
    finished_ms = $1,
    started_ms = COALESCE(started_ms, $1)
WHERE status IN ('queued', 'running') AND attempt_token IS NOT NULL
  AND job_id IN (SELECT id FROM jobs WHERE status = 'running' AND lease_expires_ms < $1)";

/// Returns the jobs of expired leases to the queue, or kills them when out of attempts.
pub(crate) const SWEEP_EXPIRED_LEASES: &str = "\
UPDATE jobs SET
    status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'dead' END,
    last_error = 'lease expired (worker ' || COALESCE(worker, '?') || ')',
    lease_expires_ms = NULL,
    attempt_token = NULL,
    finished_ms = CASE WHEN attempts < max_attempts THEN NULL ELSE $1 END
WHERE status = 'running' AND lease_expires_ms < $1";

/// The claim, up to the kind filter; [`CLAIM_JOB_TAIL`] and the backend's row lock follow.
pub(crate) const CLAIM_JOB_HEAD: &str = "\
UPDATE jobs SET status = 'running', attempts = attempts + 1, attempt_token = $1, worker = $2,
                lease_expires_ms = $3, heartbeat_ms = $4
WHERE id = (
    SELECT id FROM jobs WHERE status = 'queued' AND run_after_ms <= $4";

/// The device filter of a claim; `{d}` is the placeholder of the worker's device key.
pub(crate) fn claim_device_filter(d: &str) -> String {
    format!(
        " AND (device_key IS NULL OR device_key = {d} \
         OR substr({d}, 1, length(device_key) + 1) = device_key || '|')"
    )
}

pub(crate) const CLAIM_JOB_TAIL: &str = " ORDER BY priority DESC, run_after_ms, id LIMIT 1";

pub(crate) const CLAIM_JOB_RETURNING: &str =
    ") RETURNING id, kind, payload, priority, attempts, max_attempts, attempt_token, lease_expires_ms";

pub(crate) const HEARTBEAT_JOB: &str = "\
UPDATE jobs SET heartbeat_ms = $1, lease_expires_ms = $2
WHERE id = $3 AND attempt_token = $4 AND status = 'running'";

pub(crate) const COMPLETE_JOB: &str = "\
UPDATE jobs SET status = 'done', finished_ms = $1, lease_expires_ms = NULL
WHERE id = $2 AND attempt_token = $3 AND status = 'running'";

pub(crate) const FAIL_JOB: &str = "\
UPDATE jobs SET
    status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'dead' END,
    last_error = $1,
    run_after_ms = $2,
    lease_expires_ms = NULL,
    attempt_token = NULL,
    finished_ms = CASE WHEN attempts < max_attempts THEN NULL ELSE $3 END
WHERE id = $4 AND attempt_token = $5 AND status = 'running'";

pub(crate) const SELECT_JOB: &str = "\
SELECT id, kind, payload, priority, status, attempts, max_attempts, run_after_ms, lease_expires_ms,
       worker, last_error, dedupe_key, device_key
FROM jobs WHERE id = $1";

pub(crate) const BIND_RUN_TO_ATTEMPT: &str = "\
UPDATE runs SET job_id = $2, attempt_token = $3
WHERE id = $1 AND status IN ('queued', 'running')
  AND EXISTS (SELECT 1 FROM jobs WHERE id = $2 AND attempt_token = $3 AND status = 'running')";

/// Who holds a job now (read, and on PostgreSQL locked, when finishing one of its runs).
pub(crate) const JOB_HOLDER: &str = "SELECT status, attempt_token FROM jobs WHERE id = $1";

pub(crate) const INSERT_DELIVERY: &str = "\
INSERT INTO webhook_deliveries (delivery_id, event, received_ms) VALUES ($1, $2, $3)
ON CONFLICT (delivery_id) DO NOTHING
RETURNING delivery_id";

pub(crate) const MEASURED_RUN: &str = "\
SELECT r.id FROM runs r JOIN engines e ON e.id = r.engine_id JOIN commits c ON c.id = r.commit_id
WHERE e.name = $1 AND c.sha = $2 AND r.suite = $3 AND r.device_key = $4 AND r.status IN ('passed', 'failed')
ORDER BY r.id DESC LIMIT 1";

/// Implements [`Store`](super::Store) for a backend struct with a `pool: sqlx::Pool<$db>`
/// field, a `url: String` field (redacted), `async fn begin_write(&self)` and a
/// `CLAIM_LOCK` and `ROW_LOCK` `&str` associated constants.
macro_rules! impl_store {
    ($store:ty, $db:ty, $backend:expr) => {
        type DbRow = <$db as sqlx::Database>::Row;

        /// Reads a column, naming what was being read when it fails.
        fn col<'r, T>(row: &'r DbRow, name: &'static str) -> Result<T, $crate::store::StoreError>
        where
            T: sqlx::Decode<'r, $db> + sqlx::Type<$db>,
        {
            use sqlx::Row as _;
            row.try_get(name).map_err($crate::store::query_err(name))
        }

        fn parse_text<T>(
            column: &'static str,
            value: String,
            parse: impl Fn(&str) -> Option<T>,
        ) -> Result<T, $crate::store::StoreError> {
            parse(&value).ok_or($crate::store::StoreError::Corrupt { column, value })
        }

        fn parse_json<T: serde::de::DeserializeOwned>(
            column: &'static str,
            value: String,
        ) -> Result<T, $crate::store::StoreError> {
            serde_json::from_str(&value).map_err(|_| $crate::store::StoreError::Corrupt { column, value })
        }

        fn to_json<T: serde::Serialize>(value: &T) -> String {
            serde_json::to_string(value).expect("plain data serializes to JSON")
        }

        fn opt_ms(ms: Option<i64>) -> Option<chrono::DateTime<chrono::Utc>> {
            ms.map($crate::store::from_ms)
        }

        fn engine_from(row: &DbRow) -> Result<$crate::store::Engine, $crate::store::StoreError> {
            Ok($crate::store::Engine {
                id: $crate::store::EngineId(col(row, "id")?),
                name: col(row, "name")?,
                repo_url: col(row, "repo_url")?,
            })
        }

        fn commit_from(row: &DbRow) -> Result<$crate::store::Commit, $crate::store::StoreError> {
            let sha: String = col(row, "sha")?;
            Ok($crate::store::Commit {
                id: $crate::store::CommitId(col(row, "id")?),
                engine_id: $crate::store::EngineId(col(row, "engine_id")?),
                sha: parse_text("commits.sha", sha, |s| $crate::store::CommitSha::parse(s).ok())?,
                generation: col(row, "generation")?,
                committed_at: opt_ms(col(row, "committed_ms")?),
                title: col(row, "title")?,
            })
        }

        fn run_from(row: &DbRow) -> Result<$crate::store::Run, $crate::store::StoreError> {
            use $crate::store::*;
            Ok(Run {
                id: RunId(col(row, "id")?),
                engine_id: EngineId(col(row, "engine_id")?),
                engine: col(row, "engine")?,
                commit_id: CommitId(col(row, "commit_id")?),
                commit_sha: parse_text("commits.sha", col(row, "sha")?, |s| CommitSha::parse(s).ok())?,
                generation: col(row, "generation")?,
                status: parse_text("runs.status", col(row, "status")?, RunStatus::parse)?,
                trigger: parse_text("runs.triggered_by", col(row, "triggered_by")?, Trigger::parse)?,
                suite: col(row, "suite")?,
                device: DeviceFingerprint {
                    kind: col(row, "device_kind")?,
                    name: col(row, "device_name")?,
                    driver: col(row, "device_driver")?,
                    cuda: col(row, "device_cuda")?,
                },
                host: col(row, "host")?,
                owner: col(row, "owner")?,
                fixture_ids: parse_json("runs.fixture_ids", col(row, "fixture_ids")?)?,
                contracts: parse_json("runs.contracts", col(row, "contracts")?)?,
                // JSON has no NaN: serde_json writes it as null, read back as NaN.
                timings: parse_json::<std::collections::BTreeMap<String, Option<f64>>>(
                    "runs.timings",
                    col(row, "timings")?,
                )?
                .into_iter()
                .map(|(k, v)| (k, null_to_nan(v)))
                .collect(),
                log_path: col(row, "log_path")?,
                error: col(row, "error")?,
                job_id: col::<Option<i64>>(row, "job_id")?.map(JobId),
                created_at: from_ms(col(row, "created_ms")?),
                started_at: opt_ms(col(row, "started_ms")?),
                finished_at: opt_ms(col(row, "finished_ms")?),
            })
        }

        fn series_from(row: &DbRow) -> Result<$crate::store::Series, $crate::store::StoreError> {
            use $crate::store::*;
            Ok(Series {
                id: SeriesId(col(row, "id")?),
                engine_id: EngineId(col(row, "engine_id")?),
                engine: col(row, "engine")?,
                model: col(row, "model")?,
                model_sha256: col(row, "model_sha256")?,
                reference: col(row, "reference")?,
                device_key: col(row, "device_key")?,
                fixture_id: col(row, "fixture_id")?,
                contract_key: col(row, "contract_key")?,
            })
        }

        fn series_run_from(row: &DbRow) -> Result<$crate::store::SeriesRun, $crate::store::StoreError> {
            use $crate::store::*;
            Ok(SeriesRun {
                run_id: RunId(col(row, "run_id")?),
                status: parse_text("runs.status", col(row, "status")?, RunStatus::parse)?,
                commit_sha: parse_text("commits.sha", col(row, "sha")?, |s| CommitSha::parse(s).ok())?,
                generation: col(row, "generation")?,
                finished_at: opt_ms(col(row, "finished_ms")?),
                failed_gates: col(row, "failed_gates")?,
            })
        }

        fn measurement_from(row: &DbRow) -> Result<$crate::store::Measurement, $crate::store::StoreError> {
            Ok($crate::store::Measurement {
                model: col(row, "model")?,
                reference: col(row, "reference")?,
                prompt: col(row, "prompt")?,
                metric: col(row, "metric")?,
                statistic: col(row, "statistic")?,
                value: $crate::store::null_to_nan(col(row, "value")?),
            })
        }

        fn layer_from(row: &DbRow) -> Result<$crate::store::LayerParity, $crate::store::StoreError> {
            Ok($crate::store::LayerParity {
                model: col(row, "model")?,
                reference: col(row, "reference")?,
                prompt: col(row, "prompt")?,
                capture: col(row, "capture")?,
                layer: col(row, "layer")?,
                rel_l2: $crate::store::null_to_nan(col(row, "rel_l2")?),
                cosine: $crate::store::null_to_nan(col(row, "cosine")?),
            })
        }

        fn verdict_from(row: &DbRow) -> Result<$crate::store::StoredVerdict, $crate::store::StoreError> {
            use $crate::contracts::{ContractRef, Outcome, Severity};
            let outcome = parse_text("verdicts.outcome", col(row, "outcome")?, Outcome::parse)?;
            let observed: Option<f64> = col(row, "observed")?;
            Ok($crate::store::StoredVerdict {
                contract: ContractRef {
                    id: col(row, "contract_id")?,
                    version: col(row, "contract_version")?,
                    sha256: col(row, "contract_sha256")?,
                },
                gate_id: col(row, "gate_id")?,
                metric: col(row, "metric")?,
                reduction: col(row, "reduction")?,
                comparison: col(row, "comparison")?,
                threshold: $crate::store::null_to_nan(col(row, "threshold")?),
                floor: col(row, "floor")?,
                // NULL is "no observation" for a missing outcome, NaN otherwise.
                observed: match outcome {
                    Outcome::Missing => observed,
                    _ => Some($crate::store::null_to_nan(observed)),
                },
                n_samples: col(row, "n_samples")?,
                outcome,
                passed: col(row, "passed")?,
                severity: parse_text("verdicts.severity", col(row, "severity")?, Severity::parse)?,
                model: col(row, "model")?,
                reference: col(row, "reference")?,
                prompt: col(row, "prompt")?,
                dtype: col(row, "dtype")?,
                mode: col(row, "mode")?,
                detail: col(row, "detail")?,
            })
        }

        fn job_from(row: &DbRow) -> Result<$crate::store::Job, $crate::store::StoreError> {
            use $crate::store::*;
            Ok(Job {
                id: JobId(col(row, "id")?),
                kind: col(row, "kind")?,
                payload: parse_json("jobs.payload", col(row, "payload")?)?,
                priority: col(row, "priority")?,
                status: parse_text("jobs.status", col(row, "status")?, JobStatus::parse)?,
                attempts: col(row, "attempts")?,
                max_attempts: col(row, "max_attempts")?,
                run_after: from_ms(col(row, "run_after_ms")?),
                lease_expires_at: opt_ms(col(row, "lease_expires_ms")?),
                worker: col(row, "worker")?,
                last_error: col(row, "last_error")?,
                dedupe_key: col(row, "dedupe_key")?,
                device_key: col(row, "device_key")?,
            })
        }

        fn lease_ms(lease: std::time::Duration) -> i64 {
            i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4)
        }

        /// Adds a job inside a write transaction unless its dedupe key is taken.
        async fn enqueue_in(
            tx: &mut sqlx::Transaction<'static, $db>,
            job: &$crate::store::NewJob,
            now: chrono::DateTime<chrono::Utc>,
        ) -> Result<$crate::store::Enqueued, $crate::store::StoreError> {
            use $crate::store::*;
            let doing = "enqueueing a job";
            let id: Option<i64> = sqlx::query_scalar($crate::store::common::ENQUEUE_JOB)
                .bind(job.kind.as_str())
                .bind(to_json(&job.payload))
                .bind(job.priority)
                .bind(job.max_attempts.max(1))
                .bind(to_ms(job.run_after))
                .bind(job.dedupe_key.as_deref())
                .bind(to_ms(now))
                .bind(job.device_key.as_deref())
                .fetch_optional(&mut **tx)
                .await
                .map_err(query_err(doing))?;
            Ok(match id {
                Some(id) => Enqueued::New(JobId(id)),
                None => {
                    let id: i64 = sqlx::query_scalar($crate::store::common::JOB_BY_DEDUPE_KEY)
                        .bind(job.dedupe_key.as_deref())
                        .fetch_one(&mut **tx)
                        .await
                        .map_err(query_err(doing))?;
                    Enqueued::Duplicate(JobId(id))
                }
            })
        }

        /// Inserts one run's rows of one table in chunks of multi-row INSERTs.
        async fn insert_chunked<'a, T: 'a>(
            tx: &mut sqlx::Transaction<'static, $db>,
            head: &'static str,
            rows: &'a [T],
            doing: &'static str,
            push: impl Fn(&mut sqlx::query_builder::Separated<'_, 'a, $db, &'static str>, &'a T),
        ) -> Result<(), $crate::store::StoreError> {
            for chunk in rows.chunks($crate::store::common::INSERT_CHUNK) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(head);
                qb.push_values(chunk, |mut b, row| push(&mut b, row));
                qb.build().execute(&mut **tx).await.map_err($crate::store::query_err(doing))?;
            }
            Ok(())
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> $crate::store::Backend {
                $backend
            }

            async fn upsert_engine(
                &self,
                name: &str,
                repo_url: Option<&str>,
            ) -> Result<$crate::store::Engine, $crate::store::StoreError> {
                let now = $crate::store::to_ms(chrono::Utc::now());
                let mut tx = self.begin_write().await?;
                let row = sqlx::query($crate::store::common::UPSERT_ENGINE)
                    .bind(name)
                    .bind(repo_url)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err($crate::store::query_err("upserting an engine"))?;
                let engine = engine_from(&row)?;
                tx.commit().await.map_err($crate::store::query_err("upserting an engine"))?;
                Ok(engine)
            }

            async fn engine_by_name(
                &self,
                name: &str,
            ) -> Result<Option<$crate::store::Engine>, $crate::store::StoreError> {
                sqlx::query($crate::store::common::ENGINE_BY_NAME)
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading an engine"))?
                    .map(|r| engine_from(&r))
                    .transpose()
            }

            async fn upsert_commit(
                &self,
                engine: $crate::store::EngineId,
                c: &$crate::store::NewCommit,
            ) -> Result<$crate::store::Commit, $crate::store::StoreError> {
                let doing = "upserting a commit";
                let mut tx = self.begin_write().await?;
                let row = sqlx::query($crate::store::common::UPSERT_COMMIT)
                    .bind(engine.0)
                    .bind(c.sha.as_str())
                    .bind(c.generation)
                    .bind(c.committed_at.map($crate::store::to_ms))
                    .bind(c.title.as_deref())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err($crate::store::query_err(doing))?;
                let commit = commit_from(&row)?;
                sqlx::query($crate::store::common::SYNC_RUN_SERIES_GENERATION)
                    .bind(commit.generation)
                    .bind(commit.id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err($crate::store::query_err(doing))?;
                tx.commit().await.map_err($crate::store::query_err(doing))?;
                Ok(commit)
            }

            async fn commit_by_sha(
                &self,
                engine: $crate::store::EngineId,
                sha: &$crate::store::CommitSha,
            ) -> Result<Option<$crate::store::Commit>, $crate::store::StoreError> {
                sqlx::query($crate::store::common::COMMIT_BY_SHA)
                    .bind(engine.0)
                    .bind(sha.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a commit"))?
                    .map(|r| commit_from(&r))
                    .transpose()
            }

            async fn create_run(
                &self,
                run: &$crate::store::NewRun,
            ) -> Result<$crate::store::RunId, $crate::store::StoreError> {
                use $crate::store::*;
                let doing = "creating a run";
                if !matches!(run.status, RunStatus::Queued | RunStatus::Running) {
                    return Err(StoreError::Invalid {
                        field: "new run status",
                        value: run.status.to_string(),
                        expected: "queued or running",
                    });
                }
                let now = to_ms(chrono::Utc::now());
                let mut tx = self.begin_write().await?;
                let owner: Option<i64> = sqlx::query_scalar($crate::store::common::COMMIT_ENGINE)
                    .bind(run.commit_id.0)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(query_err(doing))?;
                match owner {
                    None => return Err(StoreError::NotFound { what: "commit", id: run.commit_id.0 }),
                    Some(e) if e != run.engine_id.0 => {
                        return Err(StoreError::Invalid {
                            field: "run commit",
                            value: run.commit_id.to_string(),
                            expected: "a commit of the run's engine",
                        });
                    }
                    Some(_) => {}
                }
                let started = (run.status == RunStatus::Running).then_some(now);
                let id: i64 = sqlx::query_scalar($crate::store::common::INSERT_RUN)
                    .bind(run.engine_id.0)
                    .bind(run.commit_id.0)
                    .bind(run.status.as_str())
                    .bind(run.trigger.as_str())
                    .bind(run.suite.as_str())
                    .bind(run.device.kind.as_str())
                    .bind(run.device.name.as_str())
                    .bind(run.device.driver.as_deref())
                    .bind(run.device.cuda.as_deref())
                    .bind(run.device.key())
                    .bind(run.host.as_deref())
                    .bind(to_json(&run.fixture_ids))
                    .bind(to_json(&run.contracts))
                    .bind("{}")
                    .bind(run.log_path.as_deref())
                    .bind(run.job_id.map(|j| j.0))
                    .bind(now)
                    .bind(started)
                    .bind(run.owner.as_deref())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(query_err(doing))?;
                tx.commit().await.map_err(query_err(doing))?;
                Ok(RunId(id))
            }

            async fn start_run(&self, id: $crate::store::RunId) -> Result<(), $crate::store::StoreError> {
                use $crate::store::*;
                let doing = "starting a run";
                let mut tx = self.begin_write().await?;
                let done = sqlx::query($crate::store::common::START_RUN)
                    .bind(id.0)
                    .bind(to_ms(chrono::Utc::now()))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_err(doing))?
                    .rows_affected();
                if done == 0 {
                    let status: Option<String> = sqlx::query_scalar($crate::store::common::RUN_STATUS)
                        .bind(id.0)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(query_err(doing))?;
                    let status = status.ok_or(StoreError::NotFound { what: "run", id: id.0 })?;
                    let from = parse_text("runs.status", status, RunStatus::parse)?;
                    return Err(StoreError::InvalidTransition { run: id, from, to: RunStatus::Running });
                }
                tx.commit().await.map_err(query_err(doing))?;
                Ok(())
            }

            async fn finish_run(
                &self,
                id: $crate::store::RunId,
                results: &$crate::store::RunResults,
            ) -> Result<(), $crate::store::StoreError> {
                use std::collections::BTreeMap;
                use $crate::store::*;
                let doing = "finishing a run";
                if !results.status.is_finished() {
                    return Err(StoreError::Invalid {
                        field: "final run status",
                        value: results.status.to_string(),
                        expected: "passed, failed or errored",
                    });
                }
                let now = to_ms(chrono::Utc::now());
                let mut tx = self.begin_write().await?;

                // 1. The run must exist, belong to no lost attempt, and not be finished.
                let row = sqlx::query($crate::store::common::RUN_FOR_FINISH)
                    .bind(id.0)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(query_err(doing))?
                    .ok_or(StoreError::NotFound { what: "run", id: id.0 })?;
                // A run of a job attempt is written only while that attempt holds the job
                // (the job row is locked first, as the lease sweep does).
                let attempt: Option<String> = col(&row, "attempt_token")?;
                if let (Some(attempt), Some(job)) = (attempt, col::<Option<i64>>(&row, "job_id")?) {
                    let sql = format!("{}{}", $crate::store::common::JOB_HOLDER, <$store>::ROW_LOCK);
                    let holder =
                        sqlx::query(&sql).bind(job).fetch_optional(&mut *tx).await.map_err(query_err(doing))?;
                    let holds = match &holder {
                        Some(h) => {
                            col::<String>(h, "status")? == "running"
                                && col::<Option<String>>(h, "attempt_token")?.as_deref() == Some(attempt.as_str())
                        }
                        None => false,
                    };
                    if !holds {
                        // roll back now: a dropped transaction's rollback waits for the pooled
                        // connection's next use, and the job row stays locked until then
                        // (a claim's SKIP LOCKED would pass the job over)
                        tx.rollback().await.map_err(query_err(doing))?;
                        return Err(StoreError::LeaseLost { run: id, job: JobId(job) });
                    }
                }
                let from = parse_text("runs.status", col(&row, "status")?, RunStatus::parse)?;
                if from.is_finished() {
                    tx.rollback().await.map_err(query_err(doing))?;
                    return Err(StoreError::InvalidTransition { run: id, from, to: results.status });
                }
                let engine_id: i64 = col(&row, "engine_id")?;
                let device_key: String = col(&row, "device_key")?;
                let contracts: Vec<$crate::contracts::ContractRef> =
                    parse_json("runs.contracts", col(&row, "contracts")?)?;
                let generation: i64 = col(&row, "generation")?;
                let contract_key = contract_key(&contracts);

                // 2. One series point per (model, reference).
                let mut series_of: BTreeMap<(&str, &str), i64> = BTreeMap::new();
                for s in &results.series {
                    let series_id: i64 = sqlx::query_scalar($crate::store::common::UPSERT_SERIES)
                        .bind(engine_id)
                        .bind(s.model.as_str())
                        .bind(s.model_sha256.as_str())
                        .bind(s.reference.as_str())
                        .bind(device_key.as_str())
                        .bind(s.fixture_id.as_str())
                        .bind(contract_key.as_str())
                        .bind(now)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(query_err(doing))?;
                    sqlx::query($crate::store::common::INSERT_RUN_SERIES)
                        .bind(id.0)
                        .bind(series_id)
                        .bind(generation)
                        .execute(&mut *tx)
                        .await
                        .map_err(query_err(doing))?;
                    series_of.insert((s.model.as_str(), s.reference.as_str()), series_id);
                }
                let series = |model: &str, reference: &str| series_of.get(&(model, reference)).copied();

                // 3. Measurements, per-layer parity, verdicts.
                let ms: Vec<(Option<i64>, &Measurement)> =
                    results.measurements.iter().map(|m| (series(&m.model, &m.reference), m)).collect();
                insert_chunked(&mut tx, $crate::store::common::INSERT_MEASUREMENTS, &ms, doing, |b, (s, m)| {
                    b.push_bind(id.0)
                        .push_bind(*s)
                        .push_bind(m.model.as_str())
                        .push_bind(m.reference.as_str())
                        .push_bind(m.prompt.as_deref())
                        .push_bind(m.metric.as_str())
                        .push_bind(m.statistic.as_str())
                        .push_bind(nan_to_null(m.value));
                })
                .await?;
                let ls: Vec<(Option<i64>, &LayerParity)> =
                    results.layers.iter().map(|l| (series(&l.model, &l.reference), l)).collect();
                insert_chunked(&mut tx, $crate::store::common::INSERT_LAYERS, &ls, doing, |b, (s, l)| {
                    b.push_bind(id.0)
                        .push_bind(*s)
                        .push_bind(l.model.as_str())
                        .push_bind(l.reference.as_str())
                        .push_bind(l.prompt.as_deref())
                        .push_bind(l.capture.as_str())
                        .push_bind(l.layer)
                        .push_bind(nan_to_null(l.rel_l2))
                        .push_bind(nan_to_null(l.cosine));
                })
                .await?;
                let vs: Vec<(Option<i64>, &StoredVerdict)> =
                    results.verdicts.iter().map(|v| (series(&v.model, &v.reference), v)).collect();
                insert_chunked(&mut tx, $crate::store::common::INSERT_VERDICTS, &vs, doing, |b, (s, v)| {
                    b.push_bind(id.0)
                        .push_bind(*s)
                        .push_bind(v.contract.id.as_str())
                        .push_bind(v.contract.version.as_str())
                        .push_bind(v.contract.sha256.as_str())
                        .push_bind(v.gate_id.as_str())
                        .push_bind(v.metric.as_str())
                        .push_bind(v.reduction.as_str())
                        .push_bind(v.comparison.as_str())
                        .push_bind(nan_to_null(v.threshold))
                        .push_bind(v.floor.and_then(nan_to_null))
                        .push_bind(v.observed.and_then(nan_to_null))
                        .push_bind(v.n_samples)
                        .push_bind(v.outcome.as_str())
                        .push_bind(v.passed)
                        .push_bind(v.severity.as_str())
                        .push_bind(v.model.as_str())
                        .push_bind(v.reference.as_str())
                        .push_bind(v.prompt.as_deref())
                        .push_bind(v.dtype.as_deref())
                        .push_bind(v.mode.as_deref())
                        .push_bind(v.detail.as_deref());
                })
                .await?;

                // 4. The final status, last.
                let finished = sqlx::query($crate::store::common::FINISH_RUN)
                    .bind(id.0)
                    .bind(results.status.as_str())
                    .bind(results.error.as_deref())
                    .bind(to_json(&results.timings))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_err(doing))?
                    .rows_affected();
                if finished != 1 {
                    return Err(StoreError::InvalidTransition {
                        run: id,
                        from: RunStatus::Errored,
                        to: results.status,
                    });
                }
                tx.commit().await.map_err(query_err(doing))?;
                Ok(())
            }

            async fn run(
                &self,
                id: $crate::store::RunId,
            ) -> Result<Option<$crate::store::Run>, $crate::store::StoreError> {
                let sql = format!("{} WHERE r.id = $1", $crate::store::common::SELECT_RUN);
                sqlx::query(&sql)
                    .bind(id.0)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a run"))?
                    .map(|r| run_from(&r))
                    .transpose()
            }

            async fn run_details(
                &self,
                id: $crate::store::RunId,
            ) -> Result<Option<$crate::store::RunDetails>, $crate::store::StoreError> {
                use $crate::store::*;
                let doing = "reading a run's results";
                let Some(run) = self.run(id).await? else { return Ok(None) };
                let sql = format!(
                    "{} JOIN run_series rs ON rs.series_id = s.id WHERE rs.run_id = $1 ORDER BY s.id",
                    $crate::store::common::SELECT_SERIES
                );
                let series = sqlx::query(&sql)
                    .bind(id.0)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(query_err(doing))?
                    .iter()
                    .map(series_from)
                    .collect::<Result<Vec<_>, _>>()?;
                let measurements = sqlx::query($crate::store::common::SELECT_MEASUREMENTS)
                    .bind(id.0)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(query_err(doing))?
                    .iter()
                    .map(measurement_from)
                    .collect::<Result<Vec<_>, _>>()?;
                let layers = sqlx::query($crate::store::common::SELECT_LAYERS)
                    .bind(id.0)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(query_err(doing))?
                    .iter()
                    .map(layer_from)
                    .collect::<Result<Vec<_>, _>>()?;
                let verdicts = sqlx::query($crate::store::common::SELECT_VERDICTS)
                    .bind(id.0)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(query_err(doing))?
                    .iter()
                    .map(verdict_from)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some(RunDetails { run, series, measurements, layers, verdicts }))
            }

            async fn recent_runs(&self, limit: i64) -> Result<Vec<$crate::store::Run>, $crate::store::StoreError> {
                let sql = format!("{} ORDER BY r.id DESC LIMIT $1", $crate::store::common::SELECT_RUN);
                sqlx::query(&sql)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading recent runs"))?
                    .iter()
                    .map(run_from)
                    .collect()
            }

            async fn running_owned_runs(
                &self,
                host: &str,
            ) -> Result<Vec<$crate::store::Run>, $crate::store::StoreError> {
                let sql = format!(
                    "{} WHERE r.status = 'running' AND r.host = $1 AND r.owner IS NOT NULL AND r.job_id IS NULL \
                     ORDER BY r.id",
                    $crate::store::common::SELECT_RUN
                );
                sqlx::query(&sql)
                    .bind(host)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading running runs"))?
                    .iter()
                    .map(run_from)
                    .collect()
            }

            async fn latest_per_series(
                &self,
                engine: Option<&str>,
            ) -> Result<Vec<$crate::store::SeriesLatest>, $crate::store::StoreError> {
                let sql = $crate::store::common::latest_per_series();
                sqlx::query(&sql)
                    .bind(engine)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading the latest run per series"))?
                    .iter()
                    .map(|row| {
                        Ok($crate::store::SeriesLatest { series: series_from(row)?, latest: series_run_from(row)? })
                    })
                    .collect()
            }

            async fn series(
                &self,
                id: $crate::store::SeriesId,
            ) -> Result<Option<$crate::store::Series>, $crate::store::StoreError> {
                let sql = format!("{} WHERE s.id = $1", $crate::store::common::SELECT_SERIES);
                sqlx::query(&sql)
                    .bind(id.0)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a series"))?
                    .map(|r| series_from(&r))
                    .transpose()
            }

            async fn series_runs(
                &self,
                id: $crate::store::SeriesId,
                limit: i64,
            ) -> Result<Vec<$crate::store::SeriesRun>, $crate::store::StoreError> {
                let sql = $crate::store::common::series_runs();
                let mut runs = sqlx::query(&sql)
                    .bind(id.0)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a series' runs"))?
                    .iter()
                    .map(series_run_from)
                    .collect::<Result<Vec<_>, _>>()?;
                runs.reverse();
                Ok(runs)
            }

            async fn series_trend(
                &self,
                id: $crate::store::SeriesId,
                metric: &str,
                statistic: &str,
                limit: i64,
            ) -> Result<Vec<$crate::store::TrendPoint>, $crate::store::StoreError> {
                use $crate::store::*;
                let mut points = sqlx::query($crate::store::common::SERIES_TREND)
                    .bind(id.0)
                    .bind(metric)
                    .bind(statistic)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(query_err("reading a trend"))?
                    .iter()
                    .map(|row| {
                        Ok(TrendPoint {
                            run_id: RunId(col(row, "run_id")?),
                            commit_sha: parse_text("commits.sha", col(row, "sha")?, |s| CommitSha::parse(s).ok())?,
                            generation: col(row, "generation")?,
                            value: null_to_nan(col(row, "value")?),
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                points.reverse();
                Ok(points)
            }

            async fn related_series(
                &self,
                id: $crate::store::SeriesId,
            ) -> Result<Vec<$crate::store::Series>, $crate::store::StoreError> {
                sqlx::query($crate::store::common::RELATED_SERIES)
                    .bind(id.0)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading related series"))?
                    .iter()
                    .map(series_from)
                    .collect()
            }

            async fn run_series_metrics(
                &self,
                run: $crate::store::RunId,
                series: $crate::store::SeriesId,
            ) -> Result<Vec<(String, String)>, $crate::store::StoreError> {
                sqlx::query($crate::store::common::RUN_SERIES_METRICS)
                    .bind(run.0)
                    .bind(series.0)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a run's metrics"))?
                    .iter()
                    .map(|row| Ok((col(row, "metric")?, col(row, "statistic")?)))
                    .collect()
            }

            async fn run_series_verdicts(
                &self,
                run: $crate::store::RunId,
                series: $crate::store::SeriesId,
            ) -> Result<Vec<$crate::store::StoredVerdict>, $crate::store::StoreError> {
                sqlx::query($crate::store::common::RUN_SERIES_VERDICTS)
                    .bind(run.0)
                    .bind(series.0)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a run's verdicts"))?
                    .iter()
                    .map(verdict_from)
                    .collect()
            }

            async fn series_failing_runs(
                &self,
                id: $crate::store::SeriesId,
                metric: &str,
                min_generation: i64,
            ) -> Result<Vec<$crate::store::RunId>, $crate::store::StoreError> {
                sqlx::query($crate::store::common::SERIES_FAILING_RUNS)
                    .bind(id.0)
                    .bind(metric)
                    .bind(min_generation)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a series' failing runs"))?
                    .iter()
                    .map(|row| Ok($crate::store::RunId(col(row, "run_id")?)))
                    .collect()
            }

            async fn series_verdict_trend(
                &self,
                id: $crate::store::SeriesId,
                metric: &str,
                reduction: &str,
                limit: i64,
            ) -> Result<Vec<$crate::store::TrendPoint>, $crate::store::StoreError> {
                use $crate::store::*;
                let mut points = sqlx::query($crate::store::common::SERIES_VERDICT_TREND)
                    .bind(id.0)
                    .bind(metric)
                    .bind(reduction)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(query_err("reading a gate's trend"))?
                    .iter()
                    .map(|row| {
                        Ok(TrendPoint {
                            run_id: RunId(col(row, "run_id")?),
                            commit_sha: parse_text("commits.sha", col(row, "sha")?, |s| CommitSha::parse(s).ok())?,
                            generation: col(row, "generation")?,
                            value: null_to_nan(col(row, "value")?),
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                points.reverse();
                Ok(points)
            }

            async fn regression(
                &self,
                id: $crate::store::SeriesId,
            ) -> Result<Option<$crate::store::Regression>, $crate::store::StoreError> {
                use $crate::store::*;
                let doing = "reading a regression";
                let latest = self.series_runs(id, 1).await?;
                let Some(latest) = latest.last() else { return Ok(None) };
                if latest.status != RunStatus::Errored && latest.failed_gates == 0 {
                    return Ok(None);
                }
                let good = sqlx::query($crate::store::common::LAST_GOOD)
                    .bind(id.0)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(query_err(doing))?;
                let (good_gen, good_run): (i64, i64) = match &good {
                    Some(row) => (col(row, "generation")?, col(row, "run_id")?),
                    None => (i64::MIN, i64::MIN),
                };
                let one = |sql: String, a: i64, b: i64, c: Option<i64>| async move {
                    let mut q = sqlx::query(&sql).bind(a).bind(b);
                    if let Some(c) = c {
                        q = q.bind(c);
                    }
                    q.fetch_optional(&self.pool)
                        .await
                        .map_err(query_err(doing))?
                        .map(|r| series_run_from(&r))
                        .transpose()
                };
                let last_good = match good {
                    Some(_) => one($crate::store::common::series_run_by_id(), id.0, good_run, None).await?,
                    None => None,
                };
                let Some(first_bad) = one($crate::store::common::first_after(), id.0, good_gen, Some(good_run)).await?
                else {
                    return Ok(None);
                };
                let ack = sqlx::query($crate::store::common::SELECT_ACK)
                    .bind(id.0)
                    .bind(first_bad.run_id.0)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(query_err(doing))?;
                let acknowledged = match ack {
                    Some(row) => Some(Acknowledgement {
                        by: col(&row, "acked_by")?,
                        note: col(&row, "note")?,
                        at: from_ms(col(&row, "acked_ms")?),
                    }),
                    None => None,
                };
                Ok(Some(Regression { series_id: id, last_good, first_bad, acknowledged }))
            }

            async fn ack_regression(
                &self,
                series: $crate::store::SeriesId,
                run: $crate::store::RunId,
                by: &str,
                note: Option<&str>,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::store::*;
                let doing = "acknowledging a regression";
                let mut tx = self.begin_write().await?;
                let n = sqlx::query($crate::store::common::INSERT_ACK)
                    .bind(series.0)
                    .bind(run.0)
                    .bind(by)
                    .bind(note)
                    .bind(to_ms(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_err(doing))?
                    .rows_affected();
                tx.commit().await.map_err(query_err(doing))?;
                Ok(n == 1)
            }

            async fn run_detail(
                &self,
                id: $crate::store::RunId,
            ) -> Result<Option<serde_json::Value>, $crate::store::StoreError> {
                let text: Option<String> = sqlx::query_scalar($crate::store::common::SELECT_RUN_DETAIL)
                    .bind(id.0)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a run's detail record"))?;
                text.map(|t| parse_json("run_details.detail", t)).transpose()
            }

            async fn put_run_detail(
                &self,
                id: $crate::store::RunId,
                detail: &serde_json::Value,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::*;
                let doing = "writing a run's detail record";
                let mut tx = self.begin_write().await?;
                sqlx::query($crate::store::common::UPSERT_RUN_DETAIL)
                    .bind(id.0)
                    .bind(to_json(detail))
                    .bind(to_ms(chrono::Utc::now()))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_err(doing))?;
                tx.commit().await.map_err(query_err(doing))?;
                Ok(())
            }

            async fn service_stats(&self) -> Result<$crate::store::ServiceStats, $crate::store::StoreError> {
                use $crate::store::*;
                let doing = "reading service statistics";
                let counts = |sql: &'static str| async move {
                    sqlx::query(sql)
                        .fetch_all(&self.pool)
                        .await
                        .map_err(query_err(doing))?
                        .iter()
                        .map(|row| Ok((col::<String>(row, "status")?, col::<i64>(row, "n")?)))
                        .collect::<Result<std::collections::BTreeMap<_, _>, StoreError>>()
                };
                let runs_by_status = counts($crate::store::common::RUNS_BY_STATUS).await?;
                let jobs_by_status = counts($crate::store::common::JOBS_BY_STATUS).await?;
                let oldest: Option<i64> = sqlx::query_scalar($crate::store::common::OLDEST_QUEUED_JOB)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(query_err(doing))?;
                let last_success = sqlx::query($crate::store::common::LAST_SUCCESS)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(query_err(doing))?
                    .iter()
                    .map(|row| Ok((series_from(row)?, opt_ms(col(row, "last_success_ms")?))))
                    .collect::<Result<Vec<_>, StoreError>>()?;
                Ok(ServiceStats { runs_by_status, jobs_by_status, oldest_queued_job: opt_ms(oldest), last_success })
            }

            async fn enqueue_job(
                &self,
                job: &$crate::store::NewJob,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::Enqueued, $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let out = enqueue_in(&mut tx, job, now).await?;
                tx.commit().await.map_err($crate::store::query_err("enqueueing a job"))?;
                Ok(out)
            }

            async fn accept_delivery(
                &self,
                delivery_id: &str,
                event: &str,
                jobs: &[$crate::store::NewJob],
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<Vec<$crate::store::Enqueued>>, $crate::store::StoreError> {
                let doing = "recording a webhook delivery";
                let mut tx = self.begin_write().await?;
                let new: Option<String> = sqlx::query_scalar($crate::store::common::INSERT_DELIVERY)
                    .bind(delivery_id)
                    .bind(event)
                    .bind($crate::store::to_ms(now))
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err($crate::store::query_err(doing))?;
                if new.is_none() {
                    return Ok(None);
                }
                let mut out = Vec::with_capacity(jobs.len());
                for job in jobs {
                    out.push(enqueue_in(&mut tx, job, now).await?);
                }
                tx.commit().await.map_err($crate::store::query_err(doing))?;
                Ok(Some(out))
            }

            async fn bind_run_to_attempt(
                &self,
                run: $crate::store::RunId,
                job: $crate::store::JobId,
                token: &str,
            ) -> Result<bool, $crate::store::StoreError> {
                let doing = "binding a run to a job attempt";
                let mut tx = self.begin_write().await?;
                let n = sqlx::query($crate::store::common::BIND_RUN_TO_ATTEMPT)
                    .bind(run.0)
                    .bind(job.0)
                    .bind(token)
                    .execute(&mut *tx)
                    .await
                    .map_err($crate::store::query_err(doing))?
                    .rows_affected();
                tx.commit().await.map_err($crate::store::query_err(doing))?;
                Ok(n == 1)
            }

            async fn measured_run(
                &self,
                engine: &str,
                sha: &$crate::store::CommitSha,
                suite: &str,
                device_key: &str,
            ) -> Result<Option<$crate::store::RunId>, $crate::store::StoreError> {
                let id: Option<i64> = sqlx::query_scalar($crate::store::common::MEASURED_RUN)
                    .bind(engine)
                    .bind(sha.as_str())
                    .bind(suite)
                    .bind(device_key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::query_err("looking for a finished measurement"))?;
                Ok(id.map($crate::store::RunId))
            }

            async fn job_runs(
                &self,
                job: $crate::store::JobId,
            ) -> Result<Vec<$crate::store::Run>, $crate::store::StoreError> {
                let sql = format!("{} WHERE r.job_id = $1 ORDER BY r.id", $crate::store::common::SELECT_RUN);
                sqlx::query(&sql)
                    .bind(job.0)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a job's runs"))?
                    .iter()
                    .map(run_from)
                    .collect()
            }

            async fn claim_job_for(
                &self,
                worker: &str,
                kinds: &[String],
                device_key: Option<&str>,
                lease: std::time::Duration,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<$crate::store::ClaimedJob>, $crate::store::StoreError> {
                use $crate::store::*;
                let doing = "claiming a job";
                let now = to_ms(now);
                let token = $crate::store::common::attempt_token(worker, now);
                let mut tx = self.begin_write().await?;
                let lock = format!("{}{}", $crate::store::common::SWEEP_LOCK_EXPIRED, <$store>::ROW_LOCK);
                for sql in [
                    lock.as_str(),
                    $crate::store::common::SWEEP_EXPIRED_RUNS,
                    $crate::store::common::SWEEP_EXPIRED_LEASES,
                ] {
                    sqlx::query(sql).bind(now).execute(&mut *tx).await.map_err(query_err(doing))?;
                }
                let mut sql = String::from($crate::store::common::CLAIM_JOB_HEAD);
                if !kinds.is_empty() {
                    // Placeholders continue after the head's $1..$4.
                    let list: Vec<String> = (0..kinds.len()).map(|i| format!("${}", 5 + i)).collect();
                    sql.push_str(&format!(" AND kind IN ({})", list.join(", ")));
                }
                if device_key.is_some() {
                    sql.push_str(&$crate::store::common::claim_device_filter(&format!("${}", 5 + kinds.len())));
                }
                sql.push_str($crate::store::common::CLAIM_JOB_TAIL);
                sql.push_str(<$store>::CLAIM_LOCK);
                sql.push_str($crate::store::common::CLAIM_JOB_RETURNING);
                let mut q = sqlx::query(&sql)
                    .bind(token.as_str())
                    .bind(worker)
                    .bind(now.saturating_add(lease_ms(lease)))
                    .bind(now);
                for k in kinds {
                    q = q.bind(k.as_str());
                }
                if let Some(d) = device_key {
                    q = q.bind(d);
                }
                let row = q.fetch_optional(&mut *tx).await.map_err(query_err(doing))?;
                let claimed = match row {
                    None => None,
                    Some(row) => Some(ClaimedJob {
                        id: JobId(col(&row, "id")?),
                        kind: col(&row, "kind")?,
                        payload: parse_json("jobs.payload", col(&row, "payload")?)?,
                        priority: col(&row, "priority")?,
                        attempt: col(&row, "attempts")?,
                        max_attempts: col(&row, "max_attempts")?,
                        token: col(&row, "attempt_token")?,
                        lease_expires_at: from_ms(col(&row, "lease_expires_ms")?),
                    }),
                };
                tx.commit().await.map_err(query_err(doing))?;
                Ok(claimed)
            }

            async fn heartbeat_job(
                &self,
                id: $crate::store::JobId,
                token: &str,
                lease: std::time::Duration,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::store::*;
                let now = to_ms(now);
                let n = sqlx::query($crate::store::common::HEARTBEAT_JOB)
                    .bind(now)
                    .bind(now.saturating_add(lease_ms(lease)))
                    .bind(id.0)
                    .bind(token)
                    .execute(&self.pool)
                    .await
                    .map_err(query_err("heart-beating a job"))?
                    .rows_affected();
                Ok(n == 1)
            }

            async fn complete_job(
                &self,
                id: $crate::store::JobId,
                token: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::store::*;
                let n = sqlx::query($crate::store::common::COMPLETE_JOB)
                    .bind(to_ms(now))
                    .bind(id.0)
                    .bind(token)
                    .execute(&self.pool)
                    .await
                    .map_err(query_err("completing a job"))?
                    .rows_affected();
                Ok(n == 1)
            }

            async fn fail_job(
                &self,
                id: $crate::store::JobId,
                token: &str,
                error: &str,
                retry_at: chrono::DateTime<chrono::Utc>,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::store::*;
                let n = sqlx::query($crate::store::common::FAIL_JOB)
                    .bind(error)
                    .bind(to_ms(retry_at))
                    .bind(to_ms(now))
                    .bind(id.0)
                    .bind(token)
                    .execute(&self.pool)
                    .await
                    .map_err(query_err("failing a job"))?
                    .rows_affected();
                Ok(n == 1)
            }

            async fn job(
                &self,
                id: $crate::store::JobId,
            ) -> Result<Option<$crate::store::Job>, $crate::store::StoreError> {
                sqlx::query($crate::store::common::SELECT_JOB)
                    .bind(id.0)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::store::query_err("reading a job"))?
                    .map(|r| job_from(&r))
                    .transpose()
            }
        }
    };
}

pub(crate) use impl_store;

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every file in migrations/<backend>/ is embedded, in order, and the two backends have
    /// the same migrations.
    #[test]
    fn every_migration_file_is_embedded() {
        for (dir, embedded) in [
            ("migrations/sqlite", super::super::sqlite::MIGRATIONS),
            ("migrations/postgres", super::super::postgres::MIGRATIONS),
        ] {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let mut files: Vec<String> = std::fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".sql"))
                .collect();
            files.sort();
            assert_eq!(files.len(), embedded.len(), "{dir}: files {files:?}");
            for (file, (version, description, sql)) in files.iter().zip(embedded) {
                assert_eq!(file, &format!("{version:04}_{description}.sql"));
                assert_eq!(&std::fs::read_to_string(root.join(file)).unwrap(), sql);
            }
        }
    }
}
