//! `manifest.json`: who computed a dump, from what, how, and which prompts it finished.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CapturePoint, Mode, ProtocolError, SCHEMA_VERSION};

/// The engine that wrote a dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EngineInfo {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_sha: Option<String>,
    /// e.g. `cpu`, `cuda`, `llama.cpp-cpu`, `torch-eager`.
    pub backend: String,
    /// e.g. `cpu`, `cuda:0`.
    pub device: String,
    /// Human-readable device name (CPU model, GPU name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Library versions and other provenance (torch, transformers, llama.cpp sdist, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
}

/// The model a dump was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelInfo {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `safetensors` or `gguf`.
    pub format: String,
    /// Weight storage type: `f32`, `f16`, `bf16`, `Q8_0`, `Q4_K_M`, ...
    pub quant: String,
    /// The dtype arithmetic ran in (`f32`, `f16`, `bf16`).
    pub compute_dtype: String,
    /// `qwen2`, `qwen3`, `qwen3_moe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_layers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<u32>,
    /// Hyper-parameters the engine had to assume because the file was silent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub assumed: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TokenizerInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub add_bos: bool,
}

/// Timings of one prompt, milliseconds. With `repeats > 1` the lists hold every timed run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Timings {
    #[serde(default)]
    pub prefill_ms: Vec<f64>,
    #[serde(default)]
    pub decode_ms: Vec<f64>,
    pub prefill_tokens: u32,
    pub decode_tokens: u32,
    /// Time to the first generated token (prefill plus sampling), per timed run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ttft_ms: Vec<f64>,
}

/// One finished prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub index: u32,
    pub id: String,
    /// Shard file name, relative to the dump directory.
    pub file: String,
    pub n_tokens: u32,
    pub n_positions: u32,
    pub n_generated: u32,
    #[serde(default)]
    pub timings: Timings,
    /// sha256 of the shard file.
    pub sha256: String,
    /// Whether the engine's own tokenization of the prompt text equals the request's ids;
    /// absent where the engine has no tokenizer or the prompt no text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_match: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<u64>,
}

/// Which captures a dump holds, and which it was asked for but cannot provide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CaptureRecord {
    #[serde(default)]
    pub points: Vec<CapturePoint>,
    #[serde(default)]
    pub layers: Vec<u32>,
    /// Capture points requested but absent (a capability the engine lacks), with why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub absent: BTreeMap<String, String>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    /// Set last: every requested prompt was written.
    pub complete: bool,
    pub engine: EngineInfo,
    pub model: ModelInfo,
    #[serde(default)]
    pub tokenizer: TokenizerInfo,
    pub mode: Mode,
    /// sha256 of the request this dump answers.
    pub request_sha256: String,
    /// Every prompt id of the request, in order (so a partial dump can name what is missing).
    pub prompt_ids: Vec<String>,
    /// Finished prompts, in the order they finished.
    pub prompts: Vec<PromptRecord>,
    #[serde(default)]
    pub captures: CaptureRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<u64>,
    /// The command line that produced the dump.
    #[serde(default)]
    pub command: Vec<String>,
    /// UTC time the dump was started, RFC 3339.
    pub created_utc: String,
    /// Set when the engine stopped on an error it could report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Anything else worth keeping (e.g. statistics a reference computed at fixture time).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, ProtocolError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ProtocolError::Io { path: path.to_path_buf(), source })?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|source| ProtocolError::Json { path: path.to_path_buf(), source })?;
        if m.schema != SCHEMA_VERSION {
            return Err(ProtocolError::Invalid {
                path: Some(path.to_path_buf()),
                field: "schema".into(),
                message: format!("manifest schema {} is not supported (this runner reads {SCHEMA_VERSION})", m.schema),
            });
        }
        Ok(m)
    }

    /// The record of a finished prompt, by id.
    pub fn prompt(&self, id: &str) -> Option<&PromptRecord> {
        self.prompts.iter().find(|p| p.id == id)
    }

    /// Requested prompts that were never finished.
    pub fn missing_prompts(&self) -> Vec<&str> {
        self.prompt_ids.iter().filter(|id| self.prompt(id).is_none()).map(String::as_str).collect()
    }
}
