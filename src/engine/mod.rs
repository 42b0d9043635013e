//! The built-in engine: a compact, readable inference engine for the Qwen family
//! (Qwen2, Qwen3, Qwen3-MoE) that loads safetensors and GGUF and speaks the dump protocol.
//!
//! - [`config`]: hyper-parameters (HF config.json or plain values), validated once
//! - [`weights`]: the [`weights::WeightSource`] seam; [`safetensors`] and [`gguf`] implement it
//! - [`model`]: weights by role, per-format name tables, the forward pass
//! - [`kernels`]: matmul, RMSNorm, RoPE, attention, softmax, SiLU, top-k
//! - [`matrix`]: weight matrices in their stored type (GGUF blocks stay mapped) and `x · Wᵀ`
//! - [`quant_dot`]: ggml-compatible activation quantizers and quantized dot products
//! - [`kv_cache`], [`captures`]: state a prompt carries through its forward calls
//! - [`backend`]: where the forward pass runs (chosen at run time)
//! - [`tokenizer`]: tokenizer.json, for tokenizer parity
//! - [`run`]: the protocol driver behind `runner engine run`
//! - `mutation` (feature `mutation-testing` only): injected bugs for the mutation tests

pub mod backend;
pub mod captures;
pub mod config;
pub mod ggml;
pub mod gguf;
pub mod kernels;
pub mod kv_cache;
pub mod matrix;
pub mod model;
#[cfg(feature = "mutation-testing")]
pub mod mutation;
pub mod quant_dot;
pub mod run;
pub mod safetensors;
pub mod tokenizer;
pub mod weights;

use std::path::PathBuf;

/// The engine's name in `describe` and in manifests.
pub const ENGINE_NAME: &str = "paritybench-engine";

/// Everything that can stop the engine; each variant names the file, prompt or value.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Protocol(#[from] crate::protocol::ProtocolError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Weights(#[from] weights::WeightError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    GgufTokenizer(#[from] gguf::TokenizerError),
    #[error("{}: prompt {prompt:?} has text but no tokenizer is available: the file embeds no vocabulary and the request names no tokenizer.json", path.display())]
    NoTokenizer { path: PathBuf, prompt: String },
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    CacheFull(#[from] kv_cache::CacheFull),
    #[error("{}: model format `{format}` is not supported by this build (it reads: {})", path.display(), run::FORMATS.join(", "))]
    UnsupportedFormat { path: PathBuf, format: String },
    #[error(
        "compute dtype `{dtype}` is not implemented by the {backend} backend (it computes in f32; ask for `auto` or `f32`)"
    )]
    UnsupportedDtype { dtype: String, backend: String },
    #[error("token id {id} is not below the vocabulary size V = {vocab}")]
    TokenOutOfVocab { id: u32, vocab: usize },
    #[error("prompt {prompt:?}, position {position}: token id {id} is not below the vocabulary size V = {vocab}")]
    PromptTokenOutOfVocab { prompt: String, position: usize, id: i64, vocab: usize },
    #[error("request option `{option}` = {value}: {message}")]
    BadOption { option: String, value: String, message: String },
    #[cfg(feature = "mutation-testing")]
    #[error(transparent)]
    Mutation(#[from] mutation::MutationError),
}
