//! Commit statuses posted back to GitHub: `pending` when a queued run starts, then
//! `success` / `failure` / `error` with a link to the run page, so a merged pull request
//! shows how its merge commit measured.
//!
//! `POST {api}/repos/{owner}/{repo}/statuses/{sha}` with `{state, target_url, description,
//! context}` as GitHub documents it (REST API "Create a commit status": `state` one of
//! error, failure, pending, success; `description` at most 140 characters; `context` names
//! the check). Posting never blocks a run: [`StatusPoster::spawn`] hands the request to a
//! task that retries server errors, rate limits and network failures with backoff and
//! gives up with a log line; a refused request (401, 404, 422) is not retried.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::StatusTarget;
use crate::config::{GithubConfig, Secret};
use crate::store::RunId;

/// GitHub's limit on a status description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 140;

/// A commit status state, as GitHub spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitState {
    Pending,
    Success,
    Failure,
    Error,
}

/// The body of "Create a commit status".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommitStatus {
    pub state: CommitState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_url: Option<String>,
    pub description: String,
    pub context: String,
}

/// Why a status could not be posted.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("POST {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("POST {url}: GitHub answered {status}: {body}")]
    Refused { url: String, status: u16, body: String },
    #[error("repository `{repo}` is not `owner/name`")]
    BadRepo { repo: String },
}

impl StatusError {
    /// Server errors, rate limits and network failures may pass on a later try.
    fn retryable(&self) -> bool {
        match self {
            StatusError::Http { .. } => true,
            StatusError::Refused { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            StatusError::BadRepo { .. } => false,
        }
    }
}

/// Posts commit statuses with a token; built only when a token is configured.
#[derive(Debug)]
pub struct StatusPoster {
    client: reqwest::Client,
    api_url: String,
    token: Secret,
    run_url: Option<String>,
    context: String,
    /// Tries per status, the first included.
    pub tries: u32,
    /// The wait after the first failed try; doubled after each next one.
    pub backoff: Duration,
}

impl StatusPoster {
    /// A poster for `[github]`, or `None` when no token is configured.
    pub fn from_config(github: &GithubConfig) -> Option<StatusPoster> {
        let token = github.token.clone()?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("paritybench/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(20))
            .build()
            .ok()?;
        Some(StatusPoster {
            client,
            api_url: github.api_url.trim_end_matches('/').to_string(),
            token,
            run_url: github.run_url.clone(),
            context: github.context.clone(),
            tries: 4,
            backoff: Duration::from_secs(2),
        })
    }

    /// The status of `engine` for a run: its link (when `github.run_url` is set), a
    /// description cut to GitHub's 140 characters and the context `<context>/<engine>`.
    pub fn status(&self, engine: &str, state: CommitState, run: Option<RunId>, description: &str) -> CommitStatus {
        CommitStatus {
            state,
            target_url: match (&self.run_url, run) {
                (Some(t), Some(r)) => Some(t.replace("{run}", &r.to_string())),
                _ => None,
            },
            description: truncate(description, MAX_DESCRIPTION_CHARS),
            context: format!("{}/{engine}", self.context),
        }
    }

    /// Posts `status` for `target`, retrying what may pass later; the tries it took.
    pub async fn post(&self, target: &StatusTarget, status: &CommitStatus) -> Result<u32, StatusError> {
        let mut wait = self.backoff;
        let mut try_no = 1;
        loop {
            match self.post_once(target, status).await {
                Ok(()) => return Ok(try_no),
                Err(e) if e.retryable() && try_no < self.tries => {
                    tracing::warn!(error = %e, try_no, wait_ms = wait.as_millis() as u64, "commit status: retrying");
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                    try_no += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn post_once(&self, target: &StatusTarget, status: &CommitStatus) -> Result<(), StatusError> {
        let (owner, name) = target
            .repo
            .split_once('/')
            .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| StatusError::BadRepo { repo: target.repo.clone() })?;
        let url = format!("{}/repos/{owner}/{name}/statuses/{}", self.api_url, target.sha);
        let response = self
            .client
            .post(&url)
            .bearer_auth(self.token.expose())
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28")
            .json(status)
            .send()
            .await
            .map_err(|source| StatusError::Http { url: url.clone(), source })?;
        let code = response.status();
        if code.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        Err(StatusError::Refused { url, status: code.as_u16(), body: truncate(&body, 300) })
    }

    /// [`StatusPoster::post`], its outcome logged: what a background task runs.
    pub async fn post_logged(&self, target: &StatusTarget, status: &CommitStatus) {
        match self.post(target, status).await {
            Ok(tries) => {
                tracing::info!(repo = %target.repo, sha = %target.sha, state = ?status.state, tries, "commit status posted")
            }
            Err(e) => tracing::error!(repo = %target.repo, sha = %target.sha, error = %e, "commit status not posted"),
        }
    }

    /// Posts in the background: the caller (a run) never waits for GitHub.
    pub fn spawn(self: &Arc<Self>, target: StatusTarget, status: CommitStatus) -> tokio::task::JoinHandle<()> {
        let poster = Arc::clone(self);
        tokio::spawn(async move { poster.post_logged(&target, &status).await })
    }
}

/// At most `max` characters, ending in `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_fit_githubs_limit() {
        let long = "é".repeat(300);
        let t = truncate(&long, MAX_DESCRIPTION_CHARS);
        assert_eq!(t.chars().count(), 140);
        assert!(t.ends_with('…'));
        assert_eq!(truncate("short", 140), "short");
    }

    #[test]
    fn states_serialize_as_github_spells_them() {
        let s = CommitStatus {
            state: CommitState::Failure,
            target_url: None,
            description: "d".into(),
            context: "paritybench/apr".into(),
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v, serde_json::json!({"state": "failure", "description": "d", "context": "paritybench/apr"}));
    }
}
