//! `runner engine describe | run --request FILE --out DIR`: the built-in engine's adapter.
//!
//! `run` exits 0 when the dump is complete and 2 when it could not be made (the error,
//! also recorded in the manifest when the dump directory exists, says why).

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
    }
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
