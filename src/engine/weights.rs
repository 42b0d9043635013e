//! Where the engine's weights come from: one trait, one implementation per file format.
//!
//! The architecture code asks for tensors by name in the *file's own* naming (HF names for
//! safetensors, `blk.N.*` names for GGUF; see `model.rs` for the per-architecture role ->
//! name tables) and always receives row-major f32 in PyTorch dimension order (`[out, in]`
//! for a linear layer, `[E, out, in]` for stacked experts). Quantized storage is
//! dequantized on load by [`WeightSource::load_f32`]; [`WeightSource::load_matrix`] keeps a
//! weight matrix in its stored type where the source can (GGUF: mapped ggml blocks);
//! [`WeightSource::raw`] also gives the stored bytes, for a backend that
//! dequantizes on its device (CUDA).

use std::path::PathBuf;

use super::matrix::Matrix;

/// Why a weight could not be provided. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a valid {format} file: {message}", path.display())]
    Format { path: PathBuf, format: &'static str, message: String },
    #[error("{}: missing tensor `{tensor}` (architecture {architecture})", path.display())]
    MissingTensor { path: PathBuf, tensor: String, architecture: String },
    #[error("{}: tensor `{tensor}` has shape {got:?}, expected {expected:?}", path.display())]
    Shape { path: PathBuf, tensor: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("{}: tensor `{tensor}` has unsupported type {dtype}", path.display())]
    UnsupportedType { path: PathBuf, tensor: String, dtype: String },
}

/// A tensor's bytes exactly as the file stores them (for a backend that dequantizes on its
/// device): the storage type by the file's name for it (`Q4_K`, `F16`, ...), the shape in
/// PyTorch order, and the bytes (whole blocks, the element order of [`WeightSource::load_f32`]).
#[derive(Debug, Clone)]
pub struct RawTensor<'a> {
    pub storage_type: &'static str,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

/// A source of named weight tensors.
pub trait WeightSource: Send + Sync {
    /// The file (or directory) the weights come from, for messages and manifests.
    fn path(&self) -> PathBuf;
    /// `safetensors` or `gguf`.
    fn format(&self) -> &'static str;
    /// Shape in PyTorch order (row-major, last dimension contiguous), if the tensor exists.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Storage type as the file names it (`F32`, `BF16`, `Q4_K`, ...), if the tensor exists.
    fn storage_type(&self, name: &str) -> Option<String>;
    /// The tensor as row-major f32 in PyTorch order, dequantized if needed.
    fn load_f32(&self, name: &str) -> Result<Vec<f32>, WeightError>;
    /// The tensor as a matrix `[rows, cols]` (`cols` the last dimension): in its stored type
    /// where the source keeps it mapped, else f32 from [`WeightSource::load_f32`]. The
    /// caller has checked that the shape has `rows * cols` elements.
    fn load_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        Ok(Matrix::f32(self.load_f32(name)?, rows, cols))
    }
    /// Every tensor name in the file.
    fn names(&self) -> Vec<String>;
    /// The stored bytes of a tensor, where the format keeps blocks a device can dequantize
    /// itself (GGUF); `None` for formats and tensors without (the caller uses `load_f32`).
    fn raw(&self, _name: &str) -> Option<RawTensor<'_>> {
        None
    }
}
