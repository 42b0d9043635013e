//! The built-in engine: a compact, readable inference engine for the Qwen family
//! (Qwen2, Qwen3, Qwen3-MoE) that loads safetensors and GGUF and speaks the dump protocol.

pub mod gguf;
pub mod weights;
