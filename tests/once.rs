//! `runner once` on bad input and half-finished engines: a real git repository holding a
//! command-template engine that replays stored dumps (subtly wrong, hanging, printing NaN,
//! dying half-way) and bad revisions and contracts. The real `runner` binary builds and runs
//! each commit and records the run under a temporary data directory. The three-commit test
//! with an engine that really computes is `tests/once_e2e.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use paritybench::config::Config;
use paritybench::once::record::{RunDetails, RunStatus};
use paritybench::protocol::{
    CapturePoint, CaptureRecord, DumpWriter, EngineInfo, Manifest, Mode, ModelInfo, ModelRef, Prompt, PromptShard,
    Request, Tensor, Timings, TokenizerInfo,
};

const V: usize = 64; // vocabulary
const H: usize = 16; // hidden size
const LAYERS: u32 = 4;
const WRONG_LAYER: u32 = 2;
/// The toy engine's timings of every prompt: three timed repeats.
const PREFILL_MS: [f64; 3] = [2.0, 4.0, 2.5];
const DECODE_MS: [f64; 3] = [3.0, 6.0, 2.0];
const TTFT_MS: [f64; 3] = [2.5, 4.5, 3.0];
const DECODE_TOKENS: u32 = 3;

/// What the engine at a commit does.
#[derive(Clone, Copy)]
enum Behaviour {
    Correct,
    /// `layer_out` of WRONG_LAYER and everything after it scaled by 1.001.
    Scaled,
    Crash,
    Hang,
    Nan,
    /// Finishes the first prompt, then dies (exit 3) with the dump left incomplete.
    Partial,
}

fn prompts() -> Vec<Prompt> {
    vec![
        Prompt { id: "alpha".into(), token_ids: vec![3, 14, 15, 9, 26], text: None, chat: false, positions: None },
        Prompt { id: "beta".into(), token_ids: vec![5, 35, 8, 9, 7, 9, 32], text: None, chat: false, positions: None },
    ]
}

/// Deterministic values in [-1, 1).
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

fn manifest(ids: Vec<String>) -> Manifest {
    Manifest {
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
        tokenizer: TokenizerInfo::default(),
        mode: Mode::Prefill,
        request_sha256: "0".repeat(64),
        prompt_ids: ids,
        prompts: Vec::new(),
        captures: CaptureRecord::default(),
        load_ms: None,
        peak_rss_bytes: None,
        peak_gpu_bytes: None,
        command: Vec::new(),
        created_utc: "2026-01-01T00:00:00Z".into(),
        error: None,
        extra: serde_json::Map::new(),
    }
}

/// A dump of the toy model: logits and every per-layer capture, `behaviour` applied.
fn write_dump(dir: &Path, behaviour: Behaviour) {
    let ps = prompts();
    let mut w = DumpWriter::create(dir, manifest(ps.iter().map(|p| p.id.clone()).collect())).unwrap();
    for (i, p) in ps.iter().enumerate() {
        if matches!(behaviour, Behaviour::Partial) && i == 1 {
            w.fail("out of memory on prompt beta".into()).unwrap();
            return;
        }
        let n = p.token_ids.len();
        let seed = 1000 * (i as u64 + 1);
        let scale = |layer: Option<u32>| match (behaviour, layer) {
            (Behaviour::Scaled, Some(l)) if l >= WRONG_LAYER => 1.001f32,
            (Behaviour::Scaled, None) => 1.001,
            _ => 1.0,
        };
        let mut logits = values(seed, n * V);
        for x in &mut logits {
            *x *= 8.0 * scale(None);
        }
        if matches!(behaviour, Behaviour::Nan) {
            logits[V + 3] = f32::NAN;
        }
        let mut shard = PromptShard {
            index: i as u32,
            id: p.id.clone(),
            token_ids: p.token_ids.clone(),
            positions: (0..n as i32).collect(),
            logits: Some(Tensor::f32(vec![n, V], logits)),
            generated: vec![1, 2, 3],
            timings: Timings {
                prefill_ms: PREFILL_MS.to_vec(),
                decode_ms: DECODE_MS.to_vec(),
                prefill_tokens: n as u32,
                decode_tokens: DECODE_TOKENS,
                ttft_ms: TTFT_MS.to_vec(),
            },
            ..Default::default()
        };
        shard.capture(CapturePoint::Embed, 0, Tensor::f32(vec![n, H], values(seed + 1, n * H)));
        for l in 0..LAYERS {
            for (k, c) in [CapturePoint::AttnOut, CapturePoint::FfnOut].into_iter().enumerate() {
                shard.capture(c, l, Tensor::f32(vec![n, H], values(seed + 10 * u64::from(l) + k as u64 + 2, n * H)));
            }
            let s = scale(Some(l));
            let out: Vec<f32> = values(seed + 10 * u64::from(l) + 5, n * H).into_iter().map(|x| x * s).collect();
            shard.capture(CapturePoint::LayerOut, l, Tensor::f32(vec![n, H], out));
        }
        w.write_prompt(shard).unwrap();
    }
    w.finish().unwrap();
}

struct World {
    tmp: tempfile::TempDir,
    /// commit name -> sha
    commits: Vec<(&'static str, String)>,
}

impl World {
    fn root(&self) -> &Path {
        self.tmp.path()
    }
    fn sha(&self, name: &str) -> &str {
        &self.commits.iter().find(|(n, _)| *n == name).unwrap().1
    }
    fn data(&self) -> PathBuf {
        self.root().join("data")
    }
    /// Every recorded run, read back through the recorder `runner once` uses.
    fn records(&self) -> Vec<RunDetails> {
        let (cache, data) = (self.root().join("cache"), self.data());
        let env = |k: &str| match k {
            "PARITYBENCH_CACHE" => Some(cache.display().to_string()),
            "PARITYBENCH_DATA" => Some(data.display().to_string()),
            _ => None,
        };
        let cfg = Config::load_with(Some(&self.root().join("runner.toml")), env).unwrap();
        paritybench::once::open_recorder(&cfg, None).unwrap().runs().unwrap()
    }

    /// `runner once --commit REV --json` with this world's config; (exit code, stdout, stderr).
    fn once(&self, rev: &str, extra: &[&str]) -> (i32, String, String) {
        self.once_as(rev, true, extra)
    }

    fn once_as(&self, rev: &str, json: bool, extra: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["once", "--commit", rev])
            .args(json.then_some("--json"))
            .arg("--config")
            .arg(self.root().join("runner.toml"))
            .args(extra)
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

const CONTRACT: &str = r#"
id: toy-parity
version: 1
gates:
  - id: cosine
    metric: logits.cosine
    reduction: min
    comparison: ">"
    value: 0.9999
  - id: rel-l2
    metric: logits.rel_l2
    reduction: max
    comparison: "<"
    value: 1.0e-4
  - id: layer-rel-l2
    metric: layer.rel_l2
    reduction: max
    comparison: "<"
    value: 1.0e-4
  - id: top1
    metric: top1
    reduction: all
    comparison: "=="
    value: 1
"#;

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // the reference, laid out as `runner fixtures build` lays it out
    let model_dir = root.join("cache/fixtures/refs/default/toy");
    // two references of the engine's kind, so the noise floor of the pair is measured
    write_dump(&model_dir.join("hf-fp32-eager"), Behaviour::Correct);
    write_dump(&model_dir.join("hf-fp32-sdpa"), Behaviour::Correct);
    let request = Request {
        schema: 1,
        model: ModelRef { path: root.join("toy-model"), sha256: Some("ab".repeat(32)), format: None, tokenizer: None },
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
    for id in ["hf-fp32-eager", "hf-fp32-sdpa"] {
        request.save(&model_dir.join(format!("{id}.request.json"))).unwrap();
        std::fs::write(model_dir.join(format!("{id}/fixture.json")), format!(r#"{{"fixture_id": "toy-{id}-1"}}"#))
            .unwrap();
    }
    std::fs::create_dir_all(model_dir.join("floors")).unwrap();
    let floors = format!(
        r#"{{"description": "toy", "references": ["{}", "{}"], "logits": 1e-7, "captures": {{"layer_out": {{{}}}}}}}"#,
        model_dir.join("hf-fp32-sdpa").display(),
        model_dir.join("hf-fp32-eager").display(),
        (0..LAYERS).map(|l| format!("\"{l}\": 1e-7")).collect::<Vec<_>>().join(", ")
    );
    std::fs::write(model_dir.join("floors/fp32-eager-vs-sdpa.json"), floors).unwrap();

    // the engine's outputs, one per behaviour that writes a dump
    for (name, b) in [
        ("correct", Behaviour::Correct),
        ("scaled", Behaviour::Scaled),
        ("nan", Behaviour::Nan),
        ("partial", Behaviour::Partial),
    ] {
        write_dump(&root.join("dumps").join(name), b);
    }

    // the engine's repository: one commit per behaviour
    let repo = root.join("engine");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let mut commits = Vec::new();
    for (name, b) in [
        ("correct", Behaviour::Correct),
        ("scaled", Behaviour::Scaled),
        ("crash", Behaviour::Crash),
        ("hang", Behaviour::Hang),
        ("nan", Behaviour::Nan),
        ("partial", Behaviour::Partial),
    ] {
        let body = match b {
            Behaviour::Correct | Behaviour::Scaled | Behaviour::Nan => {
                format!(
                    "test -f \"$1\" || exit 2\nmkdir -p \"$2\" && cp -R \"$TOY_DUMPS/{name}/.\" \"$2\"\necho wrote \"$2\"\n"
                )
            }
            Behaviour::Crash => "echo 'toy: segmentation fault in layer 2' >&2\nkill -SEGV $$\n".to_string(),
            Behaviour::Hang => "echo 'toy: waiting forever' >&2\nsleep 60\n".to_string(),
            Behaviour::Partial => format!(
                "mkdir -p \"$2\" && cp -R \"$TOY_DUMPS/{name}/.\" \"$2\"\necho 'toy: out of memory on prompt beta' >&2\nexit 3\n"
            ),
        };
        std::fs::write(repo.join("engine.sh"), format!("#!/bin/sh\n# toy engine: {name}\n{body}")).unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", name]);
        git(&repo, &["tag", name]);
        commits.push((name, git(&repo, &["rev-parse", "HEAD"])));
    }

    std::fs::write(root.join("contract.yaml"), CONTRACT).unwrap();
    std::fs::write(
        root.join("runner.toml"),
        format!(
            "default_engine = \"toy\"\ncontracts = [\"contract.yaml\"]\n\n[engines.toy]\nrepo = \"engine\"\nbuild = \"test -f engine.sh\"\nrun = \"sh engine.sh {{request}} {{out}}\"\ntimeout_s = 3\n[engines.toy.env]\nTOY_DUMPS = \"{}\"\n",
            root.join("dumps").display()
        ),
    )
    .unwrap();
    World { tmp, commits }
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn verdict<'a>(out: &'a serde_json::Value, gate: &str) -> Vec<&'a serde_json::Value> {
    out["verdicts"].as_array().unwrap().iter().filter(|v| v["gate_id"] == gate).collect()
}

#[test]
fn the_same_commit_twice_stores_bit_identical_parity_numbers() {
    let w = world();
    assert_eq!(w.once("scaled", &[]).0, 1);
    // the worktree under the cache is reused; the table names the failed gates and layer
    let (code, table, _) = w.once_as(w.sha("scaled"), false, &[]);
    assert_eq!(code, 1, "{table}");
    assert!(table.contains("hidden.layer_out.2") && table.contains("FAILED  toy-parity/rel-l2"), "{table}");
    assert!(table.contains("PASSED  toy-parity/cosine") && table.contains("status: failed"), "{table}");
    println!("{table}");
    let r = w.records();
    assert_eq!(r.len(), 2);
    let (a, b) = (&r[0], &r[1]);
    assert!(!a.measurements.is_empty() && !a.layers.is_empty());
    let parity = |m: &paritybench::once::record::Measurement| !paritybench::once::is_timing_metric(&m.metric);
    let bits = |x: &RunDetails| -> Vec<(String, u64)> {
        x.measurements
            .iter()
            .filter(|m| parity(m))
            .map(|m| {
                (format!("{}/{}/{:?}/{}/{}", m.model, m.reference, m.prompt, m.metric, m.statistic), m.value.to_bits())
            })
            .chain(x.layers.iter().map(|l| {
                (
                    format!("{}/{}/{}", l.reference, l.capture, l.layer),
                    l.rel_l2.to_bits() ^ l.cosine.to_bits().rotate_left(1),
                )
            }))
            .chain(x.verdicts.iter().map(|v| (format!("{}/{:?}", v.gate_id, v.mode), v.observed.unwrap().to_bits())))
            .collect()
    };
    assert_eq!(bits(a), bits(b));
}

#[test]
fn timings_are_stored_per_prompt_and_pooled() {
    let w = world();
    let (code, stdout, stderr) = w.once("correct", &[]);
    assert_eq!(code, 0, "{stdout} {stderr}");
    let r = w.records();
    let m = &r[0].measurements;
    let get = |reference: &str, prompt: Option<&str>, metric: &str, stat: &str| -> Vec<f64> {
        m.iter()
            .filter(|x| {
                x.reference == reference && x.prompt.as_deref() == prompt && x.metric == metric && x.statistic == stat
            })
            .map(|x| x.value)
            .collect()
    };
    // per prompt: tokens over the median / slowest / fastest repeat; time to first token in ms
    let sorted = |ms: [f64; 3]| {
        let mut v = ms;
        v.sort_by(f64::total_cmp);
        v
    };
    let (pre, dec, ttft) = (sorted(PREFILL_MS), sorted(DECODE_MS), sorted(TTFT_MS));
    let rate = |tokens: usize, ms: f64| tokens as f64 / (ms / 1000.0);
    let tokens = |id: &str| prompts().iter().find(|p| p.id == id).unwrap().token_ids.len();
    for reference in ["hf-fp32-eager", "hf-fp32-sdpa", "hf-fp32-eager/incremental"] {
        for id in ["alpha", "beta"] {
            let p = Some(id);
            let n = tokens(id);
            assert_eq!(get(reference, p, "prefill_tok_s", "median"), [rate(n, pre[1])], "{reference} {id}");
            assert_eq!(get(reference, p, "prefill_tok_s", "min"), [rate(n, pre[2])]);
            assert_eq!(get(reference, p, "prefill_tok_s", "max"), [rate(n, pre[0])]);
            assert_eq!(get(reference, p, "decode_tok_s", "median"), [rate(DECODE_TOKENS as usize, dec[1])]);
            assert_eq!(get(reference, p, "decode_tok_s", "min"), [rate(DECODE_TOKENS as usize, dec[2])]);
            assert_eq!(get(reference, p, "decode_tok_s", "max"), [rate(DECODE_TOKENS as usize, dec[0])]);
            assert_eq!(get(reference, p, "ttft_ms", "median"), [ttft[1]]);
            assert_eq!(get(reference, p, "ttft_ms", "min"), [ttft[0]]);
            assert_eq!(get(reference, p, "ttft_ms", "max"), [ttft[2]]);
        }
        // pooled (what the trend charts and their tok/s band read): the lower median of the
        // prompts' medians, the slowest and the fastest repeat of any prompt
        let (a, b) = (tokens("alpha"), tokens("beta"));
        assert!(a < b);
        assert_eq!(get(reference, None, "prefill_tok_s", "median"), [rate(a, pre[1])]);
        assert_eq!(get(reference, None, "prefill_tok_s", "min"), [rate(a, pre[2])]);
        assert_eq!(get(reference, None, "prefill_tok_s", "max"), [rate(b, pre[0])]);
        assert_eq!(get(reference, None, "decode_tok_s", "median"), [rate(DECODE_TOKENS as usize, dec[1])]);
        assert_eq!(get(reference, None, "decode_tok_s", "min"), [rate(DECODE_TOKENS as usize, dec[2])]);
        assert_eq!(get(reference, None, "decode_tok_s", "max"), [rate(DECODE_TOKENS as usize, dec[0])]);
        assert_eq!(get(reference, None, "ttft_ms", "median"), [ttft[1]]);
        assert_eq!(get(reference, None, "ttft_ms", "min"), [ttft[0]]);
        assert_eq!(get(reference, None, "ttft_ms", "max"), [ttft[2]]);
    }
}

#[test]
fn bad_revisions_are_clear_errors_and_record_nothing() {
    let w = world();
    let repo = w.root().join("engine");
    let tree = git(&repo, &["rev-parse", "HEAD^{tree}"]);
    let blob = git(&repo, &["rev-parse", "HEAD:engine.sh"]);
    for (rev, want) in
        [("no-such-branch", "no such revision"), (tree.as_str(), "it is a tree"), (blob.as_str(), "it is a blob")]
    {
        let (code, stdout, stderr) = w.once(rev, &[]);
        assert_eq!(code, 2, "{rev}: {stdout} {stderr}");
        assert!(
            stderr.contains(rev) && stderr.contains("does not name a commit") && stderr.contains(want),
            "{rev}: {stderr}"
        );
    }
    assert!(w.records().is_empty());
}

#[test]
fn a_hanging_engine_is_killed_and_recorded() {
    let w = world();
    let (code, stdout, stderr) = w.once("hang", &[]);
    assert_eq!(code, 2, "{stdout} {stderr}");
    assert!(stderr.contains("timed out") && stderr.contains("waiting forever"), "{stderr}");
    let r = w.records();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].run.status, RunStatus::Errored);
    assert!(r[0].run.error.as_deref().unwrap().contains("timed out"));
}

#[test]
fn nan_fails_every_gate_it_touches() {
    let w = world();
    let (code, stdout, stderr) = w.once("nan", &[]);
    assert_eq!(code, 1, "{stdout} {stderr}");
    let out = json(&stdout);
    assert_eq!(out["status"], "failed");
    for gate in ["cosine", "rel-l2"] {
        for v in verdict(&out, gate) {
            assert_eq!(v["outcome"], "failed", "{v}");
            assert!(v["detail"].as_str().unwrap().contains("NaN"), "{v}");
        }
    }
    let r = w.records();
    assert_eq!(r.len(), 1);
    // one NaN logit in each of the two prompts, counted against both references in both modes
    let m = &r[0].measurements;
    let nonfinite: Vec<f64> =
        m.iter().filter(|m| m.metric == "nonfinite" && m.prompt.is_none()).map(|m| m.value).collect();
    assert_eq!(nonfinite, [2.0; 4]);
    let alpha = m.iter().find(|m| m.metric == "nonfinite" && m.prompt.as_deref() == Some("alpha")).unwrap();
    assert_eq!(alpha.value, 1.0);
}

#[test]
fn a_contract_typo_is_named_before_anything_runs() {
    let w = world();
    std::fs::write(w.root().join("contract.yaml"), CONTRACT.replace("metric: logits.rel_l2", "metric: logits.rel_l3"))
        .unwrap();
    let (code, stdout, stderr) = w.once("correct", &[]);
    assert_eq!(code, 2, "{stdout} {stderr}");
    assert!(
        stderr.contains("contract.yaml")
            && stderr.contains("`logits.rel_l3`")
            && stderr.contains("did you mean `logits.rel_l2`"),
        "{stderr}"
    );
    assert!(w.records().is_empty());
}

#[test]
fn a_runner_killed_mid_run_is_recorded_by_the_next_one() {
    use std::os::unix::process::CommandExt;
    let w = world();
    // the hanging engine, with a time limit the kill comes well before
    let config = w.root().join("runner-patient.toml");
    let toml =
        std::fs::read_to_string(w.root().join("runner.toml")).unwrap().replace("timeout_s = 3", "timeout_s = 120");
    std::fs::write(&config, toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["once", "--commit", "hang", "--json", "--config"])
        .arg(&config)
        .current_dir(w.root())
        .env("PARITYBENCH_CACHE", w.root().join("cache"))
        .env("PARITYBENCH_DATA", w.data())
        .env_remove("PARITYBENCH_DB")
        .env_remove("PARITYBENCH_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // the run's files appear once it is recorded (the engine is hanging by then)
    while std::fs::read_dir(w.data().join("runs")).map(|mut d| d.next().is_none()).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline, "the run was never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SIGKILL the runner and the engine it started (its process group), as a time limit does
    // SAFETY: a plain kill(2) of the child's process group.
    assert_eq!(unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) }, 0);
    child.wait().unwrap();
    let running = w.records().remove(0);
    assert_eq!(running.run.status, RunStatus::Running, "nobody finished it: the runner died");

    // the next run on this host finds it, finishes it as errored, and runs as usual
    let (code, stdout, stderr) = w.once("correct", &[]);
    assert_eq!(code, 0, "{stdout} {stderr}");
    let note = format!("note: run {} was left running by pid {}, which is gone", running.run.id.0, child.id());
    assert!(stderr.contains(&note), "{stderr}");
    let r = w.records();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].run.status, RunStatus::Errored);
    let error = r[0].run.error.as_deref().unwrap();
    assert!(error.starts_with("abandoned:") && error.contains(&format!("pid {}", child.id())), "{error}");
    assert!(r[0].run.finished_at.is_some());
    assert_eq!(r[1].run.status, RunStatus::Passed);
    // a third run finds nothing to finish (the second one's owner is gone too, but it finished)
    let (code, _, stderr) = w.once("correct", &[]);
    assert_eq!(code, 0);
    assert!(!stderr.contains("was left running"), "{stderr}");
}

#[test]
fn an_engine_that_dies_half_way_keeps_what_it_finished() {
    let w = world();
    let (code, stdout, stderr) = w.once("partial", &[]);
    assert_eq!(code, 2, "{stdout} {stderr}");
    assert!(stderr.contains("exited with status 3") && stderr.contains("out of memory on prompt beta"), "{stderr}");
    let out = json(&stdout);
    assert_eq!(out["status"], "errored");
    // the finished prompt was compared and judged; the other is not invented
    let prompts: Vec<&str> = out["rows"].as_array().unwrap().iter().map(|r| r["prompt"].as_str().unwrap()).collect();
    assert_eq!(prompts, ["alpha"; 4], "2 references × 2 modes");
    let r = w.records();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].run.status, RunStatus::Errored);
    let res = &r[0];
    assert!(res.measurements.iter().any(|m| m.prompt.as_deref() == Some("alpha") && m.metric == "logits.rel_l2"));
    assert!(res.measurements.iter().all(|m| m.prompt.as_deref() != Some("beta")));
    assert!(!res.verdicts.is_empty() && res.verdicts.iter().all(|v| v.passed), "{:?}", res.verdicts);
}
