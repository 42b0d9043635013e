//! `runner engine describe | run --request FILE --out DIR`: the built-in engine's adapter;
//! `runner engine dequant-check --device cuda:N FILE.gguf...`: the GPU's dequantization of
//! every tensor vs the host's, bit for bit.
//!
//! `run` exits 0 when the dump is complete and 2 when it could not be made (the error,
//! also recorded in the manifest when the dump directory exists, says why). `dequant-check`
//! exits 0 when every element of every checked tensor matches in every storage type, 1 when
//! one differs, 2 when it could not run (no GPU, unreadable file).

use std::path::PathBuf;

use anyhow::Context;

use super::Outcome;
use crate::engine::{self, backend, run};
use crate::protocol::CapturePoint;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Print the engine's name, version, backends and capabilities as JSON.
    Describe,
    /// Run a request (REQ.json) and write the dump directory.
    Run {
        /// The request file.
        #[arg(long)]
        request: PathBuf,
        /// The dump directory to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Dequantize every tensor of GGUF files on a GPU (to f32, f16 and bf16) and compare
    /// the bits with the host's dequantization.
    DequantCheck {
        /// The GPU, `cuda:N`.
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// Also write the per-tensor results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// GGUF files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<Outcome> {
    match cmd {
        Command::Describe => {
            println!("{}", serde_json::to_string_pretty(&describe()).context("serializing describe")?);
            Ok(Outcome::Passed)
        }
        Command::Run { request, out } => {
            let command: Vec<String> = std::env::args().collect();
            run::run(&request, &out, command).with_context(|| format!("engine run of {}", request.display()))?;
            Ok(Outcome::Passed)
        }
        Command::DequantCheck { device, json, files } => dequant_check(&device, json.as_deref(), &files),
    }
}

fn dequant_check(device: &str, json: Option<&std::path::Path>, files: &[PathBuf]) -> anyhow::Result<Outcome> {
    use crate::engine::backend::cuda::{CudaBackend, dequant};
    use crate::engine::gguf::GgufWeights;
    use crate::engine::weights::WeightSource;
    use std::collections::BTreeMap;

    let ordinal = match backend::Device::parse(device)? {
        backend::Device::Cuda(n) => n,
        backend::Device::Cpu => anyhow::bail!("dequant-check needs a GPU (`--device cuda:N`), not `{device}`"),
    };
    let gpu = CudaBackend::new(ordinal)?;
    println!("device: {}", gpu.fingerprint().key());
    // per stored type: (tensors, elements, differing elements over the three storage types)
    let mut by_type: BTreeMap<&'static str, (usize, usize, usize)> = BTreeMap::new();
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows = Vec::new();
    for path in files {
        let w = GgufWeights::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut n_file = 0;
        for name in w.names() {
            let Some(raw) = w.raw(&name) else { continue };
            if dequant::plan(raw.storage_type, &raw.shape, raw.bytes.len()).is_err() {
                *skipped.entry(raw.storage_type.to_string()).or_insert(0) += 1;
                continue;
            }
            let c = gpu.check_dequant(&name, &raw).with_context(|| format!("{}: {name}", path.display()))?;
            let bad: usize = c.mismatches.iter().map(|(_, n)| n).sum();
            let e = by_type.entry(c.storage_type).or_insert((0, 0, 0));
            *e = (e.0 + 1, e.1 + c.n_elements, e.2 + bad);
            if let Some((ty, i, h, d)) = c.first {
                println!(
                    "MISMATCH {} {name} ({}): {bad} elements, first {} [{i}] host {h:#010x} device {d:#010x}",
                    path.display(),
                    c.storage_type,
                    ty.as_str()
                );
            }
            rows.push(serde_json::json!({
                "file": path.display().to_string(), "tensor": name, "type": c.storage_type,
                "elements": c.n_elements,
                "mismatches": c.mismatches.iter().map(|(t, n)| (t.as_str().to_string(), *n)).collect::<BTreeMap<_, _>>(),
            }));
            n_file += 1;
        }
        println!("{}: {n_file} tensors checked", path.display());
    }
    println!("{:<6} {:>8} {:>14} {:>10}", "type", "tensors", "elements", "differing");
    for (t, (n, e, bad)) in &by_type {
        println!("{t:<6} {n:>8} {e:>14} {bad:>10}");
    }
    if !skipped.is_empty() {
        println!("not checked (no device dequantization): {skipped:?}");
    }
    let total_bad: usize = by_type.values().map(|v| v.2).sum();
    if let Some(p) = json {
        let doc = serde_json::json!({
            "device": gpu.fingerprint().key(),
            "storage_types": ["f32", "f16", "bf16"],
            "by_type": by_type.iter().map(|(t, (n, e, b))| (t.to_string(), serde_json::json!({"tensors": n, "elements": e, "differing": b}))).collect::<BTreeMap<_, _>>(),
            "skipped": skipped,
            "tensors": rows,
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", p.display()))?;
    }
    if by_type.is_empty() {
        anyhow::bail!("no tensor of a supported type in {} file(s)", files.len());
    }
    Ok(if total_bad == 0 { Outcome::Passed } else { Outcome::GateFailed })
}

/// The JSON `describe` prints.
pub fn describe() -> serde_json::Value {
    serde_json::json!({
        "name": engine::ENGINE_NAME,
        "version": run::VERSION,
        "git_sha": run::git_sha(),
        "backends": backend::BACKENDS,
        "formats": run::FORMATS,
        "dtypes": ["f32"],
        "architectures": engine::config::Architecture::ALL.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
        "capabilities": {
            "captures": CapturePoint::ALL.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
            "modes": ["prefill", "incremental"],
            "decode": true,
            "logits": "full",
            "tokenizer": true,
            "options": {
                "threads": "CPU worker threads (default: RAYON_NUM_THREADS or one per core)",
                "quant_dot": "quantized GGUF weights on the CPU: \"ggml\" (default: 8-bit activations and integer dot products, as llama.cpp) or \"f32\" (dequantized weights, f32 arithmetic)",
            },
        },
    })
}
