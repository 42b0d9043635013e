//! HF checkpoints: one `model.safetensors`, or shards listed by `model.safetensors.index.json`.
//!
//! Every file is memory-mapped and its header checked when the checkpoint is opened (a
//! truncated file or a bad header is an error naming the file, never a SIGBUS later);
//! tensors are converted to f32 only when the model asks for them. F32, F16 and BF16 are
//! read; any other dtype is refused with the tensor's name.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use super::weights::{WeightError, WeightSource};

const FORMAT: &str = "safetensors";
const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One mapped file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// Where one tensor lives.
struct Entry {
    shard: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range in the shard's mapping.
    start: usize,
    end: usize,
}

/// The tensors of an HF checkpoint directory (or of one `.safetensors` file).
pub struct SafetensorsWeights {
    /// What messages name: the single file, or the index of a sharded checkpoint.
    root: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

impl SafetensorsWeights {
    /// Opens `path`: a directory holding `model.safetensors` or
    /// `model.safetensors.index.json` and its shards, or a single `.safetensors` file.
    pub fn open(path: &Path) -> Result<SafetensorsWeights, WeightError> {
        let (root, files) = if path.is_dir() {
            let index = path.join(INDEX_FILE);
            let single = path.join(SINGLE_FILE);
            if index.exists() {
                let files = shard_files_from_index(&index)?;
                (index, files)
            } else if single.exists() {
                (single.clone(), vec![single])
            } else {
                return Err(WeightError::Format {
                    path: path.to_path_buf(),
                    format: FORMAT,
                    message: format!("neither {SINGLE_FILE} nor {INDEX_FILE} is in this directory"),
                });
            }
        } else {
            (path.to_path_buf(), vec![path.to_path_buf()])
        };
        let mut w = SafetensorsWeights { root, shards: Vec::new(), tensors: BTreeMap::new() };
        for file in files {
            w.add_shard(file)?;
        }
        Ok(w)
    }

    /// The files the weights were read from, in index order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    fn add_shard(&mut self, path: PathBuf) -> Result<(), WeightError> {
        let file = File::open(&path).map_err(|source| WeightError::Io { path: path.clone(), source })?;
        // SAFETY: the mapping is read-only and checkpoints are not modified while a run
        // reads them; the header check below guarantees every tensor's byte range lies
        // inside the file as it was when mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| WeightError::Io { path: path.clone(), source })?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| WeightError::Format {
            path: path.clone(),
            format: FORMAT,
            message: format!("{e} (truncated or not a safetensors file; {} bytes)", mmap.len()),
        })?;
        let base = 8 + header_len;
        let index = self.shards.len();
        for (name, info) in meta.tensors() {
            if let Some(prev) = self.tensors.get(&name) {
                return Err(WeightError::Format {
                    path: path.clone(),
                    format: FORMAT,
                    message: format!("tensor `{name}` is also in {}", self.shards[prev.shard].path.display()),
                });
            }
            let (a, b) = info.data_offsets;
            self.tensors.insert(
                name,
                Entry { shard: index, dtype: info.dtype, shape: info.shape.clone(), start: base + a, end: base + b },
            );
        }
        self.shards.push(Shard { path, mmap });
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightError> {
        self.tensors.get(name).ok_or_else(|| WeightError::MissingTensor {
            path: self.root.clone(),
            tensor: name.to_string(),
            architecture: "?".to_string(),
        })
    }
}

/// Drops the mapped pages of a tensor that has been copied out, so that loading a model
/// peaks at its f32 copy plus one tensor rather than twice its size. Best effort: a failure
/// only costs memory.
fn release_pages(shard: &Shard, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: the mapping is a read-only view of a file that is not modified while the
        // engine runs; MADV_DONTNEED only drops its resident pages, and any later read of
        // the range (a neighbouring tensor sharing a page) faults the same bytes back in
        // from the file. No reference into the mapping is written through.
        let _ = unsafe { shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (shard, offset, len);
}

/// The distinct shard files named by an index's `weight_map`, in first-seen order.
fn shard_files_from_index(index: &Path) -> Result<Vec<PathBuf>, WeightError> {
    let text =
        std::fs::read_to_string(index).map_err(|source| WeightError::Io { path: index.to_path_buf(), source })?;
    let bad = |message: String| WeightError::Format { path: index.to_path_buf(), format: FORMAT, message };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("weight_map[`{tensor}`] is not a file name")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!("weight_map[`{tensor}`] = {file:?} is not a file in this directory")));
        }
        if seen.insert(file.to_string()) {
            files.push(dir.join(file));
        }
    }
    if files.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(files)
}

impl WeightSource for SafetensorsWeights {
    fn path(&self) -> PathBuf {
        self.root.clone()
    }

    fn format(&self) -> &'static str {
        FORMAT
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|e| e.shape.clone())
    }

    fn storage_type(&self, name: &str) -> Option<String> {
        self.tensors.get(name).map(|e| e.dtype.to_string())
    }

    fn load_f32(&self, name: &str) -> Result<Vec<f32>, WeightError> {
        let e = self.entry(name)?;
        let shard = &self.shards[e.shard];
        let bytes = &shard.mmap[e.start..e.end];
        let data = match e.dtype {
            safetensors::Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(bytes),
            safetensors::Dtype::F16 => {
                bytemuck::pod_collect_to_vec::<u8, f16>(bytes).iter().map(|x| x.to_f32()).collect()
            }
            safetensors::Dtype::BF16 => {
                bytemuck::pod_collect_to_vec::<u8, bf16>(bytes).iter().map(|x| x.to_f32()).collect()
            }
            other => {
                return Err(WeightError::UnsupportedType {
                    path: shard.path.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other} (the engine reads F32, F16 and BF16 safetensors)"),
                });
            }
        };
        release_pages(shard, e.start, e.end - e.start);
        Ok(data)
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView)> =
            tensors.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    #[test]
    fn reads_f32_f16_bf16() {
        let d = tempfile::tempdir().unwrap();
        let h: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
        let b: Vec<u8> = [0.25f32, 3.0].iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
        write(
            &d.path().join(SINGLE_FILE),
            &[
                ("a", safetensors::Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
                ("h", safetensors::Dtype::F16, vec![2, 1], h),
                ("b", safetensors::Dtype::BF16, vec![1, 2], b),
            ],
        );
        let w = SafetensorsWeights::open(d.path()).unwrap();
        assert_eq!(w.load_f32("a").unwrap(), vec![1.0, 2.0]);
        assert_eq!(w.load_f32("a").unwrap(), vec![1.0, 2.0], "released pages come back from the file");
        assert_eq!(w.load_f32("h").unwrap(), vec![1.5, -2.0]);
        assert_eq!(w.load_f32("b").unwrap(), vec![0.25, 3.0]);
        assert_eq!(w.shape("h"), Some(vec![2, 1]));
        assert_eq!(w.storage_type("b").as_deref(), Some("BF16"));
        assert_eq!(w.names(), vec!["a", "b", "h"]);
    }

    #[test]
    fn reads_sharded_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        write(
            &d.path().join("model-00001-of-00002.safetensors"),
            &[("x", safetensors::Dtype::F32, vec![1], f32_bytes(&[7.0]))],
        );
        write(
            &d.path().join("model-00002-of-00002.safetensors"),
            &[("y", safetensors::Dtype::F32, vec![1], f32_bytes(&[8.0]))],
        );
        std::fs::write(
            d.path().join(INDEX_FILE),
            r#"{"metadata":{},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let w = SafetensorsWeights::open(d.path()).unwrap();
        assert_eq!(w.load_f32("y").unwrap(), vec![8.0]);
        assert_eq!(w.files().len(), 2);
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(SINGLE_FILE);
        write(&p, &[("a", safetensors::Dtype::F32, vec![4], f32_bytes(&[1.0; 4]))]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = SafetensorsWeights::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x00garbage").unwrap();
        let e = SafetensorsWeights::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
    }

    #[test]
    fn an_unsupported_dtype_is_named() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join(SINGLE_FILE), &[("ids", safetensors::Dtype::I64, vec![1], 5i64.to_le_bytes().to_vec())]);
        let w = SafetensorsWeights::open(d.path()).unwrap();
        let e = w.load_f32("ids").unwrap_err().to_string();
        assert!(e.contains("`ids`") && e.contains("I64") && e.contains("model.safetensors"), "{e}");
    }

    #[test]
    fn an_empty_directory_says_what_it_looked_for() {
        let d = tempfile::tempdir().unwrap();
        let e = SafetensorsWeights::open(d.path()).err().unwrap().to_string();
        assert!(e.contains(SINGLE_FILE) && e.contains(INDEX_FILE), "{e}");
    }
}
