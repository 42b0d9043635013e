//! The request an adapter receives: which model, which token ids, what to record.
//!
//! Engines are always given token ids, never only text: the ids are the contract between
//! the engine under test and every reference, so nobody re-tokenizes on the other side.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CapturePoint, ProtocolError, SCHEMA_VERSION};

/// `prefill`: the whole prompt in one forward pass. `incremental`: one token at a time
/// through the KV cache, dumping logits at the same positions (catches KV-cache and
/// decode-kernel bugs that a prefill never exercises).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Prefill,
    Incremental,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Prefill => "prefill",
            Mode::Incremental => "incremental",
        }
    }
}

/// Compute dtype asked of the engine. `Auto` lets the engine use the checkpoint's own dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl ComputeDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            ComputeDtype::Auto => "auto",
            ComputeDtype::F32 => "f32",
            ComputeDtype::F16 => "f16",
            ComputeDtype::Bf16 => "bf16",
        }
    }
}

/// Which positions of a prompt to score: every position, or an explicit ascending list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(untagged)]
pub enum Positions {
    #[default]
    #[serde(with = "all_marker")]
    All,
    List(Vec<u32>),
}

impl Positions {
    /// The absolute positions to score for a prompt of `n_tokens` tokens.
    pub fn resolve(&self, n_tokens: usize) -> Vec<u32> {
        match self {
            Positions::All => (0..n_tokens as u32).collect(),
            Positions::List(v) => v.clone(),
        }
    }
}

/// Which layers to capture: every decoder layer, or an explicit list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(untagged)]
pub enum Layers {
    #[default]
    #[serde(with = "all_marker")]
    All,
    List(Vec<u32>),
}

impl Layers {
    pub fn resolve(&self, n_layers: usize) -> Vec<u32> {
        match self {
            Layers::All => (0..n_layers as u32).collect(),
            Layers::List(v) => v.iter().copied().filter(|&l| (l as usize) < n_layers).collect(),
        }
    }
    pub fn contains(&self, layer: u32) -> bool {
        match self {
            Layers::All => true,
            Layers::List(v) => v.contains(&layer),
        }
    }
}

/// (De)serializes a unit variant as the string `"all"`.
mod all_marker {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("all")
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        let s = String::deserialize(d)?;
        if s == "all" {
            Ok(())
        } else {
            Err(serde::de::Error::custom(format!("expected \"all\" or a list, got {s:?}")))
        }
    }
}

/// The model an adapter must load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// A checkpoint directory (safetensors + config.json) or a `.gguf` file.
    pub path: PathBuf,
    /// sha256 of the weights file(s) as recorded at fixture time; adapters may check it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `safetensors` or `gguf`; inferred from the path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A tokenizer.json to use instead of the one beside the weights / inside the GGUF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
}

/// One prompt: its final token ids (and the text they came from, for tokenizer parity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    pub id: String,
    pub token_ids: Vec<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Whether `text` was tokenized with the chat template applied (informational).
    #[serde(default)]
    pub chat: bool,
    /// Positions to score for this prompt; the request's `positions` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<Positions>,
}

/// What to capture besides logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CaptureSpec {
    #[serde(default)]
    pub points: Vec<CapturePoint>,
    #[serde(default)]
    pub layers: Layers,
}

/// The request file, `REQ.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub schema: u32,
    pub model: ModelRef,
    pub prompts: Vec<Prompt>,
    #[serde(default)]
    pub positions: Positions,
    #[serde(default)]
    pub captures: CaptureSpec,
    /// Greedy decode steps after the prompt (0: none).
    #[serde(default)]
    pub decode_steps: u32,
    pub mode: Mode,
    /// `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub dtype: ComputeDtype,
    /// Untimed runs before the timed ones.
    #[serde(default)]
    pub warmup: u32,
    /// Timed repetitions; the dump holds the outputs of the first, timings of all.
    #[serde(default = "one")]
    pub repeats: u32,
    /// Adapter-specific options (e.g. `{"attention": "sdpa"}` for the HF adapter).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub options: serde_json::Map<String, serde_json::Value>,
}

fn default_device() -> String {
    "cpu".to_string()
}
fn one() -> u32 {
    1
}

impl Request {
    /// Reads and validates a request file; every error names the file and the field.
    pub fn load(path: &Path) -> Result<Request, ProtocolError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ProtocolError::Io { path: path.to_path_buf(), source })?;
        let req: Request =
            serde_json::from_str(&text).map_err(|source| ProtocolError::Json { path: path.to_path_buf(), source })?;
        req.validate().map_err(|e| e.in_file(path))?;
        Ok(req)
    }

    pub fn save(&self, path: &Path) -> Result<(), ProtocolError> {
        let text = serde_json::to_string_pretty(self).expect("a request always serializes");
        std::fs::write(path, text).map_err(|source| ProtocolError::Io { path: path.to_path_buf(), source })
    }

    /// Checks what serde cannot: schema version, non-empty prompts, positions in range and
    /// ascending, unique prompt ids.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.schema != SCHEMA_VERSION {
            return Err(ProtocolError::invalid(
                "schema",
                format!("request schema {} is not supported (this runner speaks {SCHEMA_VERSION})", self.schema),
            ));
        }
        if self.prompts.is_empty() {
            return Err(ProtocolError::invalid("prompts", "no prompts".to_string()));
        }
        if self.repeats == 0 {
            return Err(ProtocolError::invalid("repeats", "must be at least 1".to_string()));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.prompts.iter().enumerate() {
            let field = format!("prompts[{i}]");
            if !seen.insert(p.id.as_str()) {
                return Err(ProtocolError::invalid(&field, format!("duplicate prompt id {:?}", p.id)));
            }
            if p.token_ids.is_empty() {
                return Err(ProtocolError::invalid(&field, format!("prompt {:?} has no token ids", p.id)));
            }
            if let Some(bad) = p.token_ids.iter().find(|&&t| t < 0) {
                return Err(ProtocolError::invalid(&field, format!("prompt {:?} has negative token id {bad}", p.id)));
            }
            let positions = self.positions_of(i);
            check_positions(&positions, p.token_ids.len()).map_err(|msg| {
                ProtocolError::invalid(&format!("{field}.positions"), format!("prompt {:?}: {msg}", p.id))
            })?;
        }
        Ok(())
    }

    /// The resolved positions to score for prompt `i`.
    pub fn positions_of(&self, i: usize) -> Vec<u32> {
        let p = &self.prompts[i];
        p.positions.as_ref().unwrap_or(&self.positions).resolve(p.token_ids.len())
    }

    /// sha256 of this request as [`Request::save`] writes it. A manifest's `request_sha256`
    /// is the sha256 of the request file's bytes, which is this for files written by `save`.
    pub fn sha256(&self) -> String {
        super::sha256_hex(serde_json::to_string_pretty(self).expect("serializes").as_bytes())
    }
}

fn check_positions(positions: &[u32], n_tokens: usize) -> Result<(), String> {
    if positions.is_empty() {
        return Err("no positions to score".to_string());
    }
    for w in positions.windows(2) {
        if w[1] <= w[0] {
            return Err(format!("positions must be strictly ascending ({} then {})", w[0], w[1]));
        }
    }
    if let Some(&last) = positions.last() {
        if last as usize >= n_tokens {
            return Err(format!("position {last} is outside the prompt of {n_tokens} tokens"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> &'static str {
        r#"{"schema":1,"model":{"path":"m"},"prompts":[{"id":"a","token_ids":[1,2,3]}],"mode":"prefill"}"#
    }

    #[test]
    fn defaults_fill_in() {
        let r: Request = serde_json::from_str(minimal()).unwrap();
        r.validate().unwrap();
        assert_eq!(r.positions, Positions::All);
        assert_eq!(r.positions_of(0), vec![0, 1, 2]);
        assert_eq!(r.device, "cpu");
        assert_eq!(r.repeats, 1);
        assert_eq!(r.captures.layers, Layers::All);
    }

    #[test]
    fn round_trips() {
        let mut r: Request = serde_json::from_str(minimal()).unwrap();
        r.positions = Positions::List(vec![1, 2]);
        r.captures.points = vec![CapturePoint::AttnOut, CapturePoint::Embed];
        r.captures.layers = Layers::List(vec![0]);
        let s = serde_json::to_string(&r).unwrap();
        let back: Request = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
        assert!(s.contains("\"attn_out\""), "{s}");
    }

    #[test]
    fn rejects_bad_positions_with_the_prompt_named() {
        let mut r: Request = serde_json::from_str(minimal()).unwrap();
        r.positions = Positions::List(vec![0, 3]);
        let e = r.validate().unwrap_err().to_string();
        assert!(e.contains("prompts[0].positions") && e.contains("position 3"), "{e}");
        r.positions = Positions::List(vec![2, 1]);
        assert!(r.validate().unwrap_err().to_string().contains("ascending"));
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        let bad = minimal().replace("\"mode\":\"prefill\"", "\"mode\":\"prefil\"");
        assert!(serde_json::from_str::<Request>(&bad).is_err());
        let bad = minimal().replace("\"schema\":1", "\"schema\":1,\"promts\":[]");
        assert!(serde_json::from_str::<Request>(&bad).is_err());
        let bad = minimal().replace("[1,2,3]", "[1,-2,3]");
        let r: Request = serde_json::from_str(&bad).unwrap();
        assert!(r.validate().unwrap_err().to_string().contains("negative token id -2"));
    }
}
