//! GGUF models as llama.cpp writes them: the container ([`file`]), dequantization of its
//! block formats to f32 ([`quants`]), the engine's [`WeightSource`](crate::engine::weights::WeightSource)
//! with the model's hyper-parameters ([`weights`]), and the embedded tokenizer ([`tokenizer`]).

pub mod file;
pub mod quants;
pub mod tokenizer;
pub mod weights;

pub use file::{GgmlType, GgufError, GgufFile, GgufHeader, MappedBytes, MetaValue, TensorInfo};
pub use tokenizer::{GgufTokenizer, TokenizerError, embedded_tokenizer, load_tokenizer};
pub use weights::{GgufConfig, GgufWeights};
