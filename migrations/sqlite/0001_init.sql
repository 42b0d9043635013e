-- paritybench schema, SQLite dialect. Keep in step with migrations/postgres/0001_init.sql:
-- the same tables, columns and indexes; only the types differ (INTEGER / REAL here,
-- BIGINT / DOUBLE PRECISION / BOOLEAN there). The queries in src/store are shared.
--
-- Conventions: timestamps are milliseconds since the Unix epoch (UTC) in *_ms columns;
-- JSON is stored as text; a NULL in a measured value stands for NaN (SQLite turns NaN into
-- NULL, so both backends store it that way).

CREATE TABLE engines (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    repo_url    TEXT,
    created_ms  INTEGER NOT NULL
);

-- One row per commit of an engine that was measured; `generation` is the git generation
-- number (1 + the largest generation of its parents), which orders trends.
CREATE TABLE commits (
    id            INTEGER PRIMARY KEY,
    engine_id     INTEGER NOT NULL REFERENCES engines(id),
    sha           TEXT    NOT NULL,
    generation    INTEGER NOT NULL,
    committed_ms  INTEGER,
    title         TEXT,
    UNIQUE (engine_id, sha)
);
CREATE INDEX commits_by_generation ON commits (engine_id, generation);

-- The durable job queue (runner serve / runner work). A job is claimed by setting a lease
-- and a fresh attempt token; a worker that stops heart-beating loses its lease and the job
-- is claimable again (or dead after max_attempts).
CREATE TABLE jobs (
    id                INTEGER PRIMARY KEY,
    kind              TEXT    NOT NULL,
    payload           TEXT    NOT NULL,
    priority          INTEGER NOT NULL DEFAULT 0,
    status            TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'done', 'dead')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL,
    run_after_ms      INTEGER NOT NULL,
    lease_expires_ms  INTEGER,
    heartbeat_ms      INTEGER,
    attempt_token     TEXT,
    worker            TEXT,
    last_error        TEXT,
    dedupe_key        TEXT UNIQUE,
    created_ms        INTEGER NOT NULL,
    finished_ms       INTEGER
);
CREATE INDEX jobs_claimable ON jobs (priority DESC, run_after_ms, id) WHERE status = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_ms) WHERE status = 'running';

-- A run of one engine at one commit on one device. Created (running, or queued) before the
-- engine starts, so a crash leaves a record; finished with everything it measured in one
-- transaction.
CREATE TABLE runs (
    id             INTEGER PRIMARY KEY,
    engine_id      INTEGER NOT NULL REFERENCES engines(id),
    commit_id      INTEGER NOT NULL REFERENCES commits(id),
    status         TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'passed', 'failed', 'errored')),
    triggered_by   TEXT    NOT NULL,
    suite          TEXT    NOT NULL,
    device_kind    TEXT    NOT NULL,
    device_name    TEXT    NOT NULL,
    device_driver  TEXT,
    device_cuda    TEXT,
    device_key     TEXT    NOT NULL,
    host           TEXT,
    fixture_ids    TEXT    NOT NULL,
    contracts      TEXT    NOT NULL,
    timings        TEXT    NOT NULL,
    log_path       TEXT,
    error          TEXT,
    job_id         INTEGER REFERENCES jobs(id),
    created_ms     INTEGER NOT NULL,
    started_ms     INTEGER,
    finished_ms    INTEGER
);
CREATE INDEX runs_recent ON runs (engine_id, id);
CREATE INDEX runs_by_commit ON runs (commit_id);
CREATE INDEX runs_unfinished ON runs (status, id) WHERE status IN ('queued', 'running');

-- A comparable series: engine × model sha256 × reference × device × fixture × contracts.
-- A new device, fixture or contract version starts a new series.
CREATE TABLE series (
    id             INTEGER PRIMARY KEY,
    engine_id      INTEGER NOT NULL REFERENCES engines(id),
    model          TEXT    NOT NULL,
    model_sha256   TEXT    NOT NULL,
    reference      TEXT    NOT NULL,
    device_key     TEXT    NOT NULL,
    fixture_id     TEXT    NOT NULL,
    contract_key   TEXT    NOT NULL,
    created_ms     INTEGER NOT NULL,
    UNIQUE (engine_id, model_sha256, reference, device_key, fixture_id, contract_key)
);

-- Which series a finished run contributed a point to; `generation` copies the run's commit
-- generation so that "latest run per series" and trends are one index range each.
CREATE TABLE run_series (
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    series_id   INTEGER NOT NULL REFERENCES series(id),
    generation  INTEGER NOT NULL,
    PRIMARY KEY (run_id, series_id)
);
CREATE INDEX run_series_by_generation ON run_series (series_id, generation, run_id);

-- One number a run measured: a metric's statistic for a model against a reference, pooled
-- over every prompt (prompt NULL) or for one prompt.
CREATE TABLE measurements (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    series_id   INTEGER REFERENCES series(id),
    model       TEXT    NOT NULL,
    reference   TEXT    NOT NULL,
    prompt      TEXT,
    metric      TEXT    NOT NULL,
    statistic   TEXT    NOT NULL,
    value       REAL
);
CREATE INDEX measurements_by_run ON measurements (run_id, series_id, metric, statistic);

-- Relative L2 error and cosine of one capture point at one layer.
CREATE TABLE layer_parity (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    series_id   INTEGER REFERENCES series(id),
    model       TEXT    NOT NULL,
    reference   TEXT    NOT NULL,
    prompt      TEXT,
    capture     TEXT    NOT NULL,
    layer       INTEGER NOT NULL,
    rel_l2      REAL,
    cosine      REAL
);
CREATE INDEX layer_parity_by_run ON layer_parity (run_id, model, reference);

-- One contract gate judged on one subject of a run, with the contract's identity.
CREATE TABLE verdicts (
    id                INTEGER PRIMARY KEY,
    run_id            INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    series_id         INTEGER REFERENCES series(id),
    contract_id       TEXT    NOT NULL,
    contract_version  TEXT    NOT NULL,
    contract_sha256   TEXT    NOT NULL,
    gate_id           TEXT    NOT NULL,
    metric            TEXT    NOT NULL,
    reduction         TEXT    NOT NULL,
    comparison        TEXT    NOT NULL CHECK (comparison IN ('>', '>=', '<', '<=', '==')),
    threshold         REAL,
    floor             REAL,
    observed          REAL,
    n_samples         INTEGER NOT NULL,
    outcome           TEXT    NOT NULL CHECK (outcome IN ('passed', 'failed', 'missing')),
    passed            INTEGER NOT NULL,
    severity          TEXT    NOT NULL CHECK (severity IN ('error', 'warning')),
    model             TEXT    NOT NULL,
    reference         TEXT    NOT NULL,
    prompt            TEXT,
    dtype             TEXT,
    mode              TEXT,
    detail            TEXT
);
CREATE INDEX verdicts_by_run ON verdicts (run_id, series_id);
CREATE INDEX verdicts_by_series ON verdicts (series_id, gate_id);
