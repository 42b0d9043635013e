//! The built-in engine on the fixture files against the fixture reference dumps.
//!
//! `runner fixtures build` writes GGUF files (`fixtures/gguf/<model>/<model>-<QUANT>.gguf`,
//! converted and quantized by the real llama.cpp) and reference dumps
//! (`fixtures/refs/default/<model>/<ref-id>/`, with the request each answered beside it as
//! `<ref-id>.request.json`). Each test reuses a reference's request, changing only
//! `model.path`, runs the real `runner engine run`, and compares with
//! `paritybench::metrics::compare`:
//!
//! - GGUF F16 vs HF FP32: rel-L2 ≤ 5e-3 and no worse than 1.1 × llama.cpp F16's own
//!   distance to HF FP32; top-1 ≥ 99%.
//! - Quantized GGUFs, the default path (the engine quantizes activations to 8 bits and takes
//!   integer block dot products as llama.cpp's CPU backend does): vs llama.cpp on the same
//!   file top-1 ≥ 99.5% and mean KL(llama.cpp ‖ engine) ≤ 1e-4 (met with KLD 0: the engine
//!   computes llama.cpp's bits, see `tests/ggml_numerics.rs`).
//! - The same, against llama.cpp's own spread on the file (its flash-attention path vs its
//!   default one, the fixture's `llamacpp-<quant>-fa`): KLD and top-1 no worse.
//! - Quantized GGUFs with `options.quant_dot = "f32"` (weights dequantized, f32 arithmetic:
//!   higher precision than llama.cpp): mean KL(HF FP32 ‖ engine) ≤ 1.1 × KL(HF FP32 ‖
//!   llama.cpp) + 1e-5.
//! - safetensors f32 vs HF FP32 eager, prefill and incremental: rel-L2 ≤ 1e-4 on the logits
//!   at every position and on every capture at every layer, identical expert choices,
//!   margin-aware top-1 100%, identical greedy continuations, every `tokenizer_match` true.
//!
//! Missing fixtures: a printed notice and a pass, unless `CI` is set: then a failure.

mod support;

use std::path::{Path, PathBuf};

use paritybench::metrics::{self, LayerValues, Report};
use paritybench::protocol::{Dump, Request};
use support::{engine_run, stderr};

/// Quantized files and the llama.cpp reference of each.
const QUANTS: [(&str, &str); 4] = [
    ("Q8_0", "llamacpp-q8_0"),
    ("Q6_K", "llamacpp-q6_k"),
    ("Q5_K_M", "llamacpp-q5_k_m"),
    ("Q4_K_M", "llamacpp-q4_k_m"),
];

fn fixtures() -> PathBuf {
    let cache = match std::env::var_os("PARITYBENCH_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/paritybench"),
    };
    cache.join("fixtures")
}

fn gguf_file(model: &str, quant: &str) -> PathBuf {
    fixtures().join("gguf").join(model).join(format!("{model}-{quant}.gguf"))
}

fn refs_dir(model: &str) -> PathBuf {
    fixtures().join("refs/default").join(model)
}

/// Whether every path exists (a dump's `manifest.json`: and the dump is complete; a
/// fixtures build may be writing it). If not: a notice (and `false`), or a panic when `CI`
/// is set.
fn present(what: &str, paths: &[PathBuf]) -> bool {
    let ready = |p: &Path| match (p.file_name(), p.parent()) {
        (Some(n), Some(dir)) if n == "manifest.json" => Dump::open_complete(dir).is_ok(),
        _ => p.exists(),
    };
    let missing: Vec<String> = paths.iter().filter(|p| !ready(p)).map(|p| p.display().to_string()).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but fixtures for {what} are missing (run `runner fixtures build`): {}", missing.join(", "));
    }
    eprintln!("NOTICE: skipping {what}: fixtures missing (run `runner fixtures build`): {}", missing.join(", "));
    false
}

/// The paths a comparison against `ref_id` of `model` needs: the request and the dump.
fn ref_paths(model: &str, ref_id: &str) -> [PathBuf; 2] {
    let d = refs_dir(model);
    [d.join(format!("{ref_id}.request.json")), d.join(ref_id).join("manifest.json")]
}

fn open_ref(model: &str, ref_id: &str) -> Dump {
    let dir = refs_dir(model).join(ref_id);
    Dump::open_complete(&dir).unwrap_or_else(|e| panic!("reference {}: {e}", dir.display()))
}

/// Runs the engine on `model_path` with the request that produced `ref_id`, only
/// `model.path` changed. The dump lives in `tmp`.
fn run_engine(model: &str, ref_id: &str, model_path: &Path, tmp: &Path) -> Dump {
    run_engine_with(model, ref_id, model_path, tmp, &[])
}

/// [`run_engine`] with engine options set (the reference's adapter options are dropped).
fn run_engine_with(
    model: &str,
    ref_id: &str,
    model_path: &Path,
    tmp: &Path,
    options: &[(&str, serde_json::Value)],
) -> Dump {
    let req_path = refs_dir(model).join(format!("{ref_id}.request.json"));
    let mut req = Request::load(&req_path).unwrap_or_else(|e| panic!("{}: {e}", req_path.display()));
    req.model.path = model_path.to_path_buf();
    if !options.is_empty() {
        req.options = options.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    }
    let mine = tmp.join(format!("{ref_id}.request.json"));
    req.save(&mine).unwrap();
    let out = tmp.join(format!("engine-{ref_id}"));
    let o = engine_run(&mine, &out, &[]);
    assert!(
        o.status.success(),
        "{model}: engine failed on {} with the {ref_id} request: {}",
        model_path.display(),
        stderr(&o)
    );
    Dump::open_complete(&out).unwrap()
}

fn compare(engine: &Dump, reference: &Dump) -> Report {
    let r = metrics::compare(engine, reference, &metrics::Options::default()).unwrap();
    assert_eq!(r.missing.len(), 0, "prompts not compared: {:?}", r.missing);
    assert!(r.nonfinite.is_empty(), "non-finite values: {:?}", r.nonfinite);
    r
}

fn top1(r: &Report) -> f64 {
    r.overall.summary.top1.expect("full logits on both sides").rate
}

fn kld_mean(r: &Report) -> f64 {
    r.overall.summary.kld.expect("full logits on both sides").mean
}

/// Positions whose logits rel-L2 exceeds 5e-3 (prompt@position=value), and the expert-set
/// disagreements per prompt and capture (a router near-tie flipped by f16 weight rounding
/// moves the logits far more than rounding alone).
fn f16_diagnostics(r: &Report) -> (String, String) {
    let mut over = Vec::new();
    let mut flips = Vec::new();
    for p in &r.prompts {
        if let Some(l) = &p.logits {
            for (&pos, &e) in p.positions.iter().zip(&l.rel_l2) {
                if e > 5e-3 {
                    over.push(format!("{}@{pos}={e:.2e}", p.id));
                }
            }
        }
        for layer in &p.layers {
            if let LayerValues::ExpertIds(x) = &layer.values {
                if x.set_matches != x.n_positions {
                    flips.push(format!(
                        "{} {} {}/{}",
                        p.id,
                        layer.tensor,
                        x.n_positions - x.set_matches,
                        x.n_positions
                    ));
                }
            }
        }
    }
    let show = |v: Vec<String>| if v.is_empty() { "none".to_string() } else { v.join(", ") };
    (show(over), show(flips))
}

/// Median and max of the reference's top-1/top-2 logit margin where the top-1 ids differ.
fn disagreement_margins(r: &Report) -> String {
    let mut m: Vec<f64> = r
        .prompts
        .iter()
        .filter_map(|p| p.topk.as_ref())
        .flat_map(|t| {
            t.top1.iter().zip(t.reference_margin.as_deref().unwrap_or(&[])).filter(|(ok, _)| !**ok).map(|(_, &m)| m)
        })
        .collect();
    if m.is_empty() {
        return "none".into();
    }
    m.sort_by(f64::total_cmp);
    format!("n {} median {:.3e} max {:.3e}", m.len(), m[m.len() / 2], m[m.len() - 1])
}

/// Every prompt of the engine's dump has `tokenizer_match == Some(true)`.
fn assert_tokenizer_parity(what: &str, d: &Dump) {
    for p in &d.manifest.prompts {
        assert_eq!(p.tokenizer_match, Some(true), "{what}: prompt {:?}: tokenizer_match {:?}", p.id, p.tokenizer_match);
    }
}

/// What the manifest must say about a GGUF run; `quant_dot`: the path the run took.
fn assert_gguf_manifest(file: &Path, quant: &str, quant_dot: &str, d: &Dump) {
    let m = &d.manifest.model;
    assert_eq!(m.format, "gguf");
    assert_eq!(m.quant, quant, "{}", file.display());
    assert_eq!(m.sha256.as_deref(), Some(paritybench::protocol::sha256_file(file).unwrap().as_str()));
    let compute = d.manifest.extra.get("compute").and_then(|v| v.as_str()).unwrap_or_default();
    assert!(compute.contains("f32") && compute.contains("GGUF types"), "manifest extra.compute: {compute:?}");
    let qd = d.manifest.extra.get("quant_dot").and_then(|v| v.as_str()).unwrap_or_default();
    assert!(qd.starts_with(quant_dot), "{}: manifest extra.quant_dot {qd:?}, expected {quant_dot}", file.display());
    if m.architecture.as_deref() == Some("qwen3_moe") {
        for key in ["qwen3moe.expert_weights_norm", "decoder_sparse_step", "mlp_only_layers"] {
            assert!(m.assumed.contains_key(key), "{}: model.assumed lacks {key}: {:?}", file.display(), m.assumed);
        }
    }
}

/// GGUF F16 of `model` against HF FP32, with llama.cpp F16 on the same file as the bar.
fn gguf_f16(model: &str) {
    let file = gguf_file(model, "F16");
    let [a, b] = ref_paths(model, "hf-fp32-eager");
    let [c, d] = ref_paths(model, "llamacpp-f16");
    if !present(&format!("GGUF F16 of {model}"), &[file.clone(), a, b, c, d]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let engine = run_engine(model, "llamacpp-f16", &file, tmp.path());
    assert_gguf_manifest(&file, "F16", "none", &engine);
    assert_tokenizer_parity(&format!("{model} F16 (embedded tokenizer)"), &engine);
    let hf = open_ref(model, "hf-fp32-eager");
    let lc = open_ref(model, "llamacpp-f16");
    let e_hf = compare(&engine, &hf);
    let l_hf = compare(&lc, &hf);
    let e_lc = compare(&engine, &lc);
    let s = &e_hf.overall.summary;
    let (e_max, e_mean) = (s.rel_l2_max.unwrap(), s.rel_l2_mean.unwrap());
    let (l_max, l_mean) = (l_hf.overall.summary.rel_l2_max.unwrap(), l_hf.overall.summary.rel_l2_mean.unwrap());
    eprintln!(
        "RESULT {model} F16: rel-L2 vs HF FP32 engine max {e_max:.3e} mean {e_mean:.3e} | llama.cpp max {l_max:.3e} mean {l_mean:.3e} | \
         top-1 vs HF engine {:.4} llama.cpp {:.4} | top-1 engine vs llama.cpp {:.4} | KLD vs HF engine {:.3e} llama.cpp {:.3e}",
        top1(&e_hf),
        top1(&l_hf),
        top1(&e_lc),
        kld_mean(&e_hf),
        kld_mean(&l_hf)
    );
    let (over, flips) = f16_diagnostics(&e_hf);
    eprintln!(
        "RESULT {model} F16: positions over 5e-3: {over}; expert choices differing from HF FP32 (set, per layer): {flips}"
    );
    assert!(e_max <= 5e-3, "{model} F16: engine rel-L2 vs HF FP32 max {e_max:.3e} > 5e-3");
    assert!(e_max <= 1.1 * l_max, "{model} F16: engine rel-L2 max {e_max:.3e} > 1.1 × llama.cpp's {l_max:.3e}");
    assert!(e_mean <= 1.1 * l_mean, "{model} F16: engine rel-L2 mean {e_mean:.3e} > 1.1 × llama.cpp's {l_mean:.3e}");
    assert!(top1(&e_hf) >= 0.99, "{model} F16: top-1 vs HF FP32 {:.4} < 0.99", top1(&e_hf));
}

/// Which acceptance criterion of the quantized files a test checks.
#[derive(Clone, Copy, PartialEq)]
enum Gate {
    /// `options.quant_dot = "f32"`: mean KL(HF FP32 ‖ engine) ≤ 1.1 × KL(HF FP32 ‖
    /// llama.cpp) + 1e-5.
    Kld,
    /// The default path (llama.cpp's quantized dot products): vs llama.cpp on the same file
    /// top-1 ≥ 99.5% and mean KL(llama.cpp ‖ engine) ≤ 1e-4.
    LlamacppNumerics,
    /// The default path, against llama.cpp's own spread on the file (the fixture's
    /// `llamacpp-<quant>-fa`: flash attention on): mean KL(llama.cpp ‖ engine) and top-1
    /// agreement no worse than llama.cpp's flash-attention path vs its default one.
    LlamacppSpread,
}

/// Each quantized GGUF of `model` against HF FP32 and llama.cpp on the same file.
fn gguf_quantized(model: &str, gate: Gate) {
    let [a, b] = ref_paths(model, "hf-fp32-eager");
    if !present(&format!("HF FP32 reference of {model}"), &[a, b]) {
        return;
    }
    let hf = open_ref(model, "hf-fp32-eager");
    let mut failures = Vec::new();
    for (quant, ref_id) in QUANTS {
        let file = gguf_file(model, quant);
        let [c, d] = ref_paths(model, ref_id);
        let mut need = vec![file.clone(), c, d];
        if gate == Gate::LlamacppSpread {
            need.extend(ref_paths(model, &format!("{ref_id}-fa")));
        }
        if !present(&format!("GGUF {quant} of {model}"), &need) {
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (options, path) = match gate {
            Gate::Kld => (vec![("quant_dot", serde_json::json!("f32"))], "f32"),
            Gate::LlamacppNumerics | Gate::LlamacppSpread => (vec![], "ggml"),
        };
        let engine = run_engine_with(model, ref_id, &file, tmp.path(), &options);
        assert_gguf_manifest(&file, quant, path, &engine);
        assert_tokenizer_parity(&format!("{model} {quant}"), &engine);
        let lc = open_ref(model, ref_id);
        let not_applicable = support::ggml_bits_not_applicable(lc.manifest.engine.versions.get("isa").map(String::as_str));
        if let (Gate::LlamacppNumerics, Some(why)) = (gate, &not_applicable) {
            eprintln!("NOTICE: {model} {quant}: the 1e-4 gate does not apply: {why}");
        }
        let (e_hf, l_hf, e_lc) = (compare(&engine, &hf), compare(&lc, &hf), compare(&engine, &lc));
        let (e_kld, l_kld, agree) = (kld_mean(&e_hf), kld_mean(&l_hf), top1(&e_lc));
        eprintln!(
            "RESULT {model} {quant} quant_dot={path}: mean KLD(HF FP32 ‖ ·) engine {e_kld:.4e} llama.cpp {l_kld:.4e} | top-1 engine vs llama.cpp {agree:.4} \
             | top-1 vs HF engine {:.4} llama.cpp {:.4} | logits rel-L2 vs HF engine {:.3e} llama.cpp {:.3e} | engine vs llama.cpp: rel-L2 {:.3e} KLD {:.4e} \
             | llama.cpp top-1 margin at disagreements: {}",
            top1(&e_hf),
            top1(&l_hf),
            e_hf.overall.summary.rel_l2_mean.unwrap(),
            l_hf.overall.summary.rel_l2_mean.unwrap(),
            e_lc.overall.summary.rel_l2_mean.unwrap(),
            kld_mean(&e_lc),
            disagreement_margins(&e_lc)
        );
        if gate == Gate::Kld && e_kld > 1.1 * l_kld + 1e-5 {
            failures.push(format!("{quant}: engine KLD {e_kld:.4e} > 1.1 × llama.cpp {l_kld:.4e} + 1e-5"));
        }
        if gate == Gate::LlamacppNumerics && not_applicable.is_none() && agree < 0.995 {
            failures.push(format!("{quant}: top-1 vs llama.cpp {agree:.4} < 0.995"));
        }
        if gate == Gate::LlamacppNumerics && not_applicable.is_none() && kld_mean(&e_lc) > 1e-4 {
            failures.push(format!("{quant}: mean KLD vs llama.cpp {:.4e} > 1e-4", kld_mean(&e_lc)));
        }
        if gate == Gate::LlamacppSpread {
            let spread = compare(&open_ref(model, &format!("{ref_id}-fa")), &lc);
            let (s_kld, s_top1) = (kld_mean(&spread), top1(&spread));
            eprintln!("SPREAD {model} {quant}: llama.cpp flash attention on vs off: KLD {s_kld:.4e} top-1 {s_top1:.4}");
            if kld_mean(&e_lc) > s_kld {
                failures.push(format!(
                    "{quant}: mean KLD vs llama.cpp {:.4e} > its own spread {s_kld:.4e}",
                    kld_mean(&e_lc)
                ));
            }
            if agree < s_top1 {
                failures.push(format!("{quant}: top-1 vs llama.cpp {agree:.4} < its own spread's {s_top1:.4}"));
            }
        }
    }
    assert!(failures.is_empty(), "{model}: {}", failures.join("; "));
}

/// safetensors f32 of `model` against HF FP32 eager in `ref_id`'s mode.
fn safetensors_f32(model: &str, ref_id: &str) {
    let dir = fixtures().join("models").join(model);
    let [a, b] = ref_paths(model, ref_id);
    if !present(&format!("{ref_id} of {model}"), &[dir.join("model.safetensors"), a, b]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let engine = run_engine(model, ref_id, &dir, tmp.path());
    assert_tokenizer_parity(&format!("{model} safetensors"), &engine);
    let hf = open_ref(model, ref_id);
    let r = compare(&engine, &hf);
    let mut failures = Vec::new();
    let (mut worst_logits, mut worst_capture, mut worst_name) = (0.0f64, 0.0f64, String::new());
    for p in &r.prompts {
        let l = p.logits.as_ref().expect("full logits on both sides");
        for (&pos, &e) in p.positions.iter().zip(&l.rel_l2) {
            worst_logits = worst_logits.max(e);
            if !(e <= 1e-4) {
                failures.push(format!("prompt {:?} position {pos}: logits rel-L2 {e:.3e}", p.id));
            }
        }
        assert!(!p.layers.is_empty(), "{model}: prompt {:?}: no capture compared", p.id);
        for layer in &p.layers {
            match &layer.values {
                LayerValues::Float(f) => {
                    if f.rel_l2 > worst_capture {
                        (worst_capture, worst_name) = (f.rel_l2, layer.tensor.clone());
                    }
                    if !(f.rel_l2 <= 1e-4) {
                        failures.push(format!("prompt {:?} {}: rel-L2 {:.3e}", p.id, layer.tensor, f.rel_l2));
                    }
                }
                LayerValues::ExpertIds(x) => {
                    if x.set_matches != x.n_positions {
                        failures.push(format!(
                            "prompt {:?} {}: experts agree at {}/{}",
                            p.id, layer.tensor, x.set_matches, x.n_positions
                        ));
                    }
                }
            }
        }
        let g = p.greedy.as_ref().expect("both dumps hold a greedy continuation");
        if g.first_divergent_step.is_some() || g.match_len != 32 {
            failures.push(format!(
                "prompt {:?}: greedy continuation diverges at step {:?} (match {})",
                p.id, g.first_divergent_step, g.match_len
            ));
        }
    }
    let ma = r.overall.summary.top1_margin_aware.expect("reference margins known");
    if ma.hits != ma.n {
        failures.push(format!("margin-aware top-1 {}/{}", ma.hits, ma.n));
    }
    eprintln!(
        "RESULT {model} safetensors vs {ref_id}: logits rel-L2 max {worst_logits:.3e}, worst capture {worst_name} {worst_capture:.3e}, \
         margin-aware top-1 {}/{}, greedy {}/{} identical, tokenizer parity {}/{}",
        ma.hits,
        ma.n,
        r.overall.greedy.map_or(0, |g| g.full_matches),
        r.prompts.len(),
        engine.manifest.prompts.iter().filter(|p| p.tokenizer_match == Some(true)).count(),
        engine.manifest.prompts.len()
    );
    assert!(failures.is_empty(), "{model} vs {ref_id}:\n{}", failures.join("\n"));
}

#[test]
fn gguf_f16_qwen3_dense() {
    gguf_f16("qwen3-dense");
}

#[test]
fn gguf_f16_qwen3_moe() {
    gguf_f16("qwen3-moe");
}

#[test]
fn gguf_f16_qwen2() {
    gguf_f16("qwen2");
}

#[test]
fn gguf_quantized_kld_qwen3_dense() {
    gguf_quantized("qwen3-dense", Gate::Kld);
}

#[test]
fn gguf_quantized_vs_llamacpp_qwen3_dense() {
    gguf_quantized("qwen3-dense", Gate::LlamacppNumerics);
}

#[test]
fn gguf_quantized_kld_qwen3_moe() {
    gguf_quantized("qwen3-moe", Gate::Kld);
}

#[test]
fn gguf_quantized_vs_llamacpp_qwen3_moe() {
    gguf_quantized("qwen3-moe", Gate::LlamacppNumerics);
}

#[test]
fn gguf_quantized_kld_qwen2() {
    gguf_quantized("qwen2", Gate::Kld);
}

#[test]
fn gguf_quantized_vs_llamacpp_qwen2() {
    gguf_quantized("qwen2", Gate::LlamacppNumerics);
}

#[test]
fn gguf_quantized_within_llamacpp_spread_qwen3_dense() {
    gguf_quantized("qwen3-dense", Gate::LlamacppSpread);
}

#[test]
fn gguf_quantized_within_llamacpp_spread_qwen3_moe() {
    gguf_quantized("qwen3-moe", Gate::LlamacppSpread);
}

#[test]
fn gguf_quantized_within_llamacpp_spread_qwen2() {
    gguf_quantized("qwen2", Gate::LlamacppSpread);
}

#[test]
fn safetensors_prefill_qwen3_dense() {
    safetensors_f32("qwen3-dense", "hf-fp32-eager");
}

#[test]
fn safetensors_incremental_qwen3_dense() {
    safetensors_f32("qwen3-dense", "hf-fp32-eager-incremental");
}

#[test]
fn safetensors_prefill_qwen3_moe() {
    safetensors_f32("qwen3-moe", "hf-fp32-eager");
}

#[test]
fn safetensors_incremental_qwen3_moe() {
    safetensors_f32("qwen3-moe", "hf-fp32-eager-incremental");
}

#[test]
fn safetensors_prefill_qwen3_moe_mixed() {
    safetensors_f32("qwen3-moe-mixed", "hf-fp32-eager");
}

#[test]
fn safetensors_incremental_qwen3_moe_mixed() {
    safetensors_f32("qwen3-moe-mixed", "hf-fp32-eager-incremental");
}

#[test]
fn safetensors_prefill_qwen2() {
    safetensors_f32("qwen2", "hf-fp32-eager");
}

#[test]
fn safetensors_incremental_qwen2() {
    safetensors_f32("qwen2", "hf-fp32-eager-incremental");
}

/// Every GGUF file type loads, reports its type, and runs one prompt with the embedded
/// tokenizer agreeing with the suite's token ids: all eleven types `tests/support/gguf_make.py`
/// writes (F32, F16, BF16 and eight quantizations, from the real converter and
/// `llama-quantize`) for Qwen3 dense and MoE, and the types `runner fixtures build` writes
/// for Qwen2. The prompts are the fixtures' (the same Qwen3 tokenizer throughout).
#[test]
fn every_gguf_file_type_runs() {
    const ALL: [&str; 11] = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0"];
    let test_gguf = fixtures().parent().unwrap().join("test-gguf");
    let sets: [(&str, Vec<(&str, PathBuf)>); 3] = [
        (
            "qwen3-dense",
            ALL.iter().map(|q| (*q, test_gguf.join(format!("qwen3-dense/qwen3-dense-{q}.gguf")))).collect(),
        ),
        ("qwen3-moe", ALL.iter().map(|q| (*q, test_gguf.join(format!("qwen3-moe/qwen3-moe-{q}.gguf")))).collect()),
        ("qwen2", paritybench::fixtures::build::GGUF_QUANTS.iter().map(|q| (*q, gguf_file("qwen2", q))).collect()),
    ];
    for (model, files) in sets {
        let [req_path, _] = ref_paths(model, "llamacpp-f16");
        let mut need: Vec<PathBuf> = files.iter().map(|(_, f)| f.clone()).collect();
        need.push(req_path.clone());
        if !present(&format!("every GGUF file type of {model}"), &need) {
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut req = Request::load(&req_path).unwrap();
        req.prompts.retain(|p| p.id == "chat-single" || p.id == "prose-en");
        req.captures.points.clear();
        req.decode_steps = 2;
        for (quant, file) in &files {
            req.model.path = file.clone();
            req.model.sha256 = None;
            let rp = tmp.path().join(format!("{quant}.json"));
            req.save(&rp).unwrap();
            let out = tmp.path().join(quant);
            let o = engine_run(&rp, &out, &[]);
            assert!(o.status.success(), "{}: {}", file.display(), stderr(&o));
            let d = Dump::open_complete(&out).unwrap();
            let path = if ["F32", "F16", "BF16"].contains(quant) { "none" } else { "ggml" };
            assert_gguf_manifest(file, quant, path, &d);
            assert_tokenizer_parity(&format!("{model} {quant}"), &d);
        }
    }
}

/// A request naming a tokenizer.json uses it (and records its sha256) instead of the
/// embedded vocabulary.
#[test]
fn gguf_with_an_explicit_tokenizer_json() {
    let model = "qwen3-dense";
    let file = gguf_file(model, "Q8_0");
    let json = fixtures().join("models").join(model).join("tokenizer.json");
    let [req_path, _] = ref_paths(model, "llamacpp-q8_0");
    if !present("GGUF with tokenizer.json", &[file.clone(), json.clone(), req_path.clone()]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut req = Request::load(&req_path).unwrap();
    req.model.path = file;
    req.model.tokenizer = Some(json.clone());
    req.captures.points.clear();
    req.decode_steps = 0;
    let rp = tmp.path().join("req.json");
    req.save(&rp).unwrap();
    let out = tmp.path().join("out");
    let o = engine_run(&rp, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = Dump::open_complete(&out).unwrap();
    assert_eq!(
        d.manifest.tokenizer.sha256.as_deref(),
        Some(paritybench::protocol::sha256_file(&json).unwrap().as_str())
    );
    assert_tokenizer_parity("qwen3-dense Q8_0 with tokenizer.json", &d);
}
