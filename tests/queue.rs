//! The job queue with real workers: `runner work` processes killed (`kill -9`), paused
//! (`SIGSTOP`/`SIGCONT`) and racing each other on PostgreSQL; retries, the errored run that
//! ends a job given up, the same measurement not repeated, and commit statuses posted to a
//! local HTTP server that records what GitHub would have received.
//!
//! The engine is a small command-template engine in a real git repository (one commit per
//! behaviour) whose adapter copies a dump written here; the reference is the same dump, so a
//! run that completes passes. Leases are 2 s so that expiry takes seconds.

mod queue_support;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paritybench::config::Config;
use paritybench::protocol::{
    DumpWriter, EngineInfo, Manifest, Mode, ModelInfo, ModelRef, Prompt, PromptShard, Request, Tensor, Timings,
};
use paritybench::queue::status::{CommitState, StatusPoster};
use paritybench::queue::worker::{JobOutcome, Tick, Worker, WorkerOptions};
use paritybench::queue::{QueueOptions, RunJob, StatusTarget, enqueue_run};
use paritybench::store::{CommitSha, Enqueued, JobId, JobStatus, RunStatus, Store, Trigger};

const V: usize = 64;

// ------------------------------------------------------------------------- the world

fn prompts() -> Vec<Prompt> {
    vec![Prompt { id: "alpha".into(), token_ids: vec![3, 14, 15, 9, 26], text: None, chat: false, positions: None }]
}

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn write_dump(dir: &Path) {
    let ps = prompts();
    let manifest = Manifest {
        schema: 1,
        complete: false,
        engine: EngineInfo {
            name: "toy".into(),
            version: "1".into(),
            backend: "cpu".into(),
            device: "cpu".into(),
            ..Default::default()
        },
        model: ModelInfo {
            path: "toy-model".into(),
            format: "safetensors".into(),
            quant: "f32".into(),
            compute_dtype: "f32".into(),
            ..Default::default()
        },
        tokenizer: Default::default(),
        mode: Mode::Prefill,
        request_sha256: "0".repeat(64),
        prompt_ids: ps.iter().map(|p| p.id.clone()).collect(),
        prompts: Vec::new(),
        captures: Default::default(),
        load_ms: None,
        peak_rss_bytes: None,
        peak_gpu_bytes: None,
        command: Vec::new(),
        created_utc: "2026-01-01T00:00:00Z".into(),
        error: None,
        extra: serde_json::Map::new(),
    };
    let mut w = DumpWriter::create(dir, manifest).unwrap();
    for (i, p) in ps.iter().enumerate() {
        let n = p.token_ids.len();
        let logits: Vec<f32> = values(1000 * (i as u64 + 1), n * V).into_iter().map(|x| 8.0 * x).collect();
        w.write_prompt(PromptShard {
            index: i as u32,
            id: p.id.clone(),
            token_ids: p.token_ids.clone(),
            positions: (0..n as i32).collect(),
            logits: Some(Tensor::f32(vec![n, V], logits)),
            generated: vec![1, 2, 3],
            timings: Timings {
                prefill_ms: vec![2.0],
                decode_ms: vec![3.0],
                prefill_tokens: n as u32,
                decode_tokens: 3,
                ttft_ms: vec![],
            },
            ..Default::default()
        })
        .unwrap();
    }
    w.finish().unwrap();
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The engine's commits: (name, seconds the adapter sleeps before writing its dump).
const COMMITS: &[(&str, f64)] =
    &[("correct", 0.0), ("slow", 1.5), ("c1", 0.3), ("c2", 0.3), ("c3", 0.3), ("c4", 0.3), ("c5", 0.3), ("c6", 0.3)];

struct World {
    tmp: tempfile::TempDir,
    commits: Vec<(&'static str, String)>,
    db: String,
}

impl World {
    fn new(db: &str, extra_toml: &str) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let model_dir = root.join("cache/fixtures/refs/default/toy");
        write_dump(&model_dir.join("hf-fp32-eager"));
        let request = Request {
            schema: 1,
            model: ModelRef {
                path: root.join("toy-model"),
                sha256: Some("ab".repeat(32)),
                format: None,
                tokenizer: None,
            },
            prompts: prompts(),
            positions: Default::default(),
            captures: Default::default(),
            decode_steps: 3,
            mode: Mode::Prefill,
            device: "cpu".into(),
            dtype: Default::default(),
            warmup: 0,
            repeats: 1,
            options: Default::default(),
        };
        request.save(&model_dir.join("hf-fp32-eager.request.json")).unwrap();
        std::fs::write(model_dir.join("hf-fp32-eager/fixture.json"), r#"{"fixture_id": "toy-hf-fp32-eager-1"}"#)
            .unwrap();
        write_dump(&root.join("dump"));

        let repo = root.join("engine");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        let mut commits = Vec::new();
        for (name, sleep) in COMMITS {
            let body = format!(
                "#!/bin/sh\n# toy engine: {name}\ntest -f \"$1\" || exit 2\nsleep {sleep}\nmkdir -p \"$2\" && cp -R \"$TOY_DUMP/.\" \"$2\"\n"
            );
            std::fs::write(repo.join("engine.sh"), body).unwrap();
            git(&repo, &["add", "-A"]);
            git(&repo, &["commit", "-q", "-m", name]);
            commits.push((*name, git(&repo, &["rev-parse", "HEAD"])));
        }
        std::fs::write(
            root.join("contract.yaml"),
            "id: toy-parity\nversion: 1\ngates:\n  - id: cosine\n    metric: logits.cosine\n    reduction: min\n    comparison: \">\"\n    value: 0.9999\n",
        )
        .unwrap();
        std::fs::write(
            root.join("runner.toml"),
            format!(
                "default_engine = \"toy\"\ncontracts = [\"contract.yaml\"]\n\n\
                 [queue]\nlease_s = 2.0\nheartbeat_s = 0.4\npoll_s = 0.1\nmax_attempts = 3\nbackoff_s = 0.001\nbackoff_max_s = 0.01\n\n\
                 {extra_toml}\n\
                 [engines.toy]\nrepo = \"engine\"\nbuild = \"test -f engine.sh\"\nrun = \"sh engine.sh {{request}} {{out}}\"\n\
                 timeout_s = 60\nincremental = false\n[engines.toy.env]\nTOY_DUMP = \"{}\"\n",
                root.join("dump").display()
            ),
        )
        .unwrap();
        World { tmp, commits, db: db.to_string() }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn sha(&self, name: &str) -> CommitSha {
        CommitSha::parse(&self.commits.iter().find(|(n, _)| *n == name).unwrap().1).unwrap()
    }

    fn config(&self) -> Config {
        let (cache, data) = (self.root().join("cache"), self.root().join("data"));
        let env = |k: &str| match k {
            "PARITYBENCH_CACHE" => Some(cache.display().to_string()),
            "PARITYBENCH_DATA" => Some(data.display().to_string()),
            _ => None,
        };
        Config::load_with(Some(&self.root().join("runner.toml")), env).unwrap()
    }

    fn job(&self, commit: &str, force: bool) -> RunJob {
        RunJob {
            engine: "toy".into(),
            commit: self.sha(commit),
            suite: "default".into(),
            trigger: Trigger::Webhook,
            force,
            status: None,
            reason: None,
        }
    }

    /// `runner work` as a real process, its log in `<root>/<name>.log`.
    fn spawn_worker(&self, name: &str) -> Child {
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["work", "--name", name, "--db", &self.db, "--config"])
            .arg(self.root().join("runner.toml"))
            .current_dir(self.root())
            .env("PARITYBENCH_CACHE", self.root().join("cache"))
            .env("PARITYBENCH_DATA", self.root().join("data"))
            .env("PARITYBENCH_LOG", "info")
            .env_remove("PARITYBENCH_DB")
            .env_remove("PARITYBENCH_CONFIG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.root().join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn in_process(&self, store: Arc<dyn Store>, config: Config) -> Worker {
        let mut opts = WorkerOptions::from_config(&config, self.root().to_path_buf());
        opts.name = "in-process".into();
        Worker::new(store, Arc::new(config), opts)
    }
}

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on a child process this test spawned and has not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Stops a worker the way systemd does (SIGTERM), reaps it, and checks it exited cleanly.
fn stop(mut child: Child) {
    signal(&child, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the worker did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the worker exits 0 on SIGTERM: {status}");
}

/// Polls `check` until it gives a value, failing after `limit` with `what` and the logs.
async fn wait_for<T, F, Fut>(limit: Duration, what: &str, w: &World, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}\nA: {}\nB: {}", w.log("A"), w.log("B"));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn queue(store: &dyn Store, w: &World, commit: &str) -> JobId {
    let opts = QueueOptions { priority: 0, max_attempts: 3, device: None };
    match enqueue_run(store, &w.job(commit, false), opts).await.unwrap() {
        Enqueued::New(id) => id,
        Enqueued::Duplicate(id) => panic!("job {id} was queued already"),
    }
}

/// Waits until the job's current attempt has bound its run, i.e. is mid-measurement.
async fn running_attempt(store: &dyn Store, w: &World, job: JobId, attempt: i64) {
    wait_for(Duration::from_secs(30), "the attempt to start its run", w, || async move {
        let j = store.job(job).await.unwrap().unwrap();
        let runs = store.job_runs(job).await.unwrap();
        (j.status == JobStatus::Running && j.attempts == attempt && runs.len() as i64 == attempt).then_some(())
    })
    .await
}

async fn done(store: &dyn Store, w: &World, job: JobId) -> paritybench::store::Job {
    wait_for(Duration::from_secs(60), "the job to be done", w, || async move {
        let j = store.job(job).await.unwrap().unwrap();
        (j.status == JobStatus::Done).then_some(j)
    })
    .await
}

// ------------------------------------------------------------------------- real processes

db_case!(a_worker_killed_mid_job_loses_nothing);
db_case!(a_paused_worker_cannot_overwrite_the_attempt_that_replaced_it);

async fn a_worker_killed_mid_job_loses_nothing(store: Arc<dyn Store>, url: String, _dir: &Path) {
    let w = World::new(&url, "");
    let job = queue(store.as_ref(), &w, "slow").await;
    let mut a = w.spawn_worker("A");
    running_attempt(store.as_ref(), &w, job, 1).await;
    a.kill().unwrap(); // SIGKILL: no cleanup of any kind
    a.wait().unwrap();

    let b = w.spawn_worker("B");
    let j = done(store.as_ref(), &w, job).await;
    stop(b);
    assert_eq!((j.attempts, j.worker.as_deref()), (2, Some("B")));
    let runs = store.job_runs(job).await.unwrap();
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!(runs[0].status, RunStatus::Errored);
    assert!(runs[0].error.as_deref().unwrap().contains("lost its lease"), "{:?}", runs[0].error);
    assert_eq!(runs[1].status, RunStatus::Passed, "{:?}\nB: {}", runs[1].error, w.log("B"));
    assert_eq!(runs[1].commit_sha, w.sha("slow"));
    assert_eq!(runs[1].trigger, Trigger::Webhook);
    let details = store.run_details(runs[1].id).await.unwrap().unwrap();
    assert!(details.verdicts.iter().all(|v| v.passed) && !details.verdicts.is_empty());
}

async fn a_paused_worker_cannot_overwrite_the_attempt_that_replaced_it(
    store: Arc<dyn Store>,
    url: String,
    _dir: &Path,
) {
    let w = World::new(&url, "");
    let job = queue(store.as_ref(), &w, "slow").await;
    let a = w.spawn_worker("A");
    running_attempt(store.as_ref(), &w, job, 1).await;
    signal(&a, libc::SIGSTOP);

    // B takes the job once A's lease expires, and finishes it.
    let b = w.spawn_worker("B");
    let j = done(store.as_ref(), &w, job).await;
    assert_eq!((j.attempts, j.worker.as_deref()), (2, Some("B")));
    let before = store.job_runs(job).await.unwrap();

    // A wakes up, finishes its engine run and tries to write: refused.
    signal(&a, libc::SIGCONT);
    let world = &w;
    wait_for(Duration::from_secs(30), "A to notice its lost lease", world, || async move {
        world.log("A").contains("lease lost; the newer attempt owns the job").then_some(())
    })
    .await;
    stop(a);
    stop(b);
    let log = w.log("A");
    assert!(log.contains("lost its lease"), "{log}");

    let runs = store.job_runs(job).await.unwrap();
    assert_eq!(runs, before, "A changed nothing after it woke up");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].status, RunStatus::Errored);
    assert!(runs[0].error.as_deref().unwrap().contains("lost its lease"), "{:?}", runs[0].error);
    let stale = store.run_details(runs[0].id).await.unwrap().unwrap();
    assert!(stale.measurements.is_empty() && stale.verdicts.is_empty(), "A's results were not written");
    assert_eq!(runs[1].status, RunStatus::Passed);
    let fresh = store.run_details(runs[1].id).await.unwrap().unwrap();
    assert!(!fresh.measurements.is_empty() && !fresh.verdicts.is_empty());
    let j = store.job(job).await.unwrap().unwrap();
    assert_eq!((j.status, j.attempts, j.worker.as_deref()), (JobStatus::Done, 2, Some("B")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_on_postgres_never_hold_the_same_lease() {
    let Some((store, url)) = queue_support::fresh_pg("two_workers").await else {
        eprintln!("PARITYBENCH_TEST_PG_URL is not set: skipped");
        return;
    };
    let w = World::new(&url, "");
    let names = ["c1", "c2", "c3", "c4", "c5", "c6"];
    let mut jobs = Vec::new();
    for n in names {
        jobs.push(queue(store.as_ref(), &w, n).await);
    }
    let (a, b) = (w.spawn_worker("A"), w.spawn_worker("B"));
    let mut finished = Vec::new();
    for job in &jobs {
        finished.push(done(store.as_ref(), &w, *job).await);
    }
    stop(a);
    stop(b);
    for j in &finished {
        assert_eq!(j.attempts, 1, "job {} was claimed twice: {j:?}", j.id);
        let runs = store.job_runs(j.id).await.unwrap();
        assert_eq!(runs.len(), 1, "job {}: {runs:#?}", j.id);
        assert_eq!(runs[0].status, RunStatus::Passed, "{:?}", runs[0].error);
    }
    let by = |n: &str| finished.iter().filter(|j| j.worker.as_deref() == Some(n)).count();
    assert_eq!(by("A") + by("B"), names.len());
    assert!(by("A") > 0 && by("B") > 0, "both workers took jobs: A {} B {}", by("A"), by("B"));
    // Each run's commit is its job's commit: no worker wrote into another's job.
    for (job, n) in jobs.iter().zip(names) {
        assert_eq!(store.job_runs(*job).await.unwrap()[0].commit_sha, w.sha(n));
    }
}

// ------------------------------------------------------------------------- in process

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_back_off_then_an_errored_run_keeps_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = queue_support::fresh_sqlite(dir.path()).await;
    let w = World::new(&url, "");
    let mut job = w.job("correct", false);
    job.commit = CommitSha::parse(&"d".repeat(40)).unwrap(); // not in the engine's repository
    let opts = QueueOptions { priority: 0, max_attempts: 3, device: None };
    let Enqueued::New(id) = enqueue_run(store.as_ref(), &job, opts).await.unwrap() else { panic!() };
    let mut worker = w.in_process(Arc::clone(&store), w.config());
    let mut outcomes = Vec::new();
    while outcomes.len() < 3 {
        match worker.try_run_one().await.unwrap() {
            Tick::Ran { job, outcome } => {
                assert_eq!(job, id);
                outcomes.push(outcome);
            }
            // the backoff (1 ms, then 2 ms) has not passed yet
            Tick::Empty => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
    for o in &outcomes[..2] {
        let JobOutcome::Retry { error, after } = o else { panic!("{o:?}") };
        assert!(error.contains("does not name a commit"), "{error}");
        assert!(*after <= Duration::from_millis(10));
    }
    let JobOutcome::GaveUp { error, run: Some(run) } = &outcomes[2] else { panic!("{:?}", outcomes[2]) };
    assert!(error.starts_with("gave up after 3 attempt(s)"), "{error}");
    let run = store.run(*run).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Errored);
    assert!(run.error.as_deref().unwrap().contains("does not name a commit"), "{:?}", run.error);
    assert_eq!((run.job_id, run.commit_sha.as_str()), (Some(id), "d".repeat(40).as_str()));
    let j = store.job(id).await.unwrap().unwrap();
    assert_eq!((j.status, j.attempts), (JobStatus::Dead, 3));
    assert!(j.last_error.unwrap().contains("does not name a commit"));
    assert_eq!(worker.try_run_one().await.unwrap(), Tick::Empty);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_measurement_is_not_repeated_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = queue_support::fresh_sqlite(dir.path()).await;
    let w = World::new(&url, "");
    let mut worker = w.in_process(Arc::clone(&store), w.config());
    let opts = QueueOptions { priority: 0, max_attempts: 3, device: None };
    let Enqueued::New(first) = enqueue_run(store.as_ref(), &w.job("correct", false), opts).await.unwrap() else {
        panic!()
    };
    let Tick::Ran { outcome: JobOutcome::Measured { run, status }, .. } = worker.try_run_one().await.unwrap() else {
        panic!()
    };
    assert_eq!(status.as_str(), "passed");
    // queued again: the same job
    assert_eq!(enqueue_run(store.as_ref(), &w.job("correct", false), opts).await.unwrap(), Enqueued::Duplicate(first));
    // asked for on a device kind (another queue key, the same measurement here): not repeated
    let cpu = QueueOptions { device: Some("cpu"), ..opts };
    let Enqueued::New(_) = enqueue_run(store.as_ref(), &w.job("correct", false), cpu).await.unwrap() else { panic!() };
    let tick = worker.try_run_one().await.unwrap();
    assert!(
        matches!(&tick, Tick::Ran { outcome: JobOutcome::AlreadyMeasured { run: r }, .. } if *r == run),
        "{tick:?}"
    );
    // a job for another device kind is not claimed by this worker
    let gpu = QueueOptions { device: Some("cuda"), ..opts };
    let Enqueued::New(gpu_job) = enqueue_run(store.as_ref(), &w.job("correct", true), gpu).await.unwrap() else {
        panic!()
    };
    // forced: measured again
    let Enqueued::New(_) = enqueue_run(store.as_ref(), &w.job("correct", true), opts).await.unwrap() else { panic!() };
    let tick = worker.try_run_one().await.unwrap();
    assert!(matches!(&tick, Tick::Ran { outcome: JobOutcome::Measured { run: r, .. }, .. } if *r != run), "{tick:?}");
    assert_eq!(worker.try_run_one().await.unwrap(), Tick::Empty, "the cuda job waits for a cuda worker");
    assert_eq!(store.job(gpu_job).await.unwrap().unwrap().status, JobStatus::Queued);
}

// ------------------------------------------------------------------------- commit statuses

/// A stand-in for api.github.com: records every request, answers from a script (201 when
/// the script is empty).
#[derive(Clone, Default)]
struct FakeGithub {
    seen: Arc<Mutex<Vec<(String, axum::http::HeaderMap, serde_json::Value)>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
}

impl FakeGithub {
    async fn start(script: &[u16]) -> (FakeGithub, String, tokio::sync::oneshot::Sender<()>) {
        let fake = FakeGithub::default();
        fake.script.lock().unwrap().extend(script);
        let state = fake.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    state.seen.lock().unwrap().push((uri.to_string(), headers, json));
                    let code = state.script.lock().unwrap().pop_front().unwrap_or(201);
                    (axum::http::StatusCode::from_u16(code).unwrap(), "{\"id\": 1}")
                }
            },
        );
        let (addr, stop) = queue_support::launch(app).await;
        (fake, format!("http://{addr}"), stop)
    }

    fn seen(&self) -> Vec<(String, axum::http::HeaderMap, serde_json::Value)> {
        self.seen.lock().unwrap().clone()
    }
}

/// The body GitHub documents for "Create a commit status": `state` (required; error,
/// failure, pending or success), `target_url`, `description` (≤ 140 characters), `context`;
/// nothing else.
fn check_status_schema(v: &serde_json::Value) {
    let o = v.as_object().unwrap_or_else(|| panic!("not an object: {v}"));
    for k in o.keys() {
        assert!(["state", "target_url", "description", "context"].contains(&k.as_str()), "unknown key {k}: {v}");
    }
    assert!(["error", "failure", "pending", "success"].contains(&o["state"].as_str().unwrap()), "{v}");
    if let Some(u) = o.get("target_url") {
        assert!(u.as_str().unwrap().starts_with("http"), "{v}");
    }
    assert!(o["description"].as_str().unwrap().chars().count() <= 140, "{v}");
    assert!(!o["context"].as_str().unwrap().is_empty(), "{v}");
}

fn github_toml(api: &str) -> String {
    format!(
        "[github]\ntoken = \"ghp_test_token\"\napi_url = \"{api}\"\nrun_url = \"https://pb.example.com/runs/{{run}}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_are_retried_and_match_githubs_schema() {
    let (fake, api, _stop) = FakeGithub::start(&[502, 503]).await;
    let w = World::new("sqlite::memory:", &github_toml(&api));
    let cfg = w.config();
    assert!(!format!("{cfg:?}").contains("ghp_test_token"), "the token never shows in Debug output");
    let mut poster = StatusPoster::from_config(&cfg.github).unwrap();
    poster.backoff = Duration::from_millis(5);
    let target = StatusTarget { repo: "paiml/aprender".into(), sha: w.sha("correct") };
    let long = "x".repeat(500);
    let status = poster.status("toy", CommitState::Failure, Some(paritybench::store::RunId(42)), &long);
    assert_eq!(poster.post(&target, &status).await.unwrap(), 3, "two server errors, then accepted");
    let seen = fake.seen();
    assert_eq!(seen.len(), 3);
    let (path, headers, body) = &seen[2];
    assert_eq!(path, &format!("/repos/paiml/aprender/statuses/{}", w.sha("correct")));
    assert_eq!(headers["authorization"], "Bearer ghp_test_token");
    assert_eq!(headers["accept"], "application/vnd.github+json");
    assert_eq!(headers["x-github-api-version"], "2022-11-28");
    assert!(headers["user-agent"].to_str().unwrap().starts_with("paritybench/"));
    check_status_schema(body);
    assert_eq!(body["state"], "failure");
    assert_eq!(body["target_url"], "https://pb.example.com/runs/42");
    assert_eq!(body["context"], "paritybench/toy");
    assert_eq!(body["description"].as_str().unwrap().chars().count(), 140);

    // A refusal (422: a bad sha, say) is not retried.
    fake.script.lock().unwrap().push_back(422);
    let e = poster.post(&target, &status).await.unwrap_err().to_string();
    assert!(e.contains("422"), "{e}");
    assert_eq!(fake.seen().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reports_pending_then_the_verdict_and_never_waits_for_github() {
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = queue_support::fresh_sqlite(dir.path()).await;
    let (fake, api, _stop) = FakeGithub::start(&[]).await;
    let w = World::new(&url, &github_toml(&api));
    let mut worker = w.in_process(Arc::clone(&store), w.config());
    let mut job = w.job("correct", false);
    job.status = Some(StatusTarget { repo: "paiml/aprender".into(), sha: w.sha("correct") });
    let opts = QueueOptions { priority: 0, max_attempts: 3, device: None };
    enqueue_run(store.as_ref(), &job, opts).await.unwrap();
    let Tick::Ran { outcome: JobOutcome::Measured { run, .. }, .. } = worker.try_run_one().await.unwrap() else {
        panic!()
    };
    worker.drain_posts(Duration::from_secs(10)).await;
    let seen = fake.seen();
    let states: Vec<&str> = seen.iter().map(|(_, _, b)| b["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["pending", "success"]);
    for (_, _, b) in &seen {
        check_status_schema(b);
    }
    assert_eq!(seen[1].2["target_url"], format!("https://pb.example.com/runs/{run}"));

    // GitHub unreachable: the run is measured all the same.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let w2 = World::new(&url, &github_toml(&format!("http://{closed}")));
    let mut worker = w2.in_process(Arc::clone(&store), w2.config());
    let mut job = w2.job("correct", true);
    job.engine = "toy".into();
    job.status = Some(StatusTarget { repo: "paiml/aprender".into(), sha: w2.sha("correct") });
    enqueue_run(store.as_ref(), &job, opts).await.unwrap();
    let started = Instant::now();
    let tick = worker.try_run_one().await.unwrap();
    assert!(matches!(tick, Tick::Ran { outcome: JobOutcome::Measured { .. }, .. }), "{tick:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

// ------------------------------------------------------------------------- nightly

impl World {
    /// `runner nightly` as a real process: (exit code, stdout, stderr).
    fn nightly(&self, extra: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["nightly", "--db", &self.db, "--config"])
            .arg(self.root().join("runner.toml"))
            .args(extra)
            .current_dir(self.root())
            .env("PARITYBENCH_CACHE", self.root().join("cache"))
            .env("PARITYBENCH_DATA", self.root().join("data"))
            .env_remove("PARITYBENCH_DB")
            .env_remove("PARITYBENCH_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nightly_queues_or_runs_each_branch_head_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = queue_support::fresh_sqlite(dir.path()).await;
    let w = World::new(&url, "[nightly]\nbranches = { toy = [\"main\"] }\n");
    let head = w.sha("c6").to_string();
    let json = |s: &str| -> serde_json::Value { serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}")) };

    // 1. queued, then already queued
    let (code, out, err) = w.nightly(&["--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let items = json(&out);
    assert_eq!(items[0]["engine"], "toy");
    assert_eq!(items[0]["branch"], "main");
    assert_eq!(items[0]["commit"], head.as_str());
    assert_eq!(items[0]["action"], "queued", "{out}");
    let job = JobId(items[0]["job"].as_i64().unwrap());
    let payload: RunJob = serde_json::from_value(store.job(job).await.unwrap().unwrap().payload).unwrap();
    assert_eq!((payload.trigger, payload.commit.to_string()), (Trigger::Nightly, head.clone()));
    let (code, out, _) = w.nightly(&["--json"]);
    assert_eq!((code, json(&out)[0]["action"].as_str()), (0, Some("already_queued")), "{out}");

    // 2. run here: measured and recorded as a nightly run; then already measured
    let (code, out, err) = w.nightly(&["--run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("toy") && out.contains(&head[..12]) && out.contains(": passed"), "{out}");
    let runs = store.recent_runs(10).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].trigger, runs[0].status, runs[0].commit_sha.to_string()),
        (Trigger::Nightly, RunStatus::Passed, head.clone())
    );
    let (code, out, _) = w.nightly(&["--run", "--json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(json(&out)[0]["action"], "already_measured", "{out}");
    assert_eq!(json(&out)[0]["run"], runs[0].id.0);

    // 3. a branch that does not exist is reported, and the exit code says so
    std::fs::write(
        w.root().join("runner.toml"),
        std::fs::read_to_string(w.root().join("runner.toml")).unwrap().replace("[\"main\"]", "[\"main\", \"nope\"]"),
    )
    .unwrap();
    let (code, out, err) = w.nightly(&[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("nope") && out.contains("could not run") && out.contains("does not name a commit"), "{out}");
    assert!(err.contains("1 of 2 branch head(s) could not be measured"), "{err}");
}
