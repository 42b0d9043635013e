//! The README's first command, minus the one-time setup: `runner once --commit HEAD` on the
//! bundled suite with the fixtures of `$PARITYBENCH_CACHE` (built by `runner fixtures build`),
//! twice, on a fresh SQLite database. The run must pass every gate of the shipped contracts
//! against every suite model and every reference (the f32 checkpoints' gates against HF FP32
//! are checked on their own too, so that a failure there is named first), and the second run
//! must store bit-identical parity numbers (read back from the database).
//!
//! The engine is this build's own `runner` (the code at HEAD, built by cargo for this test)
//! instead of a second release build in a worktree, which `runner once` would otherwise do
//! with `cargo build --release` under the cache. It runs only in release builds (the debug
//! engine is ~30× slower): `cargo test --release --test once_quickstart`, as CI does.

use std::path::{Path, PathBuf};
use std::process::Command;

use paritybench::config::Config;
use paritybench::once::record::RunDetails;

/// The shared fixtures, or `None` (skipped, except under CI) when they were never built.
fn fixtures() -> Option<PathBuf> {
    let cache = std::env::var_os("PARITYBENCH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/paritybench")))?;
    let fixtures = cache.join("fixtures");
    if fixtures.join("refs/default/fixture.json").exists() {
        return Some(fixtures);
    }
    assert!(std::env::var_os("CI").is_none(), "CI is set but {} holds no fixtures", fixtures.display());
    eprintln!("no fixtures under {}: run `runner fixtures build` first; skipped", fixtures.display());
    None
}

struct Quickstart {
    tmp: tempfile::TempDir,
}

impl Quickstart {
    fn new(fixtures: &Path) -> Quickstart {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::os::unix::fs::symlink(fixtures, cache.join("fixtures")).unwrap();
        std::fs::write(
            tmp.path().join("runner.toml"),
            format!(
                "[engines.paritybench]\nbuild = \"true\"\nrun = \"{} engine run --request {{request}} --out {{out}}\"\n",
                env!("CARGO_BIN_EXE_runner")
            ),
        )
        .unwrap();
        Quickstart { tmp }
    }

    fn env(&self) -> [(&'static str, PathBuf); 2] {
        [("PARITYBENCH_CACHE", self.tmp.path().join("cache")), ("PARITYBENCH_DATA", self.tmp.path().join("data"))]
    }

    fn once(&self) -> (i32, serde_json::Value, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["once", "--commit", "HEAD", "--json", "--config"])
            .arg(self.tmp.path().join("runner.toml"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(self.env())
            .env_remove("PARITYBENCH_DB")
            .env_remove("PARITYBENCH_CONFIG")
            .env_remove("PARITYBENCH_CONTRACTS")
            .env_remove("PARITYBENCH_SUITE")
            .env_remove("PARITYBENCH_ENGINE")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let json = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\n{stderr}"));
        (out.status.code().unwrap_or(-1), json, stderr)
    }

    fn records(&self) -> Vec<RunDetails> {
        let env = self.env();
        let lookup = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.display().to_string());
        let cfg = Config::load_with(Some(&self.tmp.path().join("runner.toml")), lookup).unwrap();
        paritybench::once::open_recorder(&cfg, None).unwrap().runs().unwrap()
    }
}

/// Every parity number a run stored, keyed, as bits (speed numbers excluded).
fn parity_bits(r: &RunDetails) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = r
        .measurements
        .iter()
        .filter(|m| !paritybench::once::is_timing_metric(&m.metric))
        .map(|m| {
            let key = format!("{}/{}/{:?}/{}/{}", m.model, m.reference, m.prompt, m.metric, m.statistic);
            (key, m.value.to_bits())
        })
        .chain(r.layers.iter().flat_map(|l| {
            let key = format!("{}/{}/{}/{}", l.model, l.reference, l.capture, l.layer);
            [(format!("{key}/rel_l2"), l.rel_l2.to_bits()), (format!("{key}/cosine"), l.cosine.to_bits())]
        }))
        .chain(r.verdicts.iter().filter(|v| !paritybench::once::is_timing_metric(&v.metric)).map(|v| {
            let key = format!("{}/{}/{}/{}/{:?}", v.contract.id, v.gate_id, v.model, v.reference, v.mode);
            (key, v.observed.map_or(u64::MAX, f64::to_bits))
        }))
        .collect();
    v.sort();
    v
}

/// The error-severity gates that did not pass, one line each.
fn failed_gates(run: &serde_json::Value, keep: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
    run["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["passed"] != true && v["severity"] == "error" && keep(v))
        .map(|v| format!("{} {} {} {} observed {}", v["gate_id"], v["model"], v["reference"], v["mode"], v["observed"]))
        .collect()
}

/// Every suite model and every reference of the fixtures was compared in `run`.
fn assert_every_reference_compared(fixtures: &Path, run: &serde_json::Value) {
    let refs = fixtures.join("refs/default");
    let rows = run["rows"].as_array().unwrap();
    for model in std::fs::read_dir(&refs).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for r in std::fs::read_dir(model.path()).unwrap().flatten().filter(|e| e.path().join("manifest.json").exists())
        {
            let (m, id) = (model.file_name().into_string().unwrap(), r.file_name().into_string().unwrap());
            let seen = rows.iter().any(|row| {
                row["reference"] == id.as_str() && row["model"].as_str().is_some_and(|x| x.starts_with(m.as_str()))
            });
            assert!(seen, "{m} / {id} was not compared");
        }
    }
}

/// A gate on a checkpoint (not a GGUF file) against an HF FP32 reference.
fn f32_checkpoint_vs_fp32(fixtures: &Path, v: &serde_json::Value) -> bool {
    let (model, reference) = (v["model"].as_str().unwrap_or(""), v["reference"].as_str().unwrap_or(""));
    fixtures.join("models").join(model).join("config.json").exists() && reference.starts_with("hf-fp32")
}

#[test]
#[cfg_attr(debug_assertions, ignore = "the built-in engine in a debug build is too slow: run with --release")]
fn once_head_on_the_bundled_suite_passes_every_gate_and_repeats_bit_identically() {
    let Some(fixtures) = fixtures() else { return };
    let q = Quickstart::new(&fixtures);
    let (code, first, stderr) = q.once();
    assert!(code == 0 || code == 1, "exit {code}: the run could not be judged\n{stderr}");
    assert_every_reference_compared(&fixtures, &first);
    let strict = failed_gates(&first, |v| f32_checkpoint_vs_fp32(&fixtures, v));
    assert!(strict.is_empty(), "gates of the f32 checkpoints vs HF FP32 failed:\n{}", strict.join("\n"));
    let judged = first["verdicts"].as_array().unwrap().iter().filter(|v| f32_checkpoint_vs_fp32(&fixtures, v)).count();
    assert!(judged > 50, "only {judged} verdicts on the f32 checkpoints vs HF FP32");
    let failed = failed_gates(&first, |_| true);
    assert_eq!(
        (code, &first["status"]),
        (0, &serde_json::json!("passed")),
        "failed gates:\n{}\n{stderr}",
        failed.join("\n")
    );

    let (code2, second, _) = q.once();
    assert_eq!(code2, code, "{second}");
    let runs = q.records();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].run.status, runs[1].run.status);
    let (a, b) = (parity_bits(&runs[0]), parity_bits(&runs[1]));
    assert!(a.len() > 1000, "{} parity numbers stored", a.len());
    assert_eq!(a, b, "the second run of the same commit stored different parity numbers");
}
