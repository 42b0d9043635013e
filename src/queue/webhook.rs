//! `POST /webhooks/github`: GitHub tells paritybench that a pull request merged (or that a
//! default branch moved), and a run of that commit is queued for each configured engine.
//!
//! Every delivery is checked before anything is read from it: the body must fit under the
//! configured size (413), and `X-Hub-Signature-256` must be `sha256=` followed by the
//! HMAC-SHA256 of the raw body under the configured secret, compared in constant time (401
//! when missing, malformed, truncated or wrong). Then the event decides:
//!
//! - `ping` — answered, nothing queued;
//! - `pull_request` with `action: closed` and `merged: true` — a run of `merge_commit_sha`;
//! - `push` to the repository's default branch, when `github.queue_pushes` is set — a run of
//!   the pushed head;
//! - anything else — a polite 202 saying it was ignored.
//!
//! Deliveries are de-duplicated by `X-GitHub-Delivery` in the same transaction that queues
//! their jobs, so a redelivery (GitHub's "Redeliver" button, a retry after a timeout) queues
//! nothing; and the jobs carry the (engine, commit, suite, device) dedupe key, so a merge seen
//! both as `pull_request` and as `push` is measured once.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;

use super::{QueueOptions, RunJob, StatusTarget};
use crate::config::GithubConfig;
use crate::store::{CommitSha, Enqueued, Store, StoreError, Trigger};

/// What the webhook needs: where to queue, and the `[github]` settings.
#[derive(Debug, Clone)]
pub struct WebhookState {
    pub store: Arc<dyn Store>,
    pub github: GithubConfig,
    /// The suite the queued runs measure.
    pub suite: String,
    /// Attempts of each queued job.
    pub max_attempts: i64,
}

/// The webhook's routes, ready to be merged into the service's router.
pub fn router(state: WebhookState) -> Router {
    let limit = state.github.max_body_bytes;
    Router::new()
        .route("/webhooks/github", post(deliver))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Arc::new(state))
}

/// Why a delivery was refused; each maps to one HTTP status once, in [`IntoResponse`].
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "the webhook secret is not configured (github.secret or PARITYBENCH_GITHUB_SECRET): no delivery can be verified"
    )]
    NoSecret,
    #[error("missing X-Hub-Signature-256 header")]
    MissingSignature,
    #[error("malformed X-Hub-Signature-256 `{shown}`: expected `sha256=` and 64 hex digits")]
    MalformedSignature { shown: String },
    #[error("X-Hub-Signature-256 does not match the body")]
    WrongSignature,
    #[error("body of {got} bytes is over the limit of {limit} bytes")]
    TooLarge { got: u64, limit: usize },
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("content type `{0}` is not accepted: set the webhook's content type to application/json")]
    ContentType(String),
    #[error("{event} payload: {message}")]
    Payload { event: String, message: String },
    #[error("queueing the run")]
    Store(#[from] StoreError),
}

impl WebhookError {
    fn status(&self) -> StatusCode {
        match self {
            WebhookError::NoSecret
            | WebhookError::MissingSignature
            | WebhookError::MalformedSignature { .. }
            | WebhookError::WrongSignature => StatusCode::UNAUTHORIZED,
            WebhookError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookError::MissingHeader(_) | WebhookError::Payload { .. } => StatusCode::BAD_REQUEST,
            WebhookError::ContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            WebhookError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            // The cause chain of a database error stays in the log.
            WebhookError::Store(e) => {
                tracing::error!(error = %e, "webhook: could not queue the run");
                "could not queue the run; see the server log".to_string()
            }
            e => {
                tracing::warn!(status = status.as_u16(), error = %e, "webhook delivery refused");
                e.to_string()
            }
        };
        (status, axum::Json(json!({ "error": message }))).into_response()
    }
}

/// Checks `X-Hub-Signature-256` against the HMAC-SHA256 of `body` in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::MissingSignature)?;
    // What may be shown of a bad header: its shape, never a full valid-looking digest.
    let shown = || header.chars().take(16).collect::<String>() + if header.len() > 16 { "…" } else { "" };
    let hex_digest =
        header.strip_prefix("sha256=").ok_or_else(|| WebhookError::MalformedSignature { shown: shown() })?;
    if hex_digest.len() != 64 {
        return Err(WebhookError::MalformedSignature { shown: shown() });
    }
    let digest = hex::decode(hex_digest).map_err(|_| WebhookError::MalformedSignature { shown: shown() })?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.verify_slice(&digest).map_err(|_| WebhookError::WrongSignature)
}

/// `sha256=<hex>` for `body` under `secret`: what GitHub sends (and what tests sign with).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &'static str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn deliver(State(state): State<Arc<WebhookState>>, headers: HeaderMap, body: Bytes) -> Response {
    match handle(&state, &headers, &body).await {
        Ok((status, value)) => (status, axum::Json(value)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn handle(
    state: &WebhookState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, serde_json::Value), WebhookError> {
    // 1. size and signature, before anything is read from the body
    if body.len() > state.github.max_body_bytes {
        return Err(WebhookError::TooLarge { got: body.len() as u64, limit: state.github.max_body_bytes });
    }
    let secret = state.github.secret.as_ref().ok_or(WebhookError::NoSecret)?;
    verify_signature(secret.expose().as_bytes(), body, header_str(headers, "x-hub-signature-256"))?;

    // 2. what it is
    let event = header_str(headers, "x-github-event").ok_or(WebhookError::MissingHeader("X-GitHub-Event"))?;
    let delivery = header_str(headers, "x-github-delivery").ok_or(WebhookError::MissingHeader("X-GitHub-Delivery"))?;
    if let Some(ct) = header_str(headers, "content-type")
        && !ct.starts_with("application/json")
    {
        return Err(WebhookError::ContentType(ct.to_string()));
    }
    let wanted = match event {
        "ping" => return Ok((StatusCode::OK, json!({ "pong": true, "delivery": delivery }))),
        "pull_request" => merged_pull_request(body)?,
        "push" => pushed_default_branch(body, state.github.queue_pushes)?,
        other => {
            return Ok((StatusCode::ACCEPTED, json!({ "ignored": format!("event `{other}` is not handled") })));
        }
    };
    let wanted = match wanted {
        Ok(w) => w,
        Err(why) => return Ok((StatusCode::ACCEPTED, json!({ "ignored": why }))),
    };
    let Some(engines) = state.github.repos.get(&wanted.repo) else {
        let why = format!("repository `{}` is not configured (github.repos)", wanted.repo);
        return Ok((StatusCode::ACCEPTED, json!({ "ignored": why })));
    };

    // 3. queue, de-duplicated by delivery id in the same transaction
    let now = chrono::Utc::now();
    let jobs: Vec<RunJob> = engines
        .iter()
        .map(|engine| RunJob {
            engine: engine.clone(),
            commit: wanted.sha.clone(),
            suite: state.suite.clone(),
            trigger: Trigger::Webhook,
            force: false,
            status: Some(StatusTarget { repo: wanted.repo.clone(), sha: wanted.sha.clone() }),
            reason: Some(wanted.reason.clone()),
        })
        .collect();
    let opts = QueueOptions { priority: state.github.priority, max_attempts: state.max_attempts, device: None };
    let rows: Vec<_> = jobs.iter().map(|j| j.to_new_job(opts, now)).collect();
    match state.store.accept_delivery(delivery, event, &rows, now).await? {
        None => {
            tracing::info!(delivery, event, "webhook: delivery seen before; nothing queued");
            Ok((StatusCode::OK, json!({ "duplicate_delivery": delivery })))
        }
        Some(done) => {
            let queued: Vec<_> = jobs
                .iter()
                .zip(&done)
                .map(|(j, e)| {
                    let (id, duplicate) = match e {
                        Enqueued::New(id) => (id, false),
                        Enqueued::Duplicate(id) => (id, true),
                    };
                    json!({ "engine": j.engine, "commit": j.commit, "job": id, "already_queued": duplicate })
                })
                .collect();
            tracing::info!(delivery, event, commit = %wanted.sha, jobs = queued.len(), "webhook: runs queued");
            Ok((StatusCode::ACCEPTED, json!({ "queued": queued, "reason": wanted.reason })))
        }
    }
}

/// A commit a delivery asks to measure.
struct Wanted {
    repo: String,
    sha: CommitSha,
    reason: String,
}

fn payload_err(event: &str, message: impl Into<String>) -> WebhookError {
    WebhookError::Payload { event: event.to_string(), message: message.into() }
}

fn parse<T: serde::de::DeserializeOwned>(event: &str, body: &[u8]) -> Result<T, WebhookError> {
    serde_json::from_slice(body).map_err(|e| payload_err(event, e.to_string()))
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
    #[serde(default)]
    default_branch: Option<String>,
}

#[derive(Deserialize)]
struct PullRequestEvent {
    action: String,
    number: u64,
    pull_request: PullRequest,
    repository: Repository,
}

#[derive(Deserialize)]
struct PullRequest {
    #[serde(default)]
    merged: bool,
    merge_commit_sha: Option<String>,
}

/// `Ok(Ok(wanted))` for a merged pull request, `Ok(Err(why))` for one to ignore.
fn merged_pull_request(body: &[u8]) -> Result<Result<Wanted, String>, WebhookError> {
    let e: PullRequestEvent = parse("pull_request", body)?;
    if e.action != "closed" || !e.pull_request.merged {
        let state = if e.action == "closed" { "closed without merging" } else { e.action.as_str() };
        return Ok(Err(format!("pull request #{} {state}: nothing to measure", e.number)));
    }
    let sha = e
        .pull_request
        .merge_commit_sha
        .ok_or_else(|| payload_err("pull_request", "a merged pull request without merge_commit_sha"))?;
    let sha = CommitSha::parse(&sha).map_err(|err| payload_err("pull_request", err.to_string()))?;
    let reason = format!("pull request #{} merged in {}", e.number, e.repository.full_name);
    Ok(Ok(Wanted { repo: e.repository.full_name, sha, reason }))
}

#[derive(Deserialize)]
struct PushEvent {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: Repository,
}

fn pushed_default_branch(body: &[u8], queue_pushes: bool) -> Result<Result<Wanted, String>, WebhookError> {
    let e: PushEvent = parse("push", body)?;
    if !queue_pushes {
        return Ok(Err("pushes are not queued (github.queue_pushes is off)".to_string()));
    }
    let default = e.repository.default_branch.as_deref().unwrap_or("main");
    let branch = e.git_ref.strip_prefix("refs/heads/").unwrap_or(&e.git_ref);
    if branch != default || e.deleted {
        return Ok(Err(format!("push to `{}` is not a new head of the default branch `{default}`", e.git_ref)));
    }
    let sha = CommitSha::parse(&e.after).map_err(|err| payload_err("push", err.to_string()))?;
    let reason = format!("push to {default} of {}", e.repository.full_name);
    Ok(Ok(Wanted { repo: e.repository.full_name, sha, reason }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked() {
        let (secret, body) = (b"It's a Secret to Everybody".as_slice(), b"Hello, World!".as_slice());
        // GitHub's documented example (docs: "Validating webhook deliveries").
        let want = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(secret, body), want);
        assert!(verify_signature(secret, body, Some(want)).is_ok());
        let wrong = want.replace("757107", "757108");
        assert!(matches!(verify_signature(secret, body, Some(&wrong)), Err(WebhookError::WrongSignature)));
        assert!(matches!(verify_signature(secret, body, None), Err(WebhookError::MissingSignature)));
        for bad in [&want[..want.len() - 2], "sha1=757107ea0eb2509fc211221cce984b8a37570b6d", "sha256=zz"] {
            let e = verify_signature(secret, body, Some(bad)).unwrap_err();
            assert!(matches!(e, WebhookError::MalformedSignature { .. }), "{bad}: {e}");
            assert!(!e.to_string().contains(&want[20..]), "the message shows no digest: {e}");
        }
        assert!(matches!(verify_signature(b"other", body, Some(want)), Err(WebhookError::WrongSignature)));
    }
}
