//! The job queue's work: what a job is, who queues it and who runs it.
//!
//! The queue itself (jobs with a kind, a JSON payload, a priority, attempts, a lease with
//! heartbeats and an attempt token) lives in the database behind [`Store`]; this module is
//! what feeds and drains it:
//!
//! - [`webhook`] — `POST /webhooks/github`: verified, de-duplicated deliveries that queue runs
//! - [`nightly`] — `runner nightly`: the configured branch heads, queued or run here
//! - [`worker`] — the loop of `runner work` and of the worker embedded in `runner serve`
//! - [`status`] — commit statuses posted back to GitHub, off the run's path
//!
//! One job kind exists today, [`RUN_JOB`]: measure one engine at one commit on one suite
//! ([`RunJob`]). Jobs run at least once, so running one is idempotent: a worker first looks
//! for a finished measurement of the same (engine, commit, suite, device) and does not
//! measure it twice unless the job is forced.

pub mod nightly;
pub mod status;
pub mod webhook;
pub mod worker;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::{CommitSha, Enqueued, NewJob, Store, StoreError, Trigger};

/// The kind of a job that measures one engine at one commit.
pub const RUN_JOB: &str = "run";

/// Where a commit status goes: the repository and commit on GitHub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusTarget {
    /// `owner/name`.
    pub repo: String,
    pub sha: CommitSha,
}

/// The payload of a [`RUN_JOB`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunJob {
    pub engine: String,
    /// A full sha: queued revisions are resolved before they are queued.
    pub commit: CommitSha,
    pub suite: String,
    pub trigger: Trigger,
    /// Measure even when this (engine, commit, suite, device) was measured before.
    #[serde(default)]
    pub force: bool,
    /// Where the result is reported, when it came from GitHub.
    #[serde(default)]
    pub status: Option<StatusTarget>,
    /// What asked for it, for people (`pull_request #12 merged in owner/repo`).
    #[serde(default)]
    pub reason: Option<String>,
}

/// How to queue a run.
#[derive(Debug, Clone, Copy)]
pub struct QueueOptions<'a> {
    pub priority: i64,
    pub max_attempts: i64,
    /// The device it must run on (`cuda`, `cpu`, or a full fingerprint key).
    pub device: Option<&'a str>,
}

impl RunJob {
    /// The key that keeps the same measurement from being queued twice: (engine, commit,
    /// suite, device requirement). A forced job has none.
    pub fn dedupe_key(&self, device: Option<&str>) -> Option<String> {
        (!self.force).then(|| format!("run/{}/{}/{}/{}", self.engine, self.commit, self.suite, device.unwrap_or("any")))
    }

    /// The job row for this payload.
    pub fn to_new_job(&self, opts: QueueOptions<'_>, now: DateTime<Utc>) -> NewJob {
        NewJob {
            kind: RUN_JOB.to_string(),
            payload: serde_json::to_value(self).expect("plain data serializes to JSON"),
            priority: opts.priority,
            max_attempts: opts.max_attempts.max(1),
            run_after: now,
            dedupe_key: self.dedupe_key(opts.device),
            device_key: opts.device.map(str::to_string),
        }
    }
}

/// Queues `job`; [`Enqueued::Duplicate`] when the same measurement is queued already.
pub async fn enqueue_run(store: &dyn Store, job: &RunJob, opts: QueueOptions<'_>) -> Result<Enqueued, StoreError> {
    let now = Utc::now();
    store.enqueue_job(&job.to_new_job(opts, now), now).await
}

/// The wait before retry number `attempt` (1 after the first failure): `base` doubled per
/// attempt, capped at `cap`.
pub fn backoff(attempt: i64, base: Duration, cap: Duration) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    base.saturating_mul(1u32 << doublings).min(cap)
}

/// This machine's device fingerprint key: the configured one, else the first GPU that
/// `nvidia-smi` reports (`cuda|<name>|driver=<version>`), else `cpu|<CPU model>` as
/// `runner once` records it.
pub fn detect_device(configured: Option<&str>) -> String {
    if let Some(d) = configured {
        return d.to_string();
    }
    let smi = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok());
    if let Some(line) = smi.as_deref().and_then(|s| s.lines().next())
        && let Some((name, driver)) = line.split_once(',')
    {
        return format!("cuda|{}|driver={}", name.trim(), driver.trim());
    }
    crate::once::device_key("cpu")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(force: bool) -> RunJob {
        RunJob {
            engine: "apr".into(),
            commit: CommitSha::parse(&"ab".repeat(20)).unwrap(),
            suite: "default".into(),
            trigger: Trigger::Webhook,
            force,
            status: None,
            reason: None,
        }
    }

    #[test]
    fn the_same_measurement_has_one_key_unless_forced() {
        let key = job(false).dedupe_key(Some("cuda")).unwrap();
        assert_eq!(key, format!("run/apr/{}/default/cuda", "ab".repeat(20)));
        assert_ne!(job(false).dedupe_key(None), Some(key));
        assert_eq!(job(true).dedupe_key(Some("cuda")), None);
    }

    #[test]
    fn payload_round_trips() {
        let j = job(false);
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["trigger"], "webhook");
        assert_eq!(serde_json::from_value::<RunJob>(v).unwrap(), j);
        let bad = serde_json::json!({"engine": "apr", "commit": "HEAD", "suite": "s", "trigger": "webhook"});
        assert!(serde_json::from_value::<RunJob>(bad).unwrap_err().to_string().contains("40 or 64 hex digits"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs;
        let got: Vec<u64> = (1..=6).map(|a| backoff(a, s(10), s(100)).as_secs()).collect();
        assert_eq!(got, [10, 20, 40, 80, 100, 100]);
        assert_eq!(backoff(i64::MAX, s(10), s(100)), s(100));
        assert_eq!(backoff(0, s(10), s(100)), s(10));
    }
}
