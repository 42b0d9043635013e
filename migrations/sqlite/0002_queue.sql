-- The job queue's second step (sqlite dialect; keep in step with the other backend's 0002):
-- device matching, attempt-bound runs and GitHub delivery de-duplication.

-- The device a job must run on: NULL runs anywhere; a device kind (`cuda`, `cpu`) runs on
-- any device of that kind; a full fingerprint key runs on that device only.
ALTER TABLE jobs ADD COLUMN device_key TEXT;

-- The attempt a run belongs to: a run created by a job attempt carries the attempt token of
-- its claim, and finishing it is refused once that attempt no longer holds the job's lease.
ALTER TABLE runs ADD COLUMN attempt_token TEXT;
CREATE INDEX runs_by_job ON runs (job_id) WHERE job_id IS NOT NULL;

-- Every GitHub webhook delivery seen (X-GitHub-Delivery): a redelivery is answered, never
-- acted on twice.
CREATE TABLE webhook_deliveries (
    delivery_id  TEXT    PRIMARY KEY,
    event        TEXT    NOT NULL,
    received_ms  INTEGER NOT NULL
);
