//! `runner once` end to end with an engine that really computes: a temporary git repository
//! holds `tests/support/toy_engine.py` (a small residual model speaking the dump protocol)
//! in three commits — correct; subtly wrong (layer 2's output × 1.001); crashing
//! (SIGSEGV). The references are dumps of the correct engine laid out as
//! `runner fixtures build` lays them out (two of them, so the noise floor between them is
//! measured, here exactly 0), and the runs are judged by the contracts shipped in
//! `contracts/`. Checked on SQLite always, and on PostgreSQL when `PARITYBENCH_TEST_PG_URL`
//! is set (a fresh database per case).

use std::path::{Path, PathBuf};
use std::process::Command;

use paritybench::config::Config;
use paritybench::metrics::{self, NoiseFloors};
use paritybench::once::record::{self, RunDetails, RunStatus};
use paritybench::protocol::{Dump, Mode, ModelRef, Prompt, Request};

const ENGINE: &str = include_str!("support/toy_engine.py");
const BEHAVIOUR: &str = "SCALE_LAYER, SCALE = None, 1.0  # BEHAVIOUR";

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

/// A prompt whose ids are the toy tokenizer's (`ord(c) % 64`), so tokenizer parity holds.
fn prompt(id: &str, text: &str) -> Prompt {
    Prompt {
        id: id.into(),
        token_ids: text.chars().map(|c| (c as u32 % 64) as i32).collect(),
        text: Some(text.into()),
        chat: false,
        positions: None,
    }
}

struct World {
    tmp: tempfile::TempDir,
    /// `--db` (PostgreSQL), or `None` for the SQLite file in the data directory.
    db: Option<String>,
}

impl World {
    fn root(&self) -> &Path {
        self.tmp.path()
    }
    fn data(&self) -> PathBuf {
        self.root().join("data")
    }
    fn sha(&self, tag: &str) -> String {
        git(&self.root().join("engine"), &["rev-parse", &format!("{tag}^{{commit}}")])
    }

    /// `runner once --commit REV --json`: (exit code, stdout, stderr).
    fn once(&self, rev: &str) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["once", "--commit", rev, "--json", "--config"])
            .arg(self.root().join("runner.toml"))
            .args(self.db.iter().flat_map(|d| ["--db", d.as_str()]))
            .current_dir(self.root())
            .env("PARITYBENCH_CACHE", self.root().join("cache"))
            .env("PARITYBENCH_DATA", self.data())
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

    /// Every run in the database, read back through the recorder `runner once` uses.
    fn records(&self) -> Vec<RunDetails> {
        let (cache, data) = (self.root().join("cache"), self.data());
        let env = |k: &str| match k {
            "PARITYBENCH_CACHE" => Some(cache.display().to_string()),
            "PARITYBENCH_DATA" => Some(data.display().to_string()),
            _ => None,
        };
        let cfg = Config::load_with(Some(&self.root().join("runner.toml")), env).unwrap();
        paritybench::once::open_recorder(&cfg, self.db.as_deref()).unwrap().runs().unwrap()
    }
}

/// The engine repository (three commits, tagged), the references and floors under the
/// cache, and a configuration naming the toy engine and the shipped contracts.
fn world(db: Option<String>) -> World {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let repo = root.join("engine");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    assert!(ENGINE.contains(BEHAVIOUR), "toy_engine.py lost its BEHAVIOUR line");
    let crash = "import os, signal, sys\nprint('toy: segmentation fault in layer 2', file=sys.stderr, flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)\n";
    for (tag, source) in [
        ("correct", ENGINE.to_string()),
        ("scaled", ENGINE.replace(BEHAVIOUR, "SCALE_LAYER, SCALE = 2, 1.001  # BEHAVIOUR")),
        ("crash", ENGINE.replace("if __name__ == \"__main__\":", &format!("{crash}if __name__ == \"__main__\":"))),
    ] {
        std::fs::write(repo.join("engine.py"), source).unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", tag]);
        git(&repo, &["tag", tag]);
    }

    // references: the correct engine, twice (HF FP32 eager and SDPA stand-ins), as
    // `runner fixtures build` lays them out, with the noise floor measured between them
    let model_dir = root.join("cache/fixtures/refs/default/toy");
    std::fs::create_dir_all(model_dir.join("floors")).unwrap();
    let engine_py = root.join("toy_engine.py");
    std::fs::write(&engine_py, ENGINE).unwrap();
    let request = Request {
        schema: 1,
        model: ModelRef { path: root.join("toy-model"), sha256: Some("ab".repeat(32)), format: None, tokenizer: None },
        prompts: vec![prompt("greeting", "hello, world"), prompt("code", "fn main() { x += 1; }")],
        positions: Default::default(),
        captures: Default::default(),
        decode_steps: 32,
        mode: Mode::Prefill,
        device: "cpu".into(),
        dtype: Default::default(),
        warmup: 0,
        repeats: 1,
        options: Default::default(),
    };
    for id in ["hf-fp32-eager", "hf-fp32-sdpa"] {
        let req = model_dir.join(format!("{id}.request.json"));
        request.save(&req).unwrap();
        let out = Command::new("python3")
            .arg(&engine_py)
            .args(["run", "--request"])
            .arg(&req)
            .arg("--out")
            .arg(model_dir.join(id))
            .output()
            .unwrap();
        assert!(out.status.success(), "toy reference {id}: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::write(model_dir.parent().unwrap().join("fixture.json"), r#"{"fixture_id": "toy-fixture-1"}"#).unwrap();
    let (a, b) =
        (Dump::open(&model_dir.join("hf-fp32-sdpa")).unwrap(), Dump::open(&model_dir.join("hf-fp32-eager")).unwrap());
    let report = metrics::compare(&a, &b, &metrics::Options::default()).unwrap();
    NoiseFloors::from_report(&report, "toy: eager vs sdpa".into())
        .save(&model_dir.join("floors/fp32-eager-vs-sdpa.json"))
        .unwrap();

    let contracts = Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts");
    std::fs::write(
        root.join("runner.toml"),
        format!(
            "default_engine = \"toy\"\ncontracts = [\"{}\"]\n\n[engines.toy]\nrepo = \"engine\"\n\
             build = \"python3 -m py_compile engine.py\"\nrun = \"python3 engine.py run --request {{request}} --out {{out}}\"\n\
             timeout_s = 120\ndecode_steps = 32\n",
            contracts.display()
        ),
    )
    .unwrap();
    World { tmp, db }
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn gates(out: &serde_json::Value, passed: bool) -> Vec<String> {
    let mut v: Vec<String> = out["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["passed"] == passed)
        .map(|v| format!("{}/{}", v["contract"]["id"].as_str().unwrap(), v["gate_id"].as_str().unwrap()))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn correct_scaled_crash(w: &World) {
    // 1. correct: every gate of the shipped contracts that applies passes, in both modes
    let (code, stdout, stderr) = w.once("correct");
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let out = json(&stdout);
    assert_eq!(out["status"], "passed");
    assert_eq!(out["commit"], w.sha("correct"));
    let passed = gates(&out, true);
    for g in [
        "builtin-strict/f32-logits-rel-l2",
        "builtin-strict/f32-layer-rel-l2",
        "builtin-strict/f32-top1-margin-aware",
        "builtin-strict/f32-kld",
        "builtin-strict/f32-greedy",
        "builtin-strict/tokenizer-parity",
        "builtin-strict/capture-count-parity",
        "seed-parity/layer-count-parity",
    ] {
        assert!(passed.contains(&g.to_string()), "{g} was not judged: {passed:?}");
    }
    assert!(gates(&out, false).is_empty(), "{stdout}");
    for r in out["rows"].as_array().unwrap() {
        assert_eq!(r["floor"], "fp32-eager-vs-sdpa", "{r}");
        assert!(r["first_divergent"].is_null(), "{r}");
    }

    // 2. layer 2 × 1.001: the relative-L2 gates fail, cosine does not see it, and the first
    // divergent layer is named
    let (code, stdout, stderr) = w.once("scaled");
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let out = json(&stdout);
    assert_eq!(out["status"], "failed");
    let failed = gates(&out, false);
    assert!(failed.contains(&"builtin-strict/f32-logits-rel-l2".to_string()), "{failed:?}");
    assert!(failed.contains(&"builtin-strict/f32-layer-rel-l2".to_string()), "{failed:?}");
    for r in out["rows"].as_array().unwrap() {
        assert_eq!(r["first_divergent"], "hidden.layer_out.2", "{r}");
        assert!(r["cosine_min"].as_f64().unwrap() > 0.9999, "a scale error barely moves cosine: {r}");
        assert!(r["rel_l2_max"].as_f64().unwrap() > 1e-4, "{r}");
    }
    let rel_l2 = |out: &serde_json::Value, gate: &str| -> f64 {
        out["verdicts"].as_array().unwrap().iter().find(|v| v["gate_id"] == gate).unwrap()["observed"].as_f64().unwrap()
    };
    let layer = rel_l2(&out, "f32-layer-rel-l2");
    assert!((0.9e-3..1.1e-3).contains(&layer), "layer rel-L2 {layer}: the scale shows at its own size");
    let before = w.records();
    assert_eq!(before.len(), 2);
    let stored = &before[1];
    let l2 = stored
        .layers
        .iter()
        .find(|l| l.capture == "layer_out" && l.layer == 2 && l.reference == "hf-fp32-eager")
        .unwrap();
    assert!((0.9e-3..1.1e-3).contains(&l2.rel_l2), "{l2:?}");
    let early = stored.layers.iter().filter(|l| l.layer < 2 && l.capture != "final_norm");
    assert!(early.clone().count() > 0 && early.into_iter().all(|l| l.rel_l2 == 0.0), "layers before 2 are exact");

    // 3. crash: recorded as errored with its stderr; nothing else changed or half-written
    let (code, stdout, stderr) = w.once("crash");
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("SIGSEGV") && stderr.contains("segmentation fault in layer 2"), "{stderr}");
    assert_eq!(json(&stdout)["status"], "errored");
    let after = w.records();
    assert_eq!(after.len(), 3);
    let crash = &after[2];
    assert_eq!(crash.run.status, RunStatus::Errored);
    assert_eq!(crash.run.commit_sha.as_str(), w.sha("crash"));
    let error = crash.run.error.as_deref().unwrap();
    assert!(error.contains("toy: segmentation fault in layer 2"), "{error}");
    assert!(crash.measurements.is_empty() && crash.layers.is_empty() && crash.verdicts.is_empty());
    let dir = w.data().join("runs").join(crash.run.id.to_string());
    let log = dir.join(record::run_logs(&dir).into_iter().find(|l| l.ends_with("engine.stderr")).unwrap());
    assert!(std::fs::read_to_string(log).unwrap().contains("segmentation fault"));
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(serde_json::to_string(a).unwrap(), serde_json::to_string(b).unwrap(), "run {} changed", a.run.id);
    }
}

#[test]
fn correct_scaled_and_crashing_commits_sqlite() {
    correct_scaled_crash(&world(None));
}

#[test]
fn correct_scaled_and_crashing_commits_postgres() {
    let Some(url) = fresh_pg("once_e2e") else {
        assert!(std::env::var_os("CI").is_none(), "CI is set but PARITYBENCH_TEST_PG_URL is not");
        eprintln!("PARITYBENCH_TEST_PG_URL is not set: PostgreSQL half skipped");
        return;
    };
    correct_scaled_crash(&world(Some(url)));
}

/// A fresh database `pbtest_<case>` on the test server (dropped first if a previous run left it).
fn fresh_pg(case: &str) -> Option<String> {
    let base = std::env::var("PARITYBENCH_TEST_PG_URL").ok().filter(|u| !u.is_empty())?;
    let db = format!("pbtest_{case}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let admin = sqlx::PgPool::connect(&base).await.expect("connect to the test server");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {db}")).execute(&admin).await.unwrap();
        admin.close().await;
    });
    let (head, query) = base.split_once('?').map_or((base.as_str(), None), |(h, q)| (h, Some(q)));
    let (server, _) = head.rsplit_once('/').expect("a postgres://host/db URL");
    Some(match query {
        Some(q) => format!("{server}/{db}?{q}"),
        None => format!("{server}/{db}"),
    })
}
