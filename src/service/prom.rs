//! `/metrics` in the Prometheus text format: runs by status, queue depth and age, and the
//! age of the last successful run of every series.

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use chrono::Utc;

use super::{ApiError, AppState, auth};
use crate::store::{JobStatus, RunStatus, ServiceStats};

/// A label value escaped as the text format asks (`\`, `"`, newline).
fn label(s: &str) -> String {
    s.replace('\\', r"\\").replace('"', r#"\""#).replace('\n', r"\n")
}

pub fn render(stats: &ServiceStats, now: chrono::DateTime<Utc>) -> String {
    let mut out = String::new();
    out.push_str("# HELP paritybench_runs Runs in the database by status.\n# TYPE paritybench_runs gauge\n");
    for s in RunStatus::ALL {
        let n = stats.runs_by_status.get(s.as_str()).copied().unwrap_or(0);
        let _ = writeln!(out, "paritybench_runs{{status=\"{s}\"}} {n}");
    }
    out.push_str("# HELP paritybench_jobs Jobs in the queue by status.\n# TYPE paritybench_jobs gauge\n");
    for s in JobStatus::ALL {
        let n = stats.jobs_by_status.get(s.as_str()).copied().unwrap_or(0);
        let _ = writeln!(out, "paritybench_jobs{{status=\"{s}\"}} {n}");
    }
    let depth = stats.jobs_by_status.get("queued").copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP paritybench_queue_depth Jobs waiting to be claimed.\n# TYPE paritybench_queue_depth gauge\nparitybench_queue_depth {depth}"
    );
    let age = stats.oldest_queued_job.map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);
    let _ = writeln!(
        out,
        "# HELP paritybench_queue_oldest_age_seconds Age of the oldest queued job (0 when none).\n# TYPE paritybench_queue_oldest_age_seconds gauge\nparitybench_queue_oldest_age_seconds {age}"
    );
    out.push_str(
        "# HELP paritybench_series_last_success_age_seconds Time since the newest passed run of a series (+Inf: never).\n# TYPE paritybench_series_last_success_age_seconds gauge\n",
    );
    for (s, t) in &stats.last_success {
        let v = match t {
            Some(t) => format!("{}", (now - *t).num_milliseconds().max(0) as f64 / 1000.0),
            None => "+Inf".to_string(),
        };
        let _ = writeln!(
            out,
            "paritybench_series_last_success_age_seconds{{series=\"{}\",engine=\"{}\",model=\"{}\",reference=\"{}\",device=\"{}\"}} {v}",
            s.id,
            label(&s.engine),
            label(&s.model),
            label(&s.reference),
            label(&s.device_key)
        );
    }
    out
}

pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Result<impl IntoResponse, ApiError> {
    auth::require_read(&state.serve, &headers)?;
    let stats = state.store.service_stats().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render(&stats, Utc::now())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
    }
}
