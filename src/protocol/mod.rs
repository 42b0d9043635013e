//! The dump protocol: the common language between paritybench and every engine.
//!
//! Every engine — the one under test and every reference — is given a [`Request`] (token
//! ids, positions, capture points, mode) and writes a dump directory: `manifest.json` plus
//! one `p{i}.safetensors` shard per prompt, each written as its prompt finishes. The
//! manifest is marked `complete: true` last, so an engine that dies half-way still leaves
//! its finished prompts usable. See `docs/PROTOCOL.md` for the wire format.

mod dump;
mod manifest;
mod request;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use dump::{Dtype, Dump, DumpWriter, PromptShard, ShardTensors, Tensor, TensorView};
pub use manifest::{CaptureRecord, EngineInfo, Manifest, ModelInfo, PromptRecord, Timings, TokenizerInfo};
pub use request::{CaptureSpec, ComputeDtype, Layers, Mode, ModelRef, Positions, Prompt, Request};

/// The protocol version this runner reads and writes (requests and manifests).
pub const SCHEMA_VERSION: u32 = 1;

/// Canonical capture points (SPEC "Engines and the dump protocol").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapturePoint {
    /// Token embedding output (layer 0 only). `[P, H]`
    Embed,
    /// Input RMSNorm output, before the q/k/v projections. `[P, H]`
    AttnNorm,
    /// Attention block output after o_proj, before the residual add. `[P, H]`
    AttnOut,
    /// Post-attention RMSNorm output. `[P, H]`
    FfnNorm,
    /// Router logits before softmax (MoE layers). `[P, E]`
    MoeRouter,
    /// Chosen experts in order (MoE layers). `[P, k]` i32
    MoeTopkIds,
    /// MLP / MoE block output, before the residual add. `[P, H]`
    FfnOut,
    /// Residual stream after the layer. `[P, H]`
    LayerOut,
    /// Final RMSNorm output, the lm_head input (layer 0 only). `[P, H]`
    FinalNorm,
}

impl CapturePoint {
    pub const ALL: [CapturePoint; 9] = [
        CapturePoint::Embed,
        CapturePoint::AttnNorm,
        CapturePoint::AttnOut,
        CapturePoint::FfnNorm,
        CapturePoint::MoeRouter,
        CapturePoint::MoeTopkIds,
        CapturePoint::FfnOut,
        CapturePoint::LayerOut,
        CapturePoint::FinalNorm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CapturePoint::Embed => "embed",
            CapturePoint::AttnNorm => "attn_norm",
            CapturePoint::AttnOut => "attn_out",
            CapturePoint::FfnNorm => "ffn_norm",
            CapturePoint::MoeRouter => "moe_router",
            CapturePoint::MoeTopkIds => "moe_topk_ids",
            CapturePoint::FfnOut => "ffn_out",
            CapturePoint::LayerOut => "layer_out",
            CapturePoint::FinalNorm => "final_norm",
        }
    }

    pub fn parse(s: &str) -> Option<CapturePoint> {
        CapturePoint::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Points recorded once per model rather than per layer (stored under layer 0).
    pub fn is_global(self) -> bool {
        matches!(self, CapturePoint::Embed | CapturePoint::FinalNorm)
    }

    /// Points that exist only on MoE layers.
    pub fn is_moe(self) -> bool {
        matches!(self, CapturePoint::MoeRouter | CapturePoint::MoeTopkIds)
    }

    /// The tensor name in a shard: `hidden.{capture}.{layer}`.
    pub fn tensor_name(self, layer: u32) -> String {
        format!("hidden.{}.{layer}", self.as_str())
    }

    /// Parses `hidden.{capture}.{layer}`.
    pub fn parse_tensor_name(name: &str) -> Option<(CapturePoint, u32)> {
        let rest = name.strip_prefix("hidden.")?;
        let (cap, layer) = rest.rsplit_once('.')?;
        Some((CapturePoint::parse(cap)?, layer.parse().ok()?))
    }
}

impl fmt::Display for CapturePoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong reading or writing the protocol; each variant names the
/// file, tensor or field involved.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: malformed JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: invalid field `{field}`: {message}", path.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "request".into()))]
    Invalid { path: Option<PathBuf>, field: String, message: String },
    #[error("{}: not a readable safetensors shard: {message}", path.display())]
    Shard { path: PathBuf, message: String },
    #[error("{}: missing tensor `{tensor}`", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{}: tensor `{tensor}` has shape {got:?}, expected {expected}", path.display())]
    Shape { path: PathBuf, tensor: String, got: Vec<usize>, expected: String },
    #[error("{}: tensor `{tensor}` has dtype {got}, expected {expected}", path.display())]
    Dtype { path: PathBuf, tensor: String, got: String, expected: String },
    #[error("{}: {message}", path.display())]
    Mismatch { path: PathBuf, message: String },
    #[error("{}: the dump is incomplete (manifest not marked complete); finished prompts: {finished}", path.display())]
    Incomplete { path: PathBuf, finished: usize },
}

impl ProtocolError {
    pub fn invalid(field: &str, message: String) -> ProtocolError {
        ProtocolError::Invalid { path: None, field: field.to_string(), message }
    }

    /// Attaches the file to an error raised before the file was known.
    pub fn in_file(self, file: &Path) -> ProtocolError {
        match self {
            ProtocolError::Invalid { path: None, field, message } => {
                ProtocolError::Invalid { path: Some(file.to_path_buf()), field, message }
            }
            other => other,
        }
    }
}

/// Lower-case hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Lower-case hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_names_round_trip() {
        for c in CapturePoint::ALL {
            assert_eq!(CapturePoint::parse(c.as_str()), Some(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(CapturePoint::parse_tensor_name(&c.tensor_name(7)), Some((c, 7)));
        }
        assert_eq!(CapturePoint::parse_tensor_name("hidden.attn_out.x"), None);
        assert_eq!(CapturePoint::parse_tensor_name("logits"), None);
    }
}
