-- The dashboard of `runner serve` (same text on both backends but for integer types).
--
-- One detail record per run: what the run page shows beyond the summary rows (argmax
-- mismatches decoded to text, greedy continuations side by side, log tails), as JSON,
-- written once when it is first computed from the run's dumps.
CREATE TABLE run_details (
    run_id      BIGINT NOT NULL PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    detail      TEXT    NOT NULL,
    created_ms  BIGINT NOT NULL
);

-- A regression a person has acknowledged: the series and its first failing run. An
-- acknowledged regression moves below the open ones on the overview.
CREATE TABLE regression_acks (
    series_id   BIGINT NOT NULL REFERENCES series(id),
    run_id      BIGINT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    acked_by    TEXT    NOT NULL,
    note        TEXT,
    acked_ms    BIGINT NOT NULL,
    PRIMARY KEY (series_id, run_id)
);

-- /metrics counts runs by status; trends mark the runs that failed a gate on one metric.
CREATE INDEX runs_by_status ON runs (status, finished_ms);
CREATE INDEX verdicts_by_series_metric ON verdicts (series_id, metric, run_id) WHERE outcome <> 'passed';
