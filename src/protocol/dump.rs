//! Writing and reading dump directories.
//!
//! Writing: [`DumpWriter`] writes the manifest (not complete) first, then each prompt's
//! shard through a temporary file and a rename, then the manifest again listing it, and
//! finally the manifest marked complete. A reader never sees a half-written shard.
//!
//! Reading: [`Dump`] opens the manifest; [`Dump::shard`] memory-maps one shard and checks
//! it against the manifest (names, dtypes, shapes, positions) before anything is compared.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use super::{CapturePoint, Manifest, PromptRecord, ProtocolError, Timings};

/// Element types a dump may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    I32,
}

impl Dtype {
    fn from_st(d: safetensors::Dtype) -> Option<Dtype> {
        match d {
            safetensors::Dtype::F32 => Some(Dtype::F32),
            safetensors::Dtype::F16 => Some(Dtype::F16),
            safetensors::Dtype::BF16 => Some(Dtype::Bf16),
            safetensors::Dtype::I32 => Some(Dtype::I32),
            _ => None,
        }
    }
    fn to_st(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::Bf16 => safetensors::Dtype::BF16,
            Dtype::I32 => safetensors::Dtype::I32,
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
    pub fn is_float(self) -> bool {
        !matches!(self, Dtype::I32)
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::I32 => "I32",
        }
    }
}

/// An owned tensor to be written into a shard.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    F16 { shape: Vec<usize>, data: Vec<f16> },
    Bf16 { shape: Vec<usize>, data: Vec<bf16> },
    I32 { shape: Vec<usize>, data: Vec<i32> },
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?} does not fit {} values", data.len());
        Tensor::F32 { shape, data }
    }
    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?} does not fit {} values", data.len());
        Tensor::I32 { shape, data }
    }
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32 { shape, .. }
            | Tensor::F16 { shape, .. }
            | Tensor::Bf16 { shape, .. }
            | Tensor::I32 { shape, .. } => shape,
        }
    }
    fn dtype(&self) -> Dtype {
        match self {
            Tensor::F32 { .. } => Dtype::F32,
            Tensor::F16 { .. } => Dtype::F16,
            Tensor::Bf16 { .. } => Dtype::Bf16,
            Tensor::I32 { .. } => Dtype::I32,
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            Tensor::F32 { data, .. } => bytemuck::cast_slice(data),
            Tensor::F16 { data, .. } => bytemuck::cast_slice(data),
            Tensor::Bf16 { data, .. } => bytemuck::cast_slice(data),
            Tensor::I32 { data, .. } => bytemuck::cast_slice(data),
        }
    }
}

/// Everything an engine computed for one prompt.
#[derive(Debug, Clone, Default)]
pub struct PromptShard {
    pub index: u32,
    pub id: String,
    /// `[T]` the prompt's token ids.
    pub token_ids: Vec<i32>,
    /// `[P]` absolute positions scored.
    pub positions: Vec<i32>,
    /// `[P, V]` raw logits predicting the token after each scored position.
    pub logits: Option<Tensor>,
    /// `[N]` greedy continuation.
    pub generated: Vec<i32>,
    /// `hidden.{capture}.{layer}` -> `[P, ·]`.
    pub hidden: BTreeMap<String, Tensor>,
    pub timings: Timings,
    pub tokenizer_match: Option<bool>,
    pub peak_rss_bytes: Option<u64>,
    pub peak_gpu_bytes: Option<u64>,
}

impl PromptShard {
    pub fn capture(&mut self, point: CapturePoint, layer: u32, t: Tensor) {
        self.hidden.insert(point.tensor_name(layer), t);
    }
}

/// Writes a dump directory prompt by prompt.
pub struct DumpWriter {
    dir: PathBuf,
    manifest: Manifest,
}

impl DumpWriter {
    /// Creates `dir` (which must not hold a manifest yet) and writes the initial manifest,
    /// `complete: false`, no prompts.
    pub fn create(dir: &Path, mut manifest: Manifest) -> Result<DumpWriter, ProtocolError> {
        let io = |source| ProtocolError::Io { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        if dir.join("manifest.json").exists() {
            return Err(ProtocolError::Mismatch {
                path: dir.to_path_buf(),
                message: "already holds a dump (manifest.json); refusing to overwrite it".into(),
            });
        }
        manifest.complete = false;
        manifest.prompts.clear();
        let w = DumpWriter { dir: dir.to_path_buf(), manifest };
        w.write_manifest()?;
        Ok(w)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest_mut(&mut self) -> &mut Manifest {
        &mut self.manifest
    }

    /// Writes one prompt's shard and records it in the manifest.
    pub fn write_prompt(&mut self, shard: PromptShard) -> Result<(), ProtocolError> {
        let file = format!("p{}.safetensors", shard.index);
        let path = self.dir.join(&file);
        let tmp = self.dir.join(format!(".{file}.tmp"));
        let n_positions = shard.positions.len();
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        let token_ids = Tensor::i32(vec![shard.token_ids.len()], shard.token_ids.clone());
        let positions = Tensor::i32(vec![n_positions], shard.positions.clone());
        let generated = Tensor::i32(vec![shard.generated.len()], shard.generated.clone());
        named.push(("token_ids".into(), &token_ids));
        named.push(("positions".into(), &positions));
        named.push(("generated".into(), &generated));
        if let Some(l) = &shard.logits {
            named.push(("logits".into(), l));
        }
        for (k, v) in &shard.hidden {
            named.push((k.clone(), v));
        }
        for (name, t) in &named {
            if name != "token_ids"
                && name != "generated"
                && name != "positions"
                && t.shape().first() != Some(&n_positions)
            {
                return Err(ProtocolError::Shape {
                    path: path.clone(),
                    tensor: name.clone(),
                    got: t.shape().to_vec(),
                    expected: format!("[{n_positions}, ·] (one row per scored position)"),
                });
            }
        }
        let views = named
            .iter()
            .map(|(name, t)| {
                let v = safetensors::tensor::TensorView::new(t.dtype().to_st(), t.shape().to_vec(), t.bytes())
                    .expect("shape and byte length agree by construction");
                (name.clone(), v)
            })
            .collect::<Vec<_>>();
        safetensors::serialize_to_file(views, None, &tmp)
            .map_err(|e| ProtocolError::Shard { path: tmp.clone(), message: e.to_string() })?;
        std::fs::rename(&tmp, &path).map_err(|source| ProtocolError::Io { path: path.clone(), source })?;
        let sha256 = super::sha256_file(&path).map_err(|source| ProtocolError::Io { path: path.clone(), source })?;
        self.manifest.prompts.push(PromptRecord {
            index: shard.index,
            id: shard.id,
            file,
            n_tokens: shard.token_ids.len() as u32,
            n_positions: n_positions as u32,
            n_generated: shard.generated.len() as u32,
            timings: shard.timings,
            sha256,
            tokenizer_match: shard.tokenizer_match,
            peak_rss_bytes: shard.peak_rss_bytes,
            peak_gpu_bytes: shard.peak_gpu_bytes,
        });
        self.write_manifest()
    }

    /// Marks the dump complete. Call after the last prompt.
    pub fn finish(mut self) -> Result<Manifest, ProtocolError> {
        self.manifest.complete = true;
        self.write_manifest()?;
        Ok(self.manifest)
    }

    /// Records an error and leaves the dump incomplete (its finished prompts stay usable).
    pub fn fail(mut self, error: String) -> Result<Manifest, ProtocolError> {
        self.manifest.complete = false;
        self.manifest.error = Some(error);
        self.write_manifest()?;
        Ok(self.manifest)
    }

    fn write_manifest(&self) -> Result<(), ProtocolError> {
        let path = self.dir.join("manifest.json");
        let tmp = self.dir.join(".manifest.json.tmp");
        let text = serde_json::to_string_pretty(&self.manifest).expect("a manifest always serializes");
        std::fs::write(&tmp, text).map_err(|source| ProtocolError::Io { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, &path).map_err(|source| ProtocolError::Io { path, source })
    }
}

/// A dump directory opened for reading.
#[derive(Debug, Clone)]
pub struct Dump {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Dump {
    /// Opens a dump, complete or not.
    pub fn open(dir: &Path) -> Result<Dump, ProtocolError> {
        let mpath = dir.join("manifest.json");
        if !mpath.exists() {
            return Err(ProtocolError::Mismatch {
                path: dir.to_path_buf(),
                message: "no manifest.json: not a dump directory".into(),
            });
        }
        let manifest = Manifest::load(&mpath)?;
        Ok(Dump { dir: dir.to_path_buf(), manifest })
    }

    /// Opens a dump that must be complete.
    pub fn open_complete(dir: &Path) -> Result<Dump, ProtocolError> {
        let d = Dump::open(dir)?;
        if !d.manifest.complete {
            return Err(ProtocolError::Incomplete { path: dir.to_path_buf(), finished: d.manifest.prompts.len() });
        }
        Ok(d)
    }

    /// Memory-maps and validates the shard of a finished prompt.
    pub fn shard(&self, id: &str) -> Result<ShardTensors, ProtocolError> {
        let rec = self.manifest.prompt(id).ok_or_else(|| ProtocolError::Mismatch {
            path: self.dir.join("manifest.json"),
            message: format!("prompt {id:?} is not among the finished prompts"),
        })?;
        let path = self.dir.join(&rec.file);
        let shard = ShardTensors::open(&path)?;
        shard.validate(rec)?;
        Ok(shard)
    }
}

struct TensorEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// One memory-mapped shard.
pub struct ShardTensors {
    pub path: PathBuf,
    mmap: Mmap,
    tensors: BTreeMap<String, TensorEntry>,
}

/// A borrowed view of one tensor in a mapped shard.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Row width for a 2-D tensor (1 for a vector).
    pub fn cols(&self) -> usize {
        self.shape.get(1..).map(|s| s.iter().product()).unwrap_or(1)
    }
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// The whole tensor as f32 (borrowed when stored as aligned f32, converted otherwise).
    pub fn to_f32(&self) -> Cow<'a, [f32]> {
        match self.dtype {
            Dtype::F32 => cast_or_copy::<f32>(self.bytes),
            Dtype::F16 => Cow::Owned(cast_or_copy::<f16>(self.bytes).iter().map(|x| x.to_f32()).collect()),
            Dtype::Bf16 => Cow::Owned(cast_or_copy::<bf16>(self.bytes).iter().map(|x| x.to_f32()).collect()),
            Dtype::I32 => Cow::Owned(cast_or_copy::<i32>(self.bytes).iter().map(|&x| x as f32).collect()),
        }
    }

    /// Row `i` as f32, into `buf` when a conversion is needed.
    pub fn row_f32<'b>(&'b self, i: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        let c = self.cols();
        let s = self.dtype.size();
        let bytes = &self.bytes[i * c * s..(i + 1) * c * s];
        match self.dtype {
            Dtype::F32 => {
                if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
                    return v;
                }
                buf.clear();
                buf.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
            Dtype::F16 => {
                buf.clear();
                buf.extend(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()));
            }
            Dtype::Bf16 => {
                buf.clear();
                buf.extend(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()));
            }
            Dtype::I32 => {
                buf.clear();
                buf.extend(bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32));
            }
        }
        buf
    }

    /// The tensor as i32 (only for I32 tensors).
    pub fn to_i32(&self) -> Option<Cow<'a, [i32]>> {
        (self.dtype == Dtype::I32).then(|| cast_or_copy::<i32>(self.bytes))
    }

    /// Raw little-endian bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

fn cast_or_copy<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(v) => Cow::Borrowed(v),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

impl ShardTensors {
    pub fn open(path: &Path) -> Result<ShardTensors, ProtocolError> {
        let file = File::open(path).map_err(|source| ProtocolError::Io { path: path.to_path_buf(), source })?;
        // SAFETY: the shard is opened read-only; dumps are written through a rename, so the
        // file under the mapping is never modified in place by a well-behaved writer. A
        // foreign process truncating it would be a bug outside our control (SIGBUS).
        let mmap =
            unsafe { Mmap::map(&file) }.map_err(|source| ProtocolError::Io { path: path.to_path_buf(), source })?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| ProtocolError::Shard { path: path.to_path_buf(), message: e.to_string() })?;
        let base = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let dtype = Dtype::from_st(info.dtype).ok_or_else(|| ProtocolError::Dtype {
                path: path.to_path_buf(),
                tensor: name.clone(),
                got: format!("{:?}", info.dtype),
                expected: "F32, F16, BF16 or I32".into(),
            })?;
            let (a, b) = info.data_offsets;
            tensors
                .insert(name.clone(), TensorEntry { dtype, shape: info.shape.clone(), start: base + a, end: base + b });
        }
        Ok(ShardTensors { path: path.to_path_buf(), mmap, tensors })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Result<TensorView<'_>, ProtocolError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ProtocolError::MissingTensor { path: self.path.clone(), tensor: name.into() })?;
        Ok(TensorView { dtype: e.dtype, shape: &e.shape, bytes: &self.mmap[e.start..e.end] })
    }

    fn get_i32(&self, name: &str) -> Result<Cow<'_, [i32]>, ProtocolError> {
        let v = self.get(name)?;
        if v.shape.len() != 1 {
            return Err(ProtocolError::Shape {
                path: self.path.clone(),
                tensor: name.into(),
                got: v.shape.to_vec(),
                expected: "1-D".into(),
            });
        }
        v.to_i32().ok_or_else(|| ProtocolError::Dtype {
            path: self.path.clone(),
            tensor: name.into(),
            got: v.dtype.name().into(),
            expected: "I32".into(),
        })
    }

    /// `[T]` token ids.
    pub fn token_ids(&self) -> Result<Cow<'_, [i32]>, ProtocolError> {
        self.get_i32("token_ids")
    }
    /// `[P]` scored positions.
    pub fn positions(&self) -> Result<Cow<'_, [i32]>, ProtocolError> {
        self.get_i32("positions")
    }
    /// `[N]` greedy continuation.
    pub fn generated(&self) -> Result<Cow<'_, [i32]>, ProtocolError> {
        self.get_i32("generated")
    }
    /// `[P, V]` logits.
    pub fn logits(&self) -> Result<TensorView<'_>, ProtocolError> {
        self.get("logits")
    }

    /// Capture tensors present, as `(point, layer, name)`.
    pub fn captures(&self) -> Vec<(CapturePoint, u32, String)> {
        self.tensors.keys().filter_map(|n| CapturePoint::parse_tensor_name(n).map(|(c, l)| (c, l, n.clone()))).collect()
    }

    /// Checks the shard against its manifest record: every tensor has the shape and dtype
    /// the protocol requires, and the positions are valid indices into the prompt.
    pub fn validate(&self, rec: &PromptRecord) -> Result<(), ProtocolError> {
        let path = &self.path;
        let ids = self.token_ids()?;
        if ids.len() != rec.n_tokens as usize {
            return Err(ProtocolError::Mismatch {
                path: path.clone(),
                message: format!("token_ids has {} entries, the manifest says {}", ids.len(), rec.n_tokens),
            });
        }
        let pos = self.positions()?;
        if pos.len() != rec.n_positions as usize {
            return Err(ProtocolError::Mismatch {
                path: path.clone(),
                message: format!("positions has {} entries, the manifest says {}", pos.len(), rec.n_positions),
            });
        }
        for (i, &p) in pos.iter().enumerate() {
            if p < 0 || p as usize >= ids.len() || (i > 0 && p <= pos[i - 1]) {
                return Err(ProtocolError::Mismatch {
                    path: path.clone(),
                    message: format!(
                        "positions[{i}] = {p} is not a strictly ascending index into {} tokens",
                        ids.len()
                    ),
                });
            }
        }
        self.generated()?;
        let p = pos.len();
        for (name, e) in &self.tensors {
            let is_row_tensor = name == "logits" || name.starts_with("hidden.");
            if !is_row_tensor {
                continue;
            }
            if e.shape.len() != 2 || e.shape[0] != p {
                return Err(ProtocolError::Shape {
                    path: path.clone(),
                    tensor: name.clone(),
                    got: e.shape.clone(),
                    expected: format!("[{p}, ·]"),
                });
            }
            let want_int = name.starts_with("hidden.moe_topk_ids.");
            if want_int != (e.dtype == Dtype::I32) {
                return Err(ProtocolError::Dtype {
                    path: path.clone(),
                    tensor: name.clone(),
                    got: e.dtype.name().into(),
                    expected: if want_int { "I32".into() } else { "F32, F16 or BF16".into() },
                });
            }
            if name.starts_with("hidden.") && CapturePoint::parse_tensor_name(name).is_none() {
                return Err(ProtocolError::Mismatch {
                    path: path.clone(),
                    message: format!("tensor `{name}` is not a known capture (hidden.{{capture}}.{{layer}})"),
                });
            }
        }
        self.validate_top_k(p)
    }

    /// Top-k-only dumps (PROTOCOL.md): `top_ids` I32 `[P, K]` and, where known, `top_probs`
    /// float `[P, K]` of the same shape.
    fn validate_top_k(&self, p: usize) -> Result<(), ProtocolError> {
        let path = &self.path;
        let ids = self.tensors.get("top_ids");
        if let Some(e) = ids {
            if e.shape.len() != 2 || e.shape[0] != p || e.shape[1] == 0 {
                return Err(ProtocolError::Shape {
                    path: path.clone(),
                    tensor: "top_ids".into(),
                    got: e.shape.clone(),
                    expected: format!("[{p}, K] with K ≥ 1"),
                });
            }
            if e.dtype != Dtype::I32 {
                return Err(ProtocolError::Dtype {
                    path: path.clone(),
                    tensor: "top_ids".into(),
                    got: e.dtype.name().into(),
                    expected: "I32".into(),
                });
            }
        }
        if let Some(e) = self.tensors.get("top_probs") {
            let Some(ids) = ids else {
                return Err(ProtocolError::MissingTensor {
                    path: path.clone(),
                    tensor: "top_ids (top_probs needs the ids it belongs to)".into(),
                });
            };
            if e.shape != ids.shape {
                return Err(ProtocolError::Shape {
                    path: path.clone(),
                    tensor: "top_probs".into(),
                    got: e.shape.clone(),
                    expected: format!("{:?} (the shape of top_ids)", ids.shape),
                });
            }
            if !e.dtype.is_float() {
                return Err(ProtocolError::Dtype {
                    path: path.clone(),
                    tensor: "top_probs".into(),
                    got: e.dtype.name().into(),
                    expected: "F32, F16 or BF16".into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{CaptureRecord, EngineInfo, Mode, ModelInfo, TokenizerInfo};

    pub(crate) fn manifest(ids: &[&str]) -> Manifest {
        Manifest {
            schema: crate::protocol::SCHEMA_VERSION,
            complete: false,
            engine: EngineInfo {
                name: "test".into(),
                version: "0".into(),
                backend: "cpu".into(),
                device: "cpu".into(),
                ..Default::default()
            },
            model: ModelInfo {
                path: "m".into(),
                format: "safetensors".into(),
                quant: "f32".into(),
                compute_dtype: "f32".into(),
                ..Default::default()
            },
            tokenizer: TokenizerInfo::default(),
            mode: Mode::Prefill,
            request_sha256: "0".into(),
            prompt_ids: ids.iter().map(|s| s.to_string()).collect(),
            prompts: vec![],
            captures: CaptureRecord::default(),
            load_ms: None,
            peak_rss_bytes: None,
            peak_gpu_bytes: None,
            command: vec![],
            created_utc: "2026-01-01T00:00:00Z".into(),
            error: None,
            extra: Default::default(),
        }
    }

    fn shard(index: u32, id: &str, v: usize) -> PromptShard {
        let positions = vec![0, 2];
        let logits: Vec<f32> = (0..2 * v).map(|i| i as f32 * 0.5).collect();
        let mut s = PromptShard {
            index,
            id: id.into(),
            token_ids: vec![5, 6, 7],
            positions,
            logits: Some(Tensor::f32(vec![2, v], logits)),
            generated: vec![1, 2],
            ..Default::default()
        };
        s.capture(CapturePoint::AttnOut, 1, Tensor::F16 { shape: vec![2, 3], data: vec![f16::from_f32(1.5); 6] });
        s.capture(CapturePoint::MoeTopkIds, 0, Tensor::i32(vec![2, 2], vec![3, 1, 0, 2]));
        s
    }

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("dump");
        let mut w = DumpWriter::create(&d, manifest(&["a", "b"])).unwrap();
        w.write_prompt(shard(0, "a", 5)).unwrap();
        let partial = Dump::open(&d).unwrap();
        assert!(!partial.manifest.complete);
        assert_eq!(partial.manifest.missing_prompts(), vec!["b"]);
        assert!(matches!(Dump::open_complete(&d), Err(ProtocolError::Incomplete { finished: 1, .. })));
        w.write_prompt(shard(1, "b", 5)).unwrap();
        w.finish().unwrap();

        let dump = Dump::open_complete(&d).unwrap();
        let s = dump.shard("b").unwrap();
        assert_eq!(&*s.token_ids().unwrap(), &[5, 6, 7]);
        assert_eq!(&*s.positions().unwrap(), &[0, 2]);
        let l = s.logits().unwrap();
        assert_eq!(l.shape, &[2, 5]);
        let mut buf = Vec::new();
        assert_eq!(l.row_f32(1, &mut buf), &[2.5, 3.0, 3.5, 4.0, 4.5]);
        let h = s.get("hidden.attn_out.1").unwrap();
        assert_eq!(h.dtype, Dtype::F16);
        assert_eq!(&*h.to_f32(), &[1.5; 6]);
        assert_eq!(s.captures().len(), 2);
        // the shard's sha256 is recorded
        assert_eq!(dump.manifest.prompts[1].sha256, crate::protocol::sha256_file(&d.join("p1.safetensors")).unwrap());
    }

    #[test]
    fn refuses_to_overwrite_a_dump() {
        let dir = tempfile::tempdir().unwrap();
        DumpWriter::create(dir.path(), manifest(&["a"])).unwrap();
        let e = DumpWriter::create(dir.path(), manifest(&["a"])).err().unwrap().to_string();
        assert!(e.contains("already holds a dump"), "{e}");
    }

    #[test]
    fn rejects_a_row_tensor_with_the_wrong_row_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DumpWriter::create(dir.path(), manifest(&["a"])).unwrap();
        let mut s = shard(0, "a", 4);
        s.capture(CapturePoint::LayerOut, 0, Tensor::f32(vec![3, 2], vec![0.0; 6]));
        let e = w.write_prompt(s).unwrap_err().to_string();
        assert!(e.contains("hidden.layer_out.0") && e.contains("[3, 2]"), "{e}");
    }

    #[test]
    fn validation_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DumpWriter::create(dir.path(), manifest(&["a"])).unwrap();
        let mut s = shard(0, "a", 4);
        s.capture(CapturePoint::MoeTopkIds, 2, Tensor::f32(vec![2, 2], vec![0.0; 4]));
        w.write_prompt(s).unwrap();
        w.finish().unwrap();
        let dump = Dump::open(dir.path()).unwrap();
        let e = dump.shard("a").err().unwrap().to_string();
        assert!(e.contains("hidden.moe_topk_ids.2") && e.contains("I32"), "{e}");
        let e = dump.shard("zz").err().unwrap().to_string();
        assert!(e.contains("\"zz\""), "{e}");
    }

    #[test]
    fn validates_top_k_tensors() {
        let write = |extra: Vec<(&str, Tensor)>| {
            let dir = tempfile::tempdir().unwrap();
            let mut w = DumpWriter::create(dir.path(), manifest(&["a"])).unwrap();
            let mut s = shard(0, "a", 4);
            s.logits = None;
            for (name, t) in extra {
                s.hidden.insert(name.into(), t);
            }
            w.write_prompt(s).unwrap();
            w.finish().unwrap();
            let r = Dump::open(dir.path()).unwrap().shard("a").map(|_| ()).map_err(|e| e.to_string());
            (dir, r)
        };
        let ids = || Tensor::i32(vec![2, 3], vec![1, 2, 3, 4, 5, 6]);
        let probs = |k: usize| Tensor::f32(vec![2, k], vec![0.1; 2 * k]);
        assert!(write(vec![("top_ids", ids()), ("top_probs", probs(3))]).1.is_ok());
        assert!(write(vec![("top_ids", ids())]).1.is_ok());
        let e = write(vec![("top_ids", Tensor::f32(vec![2, 3], vec![0.0; 6]))]).1.unwrap_err();
        assert!(e.contains("top_ids") && e.contains("I32"), "{e}");
        let e = write(vec![("top_ids", Tensor::i32(vec![2], vec![1, 2]))]).1.unwrap_err();
        assert!(e.contains("top_ids") && e.contains("[2, K]"), "{e}");
        let e = write(vec![("top_ids", ids()), ("top_probs", probs(2))]).1.unwrap_err();
        assert!(e.contains("top_probs") && e.contains("[2, 2]"), "{e}");
        let e = write(vec![("top_ids", ids()), ("top_probs", Tensor::i32(vec![2, 3], vec![0; 6]))]).1.unwrap_err();
        assert!(e.contains("top_probs") && e.contains("F32"), "{e}");
        let e = write(vec![("top_probs", probs(3))]).1.unwrap_err();
        assert!(e.contains("top_ids"), "{e}");
    }

    #[test]
    fn rejects_a_truncated_shard() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DumpWriter::create(dir.path(), manifest(&["a"])).unwrap();
        w.write_prompt(shard(0, "a", 4)).unwrap();
        w.finish().unwrap();
        let p = dir.path().join("p0.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 7]).unwrap();
        let e = Dump::open(dir.path()).unwrap().shard("a").err().unwrap().to_string();
        assert!(e.contains("p0.safetensors"), "{e}");
    }
}
