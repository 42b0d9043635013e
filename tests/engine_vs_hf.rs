//! The built-in engine against HF transformers fp32 on tiny random checkpoints.
//!
//! `tests/support/hf_reference.py` (run with the venv python) builds Qwen3 dense,
//! Qwen3-MoE (all sparse, norm_topk_prob), Qwen3-MoE mixed (mlp_only_layers, no
//! renormalisation) and Qwen2 (q/k/v bias, bf16 storage) checkpoints and records HF's
//! logits, every capture through forward hooks, and greedy continuations. Each test runs
//! `runner engine run` in prefill and incremental mode and requires relative L2 ≤ 1e-4 at
//! every scored position, for the logits and for every capture at every layer, identical
//! expert choices and identical greedy tokens.
//!
//! Without the venv the tests print a notice and pass, unless `CI` is set: then they fail.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use paritybench::protocol::{Dump, Mode, Positions, Request};
use support::*;

const GATE: f64 = 1e-4;
const MODELS: [&str; 4] = ["qwen3-dense", "qwen3-moe", "qwen3-moe-mixed", "qwen2"];

/// The reference directory, generated once per test binary (cached by script hash).
fn references() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let Some(py) = python() else {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but the paritybench venv python is missing (set PARITYBENCH_PYTHON or run runners/setup.sh)");
            }
            eprintln!("NOTICE: skipping engine-vs-HF tests: no venv python (set PARITYBENCH_PYTHON or run runners/setup.sh)");
            return None;
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/hf_reference.py");
        let hash = paritybench::protocol::sha256_file(&script).unwrap();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hf_reference-{}", &hash[..12]));
        if !dir.join("DONE").exists() {
            let _ = std::fs::remove_dir_all(&dir);
            let out = std::process::Command::new(&py).arg(&script).arg(&dir).output().expect("python starts");
            assert!(out.status.success(), "hf_reference.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        Some(dir)
    })
    .as_deref()
}

struct Case {
    dir: PathBuf,
    cases: serde_json::Value,
}

fn case(name: &str) -> Option<Case> {
    let dir = references()?.join(name);
    let cases = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    Some(Case { dir, cases })
}

/// The request for one model: every prompt, all points and layers; prompt `mid` scores a
/// subset of positions.
fn request_for(c: &Case, mode: Mode) -> Request {
    let prompts: Vec<(&str, Vec<i32>)> = c.cases["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let ids = p["token_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
            (p["id"].as_str().unwrap(), ids)
        })
        .collect();
    let mut req = request(&c.dir.join("model"), &prompts, mode, c.cases["decode_steps"].as_u64().unwrap() as u32);
    for (p, json) in req.prompts.iter_mut().zip(c.cases["prompts"].as_array().unwrap()) {
        if p.id == "mid" {
            p.positions = Some(Positions::List(vec![0, 5, 11, 18]));
        }
        p.text = json.get("text").and_then(|t| t.as_str()).map(str::to_string);
    }
    req
}

/// Worst rel L2 per tensor kind, for the report.
#[derive(Default)]
struct Worst {
    logits: f64,
    captures: std::collections::BTreeMap<String, f64>,
}

/// Runs one model in one mode and checks it against the reference.
fn check(name: &str, mode: Mode) {
    let Some(c) = case(name) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let req_path = tmp.path().join("req.json");
    let req = request_for(&c, mode);
    req.save(&req_path).unwrap();
    let out = tmp.path().join("dump");
    let o = engine_run(&req_path, &out, &[]);
    assert!(o.status.success(), "{name} {mode:?}: engine failed: {}", stderr(&o));

    let dump = Dump::open_complete(&out).unwrap();
    let refs_bytes = std::fs::read(c.dir.join("ref.safetensors")).unwrap();
    let refs = safetensors::SafeTensors::deserialize(&refs_bytes).unwrap();
    let f32s = |n: &str| -> (Vec<usize>, Vec<f32>) {
        let t = refs.tensor(n).unwrap_or_else(|_| panic!("reference lacks {n}"));
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    let i32s = |n: &str| -> Vec<i32> {
        refs.tensor(n).unwrap().data().chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    let mut worst = Worst::default();
    let mut n_captures = 0;
    for p in &req.prompts {
        let shard = dump.shard(&p.id).unwrap();
        let positions: Vec<usize> = shard.positions().unwrap().iter().map(|&x| x as usize).collect();
        // logits, row by row
        let (shape, want) = f32s(&format!("{}.logits", p.id));
        let v = shape[1];
        let got = shard.logits().unwrap().to_f32();
        assert_eq!(got.len(), positions.len() * v);
        for (r, &pos) in positions.iter().enumerate() {
            let e = rel_l2(&got[r * v..(r + 1) * v], &want[pos * v..(pos + 1) * v]);
            worst.logits = worst.logits.max(e);
            assert!(e <= GATE, "{name} {mode:?} prompt {} position {pos}: logits rel L2 {e:.3e} > {GATE}", p.id);
        }
        // greedy continuation
        let generated = shard.generated().unwrap();
        assert_eq!(
            &*generated,
            &i32s(&format!("{}.generated", p.id))[..],
            "{name} {mode:?} prompt {}: greedy tokens",
            p.id
        );
        // every capture the reference has must be in the dump and agree
        let ref_names: Vec<String> = refs
            .names()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{}.hidden.", p.id)))
            .map(|n| n.to_string())
            .collect();
        let dump_names: Vec<String> = shard.captures().into_iter().map(|(_, _, n)| n).collect();
        let mut want_names: Vec<String> = ref_names.iter().map(|n| n[p.id.len() + 1..].to_string()).collect();
        want_names.sort();
        assert_eq!(dump_names, want_names, "{name} {mode:?} prompt {}: captured tensors", p.id);
        for tensor in &dump_names {
            let key = format!("{}.{tensor}", p.id);
            let got = shard.get(tensor).unwrap();
            if tensor.starts_with("hidden.moe_topk_ids.") {
                let k = got.shape[1];
                let want = i32s(&key);
                let got = got.to_i32().unwrap();
                for (r, &pos) in positions.iter().enumerate() {
                    assert_eq!(
                        &got[r * k..(r + 1) * k],
                        &want[pos * k..(pos + 1) * k],
                        "{name} {mode:?} {key} position {pos}"
                    );
                }
                continue;
            }
            let (shape, want) = f32s(&key);
            let w = shape[1];
            assert_eq!(got.shape, &[positions.len(), w], "{key}");
            let got = got.to_f32();
            let kind = tensor.split('.').nth(1).unwrap().to_string();
            for (r, &pos) in positions.iter().enumerate() {
                let e = rel_l2(&got[r * w..(r + 1) * w], &want[pos * w..(pos + 1) * w]);
                let slot = worst.captures.entry(kind.clone()).or_insert(0.0);
                *slot = slot.max(e);
                assert!(e <= GATE, "{name} {mode:?} {key} position {pos}: rel L2 {e:.3e} > {GATE}");
            }
            n_captures += 1;
        }
        if let Some(m) = dump.manifest.prompt(&p.id).and_then(|r| r.tokenizer_match) {
            assert!(m, "{name}: the engine's tokenization of prompt {} differs from its ids", p.id);
        }
    }
    let caps: Vec<String> = worst.captures.iter().map(|(k, v)| format!("{k} {v:.1e}")).collect();
    println!(
        "{name:16} {:11} logits {:.2e} | {} captures, worst per point: {}",
        format!("{mode:?}"),
        worst.logits,
        n_captures,
        caps.join(", ")
    );
}

#[test]
fn qwen3_dense_prefill() {
    check(MODELS[0], Mode::Prefill);
}
#[test]
fn qwen3_dense_incremental() {
    check(MODELS[0], Mode::Incremental);
}
#[test]
fn qwen3_moe_prefill() {
    check(MODELS[1], Mode::Prefill);
}
#[test]
fn qwen3_moe_incremental() {
    check(MODELS[1], Mode::Incremental);
}
#[test]
fn qwen3_moe_mixed_prefill() {
    check(MODELS[2], Mode::Prefill);
}
#[test]
fn qwen3_moe_mixed_incremental() {
    check(MODELS[2], Mode::Incremental);
}
#[test]
fn qwen2_prefill() {
    check(MODELS[3], Mode::Prefill);
}
#[test]
fn qwen2_incremental() {
    check(MODELS[3], Mode::Incremental);
}

/// The tokenizer beside the qwen3-dense checkpoint is found and agrees with the ids.
#[test]
fn tokenizer_parity_is_recorded() {
    let Some(c) = case("qwen3-dense") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut req = request_for(&c, Mode::Prefill);
    req.captures.points.clear();
    req.decode_steps = 0;
    // a second prompt whose text does not match its ids
    let mut wrong = req.prompts[0].clone();
    wrong.id = "wrong".into();
    wrong.text = Some("w1 w2".into());
    req.prompts.push(wrong);
    let rp = tmp.path().join("req.json");
    req.save(&rp).unwrap();
    let o = engine_run(&rp, &tmp.path().join("d"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = Dump::open_complete(&tmp.path().join("d")).unwrap();
    assert_eq!(d.manifest.prompt("short").unwrap().tokenizer_match, Some(true));
    assert_eq!(d.manifest.prompt("wrong").unwrap().tokenizer_match, Some(false));
    assert_eq!(d.manifest.prompt("long").unwrap().tokenizer_match, None, "no text, no verdict");
    let sha = paritybench::protocol::sha256_file(&c.dir.join("model/tokenizer.json")).unwrap();
    assert_eq!(d.manifest.tokenizer.sha256.as_deref(), Some(sha.as_str()));
}
