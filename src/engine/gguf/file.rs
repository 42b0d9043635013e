//! The GGUF container, parsed exactly as llama.cpp writes it (`gguf-py/gguf/gguf_writer.py`,
//! read back by `ggml/src/gguf.cpp` and `gguf-py/gguf/gguf_reader.py`).
//!
//! Layout (little-endian; versions 2 and 3 share it):
//!
//! ```text
//! magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv x      { key: string, value_type u32, value }
//! n_tensors x { name: string, n_dims u32, dims u64[n_dims] (ne0 = fastest first),
//!               ggml_type u32, offset u64 (relative to the data section) }
//! padding to `general.alignment` (default 32)
//! data section: each tensor at data_offset + offset, offset a multiple of the alignment
//! ```
//!
//! A string is `len u64` then `len` bytes of UTF-8; an array is `item_type u32, count u64`
//! then the items. The whole header is validated when the file is opened (every length
//! against the bytes that remain, every tensor's byte range against the file's end), so a
//! truncated or corrupted file is an error naming the file and the field, never a panic.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

/// `general.alignment` when the file does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`: no tensor in a GGUF file has more dimensions.
pub const MAX_DIMS: u32 = 4;
/// Arrays of arrays are allowed by the format; deeper nesting than this is refused so that
/// a crafted file cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// Why a GGUF file could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a GGUF file: magic bytes are {found:02x?}, expected \"GGUF\"", path.display())]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{}: GGUF version {version} is not supported (2 and 3 are)", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{}: big-endian GGUF files are not supported (version field reads {raw:#010x})", path.display())]
    BigEndian { path: PathBuf, raw: u32 },
    #[error("{}: truncated: {what} at byte {offset} needs {needed} bytes, but the file has {file_len}", path.display())]
    Truncated { path: PathBuf, what: String, offset: u64, needed: u64, file_len: u64 },
    #[error("{}: metadata `{key}` has unknown value type id {type_id}", path.display())]
    UnknownValueType { path: PathBuf, key: String, type_id: u32 },
    #[error("{}: metadata `{key}`: bool byte is {value}, expected 0 or 1", path.display())]
    InvalidBool { path: PathBuf, key: String, value: u8 },
    #[error("{}: metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}", path.display())]
    NestingTooDeep { path: PathBuf, key: String },
    #[error("{}: {what} is not valid UTF-8", path.display())]
    InvalidUtf8 { path: PathBuf, what: String },
    #[error("{}: metadata key `{key}` appears twice", path.display())]
    DuplicateKey { path: PathBuf, key: String },
    #[error("{}: tensor `{tensor}` appears twice", path.display())]
    DuplicateTensor { path: PathBuf, tensor: String },
    #[error("{}: general.alignment is {value}, expected a non-zero power of two", path.display())]
    BadAlignment { path: PathBuf, value: u64 },
    #[error("{}: metadata `{key}` is {found}, expected {expected}", path.display())]
    WrongType { path: PathBuf, key: String, expected: &'static str, found: String },
    #[error("{}: metadata `{key}` is missing", path.display())]
    MissingKey { path: PathBuf, key: String },
    #[error("{}: tensor `{tensor}` has unknown ggml type id {type_id}", path.display())]
    UnknownGgmlType { path: PathBuf, tensor: String, type_id: u32 },
    #[error("{}: tensor `{tensor}` has {n_dims} dimensions (at most {MAX_DIMS})", path.display())]
    TooManyDims { path: PathBuf, tensor: String, n_dims: u32 },
    #[error("{}: tensor `{tensor}` has invalid dimensions {dims:?}", path.display())]
    BadDims { path: PathBuf, tensor: String, dims: Vec<u64> },
    #[error(
        "{}: tensor `{tensor}`: row length {ne0} is not a multiple of the {ggml_type} block size {block_size}",
        path.display()
    )]
    PartialBlock { path: PathBuf, tensor: String, ggml_type: &'static str, ne0: u64, block_size: u64 },
    #[error("{}: tensor `{tensor}` has offset {offset}, not a multiple of the alignment {alignment}", path.display())]
    Misaligned { path: PathBuf, tensor: String, offset: u64, alignment: u64 },
    #[error(
        "{}: tensor `{tensor}` spans bytes {start}..{end} but the file ends at {file_len} (truncated data?)",
        path.display()
    )]
    TensorOutOfBounds { path: PathBuf, tensor: String, start: u64, end: u64, file_len: u64 },
}

/// ggml tensor types, with the ids of `ggml.h` / `gguf-py/gguf/constants.py`.
///
/// Every type the format defines is listed so that an id outside this list is a corrupt
/// file, while a listed type the engine cannot dequantize is a clear "unsupported" error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    Bf16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
    Nvfp4,
    Q1_0,
    Q2_0,
}

/// Elements per super-block of the K-quants (`QK_K`).
pub const QK_K: u64 = 256;

impl GgmlType {
    /// The type with ggml id `id`, if the format defines one.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => Iq2Xxs,
            17 => Iq2Xs,
            18 => Iq3Xxs,
            19 => Iq1S,
            20 => Iq4Nl,
            21 => Iq3S,
            22 => Iq2S,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => Iq1M,
            30 => Bf16,
            34 => Tq1_0,
            35 => Tq2_0,
            39 => Mxfp4,
            40 => Nvfp4,
            41 => Q1_0,
            42 => Q2_0,
            _ => return None,
        })
    }

    /// The name gguf-py gives the type (`GGMLQuantizationType.<name>`): `F32`, `Q4_K`, `BF16`.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            Iq2Xxs => "IQ2_XXS",
            Iq2Xs => "IQ2_XS",
            Iq3Xxs => "IQ3_XXS",
            Iq1S => "IQ1_S",
            Iq4Nl => "IQ4_NL",
            Iq3S => "IQ3_S",
            Iq2S => "IQ2_S",
            Iq4Xs => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Iq1M => "IQ1_M",
            Bf16 => "BF16",
            Tq1_0 => "TQ1_0",
            Tq2_0 => "TQ2_0",
            Mxfp4 => "MXFP4",
            Nvfp4 => "NVFP4",
            Q1_0 => "Q1_0",
            Q2_0 => "Q2_0",
        }
    }

    /// `(elements per block, bytes per block)`, as `GGML_QUANT_SIZES` in gguf-py.
    pub fn block_layout(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | Bf16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 2 + 2 + 32),
            Q2K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8K => (QK_K, 4 + QK_K + QK_K / 8),
            Iq2Xxs => (QK_K, 2 + QK_K / 4),
            Iq2Xs => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            Iq3Xxs => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            Iq1S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            Iq4Nl => (32, 2 + 16),
            Iq3S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            Iq2S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            Iq4Xs => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            Iq1M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            Tq1_0 => (QK_K, 2 + 4 * 13),
            Tq2_0 => (QK_K, 2 + 64),
            Mxfp4 => (32, 1 + 16),
            Nvfp4 => (64, 4 + 32),
            Q1_0 => (128, 2 + 16),
            Q2_0 => (64, 2 + 16),
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Metadata value types (`GGUFValueType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Fewest bytes one value of this type occupies (for bounding allocations).
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Items all of `item_type` (itself possibly `Array`).
    Array {
        item_type: ValueType,
        items: Vec<MetaValue>,
    },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::String(_) => ValueType::String,
            MetaValue::Array { .. } => ValueType::Array,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F64(_) => ValueType::F64,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer of any width that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as f64, if it is a float (f32 widens exactly).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<(ValueType, &[MetaValue])> {
        match self {
            MetaValue::Array { item_type, items } => Some((*item_type, items)),
            _ => None,
        }
    }

    /// A short description for error messages: `u32`, `array of string (151936)`.
    pub fn describe(&self) -> String {
        match self {
            MetaValue::Array { item_type, items } => format!("array of {} ({})", item_type.name(), items.len()),
            other => other.value_type().name().to_string(),
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF (ggml) order: `dims[0]` is the contiguous, fastest-varying dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset relative to the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Shape in PyTorch order (GGUF dims reversed), e.g. `[out, in]` for a linear weight.
    pub fn torch_shape(&self) -> Vec<usize> {
        // Every dim was checked at parse time to make n_bytes fit in the file, so each fits usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// Everything before the data section: version, metadata, tensor table, layout.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl GgufHeader {
    /// Parse and validate the header of a GGUF file whose full contents are `bytes`.
    /// `path` is only used in error messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        let mut r = Reader { path, bytes, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(GgufError::BadMagic { path: path.to_path_buf(), found: magic.to_vec() });
        }
        let version = r.u32("version")?;
        if version & 0xFFFF == 0 && version != 0 {
            return Err(GgufError::BigEndian { path: path.to_path_buf(), raw: version });
        }
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { path: path.to_path_buf(), version });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;

        let mut metadata = Vec::with_capacity(r.bounded(n_kv, 8 + 4 + 1));
        let mut meta_index = HashMap::new();
        for i in 0..n_kv {
            let key = r.string(|| format!("key of metadata entry {i}"))?;
            let type_id = r.u32(&format!("value type of `{key}`"))?;
            let value = r.value(&key, type_id, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey { path: path.to_path_buf(), key });
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::U32(a)) if *a != 0 && a.is_power_of_two() => u64::from(*a),
            Some(MetaValue::U32(a)) => {
                return Err(GgufError::BadAlignment { path: path.to_path_buf(), value: u64::from(*a) });
            }
            Some(other) => {
                return Err(GgufError::WrongType {
                    path: path.to_path_buf(),
                    key: "general.alignment".into(),
                    expected: "u32",
                    found: other.describe(),
                });
            }
        };

        let mut tensors = Vec::with_capacity(r.bounded(n_tensors, 8 + 4 + 4 + 8));
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = r.string(|| format!("name of tensor {i}"))?;
            let info = r.tensor_info(name, alignment)?;
            if tensor_index.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor { path: path.to_path_buf(), tensor: info.name });
            }
            tensors.push(info);
        }

        let header_end = r.pos as u64;
        let data_offset = header_end.div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        for t in &tensors {
            let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        path: path.to_path_buf(),
                        tensor: t.name.clone(),
                        start: data_offset.saturating_add(t.offset),
                        end: data_offset.saturating_add(t.offset).saturating_add(t.n_bytes),
                        file_len,
                    });
                }
            }
        }
        Ok(GgufHeader { version, alignment, data_offset, metadata, meta_index, tensors, tensor_index })
    }

    /// Metadata entries in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Tensor entries in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
}

/// A GGUF file, memory-mapped, with its validated header.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    header: GgufHeader,
}

/// The bytes of one tensor inside a mapped GGUF file, kept alive by a shared handle on the
/// map (a model keeps its weights in the file's own types without copying them).
#[derive(Debug, Clone)]
pub struct MappedBytes {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only and model files are treated as immutable
        // inputs (their sha256 is recorded in every manifest). Another process truncating
        // or rewriting the file while it is mapped would be outside our control (SIGBUS or
        // changed bytes), the accepted risk of every memory-mapped model loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = GgufHeader::parse(path, &mmap)?;
        Ok(GgufFile { path: path.to_path_buf(), mmap: Arc::new(mmap), header })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.header.get(key)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        self.header.tensors()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensor(name)
    }

    /// The raw bytes of a tensor (bounds were checked when the file was opened).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + info.offset) as usize;
        &self.mmap[start..start + info.n_bytes as usize]
    }

    /// A tensor's bytes as a shared handle on the map (see [`MappedBytes`]).
    pub fn tensor_mapped(&self, info: &TensorInfo) -> MappedBytes {
        let start = (self.header.data_offset + info.offset) as usize;
        MappedBytes { map: Arc::clone(&self.mmap), start, len: info.n_bytes as usize }
    }

    /// A required string value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "string", v))
    }

    /// An optional unsigned integer (any integer width, non-negative).
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| self.wrong_type(key, "unsigned integer", v)),
        }
    }

    /// An optional float (f32 or f64; f32 widens exactly).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong_type(key, "float", v)),
        }
    }

    /// An optional bool.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong_type(key, "bool", v)),
        }
    }

    /// An optional array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let items = match v.as_array() {
            Some((ValueType::String, items)) => items,
            _ => return Err(self.wrong_type(key, "array of string", v)),
        };
        Ok(Some(items.iter().filter_map(MetaValue::as_str).collect()))
    }

    /// An optional array of integers (any width), as i64.
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let Some((_, items)) = v.as_array() else { return Err(self.wrong_type(key, "array of integers", v)) };
        items
            .iter()
            .map(|x| x.as_i64().ok_or_else(|| self.wrong_type(key, "array of integers", v)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.to_string() })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
        GgufError::WrongType { path: self.path.clone(), key: key.to_string(), expected, found: found.describe() }
    }
}

/// A bounds-checked little-endian cursor over the file's bytes.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: String, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what,
            offset: self.pos as u64,
            needed,
            file_len: self.bytes.len() as u64,
        }
    }

    fn take_with(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            return Err(self.truncated(what(), n));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        self.take_with(n, || what.to_string())
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take_with(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array(|| what.to_string()).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array(|| what.to_string()).map(u64::from_le_bytes)
    }

    /// How many items of at least `min_size` bytes can still fit: a safe `Vec` capacity.
    fn bounded(&self, count: u64, min_size: u64) -> usize {
        let remaining = (self.bytes.len() - self.pos) as u64;
        count.min(remaining / min_size.max(1)) as usize
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let len = u64::from_le_bytes(self.array(|| format!("length of {}", what()))?);
        let s = self.take_with(len, || format!("{} ({len} bytes)", what()))?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 { path: self.path.to_path_buf(), what: what() }),
        }
    }

    fn value(&mut self, key: &str, type_id: u32, depth: usize) -> Result<MetaValue, GgufError> {
        let Some(ty) = ValueType::from_id(type_id) else {
            return Err(GgufError::UnknownValueType { path: self.path.to_path_buf(), key: key.to_string(), type_id });
        };
        let what = || format!("value of `{key}`");
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                value => {
                    return Err(GgufError::InvalidBool { path: self.path.to_path_buf(), key: key.to_string(), value });
                }
            },
            ValueType::String => MetaValue::String(self.string(what)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep { path: self.path.to_path_buf(), key: key.to_string() });
                }
                let item_id = self.u32(&format!("item type of `{key}`"))?;
                let Some(item_type) = ValueType::from_id(item_id) else {
                    return Err(GgufError::UnknownValueType {
                        path: self.path.to_path_buf(),
                        key: key.to_string(),
                        type_id: item_id,
                    });
                };
                let count = self.u64(&format!("length of `{key}`"))?;
                let min = item_type.min_size();
                if count.saturating_mul(min) > (self.bytes.len() - self.pos) as u64 {
                    return Err(self.truncated(format!("{count} items of `{key}`"), count.saturating_mul(min)));
                }
                let mut items = Vec::with_capacity(self.bounded(count, min));
                for _ in 0..count {
                    items.push(self.value(key, item_id, depth + 1)?);
                }
                MetaValue::Array { item_type, items }
            }
        })
    }

    fn tensor_info(&mut self, name: String, alignment: u64) -> Result<TensorInfo, GgufError> {
        let path = || self.path.to_path_buf();
        let n_dims = self.u32(&format!("dimension count of tensor `{name}`"))?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims { path: path(), tensor: name, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(self.u64(&format!("dimension {d} of tensor `{name}`"))?);
        }
        let type_id = self.u32(&format!("type of tensor `{name}`"))?;
        let offset = self.u64(&format!("offset of tensor `{name}`"))?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnknownGgmlType { path: path(), tensor: name, type_id });
        };
        // ggml stores dims as int64: each must be non-negative as i64, and their product too.
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| if d > i64::MAX as u64 { None } else { acc.checked_mul(d) })
            .filter(|&n| n <= i64::MAX as u64);
        let Some(n_elements) = n_elements else {
            return Err(GgufError::BadDims { path: path(), tensor: name, dims });
        };
        let (block_size, type_size) = ggml_type.block_layout();
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % block_size != 0 {
            return Err(GgufError::PartialBlock {
                path: path(),
                tensor: name,
                ggml_type: ggml_type.name(),
                ne0,
                block_size,
            });
        }
        // n_elements / block_size <= i64::MAX / 1 and type_size <= 292, so this cannot overflow u64
        // unless the element count is absurd; checked_mul keeps it an error rather than a wrap.
        let Some(n_bytes) = (n_elements / block_size).checked_mul(type_size) else {
            return Err(GgufError::BadDims { path: path(), tensor: name, dims });
        };
        if offset % alignment != 0 {
            return Err(GgufError::Misaligned { path: path(), tensor: name, offset, alignment });
        }
        Ok(TensorInfo { name, dims, ggml_type, offset, n_elements, n_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// What gguf-py's writer never produces but the format allows: an empty array, an empty
    /// string, no tensors at all, and a custom alignment.
    #[test]
    fn format_edge_cases_parse() {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes()); // tensors
        b.extend_from_slice(&3u64.to_le_bytes()); // kv
        string(&mut b, "empty.array");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        string(&mut b, "empty.string");
        b.extend_from_slice(&8u32.to_le_bytes());
        string(&mut b, "");
        string(&mut b, "general.alignment");
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&64u32.to_le_bytes());
        let h = GgufHeader::parse(Path::new("edge.gguf"), &b).expect("parses");
        assert_eq!(h.version, 2);
        assert_eq!(h.get("empty.array"), Some(&MetaValue::Array { item_type: ValueType::String, items: vec![] }));
        assert_eq!(h.get("empty.string"), Some(&MetaValue::String(String::new())));
        assert_eq!(h.alignment, 64);
        assert_eq!(h.data_offset, (b.len() as u64).div_ceil(64) * 64);
        assert!(h.tensors().is_empty());

        // an alignment that is not a power of two
        let n = b.len();
        b[n - 4..].copy_from_slice(&48u32.to_le_bytes());
        let err = GgufHeader::parse(Path::new("edge.gguf"), &b).expect_err("bad alignment");
        assert!(matches!(err, GgufError::BadAlignment { value: 48, .. }), "{err}");
        assert_eq!(err.to_string(), "edge.gguf: general.alignment is 48, expected a non-zero power of two");
    }
}
