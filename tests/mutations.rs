//! The gates catch bugs: each test injects one realistic bug into the built-in engine
//! (`src/engine/mutation.rs`, feature `mutation-testing`, chosen by `PARITYBENCH_MUTATION`),
//! runs the real `runner engine run` on a seeded model of the bundled suite, compares the dump
//! with the stored HF transformers FP32 reference (the real metrics, with the fixture's noise
//! floors), and judges it with the shipped contracts (`contracts/*.yaml`, the real contract
//! code). Each mutation must fail `builtin-strict`, and the per-layer report must name the
//! capture where the bug starts. The negative controls run the same models, modes and gates
//! without a mutation and must pass.
//!
//! Also measured: whether the seeds' weak gate (logits cosine > 0.99, the rule of
//! `seed-parity.yaml`) would notice each bug on the same FP32 pair. The table is printed
//! (run with `--nocapture`) and kept in docs/MUTATIONS.md.
//!
//! Run: `cargo test --release --features mutation-testing --test mutations`. Needs the
//! fixtures of `runner fixtures build` in `$PARITYBENCH_CACHE`; without them the tests print a
//! notice and pass, unless `CI` is set: then they fail.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use paritybench::config::EngineConfig;
use paritybench::contracts::{Contract, Metric, Subject, Verdict};
use paritybench::metrics::{self, Report};
use paritybench::once::refs::{self, ModelGroup, Variant};
use paritybench::protocol::{Dump, Mode};

/// The shipped contracts, judged as `runner once` judges them.
const STRICT: &str = "contracts/builtin-strict.yaml";
const SEED: &str = "contracts/seed-parity.yaml";
/// The seeds' cosine gate (seed-parity.yaml `logits-cosine-vs-hf-fp16`), applied here to the
/// FP32 pair so that only the injected bug moves it.
const SEED_COSINE: f64 = 0.99;
/// `runner once`'s default multiple of the noise floor for the first divergent layer.
const FLOOR_K: f64 = 10.0;

fn groups() -> Option<&'static [ModelGroup]> {
    static G: OnceLock<Option<Vec<ModelGroup>>> = OnceLock::new();
    G.get_or_init(|| {
        let cache = std::env::var_os("PARITYBENCH_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/paritybench")))?;
        match refs::discover(&cache, "default") {
            Ok(g) => Some(g),
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "CI is set but the suite's fixtures are missing: {e}");
                eprintln!("NOTICE: skipping the mutation tests: {e}");
                None
            }
        }
    })
    .as_deref()
}

/// One engine run judged against one model's references.
struct Judged {
    /// vs HF FP32 (eager; the incremental reference for incremental runs).
    report: Report,
    /// `builtin-strict` on the FP32 pair.
    strict: Vec<Verdict>,
    /// The real `seed-parity` contract on the engine vs the HF FP16 reference (prefill only).
    seed_fp16: Vec<Verdict>,
    /// Minimum logits cosine vs HF FP32 over every scored position.
    cosine_min_fp32: f64,
}

impl Judged {
    fn blocking(&self) -> Vec<String> {
        self.strict.iter().filter(|v| v.blocks()).map(describe).collect()
    }

    fn first_divergent(&self) -> Option<String> {
        self.report.overall.first_divergent.as_ref().map(|d| d.tensor.clone())
    }

    /// `passes` / `fails` for the seeds' cosine rule on the FP32 pair.
    fn seed_cosine_rule(&self) -> &'static str {
        if self.cosine_min_fp32 > SEED_COSINE { "passes (misses it)" } else { "fails (catches it)" }
    }
}

fn describe(v: &Verdict) -> String {
    format!("{} ({} {} = {:?} vs {})", v.gate_id, v.reduction.as_str(), v.metric.as_str(), v.observed, v.threshold)
}

fn contract(rel: &str) -> Contract {
    Contract::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The subject `runner once` builds for one comparison: every sample by metric name, the
/// fixture's logits noise floor.
fn subject(g: &ModelGroup, reference: &refs::Reference, mode: Mode, report: &Report) -> Subject {
    let mut s = Subject {
        engine: paritybench::config::BUILTIN_ENGINE.into(),
        model: g.model.clone(),
        reference: reference.id.clone(),
        dtype: Some(g.dtype.clone()),
        mode: Some(mode.as_str().into()),
        ..Default::default()
    };
    for (k, v) in report.samples().iter() {
        if let Some(m) = Metric::parse(&k.metric) {
            s.samples.entry(m).or_default().extend_from_slice(v);
        }
    }
    if let Some(f) = g.pair_floor(reference, "f32") {
        s.noise_floors.insert(Metric::LogitsRelL2, f.floors.logits);
    }
    s
}

/// Runs the engine on `model` in `mode` with `mutation` (None: the unmutated engine) and
/// judges the dump. Returns None when the fixtures are absent.
fn judge(model: &str, mode: Mode, mutation: Option<&str>) -> Option<Judged> {
    let g = groups()?.iter().find(|g| g.model == model && g.key == "st").unwrap_or_else(|| {
        panic!("the suite has no safetensors fixture for {model}");
    });
    let name = mutation.unwrap_or("none").replace([':', '.'], "_");
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("mutations").join(format!("{model}-{}-{name}", mode.as_str()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let request = dir.join("request.json");
    g.request(&EngineConfig::builtin(), &Variant { mode }).save(&request).unwrap();
    let out = dir.join("dump");
    let o = support::engine_run(&request, &out, &[("PARITYBENCH_MUTATION", mutation.unwrap_or(""))]);
    assert!(o.status.success(), "engine run with {mutation:?} failed:\n{}", support::stderr(&o));
    let dump = Dump::open_complete(&out).unwrap();
    assert_eq!(
        dump.manifest.extra.get("mutation").and_then(|v| v.as_str()).map(|s| s.split(':').next().unwrap_or_default()),
        mutation.map(|m| m.split(':').next().unwrap_or_default()),
        "the manifest records the injected mutation"
    );

    let fp32_id = match mode {
        Mode::Prefill => "hf-fp32-eager",
        Mode::Incremental => "hf-fp32-eager-incremental",
    };
    let reference = |id: &str| g.references.iter().find(|r| r.id == id);
    let fp32 = reference(fp32_id).unwrap_or_else(|| panic!("{model}: no {fp32_id} reference"));
    // The floor `runner once` judges this pair by: HF FP32 vs a twin of the f32 engine.
    let floors = g.pair_floor(fp32, "f32").map(|f| f.floors.clone());
    let opts = metrics::Options { floors, floor_k: FLOOR_K, ..Default::default() };
    let report = metrics::compare(&dump, &Dump::open_complete(&fp32.dir).unwrap(), &opts).unwrap();
    let strict = contract(STRICT).evaluate(&[subject(g, fp32, mode, &report)]).verdicts;
    let seed_fp16 = match (mode, reference("hf-fp16-sdpa")) {
        (Mode::Prefill, Some(r)) => {
            let rep = metrics::compare(&dump, &Dump::open_complete(&r.dir).unwrap(), &opts).unwrap();
            contract(SEED).evaluate(&[subject(g, r, mode, &rep)]).verdicts
        }
        _ => Vec::new(),
    };
    let cosine_min_fp32 = report.overall.summary.cosine_min.expect("both dumps hold full logits");
    Some(Judged { report, strict, seed_fp16, cosine_min_fp32 })
}

/// One row of the table in docs/MUTATIONS.md.
fn print_row(mutation: &str, model: &str, mode: Mode, j: &Judged) {
    let d = j.report.overall.first_divergent.as_ref();
    let seed_fp16 = match j.seed_fp16.iter().find(|v| v.gate_id == "logits-cosine-vs-hf-fp16") {
        Some(v) => format!("{} ({:?})", v.outcome.as_str(), v.observed),
        None => "-".into(),
    };
    let failing: Vec<&str> = j.strict.iter().filter(|v| v.blocks()).map(|v| v.gate_id.as_str()).collect();
    println!(
        "MUTATION-ROW | {mutation} | {model} | {} | {} | {} | {} | {:.6} | {} | {seed_fp16} |",
        mode.as_str(),
        d.map_or("none".into(), |d| d.tensor.clone()),
        d.map_or("-".into(), |d| format!("{:.2e}", d.rel_l2)),
        if failing.is_empty() { "none".into() } else { failing.join(", ") },
        j.cosine_min_fp32,
        j.seed_cosine_rule(),
    );
}

/// The unmutated engine on `model` in `mode` passes every error gate of `builtin-strict`
/// against HF FP32, and the report names no divergent point.
fn control(model: &str, mode: Mode) {
    let Some(j) = judge(model, mode, None) else { return };
    print_row("none (control)", model, mode, &j);
    let blocking = j.blocking();
    assert!(blocking.is_empty(), "{model} {mode:?}: the unmutated engine fails builtin-strict: {blocking:#?}");
    assert!(j.strict.iter().any(|v| v.gate_id == "f32-layer-rel-l2" && v.passed()), "the layer gate judged");
    for gate in ["tokenizer-parity", "capture-count-parity"] {
        let v = j.strict.iter().find(|v| v.gate_id == gate).unwrap_or_else(|| panic!("{gate} judged"));
        assert!(v.passed() && v.n_samples == j.report.prompts.len(), "{gate}: {}", describe(v));
    }
    assert_eq!(j.first_divergent(), None, "{model} {mode:?}: no divergent point without a bug");
    assert!(j.cosine_min_fp32 > SEED_COSINE);
}

/// `mutation` on `model` in `mode` fails builtin-strict (at least `must_fail`), and the
/// report names `first` as the first divergent capture, overall and in every prompt.
fn mutant(mutation: &str, model: &str, mode: Mode, first: &str, must_fail: &[&str]) -> Option<Judged> {
    let j = judge(model, mode, Some(mutation))?;
    print_row(mutation, model, mode, &j);
    let blocking = j.blocking();
    assert!(!blocking.is_empty(), "{mutation} on {model} {mode:?} passes builtin-strict");
    for gate in must_fail {
        assert!(
            j.strict.iter().any(|v| v.gate_id == *gate && v.blocks()),
            "{mutation}: gate {gate} should fail; failing: {blocking:#?}"
        );
    }
    assert_eq!(j.first_divergent().as_deref(), Some(first), "{mutation} on {model}: first divergent point overall");
    for p in &j.report.prompts {
        let got = p.first_divergent.as_ref().map(|d| d.tensor.as_str());
        assert_eq!(got, Some(first), "{mutation} on {model}: first divergent point of prompt {:?}", p.id);
    }
    Some(j)
}

// --- negative controls --------------------------------------------------------------------

#[test]
fn control_qwen3_dense_prefill() {
    control("qwen3-dense", Mode::Prefill);
}

#[test]
fn control_qwen3_dense_incremental() {
    control("qwen3-dense", Mode::Incremental);
}

#[test]
fn control_qwen2_prefill() {
    control("qwen2", Mode::Prefill);
}

#[test]
fn control_qwen3_moe_prefill() {
    control("qwen3-moe", Mode::Prefill);
}

#[test]
fn control_qwen3_moe_mixed_prefill() {
    control("qwen3-moe-mixed", Mode::Prefill);
}

// --- mutations ----------------------------------------------------------------------------

const LAYER_GATE: &[&str] = &["f32-layer-rel-l2"];

#[test]
fn rope_theta() {
    mutant("rope-theta", "qwen3-dense", Mode::Prefill, "hidden.attn_out.0", LAYER_GATE);
}

#[test]
fn query_position_off_by_one() {
    mutant("query-position-off-by-one", "qwen3-dense", Mode::Prefill, "hidden.attn_out.0", LAYER_GATE);
}

#[test]
fn no_qk_norm() {
    mutant("no-qk-norm", "qwen3-dense", Mode::Prefill, "hidden.attn_out.0", LAYER_GATE);
}

#[test]
fn no_causal_mask() {
    mutant("no-causal-mask", "qwen3-dense", Mode::Prefill, "hidden.attn_out.0", LAYER_GATE);
}

#[test]
fn no_qkv_bias() {
    mutant("no-qkv-bias", "qwen2", Mode::Prefill, "hidden.attn_out.0", LAYER_GATE);
}

#[test]
fn flip_norm_topk_prob_all_sparse() {
    // every layer sparse, norm_topk_prob = true: the router is right, the weights are not
    mutant("flip-norm-topk-prob", "qwen3-moe", Mode::Prefill, "hidden.ffn_out.0", LAYER_GATE);
}

#[test]
fn flip_norm_topk_prob_mixed() {
    // dense layers 0 and 2, norm_topk_prob = false: the first sparse layer is 1
    mutant("flip-norm-topk-prob", "qwen3-moe-mixed", Mode::Prefill, "hidden.ffn_out.1", LAYER_GATE);
}

#[test]
fn one_layer_scaled_by_1_001() {
    let Some(j) = mutant("scale-layer-output:2", "qwen3-dense", Mode::Prefill, "hidden.layer_out.2", LAYER_GATE) else {
        return;
    };
    let d = j.report.overall.first_divergent.as_ref().unwrap();
    assert!((d.rel_l2 - 1e-3).abs() < 1e-5, "a ×1.001 scale is a 1e-3 relative error: {}", d.rel_l2);
    // The seeds' cosine rule cannot see it: RMSNorm undoes most of a scale.
    assert!(j.cosine_min_fp32 > SEED_COSINE, "cosine min {}", j.cosine_min_fp32);
}

#[test]
fn kv_cache_bug_is_caught_in_incremental_mode() {
    mutant("kv-write-off-by-one", "qwen3-dense", Mode::Incremental, "hidden.attn_out.0", LAYER_GATE);
}

#[test]
fn kv_cache_bug_is_invisible_to_prefill_parity() {
    // The prompt in one forward pass never reads a slot written by an earlier call: every
    // logit and capture of the prompt is right. Only the greedy continuation, which runs
    // through the cache one token at a time, goes wrong — and says nothing about where.
    let Some(j) = judge("qwen3-dense", Mode::Prefill, Some("kv-write-off-by-one")) else { return };
    print_row("kv-write-off-by-one", "qwen3-dense", Mode::Prefill, &j);
    assert_eq!(j.first_divergent(), None);
    let blocking: Vec<&str> = j.strict.iter().filter(|v| v.blocks()).map(|v| v.gate_id.as_str()).collect();
    assert_eq!(blocking, ["f32-greedy"], "prefill sees the KV bug only through greedy decoding");
}
