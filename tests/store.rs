//! The storage contract: every case runs on SQLite always, and on PostgreSQL when
//! `PARITYBENCH_TEST_PG_URL` is set (a fresh database per case; start a throwaway server
//! with `eval "$(scripts/pg-test-server.sh start)"`). With `CI` set and no URL, the
//! PostgreSQL half fails instead of being skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use paritybench::contracts::{Contract, ContractRef, Metric, Outcome, Severity, Subject};
use paritybench::store::{
    self, Backend, CommitSha, DeviceFingerprint, EngineId, Enqueued, JobStatus, LayerParity, Measurement, NewCommit,
    NewJob, NewRun, RunResults, RunStatus, SeriesSubject, Store, StoreError, StoredVerdict, Trigger,
};

// ------------------------------------------------------------------------- harness

/// The PostgreSQL server to test against, if any; with `CI` set, one is required.
fn pg_url() -> Option<String> {
    match std::env::var("PARITYBENCH_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI is set but PARITYBENCH_TEST_PG_URL is not: the PostgreSQL half must run in CI")
        }
        _ => None,
    }
}

/// A fresh, migrated PostgreSQL database named after the case (dropped first if a previous
/// run left it).
async fn fresh_pg(case: &str) -> Option<Arc<dyn Store>> {
    fresh_pg_url(case).await.map(|(store, _)| store)
}

async fn fresh_pg_url(case: &str) -> Option<(Arc<dyn Store>, String)> {
    let base = pg_url()?;
    let admin = sqlx::PgPool::connect(&base).await.expect("connect to the test server");
    let db = format!("pbtest_{case}");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&admin).await.unwrap();
    admin.close().await;
    let (head, query) = base.split_once('?').map_or((base.as_str(), None), |(h, q)| (h, Some(q)));
    let (server, _) = head.rsplit_once('/').expect("a postgres://host/db URL");
    let url = match query {
        Some(q) => format!("{server}/{db}?{q}"),
        None => format!("{server}/{db}"),
    };
    Some((store::connect(&url).await.unwrap_or_else(|e| panic!("{e}")), url))
}

async fn fresh_sqlite(dir: &Path) -> Arc<dyn Store> {
    let url = format!("sqlite://{}", dir.join("data/paritybench.db").display());
    store::connect(&url).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `case` on SQLite, and on PostgreSQL when configured.
macro_rules! storage_case {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                super::$case(super::fresh_sqlite(dir.path()).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                match super::fresh_pg(stringify!($case)).await {
                    Some(store) => super::$case(store).await,
                    None => eprintln!("PARITYBENCH_TEST_PG_URL is not set: PostgreSQL half skipped"),
                }
            }
        }
    };
}

storage_case!(engines_and_commits);
storage_case!(run_lifecycle_round_trips_everything);
storage_case!(queued_runs_start_then_finish);
storage_case!(errored_run_keeps_what_it_finished);
storage_case!(finishing_is_all_or_nothing);
storage_case!(series_and_dashboard_reads);
storage_case!(job_queue_leases_and_attempts);
storage_case!(concurrent_claims_never_share_a_job);
storage_case!(job_attempts_own_their_runs);
storage_case!(running_runs_are_found_by_host_and_owner);

/// The runs a later `runner once` checks for a dead owner: running, owned, on its host, not
/// a job attempt's.
async fn running_runs_are_found_by_host_and_owner(store: Arc<dyn Store>) {
    let (engine, commit) = engine_and_commit(&*store, 7).await;
    let owned = |host: &str, owner: Option<&str>| NewRun {
        host: Some(host.into()),
        owner: owner.map(String::from),
        ..new_run(engine, commit, cpu(), vec![])
    };
    let a = store.create_run(&owned("box-a", Some("boot/ns/11/100"))).await.unwrap();
    let _other_host = store.create_run(&owned("box-b", Some("boot/ns/12/100"))).await.unwrap();
    let _no_owner = store.create_run(&owned("box-a", None)).await.unwrap();
    let done = store.create_run(&owned("box-a", Some("boot/ns/13/100"))).await.unwrap();
    store.finish_run(done, &RunResults::errored("finished")).await.unwrap();
    let c = store.create_run(&owned("box-a", Some("boot/ns/14/100"))).await.unwrap();
    let found = store.running_owned_runs("box-a").await.unwrap();
    assert_eq!(found.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a, c], "running, owned, on box-a, oldest first");
    assert_eq!(found[0].owner.as_deref(), Some("boot/ns/11/100"));
    assert_eq!(store.run(a).await.unwrap().unwrap().owner.as_deref(), Some("boot/ns/11/100"));
    assert!(store.running_owned_runs("box-c").await.unwrap().is_empty());
}

// ------------------------------------------------------------------------- fixtures

fn sha(n: u32) -> CommitSha {
    CommitSha::parse(&format!("{n:040x}")).unwrap()
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_760_000_000 + secs, 0).unwrap()
}

fn cpu() -> DeviceFingerprint {
    DeviceFingerprint { kind: "cpu".into(), name: "AMD EPYC 9654".into(), driver: None, cuda: None }
}

fn h100() -> DeviceFingerprint {
    DeviceFingerprint {
        kind: "cuda".into(),
        name: "NVIDIA H100 80GB HBM3".into(),
        driver: Some("550.54.15".into()),
        cuda: Some("12.4".into()),
    }
}

fn seed_contract() -> Contract {
    Contract::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts/seed-parity.yaml")).unwrap()
}

async fn engine_and_commit(store: &dyn Store, generation: i64) -> (EngineId, paritybench::store::CommitId) {
    let e = store.upsert_engine("paritybench", None).await.unwrap();
    let c = store
        .upsert_commit(e.id, &NewCommit { sha: sha(generation as u32), generation, committed_at: None, title: None })
        .await
        .unwrap();
    (e.id, c.id)
}

fn new_run(
    engine: EngineId,
    commit: paritybench::store::CommitId,
    device: DeviceFingerprint,
    contracts: Vec<ContractRef>,
) -> NewRun {
    NewRun {
        engine_id: engine,
        commit_id: commit,
        status: RunStatus::Running,
        trigger: Trigger::Cli,
        suite: "bundled".into(),
        device,
        host: Some("gpu-box-1".into()),
        owner: None,
        fixture_ids: vec!["fx-qwen3-dense-hf-f16-1".into(), "fx-qwen3-dense-llamacpp-f16-1".into()],
        contracts,
        log_path: Some("/var/log/paritybench/run.log".into()),
        job_id: None,
    }
}

fn subject(model: &str, reference: &str) -> SeriesSubject {
    SeriesSubject {
        model: model.into(),
        model_sha256: format!("{:0>64}", model.len()),
        reference: reference.into(),
        fixture_id: format!("fx-{model}-{reference}-1"),
    }
}

fn measurement(model: &str, reference: &str, metric: &str, statistic: &str, value: f64) -> Measurement {
    Measurement {
        model: model.into(),
        reference: reference.into(),
        prompt: None,
        metric: metric.into(),
        statistic: statistic.into(),
        value,
    }
}

/// A run's results judged by the real seed contract: cosine samples per position, top-1
/// against llama.cpp, capture counts.
fn judged_results(cosines: Vec<f64>) -> RunResults {
    let contract = seed_contract();
    let hf = Subject {
        engine: "paritybench".into(),
        model: "qwen3-dense".into(),
        reference: "hf-f16".into(),
        dtype: Some("f16".into()),
        mode: Some("prefill".into()),
        prompt: None,
        samples: BTreeMap::from([(Metric::LogitsCosine, cosines.clone()), (Metric::LayerCountParity, vec![1.0; 8])]),
        noise_floors: BTreeMap::new(),
    };
    let llama = Subject {
        reference: "llamacpp-f16".into(),
        samples: BTreeMap::from([(Metric::Top1, vec![1.0, 1.0, 0.0])]),
        ..hf.clone()
    };
    let eval = contract.evaluate(&[hf, llama]);
    let min = cosines.iter().copied().fold(f64::INFINITY, f64::min);
    RunResults {
        status: if eval.passed() { RunStatus::Passed } else { RunStatus::Failed },
        error: None,
        timings: BTreeMap::from([("engine".into(), 1234.5), ("metrics".into(), 56.0)]),
        series: vec![subject("qwen3-dense", "hf-f16"), subject("qwen3-dense", "llamacpp-f16")],
        measurements: vec![
            measurement("qwen3-dense", "hf-f16", "logits.cosine", "min", min),
            measurement("qwen3-dense", "hf-f16", "logits.rel_l2", "max", 3.5e-3),
            measurement("qwen3-dense", "llamacpp-f16", "top1", "mean", 2.0 / 3.0),
            Measurement { prompt: Some("p0".into()), ..measurement("qwen3-dense", "hf-f16", "kld", "p99", 1e-5) },
        ],
        layers: (0..4)
            .map(|layer| LayerParity {
                model: "qwen3-dense".into(),
                reference: "hf-f16".into(),
                prompt: Some("p0".into()),
                capture: "layer_out".into(),
                layer,
                rel_l2: 1e-4 * (layer + 1) as f64,
                cosine: 1.0 - 1e-6 * layer as f64,
            })
            .collect(),
        verdicts: eval.verdicts.iter().map(StoredVerdict::from).collect(),
    }
}

/// `results` with more verdicts.
fn results_with(results: &RunResults, verdicts: Vec<StoredVerdict>) -> RunResults {
    let mut r = results.clone();
    r.verdicts.extend(verdicts);
    r
}

/// Floats equal, NaN equal to NaN.
fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

// ------------------------------------------------------------------------- cases

async fn engines_and_commits(store: Arc<dyn Store>) {
    let a = store.upsert_engine("apr", None).await.unwrap();
    let b = store.upsert_engine("apr", Some("https://github.com/paiml/aprender")).await.unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(b.repo_url.as_deref(), Some("https://github.com/paiml/aprender"));
    let c = store.upsert_engine("apr", None).await.unwrap();
    assert_eq!(c.repo_url.as_deref(), Some("https://github.com/paiml/aprender"), "None keeps the URL");
    assert_eq!(store.engine_by_name("apr").await.unwrap(), Some(c.clone()));
    assert_eq!(store.engine_by_name("nope").await.unwrap(), None);

    let nc = NewCommit { sha: sha(7), generation: 7, committed_at: Some(t(70)), title: Some("Fix rope".into()) };
    let c1 = store.upsert_commit(a.id, &nc).await.unwrap();
    assert_eq!((c1.sha.clone(), c1.generation, c1.committed_at), (sha(7), 7, Some(t(70))));
    let c2 = store.upsert_commit(a.id, &NewCommit { title: None, committed_at: None, ..nc.clone() }).await.unwrap();
    assert_eq!(c1, c2, "same sha, same commit; missing fields keep what is stored");
    assert_eq!(store.commit_by_sha(a.id, &sha(7)).await.unwrap(), Some(c1.clone()));
    assert_eq!(store.commit_by_sha(a.id, &sha(8)).await.unwrap(), None);
    // The same sha in another engine's repository is another commit.
    let other = store.upsert_engine("llama.cpp", None).await.unwrap();
    let c3 = store.upsert_commit(other.id, &nc).await.unwrap();
    assert_ne!(c3.id, c1.id);

    // A run must name a commit of its own engine.
    let err = store.create_run(&new_run(other.id, c1.id, cpu(), vec![])).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid { field: "run commit", .. }), "{err}");
    let err = store.create_run(&new_run(a.id, paritybench::store::CommitId(999_999), cpu(), vec![])).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "commit", .. }), "{err}");
}

async fn run_lifecycle_round_trips_everything(store: Arc<dyn Store>) {
    let contract = seed_contract().reference();
    let (engine, commit) = engine_and_commit(&*store, 42).await;
    let id = store.create_run(&new_run(engine, commit, h100(), vec![contract.clone()])).await.unwrap();

    // Recorded before the engine starts: a crash leaves this row.
    let run = store.run(id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert!(run.started_at.is_some() && run.finished_at.is_none());
    assert_eq!((run.engine.as_str(), run.commit_sha.clone(), run.generation), ("paritybench", sha(42), 42));
    assert_eq!(run.device, h100());
    assert_eq!(run.trigger, Trigger::Cli);
    assert_eq!(run.contracts, vec![contract.clone()]);
    assert_eq!(run.fixture_ids.len(), 2);
    assert_eq!(run.log_path.as_deref(), Some("/var/log/paritybench/run.log"));
    assert_eq!(store.recent_runs(10).await.unwrap(), vec![run.clone()]);

    // A cosine of 0.98 at one position fails the seed gate.
    let mut results = judged_results(vec![0.999, 0.98, 0.9995]);
    results.measurements.push(measurement("qwen3-dense", "hf-f16", "logits.max_abs", "max", f64::INFINITY));
    results.measurements.push(measurement("qwen3-dense", "hf-f16", "nonfinite", "count", f64::NAN));
    results.layers[3].rel_l2 = f64::NAN;
    results.timings.insert("decode".into(), f64::NAN);
    assert_eq!(results.status, RunStatus::Failed);
    // A NaN observation (a failed verdict) must not read back as "missing".
    let mut nan_verdict = results.verdicts[0].clone();
    nan_verdict.gate_id = "nan-observed".into();
    (nan_verdict.observed, nan_verdict.outcome, nan_verdict.passed) = (Some(f64::NAN), Outcome::Failed, false);
    // A missing one (no floor: threshold NaN, nothing observed) reads back as missing.
    let mut missing_verdict = results.verdicts[0].clone();
    missing_verdict.gate_id = "no-floor".into();
    (missing_verdict.observed, missing_verdict.threshold) = (None, f64::NAN);
    (missing_verdict.outcome, missing_verdict.passed) = (Outcome::Missing, false);
    store.finish_run(id, &results_with(&results, vec![nan_verdict, missing_verdict])).await.unwrap();

    let d = store.run_details(id).await.unwrap().unwrap();
    assert_eq!(d.run.status, RunStatus::Failed);
    assert!(d.run.finished_at.is_some());
    assert_eq!(d.run.timings.len(), 3);
    assert!(d.run.timings["decode"].is_nan() && d.run.timings["engine"] == 1234.5);
    assert_eq!(d.run.error, None);
    assert_eq!(d.series.len(), 2);
    assert_eq!(d.series[0].device_key, h100().key());
    assert_eq!(d.series[0].contract_key, format!("seed-parity@{}", contract.version));
    assert_eq!(d.measurements.len(), results.measurements.len());
    for (got, want) in d.measurements.iter().zip(&results.measurements) {
        assert_eq!(
            (&got.model, &got.reference, &got.prompt, &got.metric, &got.statistic),
            (&want.model, &want.reference, &want.prompt, &want.metric, &want.statistic)
        );
        assert!(same(got.value, want.value), "{}: {} vs {}", got.metric, got.value, want.value);
    }
    assert_eq!(d.layers.len(), 4);
    for (got, want) in d.layers.iter().zip(&results.layers) {
        assert_eq!((&got.capture, got.layer, &got.prompt), (&want.capture, want.layer, &want.prompt));
        assert!(same(got.rel_l2, want.rel_l2) && same(got.cosine, want.cosine));
    }
    let (verdicts, extra) = d.verdicts.split_at(results.verdicts.len());
    assert_eq!(verdicts, results.verdicts, "verdicts round-trip exactly");
    let [nan, missing] = extra else { panic!("{extra:?}") };
    assert_eq!((nan.gate_id.as_str(), nan.outcome), ("nan-observed", Outcome::Failed));
    assert!(nan.observed.unwrap().is_nan());
    assert_eq!((missing.gate_id.as_str(), missing.outcome, missing.observed), ("no-floor", Outcome::Missing, None));
    assert!(missing.threshold.is_nan());
    let failed: Vec<&StoredVerdict> = verdicts.iter().filter(|v| !v.passed).collect();
    let failed_ids: BTreeSet<&str> = failed.iter().map(|v| v.gate_id.as_str()).collect();
    assert_eq!(failed_ids, BTreeSet::from(["logits-cosine-vs-hf-fp16", "argmax-vs-llamacpp-top1"]));
    let cos = failed.iter().find(|v| v.gate_id == "logits-cosine-vs-hf-fp16").unwrap();
    assert_eq!((cos.observed, cos.threshold, cos.n_samples), (Some(0.98), 0.99, 3));
    assert_eq!((cos.contract.clone(), cos.severity, cos.outcome), (contract.clone(), Severity::Error, Outcome::Failed));

    // A finished run stays finished.
    let err = store.finish_run(id, &RunResults::errored("again")).await.unwrap_err();
    assert!(
        matches!(err, StoreError::InvalidTransition { from: RunStatus::Failed, to: RunStatus::Errored, .. }),
        "{err}"
    );
    let err = store.finish_run(paritybench::store::RunId(987_654), &RunResults::errored("x")).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "run", .. }), "{err}");
    let mut not_final = RunResults::errored("x");
    not_final.status = RunStatus::Running;
    assert!(matches!(store.finish_run(id, &not_final).await.unwrap_err(), StoreError::Invalid { .. }));
    assert_eq!(store.run_details(paritybench::store::RunId(987_654)).await.unwrap(), None);
}

async fn queued_runs_start_then_finish(store: Arc<dyn Store>) {
    let (engine, commit) = engine_and_commit(&*store, 3).await;
    let mut queued = new_run(engine, commit, cpu(), vec![]);
    queued.status = RunStatus::Queued;
    queued.trigger = Trigger::Webhook;
    let id = store.create_run(&queued).await.unwrap();
    let run = store.run(id).await.unwrap().unwrap();
    assert_eq!((run.status, run.started_at, run.trigger), (RunStatus::Queued, None, Trigger::Webhook));
    store.start_run(id).await.unwrap();
    assert_eq!(store.run(id).await.unwrap().unwrap().status, RunStatus::Running);
    let err = store.start_run(id).await.unwrap_err();
    assert!(
        matches!(err, StoreError::InvalidTransition { from: RunStatus::Running, to: RunStatus::Running, .. }),
        "{err}"
    );
    assert!(matches!(
        store.start_run(paritybench::store::RunId(55_555)).await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    let mut passed = RunResults::errored("unused");
    passed.status = RunStatus::Passed;
    passed.error = None;
    store.finish_run(id, &passed).await.unwrap();
    let run = store.run(id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Passed);
    assert!(run.started_at.unwrap() <= run.finished_at.unwrap());

    let mut bad = new_run(engine, commit, cpu(), vec![]);
    bad.status = RunStatus::Passed;
    assert!(matches!(store.create_run(&bad).await.unwrap_err(), StoreError::Invalid { .. }));
}

async fn errored_run_keeps_what_it_finished(store: Arc<dyn Store>) {
    let (engine, commit) = engine_and_commit(&*store, 9).await;
    let id = store.create_run(&new_run(engine, commit, cpu(), vec![seed_contract().reference()])).await.unwrap();
    let mut results = judged_results(vec![0.9999; 4]);
    results.status = RunStatus::Errored;
    results.error = Some("engine exited with signal 11 (SIGSEGV) after prompt 3 of 8".into());
    results.verdicts.clear();
    store.finish_run(id, &results).await.unwrap();
    let d = store.run_details(id).await.unwrap().unwrap();
    assert_eq!(d.run.status, RunStatus::Errored);
    assert_eq!(d.run.error, results.error);
    assert_eq!(d.measurements.len(), results.measurements.len(), "what finished is kept");
    assert_eq!(d.layers.len(), 4);
    // An errored run is a point of its series: the dashboard shows it.
    let latest = store.latest_per_series(None).await.unwrap();
    assert_eq!(latest.len(), 2);
    assert!(latest.iter().all(|l| l.latest.run_id == id && l.latest.status == RunStatus::Errored));
}

async fn finishing_is_all_or_nothing(store: Arc<dyn Store>) {
    let (engine, commit) = engine_and_commit(&*store, 5).await;
    let id = store.create_run(&new_run(engine, commit, cpu(), vec![seed_contract().reference()])).await.unwrap();
    let mut results = judged_results(vec![0.9999; 4]);
    // The last verdict is one the database refuses (comparisons are a closed set); by then
    // the series, measurements and layers were inserted.
    results.verdicts.last_mut().unwrap().comparison = "~=".into();
    let err = store.finish_run(id, &results).await.unwrap_err();
    assert!(matches!(err, StoreError::Query { doing: "finishing a run", .. }), "{err}");
    let d = store.run_details(id).await.unwrap().unwrap();
    assert_eq!(d.run.status, RunStatus::Running, "status untouched");
    assert!(
        d.series.is_empty() && d.measurements.is_empty() && d.layers.is_empty() && d.verdicts.is_empty(),
        "nothing half-written: {d:?}"
    );
    assert!(store.latest_per_series(None).await.unwrap().is_empty());
    // The same run can still be finished properly.
    let results = judged_results(vec![0.9999; 4]);
    store.finish_run(id, &results).await.unwrap();
    assert_eq!(store.run_details(id).await.unwrap().unwrap().verdicts.len(), results.verdicts.len());
}

async fn series_and_dashboard_reads(store: Arc<dyn Store>) {
    let e = store.upsert_engine("paritybench", None).await.unwrap();
    let v1 = seed_contract().reference();
    // The next version of the shipped contract: another series.
    let v2 = ContractRef { version: format!("{}.next", v1.version), ..v1.clone() };
    let mut commits = BTreeMap::new();
    // Commits recorded out of order: trends follow generation, not insertion.
    for g in [5, 1, 4, 2, 3] {
        let c = store
            .upsert_commit(e.id, &NewCommit { sha: sha(g), generation: g as i64, committed_at: None, title: None })
            .await
            .unwrap();
        commits.insert(g, c.id);
    }
    let run_at = |g: u32, device: DeviceFingerprint, contract: ContractRef, rel: f64, pass: bool| {
        let store = store.clone();
        let commit = commits[&g];
        async move {
            let id = store.create_run(&new_run(e.id, commit, device, vec![contract.clone()])).await.unwrap();
            let verdict = StoredVerdict {
                contract,
                gate_id: "rel".into(),
                metric: "logits.rel_l2".into(),
                reduction: "max".into(),
                comparison: "<=".into(),
                threshold: 1e-3,
                floor: None,
                observed: Some(rel),
                n_samples: 16,
                outcome: if pass { Outcome::Passed } else { Outcome::Failed },
                passed: pass,
                severity: Severity::Error,
                model: "qwen3-dense".into(),
                reference: "hf-f32".into(),
                prompt: None,
                dtype: Some("f32".into()),
                mode: None,
                detail: None,
            };
            let results = RunResults {
                status: if pass { RunStatus::Passed } else { RunStatus::Failed },
                error: None,
                timings: BTreeMap::new(),
                series: vec![subject("qwen3-dense", "hf-f32")],
                measurements: vec![
                    measurement("qwen3-dense", "hf-f32", "logits.rel_l2", "max", rel),
                    Measurement {
                        prompt: Some("p1".into()),
                        ..measurement("qwen3-dense", "hf-f32", "logits.rel_l2", "max", 99.0)
                    },
                ],
                layers: vec![],
                verdicts: vec![verdict],
            };
            store.finish_run(id, &results).await.unwrap();
            id
        }
    };
    let r5 = run_at(5, cpu(), v1.clone(), 5e-5, true).await;
    let r1 = run_at(1, cpu(), v1.clone(), 1e-5, true).await;
    let r4 = run_at(4, cpu(), v1.clone(), 4e-3, false).await;
    let r2 = run_at(2, cpu(), v1.clone(), 2e-5, true).await;
    let r3 = run_at(3, cpu(), v1.clone(), 3e-5, true).await;
    // A re-run of an old commit (a bisection step) is newer but not the latest state.
    let r2b = run_at(2, cpu(), v1.clone(), 2.5e-5, true).await;
    // Another device and another contract version are other series.
    let gpu = run_at(3, h100(), v1.clone(), 7e-6, true).await;
    let v2run = run_at(4, cpu(), v2.clone(), 4e-5, true).await;

    let latest = store.latest_per_series(Some("paritybench")).await.unwrap();
    assert_eq!(latest.len(), 3, "{latest:#?}");
    let cpu_v1 = latest
        .iter()
        .find(|l| l.series.device_key == cpu().key() && l.series.contract_key == format!("seed-parity@{}", v1.version))
        .unwrap();
    assert_eq!((cpu_v1.latest.run_id, cpu_v1.latest.generation, cpu_v1.latest.status), (r5, 5, RunStatus::Passed));
    assert_eq!(cpu_v1.latest.commit_sha, sha(5));
    assert_eq!(cpu_v1.series.model, "qwen3-dense");
    assert_eq!(cpu_v1.series.fixture_id, "fx-qwen3-dense-hf-f32-1");
    let gpu_s = latest.iter().find(|l| l.series.device_key == h100().key()).unwrap();
    assert_eq!(gpu_s.latest.run_id, gpu);
    let v2_s = latest.iter().find(|l| l.series.contract_key == format!("seed-parity@{}", v2.version)).unwrap();
    assert_eq!(v2_s.latest.run_id, v2run);
    assert!(store.latest_per_series(Some("llama.cpp")).await.unwrap().is_empty());
    assert_eq!(store.latest_per_series(None).await.unwrap().len(), 3);

    let series = cpu_v1.series.id;
    assert_eq!(store.series(series).await.unwrap().as_ref(), Some(&cpu_v1.series));
    let runs = store.series_runs(series, 100).await.unwrap();
    let order: Vec<(i64, paritybench::store::RunId)> = runs.iter().map(|r| (r.generation, r.run_id)).collect();
    assert_eq!(order, vec![(1, r1), (2, r2), (2, r2b), (3, r3), (4, r4), (5, r5)]);
    let failed: Vec<i64> = runs.iter().map(|r| r.failed_gates).collect();
    assert_eq!(failed, vec![0, 0, 0, 0, 1, 0]);
    let last3 = store.series_runs(series, 3).await.unwrap();
    assert_eq!(last3.iter().map(|r| r.run_id).collect::<Vec<_>>(), vec![r3, r4, r5]);

    let trend = store.series_trend(series, "logits.rel_l2", "max", 100).await.unwrap();
    let values: Vec<(i64, f64)> = trend.iter().map(|p| (p.generation, p.value)).collect();
    assert_eq!(
        values,
        vec![(1, 1e-5), (2, 2e-5), (2, 2.5e-5), (3, 3e-5), (4, 4e-3), (5, 5e-5)],
        "per-prompt rows excluded"
    );
    assert!(store.series_trend(series, "kld", "mean", 100).await.unwrap().is_empty());

    // Correcting a commit's generation moves its points.
    store
        .upsert_commit(e.id, &NewCommit { sha: sha(1), generation: 6, committed_at: None, title: None })
        .await
        .unwrap();
    let runs = store.series_runs(series, 100).await.unwrap();
    assert_eq!(runs.last().map(|r| (r.run_id, r.generation)), Some((r1, 6)));
    let latest = store.latest_per_series(None).await.unwrap();
    assert!(latest.iter().any(|l| l.latest.run_id == r1));
}

async fn job_queue_leases_and_attempts(store: Arc<dyn Store>) {
    let job = |kind: &str, priority: i64, dedupe: Option<&str>| NewJob {
        kind: kind.into(),
        payload: serde_json::json!({"commit": "abc", "priority": priority}),
        priority,
        max_attempts: 2,
        run_after: t(0),
        dedupe_key: dedupe.map(str::to_string),
        device_key: None,
    };
    let Enqueued::New(low) = store.enqueue_job(&job("run", 0, None), t(0)).await.unwrap() else { panic!() };
    let Enqueued::New(high) = store.enqueue_job(&job("run", 10, Some("delivery-1")), t(0)).await.unwrap() else {
        panic!()
    };
    assert_eq!(store.enqueue_job(&job("run", 10, Some("delivery-1")), t(1)).await.unwrap(), Enqueued::Duplicate(high));
    let Enqueued::New(bisect) = store.enqueue_job(&job("bisect", 99, None), t(0)).await.unwrap() else { panic!() };
    let mut later = job("run", 100, None);
    later.run_after = t(1000);
    let Enqueued::New(delayed) = store.enqueue_job(&later, t(0)).await.unwrap() else { panic!() };

    let lease = Duration::from_secs(60);
    let run_kind = vec!["run".to_string()];
    // Highest priority among due jobs of the asked kinds.
    let a = store.claim_job("w1", &run_kind, lease, t(10)).await.unwrap().unwrap();
    assert_eq!((a.id, a.kind.as_str(), a.attempt, a.max_attempts), (high, "run", 1, 2));
    assert_eq!(a.payload, serde_json::json!({"commit": "abc", "priority": 10}));
    assert_eq!(a.lease_expires_at, t(70));
    let b = store.claim_job("w2", &[], lease, t(10)).await.unwrap().unwrap();
    assert_eq!(b.id, bisect, "no kind filter: any kind");
    let c = store.claim_job("w2", &run_kind, lease, t(10)).await.unwrap().unwrap();
    assert_eq!(c.id, low);
    assert_eq!(store.claim_job("w3", &[], lease, t(10)).await.unwrap(), None, "the delayed job is not due");

    // Heartbeats extend; a wrong token is refused.
    assert!(store.heartbeat_job(a.id, &a.token, lease, t(50)).await.unwrap());
    assert!(!store.heartbeat_job(a.id, "not-the-token", lease, t(50)).await.unwrap());
    assert_eq!(store.job(a.id).await.unwrap().unwrap().lease_expires_at, Some(t(110)));

    // w2 dies holding `low`: after its lease expires another worker gets it (attempt 2), and
    // w2's token no longer works.
    assert!(store.complete_job(b.id, &b.token, t(20)).await.unwrap());
    let c2 = store.claim_job("w3", &run_kind, lease, t(71)).await.unwrap().unwrap();
    assert_eq!((c2.id, c2.attempt), (low, 2));
    assert_ne!(c2.token, c.token);
    assert!(!store.complete_job(c.id, &c.token, t(72)).await.unwrap());
    assert!(!store.heartbeat_job(c.id, &c.token, lease, t(72)).await.unwrap());
    // The last attempt fails: out of attempts, the job is dead with its error.
    assert!(store.fail_job(c2.id, &c2.token, "engine build failed", t(100), t(80)).await.unwrap());
    let dead = store.job(low).await.unwrap().unwrap();
    assert_eq!(
        (dead.status, dead.attempts, dead.last_error.as_deref()),
        (JobStatus::Dead, 2, Some("engine build failed"))
    );

    // A failure with attempts left returns the job to the queue at retry_at.
    assert!(store.fail_job(a.id, &a.token, "runner restarted", t(200), t(90)).await.unwrap());
    let queued = store.job(a.id).await.unwrap().unwrap();
    assert_eq!((queued.status, queued.attempts, queued.run_after), (JobStatus::Queued, 1, t(200)));
    assert_eq!(store.claim_job("w1", &run_kind, lease, t(150)).await.unwrap(), None);
    let a2 = store.claim_job("w1", &run_kind, lease, t(1001)).await.unwrap().unwrap();
    assert_eq!(a2.id, delayed, "priority 100 is due at 1000");
    let a3 = store.claim_job("w1", &run_kind, lease, t(1001)).await.unwrap().unwrap();
    assert_eq!((a3.id, a3.attempt), (high, 2));
    assert!(store.complete_job(a3.id, &a3.token, t(1002)).await.unwrap());
    assert!(!store.complete_job(a3.id, &a3.token, t(1003)).await.unwrap(), "done once");
    assert_eq!(store.job(high).await.unwrap().unwrap().status, JobStatus::Done);

    // w1 never finished `delayed` (attempt 1): its lease expired, so w9 gets attempt 2; when
    // that lease expires too, the job is out of attempts and dead.
    let lost = store.claim_job("w9", &[], Duration::from_secs(1), t(2000)).await.unwrap().unwrap();
    assert_eq!((lost.id, lost.attempt), (delayed, 2));
    assert_eq!(store.job(delayed).await.unwrap().unwrap().last_error.as_deref(), Some("lease expired (worker w1)"));
    assert_eq!(store.claim_job("w9", &[], Duration::from_secs(1), t(2002)).await.unwrap(), None);
    let j = store.job(delayed).await.unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Dead);
    assert_eq!(j.last_error.as_deref(), Some("lease expired (worker w9)"));
}

async fn concurrent_claims_never_share_a_job(store: Arc<dyn Store>) {
    const JOBS: usize = 40;
    for i in 0..JOBS {
        let job = NewJob {
            kind: "run".into(),
            payload: serde_json::json!({ "i": i }),
            priority: (i % 3) as i64,
            max_attempts: 3,
            run_after: t(0),
            dedupe_key: None,
            device_key: None,
        };
        store.enqueue_job(&job, t(0)).await.unwrap();
    }
    let mut workers = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(j) = store.claim_job(&format!("w{w}"), &[], Duration::from_secs(600), t(1)).await.unwrap() {
                assert!(store.complete_job(j.id, &j.token, t(2)).await.unwrap());
                mine.push(j.id);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let unique: BTreeSet<_> = all.iter().copied().collect();
    assert_eq!((all.len(), unique.len()), (JOBS, JOBS), "every job claimed exactly once");
}

// ------------------------------------------------------------------------- not per-backend

#[tokio::test]
async fn urls_pick_the_backend_and_reopen_migrated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/pb.db");
    let url = format!("sqlite://{}", path.display());
    let s = store::connect(&url).await.unwrap();
    assert_eq!(s.backend(), Backend::Sqlite);
    let e = s.upsert_engine("x", None).await.unwrap();
    drop(s);
    // A plain path opens the same file; migrations are not re-applied.
    let again = store::connect(path.to_str().unwrap()).await.unwrap();
    assert_eq!(again.engine_by_name("x").await.unwrap(), Some(e));
    let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&raw).await.unwrap();
    assert_eq!(mode, "wal");

    let mem = store::connect("sqlite::memory:").await.unwrap();
    assert!(mem.upsert_engine("m", None).await.is_ok());

    let err = store::connect("mysql://u:hunter2@h/db").await.unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedUrl { .. }));
    assert!(!err.to_string().contains("hunter2"), "{err}");
    if let Some(pg) = fresh_pg("backend_pick").await {
        assert_eq!(pg.backend(), Backend::Postgres);
    }
    let err = store::connect("postgres://u:hunter2@127.0.0.1:1/db").await.unwrap_err();
    assert!(matches!(err, StoreError::Connect { .. }));
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

// ------------------------------------------------------------------------- scale

/// The dashboard's reads on 100,000 runs must answer with p99 < 50 ms. Seeds the database
/// with SQL (100 series × 1,000 runs over 1,000 commits; 6 measurements and 3 verdicts per
/// run; 36 layer rows for the last 1,000 runs), then times each read 200 times.
/// `cargo test --test store -- --ignored dashboard_reads_at_scale --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "seeds 100,000 runs: run on demand"]
async fn dashboard_reads_at_scale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scale.db");
    let sqlite_url = format!("sqlite://{}", path.display());
    let sqlite = store::connect(&sqlite_url).await.unwrap();
    let raw = sqlx::SqlitePool::connect(&sqlite_url).await.unwrap();
    seed_at_scale(
        &*sqlite,
        |sql| {
            let raw = raw.clone();
            async move { sqlx::query(&sql).execute(&raw).await.map(|_| ()) }
        },
        "printf('%040x', i)",
    )
    .await;
    time_dashboard("sqlite", &*sqlite).await;
    if let Some((pg, url)) = fresh_pg_url("scale").await {
        let raw = sqlx::PgPool::connect(&url).await.unwrap();
        seed_at_scale(
            &*pg,
            |sql| {
                let raw = raw.clone();
                async move { sqlx::query(&sql).execute(&raw).await.map(|_| ()) }
            },
            "lpad(to_hex(i), 40, '0')",
        )
        .await;
        time_dashboard("postgres", &*pg).await;
    }
}

async fn seed_at_scale<F, Fut>(store: &dyn Store, exec: F, hex40: &str)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    let started = std::time::Instant::now();
    let e = store.upsert_engine("paritybench", None).await.unwrap();
    let n = |count: u32| format!("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) ");
    let engine = e.id.0;
    let statements = [
        format!("INSERT INTO commits (engine_id, sha, generation) {} SELECT {engine}, {hex40}, i FROM n", n(1000)),
        format!(
            "INSERT INTO series (engine_id, model, model_sha256, reference, device_key, fixture_id, contract_key, created_ms) {} \
             SELECT {engine}, 'model-' || (i % 10), 'sha-' || (i % 10), 'ref-' || ((i / 10) % 2), 'dev-' || (i / 20), 'fx', 'seed-parity@1', 0 FROM n",
            n(100)
        ),
        format!(
            "INSERT INTO runs (engine_id, commit_id, status, triggered_by, suite, device_kind, device_name, device_key, \
             fixture_ids, contracts, timings, created_ms, started_ms, finished_ms) {} \
             SELECT {engine}, (SELECT id FROM commits WHERE generation = ((i - 1) / 100) + 1), \
                    CASE WHEN i % 17 = 0 THEN 'failed' ELSE 'passed' END, 'nightly', 'bundled', 'cpu', 'cpu', 'dev-' || (i % 5), \
                    '[]', '[]', '{{}}', i, i, i FROM n",
            n(100_000)
        ),
        "INSERT INTO run_series (run_id, series_id, generation) \
         SELECT r.id, (r.id % 100) + 1, c.generation FROM runs r JOIN commits c ON c.id = r.commit_id".to_string(),
        "INSERT INTO measurements (run_id, series_id, model, reference, prompt, metric, statistic, value) \
         SELECT rs.run_id, rs.series_id, 'model', 'ref', p.prompt, m.metric, 'max', rs.run_id * 1e-9 \
         FROM run_series rs \
         CROSS JOIN (SELECT 'logits.rel_l2' AS metric UNION ALL SELECT 'kld' UNION ALL SELECT 'top1') m \
         CROSS JOIN (SELECT NULL AS prompt UNION ALL SELECT 'p0') p".to_string(),
        "INSERT INTO verdicts (run_id, series_id, contract_id, contract_version, contract_sha256, gate_id, metric, \
         reduction, comparison, threshold, observed, n_samples, outcome, passed, severity, model, reference) \
         SELECT rs.run_id, rs.series_id, 'seed-parity', '1', 'x', g.gate, 'logits.cosine', 'min', '>', 0.99, 0.995, 256, \
                CASE WHEN rs.run_id % 17 = 0 THEN 'failed' ELSE 'passed' END, rs.run_id % 17 <> 0, 'error', 'model', 'ref' \
         FROM run_series rs CROSS JOIN (SELECT 'a' AS gate UNION ALL SELECT 'b' UNION ALL SELECT 'c') g".to_string(),
        format!(
            "INSERT INTO layer_parity (run_id, series_id, model, reference, prompt, capture, layer, rel_l2, cosine) {} \
             SELECT 99000 + (i / 36) + 1, NULL, 'model', 'ref', NULL, 'layer_out', i % 36, 1e-5, 0.99999 FROM n",
            n(35_999)
        ),
        "ANALYZE".to_string(),
    ];
    for sql in statements {
        exec(sql.clone()).await.unwrap_or_else(|err| panic!("{err}\n{sql}"));
    }
    eprintln!("seeded 100,000 runs in {:.1} s", started.elapsed().as_secs_f64());
}

async fn time_dashboard(backend: &str, store: &dyn Store) {
    use paritybench::store::{RunId, SeriesId};
    const REPS: usize = 200;
    let latest = store.latest_per_series(None).await.unwrap();
    assert_eq!(latest.len(), 100);
    assert!(latest.iter().all(|l| l.latest.generation == 1000), "the newest commit is the latest state");
    assert_eq!(store.series_runs(SeriesId(7), 10_000).await.unwrap().len(), 1000);
    let details = store.run_details(RunId(99_500)).await.unwrap().unwrap();
    assert_eq!((details.measurements.len(), details.verdicts.len(), details.layers.len()), (6, 3, 36));

    let mut report = Vec::new();
    macro_rules! time {
        ($name:literal, $call:expr) => {{
            let mut ms = Vec::with_capacity(REPS);
            for i in 0..REPS {
                let t0 = std::time::Instant::now();
                let out = $call(i).await.unwrap();
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(out);
            }
            ms.sort_by(f64::total_cmp);
            let p50 = ms[REPS / 2];
            let p99 = ms[(REPS * 99) / 100 - 1];
            report.push(format!("{backend:>8} {:<28} p50 {p50:7.2} ms  p99 {p99:7.2} ms", $name));
            (p99, $name)
        }};
    }
    let results = [
        time!("latest_per_series (100)", |_| store.latest_per_series(None)),
        time!("series_runs (last 200)", |i: usize| store.series_runs(SeriesId(1 + (i as i64 % 100)), 200)),
        time!("series_trend (last 200)", |i: usize| store.series_trend(
            SeriesId(1 + (i as i64 % 100)),
            "kld",
            "max",
            200
        )),
        time!("run_details", |i: usize| store.run_details(RunId(99_001 + i as i64))),
        time!("recent_runs (50)", |_| store.recent_runs(50)),
    ];
    for line in &report {
        eprintln!("{line}");
    }
    for (p99, name) in results {
        assert!(p99 < 50.0, "{backend}: {name} p99 {p99:.2} ms >= 50 ms");
    }
}

/// Device matching, runs bound to a job attempt, the sweep that closes a lost attempt's
/// run, the refusal of a stale attempt's results, delivery de-duplication, and the lookup
/// that keeps a measurement from being repeated.
async fn job_attempts_own_their_runs(store: Arc<dyn Store>) {
    let (engine, commit) = engine_and_commit(store.as_ref(), 7).await;
    let lease = Duration::from_secs(10);
    let job = |dedupe: &str, device: Option<&str>| NewJob {
        kind: "run".into(),
        payload: serde_json::json!({}),
        priority: 0,
        max_attempts: 3,
        run_after: t(0),
        dedupe_key: Some(dedupe.to_string()),
        device_key: device.map(str::to_string),
    };
    // 1. a delivery is recorded with its jobs, once
    let first = store.accept_delivery("d-1", "pull_request", &[job("gpu", Some("cuda"))], t(0)).await.unwrap();
    let Some(&[Enqueued::New(gpu_job)]) = first.as_deref() else { panic!("{first:?}") };
    assert_eq!(store.accept_delivery("d-1", "pull_request", &[job("other", None)], t(1)).await.unwrap(), None);
    assert_eq!(store.job(gpu_job).await.unwrap().unwrap().device_key.as_deref(), Some("cuda"));

    // 2. a job for `cuda` is claimed by a GPU worker only
    assert_eq!(store.claim_job_for("cpu-box", &[], Some(&cpu().key()), lease, t(1)).await.unwrap(), None);
    let a = store.claim_job_for("gpu-box", &[], Some(&h100().key()), lease, t(1)).await.unwrap().unwrap();
    assert_eq!(a.id, gpu_job);

    // 3. its run is bound to the attempt; a lost lease closes the run, and the next
    // attempt's run refuses results once that attempt has failed
    let run = store.create_run(&new_run(engine, commit, h100(), vec![])).await.unwrap();
    assert!(!store.bind_run_to_attempt(run, a.id, "not-the-token").await.unwrap());
    assert!(store.bind_run_to_attempt(run, a.id, &a.token).await.unwrap());
    let b = store.claim_job_for("gpu-box-2", &[], Some(&h100().key()), lease, t(20)).await.unwrap().unwrap();
    assert_eq!((b.id, b.attempt), (gpu_job, 2));
    let closed = store.run(run).await.unwrap().unwrap();
    assert_eq!(closed.status, RunStatus::Errored);
    assert!(closed.error.as_deref().unwrap().contains("lost its lease"), "{:?}", closed.error);
    assert_eq!(closed.job_id, Some(gpu_job));
    let passed = RunResults { status: RunStatus::Passed, error: None, ..RunResults::errored("") };
    let e = store.finish_run(run, &passed).await.unwrap_err();
    assert!(matches!(e, StoreError::LeaseLost { run: r, job } if r == run && job == gpu_job), "{e}");
    let run2 = store.create_run(&new_run(engine, commit, h100(), vec![])).await.unwrap();
    assert!(store.bind_run_to_attempt(run2, b.id, &b.token).await.unwrap());
    assert!(store.fail_job(b.id, &b.token, "git fetch failed", t(30), t(21)).await.unwrap());
    let e = store.finish_run(run2, &passed).await.unwrap_err();
    assert!(matches!(e, StoreError::LeaseLost { run, job } if run == run2 && job == gpu_job), "{e}");
    assert!(!store.bind_run_to_attempt(run2, b.id, &b.token).await.unwrap(), "the failed attempt holds nothing");
    assert_eq!(store.run(run2).await.unwrap().unwrap().status, RunStatus::Running, "nothing was written");
    let c = store.claim_job_for("gpu-box", &[], Some(&h100().key()), lease, t(31)).await.unwrap().unwrap();
    let run3 = store.create_run(&new_run(engine, commit, h100(), vec![])).await.unwrap();
    assert!(store.bind_run_to_attempt(run3, c.id, &c.token).await.unwrap());
    store.finish_run(run3, &passed).await.unwrap();
    assert_eq!(store.job_runs(gpu_job).await.unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), [run, run2, run3]);

    // 4. what was measured is found by (engine, commit, suite, device)
    let sha7 = sha(7);
    assert_eq!(store.measured_run("paritybench", &sha7, "bundled", &h100().key()).await.unwrap(), Some(run3));
    assert_eq!(store.measured_run("paritybench", &sha7, "bundled", &cpu().key()).await.unwrap(), None);
    assert_eq!(store.measured_run("paritybench", &sha7, "other-suite", &h100().key()).await.unwrap(), None);
    assert_eq!(store.measured_run("paritybench", &sha(8), "bundled", &h100().key()).await.unwrap(), None);
}
