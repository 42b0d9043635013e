//! `POST /webhooks/github` against the real router served on port 0 by axum, with GitHub's
//! documented payload shapes (tests/data/github/) and a real database: SQLite always,
//! PostgreSQL when `PARITYBENCH_TEST_PG_URL` is set.

mod queue_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use paritybench::config::{GithubConfig, Secret};
use paritybench::queue::webhook::{WebhookState, router, sign};
use paritybench::queue::{RUN_JOB, RunJob};
use paritybench::store::{JobStatus, Store, Trigger};

const SECRET: &str = "It's a Secret to Everybody";
const MERGE_SHA: &str = "9f2c1e7b4a0d3c5e8f1a2b3c4d5e6f708192a3b4";

fn payload(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/github").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn github(queue_pushes: bool) -> GithubConfig {
    GithubConfig {
        secret: Some(Secret::new(SECRET)),
        repos: BTreeMap::from([("paiml/aprender".to_string(), vec!["apr".to_string(), "apr-cuda".to_string()])]),
        queue_pushes,
        max_body_bytes: 64 * 1024,
        ..GithubConfig::default()
    }
}

struct Hook {
    base: String,
    client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Hook {
    async fn start(store: Arc<dyn Store>, github: GithubConfig) -> Hook {
        let state = WebhookState { store, github, suite: "default".into(), max_attempts: 3 };
        let (addr, stop) = queue_support::launch(router(state)).await;
        Hook { base: format!("http://{addr}"), client: reqwest::Client::new(), _stop: stop }
    }

    /// A delivery as GitHub sends it; `signature: None` leaves the header out.
    async fn send(
        &self,
        event: &str,
        delivery: &str,
        body: &[u8],
        signature: Option<String>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .client
            .post(format!("{}/webhooks/github", self.base))
            .header("Content-Type", "application/json")
            .header("User-Agent", "GitHub-Hookshot/a1b2c3d")
            .header("X-GitHub-Event", event)
            .header("X-GitHub-Delivery", delivery)
            .header("X-GitHub-Hook-ID", "509171342")
            .body(body.to_vec());
        if let Some(s) = signature {
            req = req.header("X-Hub-Signature-256", s);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    async fn signed(&self, event: &str, delivery: &str, body: &[u8]) -> (u16, serde_json::Value) {
        self.send(event, delivery, body, Some(sign(SECRET.as_bytes(), body))).await
    }
}

/// Every job in the queue (claimed to be seen, so call this last).
async fn drain(store: &dyn Store) -> Vec<(RunJob, paritybench::store::ClaimedJob)> {
    let mut out = Vec::new();
    while let Some(j) = store.claim_job("test", &[], Duration::from_secs(60), chrono::Utc::now()).await.unwrap() {
        out.push((serde_json::from_value(j.payload.clone()).unwrap(), j));
    }
    out
}

db_case!(a_merged_pull_request_is_queued_once_per_engine);
db_case!(bad_signatures_are_refused_and_queue_nothing);
db_case!(other_events_are_answered_politely);

async fn a_merged_pull_request_is_queued_once_per_engine(store: Arc<dyn Store>, _url: String, _dir: &Path) {
    let hook = Hook::start(Arc::clone(&store), github(true)).await;
    let body = payload("pull_request_closed_merged.json");
    let delivery = "72d3162e-cc78-11e3-81ab-4c9367dc0958";

    // 1. the same delivery three times: queued by the first, acknowledged after
    let (status, first) = hook.signed("pull_request", delivery, &body).await;
    assert_eq!(status, 202, "{first}");
    let queued = first["queued"].as_array().unwrap();
    assert_eq!(queued.len(), 2, "{first}");
    assert!(queued.iter().all(|q| q["already_queued"] == false && q["commit"] == MERGE_SHA), "{first}");
    assert_eq!(first["reason"], "pull request #1423 merged in paiml/aprender");
    for _ in 0..2 {
        let (status, again) = hook.signed("pull_request", delivery, &body).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["duplicate_delivery"], delivery);
    }

    // 2. the same merge seen as a push (another delivery): already queued, not queued again
    let (status, push) = hook.signed("push", "9a1e5c30-cc79-11e3-8a4f-1c2e7d0b7e11", &payload("push_main.json")).await;
    assert_eq!(status, 202, "{push}");
    assert!(push["queued"].as_array().unwrap().iter().all(|q| q["already_queued"] == true), "{push}");

    // 3. exactly one job per engine, carrying what a worker and the status poster need
    let jobs = drain(store.as_ref()).await;
    let mut engines: Vec<&str> = jobs.iter().map(|(p, _)| p.engine.as_str()).collect();
    engines.sort();
    assert_eq!(engines, ["apr", "apr-cuda"]);
    for (p, j) in &jobs {
        assert_eq!(j.kind, RUN_JOB);
        assert_eq!(p.commit.as_str(), MERGE_SHA);
        assert_eq!(p.suite, "default");
        assert_eq!(p.trigger, Trigger::Webhook);
        assert!(!p.force);
        let target = p.status.as_ref().unwrap();
        assert_eq!((target.repo.as_str(), target.sha.as_str()), ("paiml/aprender", MERGE_SHA));
        assert_eq!(j.priority, 10);
        assert_eq!(j.max_attempts, 3);
        assert_eq!(store.job(j.id).await.unwrap().unwrap().status, JobStatus::Running);
    }
}

async fn bad_signatures_are_refused_and_queue_nothing(store: Arc<dyn Store>, _url: String, _dir: &Path) {
    let hook = Hook::start(Arc::clone(&store), github(true)).await;
    let body = payload("pull_request_closed_merged.json");
    let good = sign(SECRET.as_bytes(), &body);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("wrong secret", Some(sign(b"not the secret", &body))),
        ("another body", Some(sign(SECRET.as_bytes(), &payload("push_main.json")))),
        ("missing", None),
        ("truncated", Some(good[..good.len() - 8].to_string())),
        ("cut to the prefix", Some("sha256=".to_string())),
        ("sha1 instead", Some(format!("sha1={}", &good[7..47]))),
        ("not hex", Some(format!("sha256={}", "z".repeat(64)))),
    ];
    for (i, (what, signature)) in cases.into_iter().enumerate() {
        let (status, resp) = hook.send("pull_request", &format!("bad-{i}"), &body, signature).await;
        assert_eq!(status, 401, "{what}: {resp}");
        let error = resp["error"].as_str().unwrap();
        assert!(error.contains("X-Hub-Signature-256"), "{what}: {error}");
        assert!(!error.contains(&good[20..]), "{what}: the expected digest leaks: {error}");
    }
    // A body over the limit is refused before its signature is even looked at.
    let big = vec![b' '; 100 * 1024];
    let (status, resp) = hook.signed("pull_request", "big", &big).await;
    assert_eq!(status, 413, "{resp}");
    // No secret configured: nothing can be verified, nothing is accepted.
    let open = Hook::start(Arc::clone(&store), GithubConfig { secret: None, ..github(true) }).await;
    let (status, resp) = open.signed("pull_request", "no-secret", &body).await;
    assert_eq!(status, 401, "{resp}");
    assert!(resp["error"].as_str().unwrap().contains("not configured"), "{resp}");

    assert!(drain(store.as_ref()).await.is_empty(), "nothing may be queued");
    // The refused deliveries were not recorded: the genuine one is still accepted.
    let (status, resp) = hook.signed("pull_request", "bad-3", &body).await;
    assert_eq!(status, 202, "{resp}");
}

async fn other_events_are_answered_politely(store: Arc<dyn Store>, _url: String, _dir: &Path) {
    let hook = Hook::start(Arc::clone(&store), github(false)).await;
    let (status, pong) = hook.signed("ping", "p-1", &payload("ping.json")).await;
    assert_eq!((status, &pong["pong"]), (200, &serde_json::Value::Bool(true)), "{pong}");
    for (event, file, want) in [
        ("pull_request", "pull_request_closed_unmerged.json", "closed without merging"),
        ("pull_request", "pull_request_opened.json", "#1423 opened"),
        ("push", "push_main.json", "queue_pushes is off"),
        ("star", "star_created.json", "event `star` is not handled"),
    ] {
        let (status, resp) = hook.signed(event, &format!("{event}-{file}"), &payload(file)).await;
        assert_eq!(status, 202, "{file}: {resp}");
        assert!(resp["ignored"].as_str().unwrap().contains(want), "{file}: {resp}");
    }
    // A repository nobody configured.
    let other = String::from_utf8(payload("pull_request_closed_merged.json")).unwrap().replace("paiml/aprender", "x/y");
    let (status, resp) = hook.signed("pull_request", "other-repo", other.as_bytes()).await;
    assert_eq!(status, 202, "{resp}");
    assert!(resp["ignored"].as_str().unwrap().contains("`x/y` is not configured"), "{resp}");
    // Broken payloads and headers are the sender's fault, said plainly.
    let (status, resp) = hook.signed("pull_request", "broken", b"{\"action\": \"closed\"}").await;
    assert_eq!(status, 400, "{resp}");
    assert!(resp["error"].as_str().unwrap().starts_with("pull_request payload: missing field"), "{resp}");
    let body = payload("ping.json");
    let resp = hook
        .client
        .post(format!("{}/webhooks/github", hook.base))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("X-GitHub-Event", "ping")
        .header("X-GitHub-Delivery", "form")
        .header("X-Hub-Signature-256", sign(SECRET.as_bytes(), &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    assert!(drain(store.as_ref()).await.is_empty());
}
