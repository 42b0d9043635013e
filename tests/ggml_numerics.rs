//! The built-in engine on quantized GGUF files against every tensor llama.cpp computes, bit
//! for bit.
//!
//! For each quantized fixture file (qwen3-dense, qwen3-moe, qwen2 × Q8_0, Q6_K, Q5_K_M,
//! Q4_K_M) and the suite's longest prompt (`long-code`, 171 tokens: llamafile's and the
//! repacked kernels' row groups and their remainders, the tiled K-quant kernel, attention
//! over 256 cells), `scripts/llamacpp-trace.py` runs llama-cpp-python with ggml's eval
//! callback and dumps every tensor of the graph; the engine runs the same ids with every
//! capture; `scripts/trace-compare.py` compares each capture (embedding, norms, attention and
//! MLP/MoE outputs, router logits and picks, residual stream, final norm, logits) with
//! llama.cpp's tensor. Every one must have the same bits, and the engine's greedy tokens must
//! be llama.cpp's argmax at each step (the decode steps run the one-row kernels).
//!
//! Missing fixtures or llama-cpp-python: a notice and a pass, unless `CI` is set. A llama.cpp
//! built for another instruction set than `support::GGML_ISA` (a CPU without AVX-512): a
//! notice that the claim does not apply there.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{engine_run, stderr};

const MODELS: [&str; 3] = ["qwen3-dense", "qwen3-moe", "qwen2"];
const QUANTS: [&str; 4] = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"];
const PROMPT: &str = "long-code";
const DECODE: usize = 3;

fn fixtures() -> PathBuf {
    let cache = match std::env::var_os("PARITYBENCH_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/paritybench"),
    };
    cache.join("fixtures")
}

fn skip(msg: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but {msg}");
    }
    eprintln!("NOTICE: skipping: {msg}");
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

/// The llama.cpp reference request of `model`/`quant` (every position, every capture), cut
/// to [`PROMPT`].
fn request(model: &str, quant: &str, out: &Path) -> Option<Vec<u32>> {
    let path = fixtures().join(format!("refs/default/{model}/llamacpp-{}.request.json", quant.to_lowercase()));
    let text = std::fs::read_to_string(&path).ok()?;
    let mut req: serde_json::Value = serde_json::from_str(&text).expect("a JSON request");
    let prompts = req["prompts"].as_array().expect("prompts").clone();
    let mut p = prompts.into_iter().find(|p| p["id"] == PROMPT).expect("the suite has the prompt");
    p.as_object_mut().unwrap().remove("positions"); // every position, as the trace has them
    let ids: Vec<u32> = p["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    req["prompts"] = serde_json::json!([p]);
    req["decode_steps"] = serde_json::json!(DECODE);
    req["positions"] = serde_json::json!("all");
    std::fs::write(out, serde_json::to_vec(&req).unwrap()).unwrap();
    Some(ids)
}

fn check(model: &str, quant: &str, python: &Path, tmp: &Path) -> Result<(), String> {
    let gguf = fixtures().join(format!("gguf/{model}/{model}-{quant}.gguf"));
    let req = tmp.join(format!("{model}-{quant}.request.json"));
    let Some(ids) = request(model, quant, &req).filter(|_| gguf.exists()) else {
        skip(&format!("fixtures for {model} {quant} are missing (run `runner fixtures build`)"));
        return Ok(());
    };
    let (dump, trace) = (tmp.join(format!("{model}-{quant}-engine")), tmp.join(format!("{model}-{quant}-trace")));
    let o = engine_run(&req, &dump, &[]);
    if !o.status.success() {
        return Err(format!("{model} {quant}: the engine failed: {}", stderr(&o)));
    }
    let tokens: Vec<String> = ids.iter().map(u32::to_string).collect();
    let o = Command::new(python)
        .arg(script("llamacpp-trace.py"))
        .arg(&gguf)
        .arg(&trace)
        .args(["--tokens", &tokens.join(","), "--decode", &(DECODE - 1).to_string()])
        .output()
        .expect("python starts");
    if !o.status.success() {
        return Err(format!("{model} {quant}: llamacpp-trace.py failed: {}", stderr(&o)));
    }
    let o = Command::new(python).arg(script("trace-compare.py")).arg(&trace).arg(&dump).output().expect("python starts");
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    eprintln!("{model} {quant}:\n{table}");
    if !o.status.success() {
        return Err(format!("{model} {quant}: not llama.cpp's bits:\n{table}{}", stderr(&o)));
    }
    // greedy tokens: the argmax of llama.cpp's logits after the prompt and each decode step
    let logits = std::fs::read(trace.join("logits.bin")).unwrap();
    let logits: Vec<f32> = logits.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(trace.join("index.json")).unwrap()).unwrap();
    let v = index["n_vocab"].as_u64().unwrap() as usize;
    let rows: Vec<&[f32]> = logits.chunks_exact(v).collect();
    let steps = [ids.len() - 1, ids.len(), ids.len() + 1];
    let want: Vec<u32> = steps.iter().map(|&r| paritybench::engine::kernels::argmax(rows[r]) as u32).collect();
    let got = generated(&dump);
    if got != want {
        return Err(format!("{model} {quant}: greedy tokens {got:?}, llama.cpp's argmax {want:?}"));
    }
    Ok(())
}

/// The `generated` ids of the dump's first prompt.
fn generated(dump: &Path) -> Vec<u32> {
    let bytes = std::fs::read(dump.join("p0.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("generated").unwrap();
    t.data().chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32).collect()
}

#[test]
fn quantized_files_give_llama_cpps_bits_at_every_capture() {
    let Some(python) = support::python() else {
        skip("no Python with llama-cpp-python (run runners/setup.sh)");
        return;
    };
    if let Some(why) = support::ggml_bits_not_applicable(std::env::var("PARITYBENCH_LLAMACPP_ISA").ok().as_deref()) {
        eprintln!("NOTICE: not applicable on this machine: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for model in MODELS {
        for quant in QUANTS {
            if let Err(e) = check(model, quant, &python, tmp.path()) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
