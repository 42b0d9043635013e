//! GGUF as a [`WeightSource`] for the engine, and the model hyper-parameters the file
//! carries, read once into [`GgufConfig`] with the keys that were absent listed, so that the
//! engine can state every assumption it makes instead of guessing silently.

use std::path::{Path, PathBuf};

use super::file::{GgmlType, GgufError, GgufFile};
use super::quants::{self, QuantError};
use crate::engine::matrix::{Matrix, Storage};
use crate::engine::weights::{RawTensor, WeightError, WeightSource};

/// Hyper-parameters of a GGUF model. Keys are `{architecture}.{name}` in the file.
/// `None` means the key is absent (listed in [`GgufConfig::absent`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufConfig {
    /// `general.architecture`: `qwen3`, `qwen3moe`, `qwen2`, ...
    pub architecture: String,
    /// `general.file_type` (llama.cpp's `llama_ftype`), if present.
    pub file_type: Option<u64>,
    pub block_count: u64,
    pub embedding_length: u64,
    pub feed_forward_length: Option<u64>,
    pub head_count: u64,
    pub head_count_kv: Option<u64>,
    /// Per-head dimension of keys/queries (`attention.key_length`).
    pub key_length: Option<u64>,
    pub value_length: Option<u64>,
    pub rope_freq_base: Option<f64>,
    pub layer_norm_rms_epsilon: Option<f64>,
    pub context_length: Option<u64>,
    pub expert_count: Option<u64>,
    pub expert_used_count: Option<u64>,
    pub expert_feed_forward_length: Option<u64>,
    pub expert_shared_feed_forward_length: Option<u64>,
    /// `expert_weights_norm`: llama.cpp's name for `norm_topk_prob` (renormalise the top-k
    /// router weights). `convert_hf_to_gguf.py` does not write it for qwen3moe/qwen2moe;
    /// llama.cpp's qwen3moe graph then always renormalises.
    pub expert_weights_norm: Option<bool>,
    /// `expert_gating_func`: 1 softmax, 2 sigmoid, 4 sqrt-softplus.
    pub expert_gating_func: Option<u64>,
    /// Entries of `tokenizer.ggml.tokens`, if the file embeds a vocabulary.
    pub tokenizer_vocab_size: Option<u64>,
    /// Rows of `token_embd.weight` (the `V` of the logits), if that tensor exists.
    pub embedding_rows: Option<u64>,
    /// Every optional key above that the file does not have, fully qualified.
    pub absent: Vec<String>,
}

impl GgufConfig {
    /// Read the hyper-parameters. Required: `general.architecture`, `block_count`,
    /// `embedding_length`, `attention.head_count`; a key of the wrong type is an error.
    pub fn from_file(file: &GgufFile) -> Result<GgufConfig, GgufError> {
        let architecture = file.get_str("general.architecture")?.to_string();
        let arch = architecture.as_str();
        let mut absent = Vec::new();
        let mut opt_u64 = |name: &str| -> Result<Option<u64>, GgufError> {
            let key = format!("{arch}.{name}");
            let v = file.get_u64(&key)?;
            if v.is_none() {
                absent.push(key);
            }
            Ok(v)
        };
        let required = |v: Option<u64>, name: &str| {
            v.ok_or_else(|| GgufError::MissingKey { path: file.path().to_path_buf(), key: format!("{arch}.{name}") })
        };
        let block_count = required(opt_u64("block_count")?, "block_count")?;
        let embedding_length = required(opt_u64("embedding_length")?, "embedding_length")?;
        let head_count = required(opt_u64("attention.head_count")?, "attention.head_count")?;
        let feed_forward_length = opt_u64("feed_forward_length")?;
        let head_count_kv = opt_u64("attention.head_count_kv")?;
        let key_length = opt_u64("attention.key_length")?;
        let value_length = opt_u64("attention.value_length")?;
        let context_length = opt_u64("context_length")?;
        let expert_count = opt_u64("expert_count")?;
        let expert_used_count = opt_u64("expert_used_count")?;
        let expert_feed_forward_length = opt_u64("expert_feed_forward_length")?;
        let expert_shared_feed_forward_length = opt_u64("expert_shared_feed_forward_length")?;
        let expert_gating_func = opt_u64("expert_gating_func")?;

        let mut opt_f64 = |name: &str| -> Result<Option<f64>, GgufError> {
            let key = format!("{arch}.{name}");
            let v = file.get_f64(&key)?;
            if v.is_none() {
                absent.push(key);
            }
            Ok(v)
        };
        let rope_freq_base = opt_f64("rope.freq_base")?;
        let layer_norm_rms_epsilon = opt_f64("attention.layer_norm_rms_epsilon")?;

        let key = format!("{arch}.expert_weights_norm");
        let expert_weights_norm = file.get_bool(&key)?;
        if expert_weights_norm.is_none() {
            absent.push(key);
        }
        let file_type = file.get_u64("general.file_type")?;
        if file_type.is_none() {
            absent.push("general.file_type".into());
        }
        let tokenizer_vocab_size = match file.get("tokenizer.ggml.tokens") {
            Some(v) => match v.as_array() {
                Some((_, items)) => Some(items.len() as u64),
                None => {
                    return Err(GgufError::WrongType {
                        path: file.path().to_path_buf(),
                        key: "tokenizer.ggml.tokens".into(),
                        expected: "array of string",
                        found: v.describe(),
                    });
                }
            },
            None => {
                absent.push("tokenizer.ggml.tokens".into());
                None
            }
        };
        // token_embd.weight has GGUF dims [hidden, vocab]: the rows are the last dim.
        let embedding_rows = file.tensor("token_embd.weight").and_then(|t| t.dims.last().copied());

        Ok(GgufConfig {
            architecture,
            file_type,
            block_count,
            embedding_length,
            feed_forward_length,
            head_count,
            head_count_kv,
            key_length,
            value_length,
            rope_freq_base,
            layer_norm_rms_epsilon,
            context_length,
            expert_count,
            expert_used_count,
            expert_feed_forward_length,
            expert_shared_feed_forward_length,
            expert_weights_norm,
            expert_gating_func,
            tokenizer_vocab_size,
            embedding_rows,
            absent,
        })
    }

    /// `V`: rows of the embedding where known, else the tokenizer's entries.
    pub fn vocab_size(&self) -> Option<u64> {
        self.embedding_rows.or(self.tokenizer_vocab_size)
    }

    /// The quantization summary for manifests: the most common ggml type among
    /// the 2-D weights, e.g. `Q4_K` for a Q4_K_M file (which mixes Q4_K and Q6_K).
    pub fn dominant_type(file: &GgufFile) -> Option<&'static str> {
        let mut counts: Vec<(&'static str, u64)> = Vec::new();
        for t in file.tensors().iter().filter(|t| t.dims.len() >= 2) {
            let name = t.ggml_type.name();
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += t.n_elements,
                None => counts.push((name, t.n_elements)),
            }
        }
        counts.into_iter().max_by_key(|&(_, c)| c).map(|(n, _)| n)
    }
}

/// A GGUF file as the engine's weight source.
#[derive(Debug)]
pub struct GgufWeights {
    file: GgufFile,
}

impl GgufWeights {
    pub fn open(path: &Path) -> Result<GgufWeights, WeightError> {
        let file = GgufFile::open(path).map_err(|e| to_weight_error(path, e))?;
        Ok(GgufWeights { file })
    }

    /// The parsed file: metadata, tensor table, raw tensor bytes.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> Result<GgufConfig, WeightError> {
        GgufConfig::from_file(&self.file).map_err(|e| to_weight_error(self.file.path(), e))
    }
}

/// GGUF errors at the weight seam: I/O stays I/O, everything else is a format error whose
/// message names the field (the path is carried by the variant).
pub fn to_weight_error(path: &Path, e: GgufError) -> WeightError {
    match e {
        GgufError::Io { path, source } => WeightError::Io { path, source },
        other => WeightError::Format {
            path: path.to_path_buf(),
            format: "gguf",
            message: strip_path(path, &other.to_string()),
        },
    }
}

/// GgufError messages start with the path; WeightError::Format prints it again.
fn strip_path(path: &Path, message: &str) -> String {
    let prefix = format!("{}: ", path.display());
    message.strip_prefix(&prefix).unwrap_or(message).to_string()
}

impl WeightSource for GgufWeights {
    fn path(&self) -> PathBuf {
        self.file.path().to_path_buf()
    }

    fn format(&self) -> &'static str {
        "gguf"
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file.tensor(name).map(|t| t.torch_shape())
    }

    fn storage_type(&self, name: &str) -> Option<String> {
        self.file.tensor(name).map(|t| t.ggml_type.name().to_string())
    }

    fn load_f32(&self, name: &str) -> Result<Vec<f32>, WeightError> {
        let path = self.file.path();
        let architecture =
            || self.file.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("unknown").to_string();
        let info = self.file.tensor(name).ok_or_else(|| WeightError::MissingTensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            architecture: architecture(),
        })?;
        let unsupported = || WeightError::UnsupportedType {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            dtype: info.ggml_type.name().to_string(),
        };
        if !quants::is_supported(info.ggml_type) {
            return Err(unsupported());
        }
        // [n_elements] row-major, PyTorch order (= GGUF order read fastest-dim-last).
        let mut out = vec![0f32; info.n_elements as usize];
        quants::dequantize(info.ggml_type, self.file.tensor_bytes(info), &mut out).map_err(|e| match e {
            QuantError::Unsupported(_) => unsupported(),
            QuantError::SizeMismatch { .. } => WeightError::Format {
                path: path.to_path_buf(),
                format: "gguf",
                message: format!("tensor `{name}`: {e}"),
            },
        })?;
        Ok(out)
    }

    /// F32 tensors are copied out as f32; every other supported type stays mapped.
    fn load_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        let info = match self.file.tensor(name) {
            Some(info) if info.ggml_type != GgmlType::F32 && quants::is_supported(info.ggml_type) => info,
            _ => return Ok(Matrix::f32(self.load_f32(name)?, rows, cols)),
        };
        let (bs, ts) = info.ggml_type.block_layout();
        let (bs, ts) = (bs as usize, ts as usize);
        if !cols.is_multiple_of(bs) || info.n_bytes as usize != rows * (cols / bs) * ts {
            return Err(WeightError::Format {
                path: self.file.path().to_path_buf(),
                format: "gguf",
                message: format!(
                    "tensor `{name}`: {} bytes of {} do not hold [{rows}, {cols}] ({bs} elements per block of {ts} bytes)",
                    info.n_bytes, info.ggml_type
                ),
            });
        }
        Ok(Matrix { storage: Storage::Mapped { ty: info.ggml_type, bytes: self.file.tensor_mapped(info) }, rows, cols })
    }

    fn names(&self) -> Vec<String> {
        self.file.tensors().iter().map(|t| t.name.clone()).collect()
    }

    fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        let info = self.file.tensor(name)?;
        Some(RawTensor {
            storage_type: info.ggml_type.name(),
            shape: info.torch_shape(),
            bytes: self.file.tensor_bytes(info),
        })
    }
}
