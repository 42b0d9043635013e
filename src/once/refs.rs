//! The reference dumps of a suite, the engine requests built from them, and the noise floor
//! that belongs to each (engine, reference) pair.
//!
//! Layout (written by `runner fixtures build`):
//! `<cache>/fixtures/refs/<suite>/<model>/<ref-id>/` holds a dump, `<ref-id>.request.json`
//! beside it (in `<model>/`, or inside the dump directory) is the request that produced it,
//! `fixture.json` (`{"fixture_id": ...}`) names it, and `<model>/floors/*.json` hold the
//! noise floors measured between two references (each file lists the two it came from).
//!
//! References are grouped by the model FILE they ran on: the safetensors checkpoint (group
//! key `st`) and each GGUF file (key = file stem). The engine runs once per group and mode
//! on that file and is compared with every reference of the group — the HF references of
//! the checkpoint, or llama.cpp on the same GGUF file — and, for a GGUF group, also with the
//! model's HF FP32 prefill references (a GGUF file is judged both against llama.cpp on the
//! same file and against the unquantized model it came from). The engine is asked for
//! exactly the references' prompts, token ids and positions, with every capture point.
//!
//! The noise floor of a pair (engine, reference R) is the floor measured at fixture time
//! between R and a *twin* of the engine: a reference that ran on the same model file in the
//! engine's compute dtype (for the built-in engine on the checkpoint: HF FP32; on a GGUF
//! file: llama.cpp on that file). Engine vs HF FP16 thus gets the FP16-vs-FP32 floor, a Q8_0
//! file vs HF FP32 gets llama.cpp-Q8_0-vs-HF-FP32, and a pair with no such measurement gets
//! no floor (said as such, never a floor of another kind).

use std::path::{Path, PathBuf};

use crate::config::EngineConfig;
use crate::metrics::NoiseFloors;
use crate::protocol::{CapturePoint, CaptureSpec, ComputeDtype, Dump, Layers, Mode, Request, SCHEMA_VERSION};

/// The group key of the safetensors checkpoint.
pub const SAFETENSORS_KEY: &str = "st";

#[derive(Debug, thiserror::Error)]
pub enum RefsError {
    #[error("no reference dumps for suite `{suite}` under {} (run `runner fixtures build --suite {suite}`)", dir.display())]
    NoReferences { suite: String, dir: PathBuf },
    #[error("reference {}: {message}", dir.display())]
    Bad { dir: PathBuf, message: String },
}

/// One reference dump.
#[derive(Debug, Clone)]
pub struct Reference {
    /// `hf-fp32-eager`, `llamacpp-q4_k_m`, ...
    pub id: String,
    pub dir: PathBuf,
    pub fixture_id: String,
    pub request: Request,
    /// The reference's compute dtype (`f32`, `f16`, `bf16`), lower case.
    pub compute_dtype: String,
    /// `safetensors` or `gguf`, lower case.
    pub format: String,
    /// The reference's mode (prefill or incremental).
    pub mode: Mode,
    /// It ran on the group's model file (false: an HF FP32 reference added to a GGUF group).
    pub same_file: bool,
}

/// A noise floor file of a model: its name (the file stem) and contents.
#[derive(Debug, Clone)]
pub struct NamedFloors {
    pub name: String,
    pub floors: NoiseFloors,
}

impl NamedFloors {
    /// The ids (directory names) of the two references the floor was measured between.
    fn reference_ids(&self) -> Vec<String> {
        self.floors.references.iter().map(|r| file_name(Path::new(r))).collect()
    }
}

/// References that share one model file: the engine runs once per variant for all of them.
#[derive(Debug, Clone)]
pub struct ModelGroup {
    pub model: String,
    /// `st` for the safetensors checkpoint, else the GGUF file stem (`qwen3-dense-Q8_0`).
    pub key: String,
    /// The engine-side weight dtype, lower case: `f32` (the checkpoint), `f16`, `q8_0`,
    /// `q4_k_m`, ... Contract scopes match on it.
    pub dtype: String,
    pub model_sha256: String,
    pub references: Vec<Reference>,
    /// Every noise floor measured for the model.
    pub floors: Vec<NamedFloors>,
}

/// How the engine is asked to run.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub mode: Mode,
}

impl ModelGroup {
    /// The name runs, series and verdicts use for the engine side: the model for the
    /// checkpoint, the file stem for a GGUF file (so `qwen3-dense` vs `hf-fp32-eager` and
    /// `qwen3-dense-Q8_0` vs `hf-fp32-eager` are different series).
    pub fn label(&self) -> &str {
        if self.key == SAFETENSORS_KEY { &self.model } else { &self.key }
    }

    /// Prefill always; incremental too on the safetensors checkpoint when the engine wants it.
    pub fn variants(&self, incremental: bool) -> Vec<Variant> {
        let mut v = vec![Variant { mode: Mode::Prefill }];
        if incremental && self.key == SAFETENSORS_KEY {
            v.push(Variant { mode: Mode::Incremental });
        }
        v
    }

    /// The engine's request: the first reference's model and prompts, every capture point.
    pub fn request(&self, engine: &EngineConfig, v: &Variant) -> Request {
        let base = &self.references[0].request;
        Request {
            schema: SCHEMA_VERSION,
            model: base.model.clone(),
            prompts: base.prompts.clone(),
            positions: base.positions.clone(),
            captures: CaptureSpec { points: CapturePoint::ALL.to_vec(), layers: Layers::All },
            decode_steps: engine.decode_steps,
            mode: v.mode,
            device: engine.device.clone(),
            dtype: ComputeDtype::Auto,
            warmup: 0,
            repeats: 1,
            options: serde_json::Map::new(),
        }
    }

    /// The engine's twins: references of the group's own file in the engine's compute dtype.
    fn twins<'a>(&'a self, engine_compute_dtype: &'a str) -> impl Iterator<Item = &'a Reference> + 'a {
        self.references
            .iter()
            .filter(move |r| r.same_file && r.compute_dtype.eq_ignore_ascii_case(engine_compute_dtype))
    }

    /// The noise floor of the pair (engine computing in `engine_compute_dtype`, `r`): a floor
    /// measured between `r` and a twin of the engine (see the module docs). Where several
    /// were measured (HF FP32 eager vs SDPA, and incremental vs prefill), the largest logits
    /// floor is taken. `None`: the fixture holds no measurement for this kind of pair.
    pub fn pair_floor(&self, r: &Reference, engine_compute_dtype: &str) -> Option<&NamedFloors> {
        let twins: Vec<&str> = self.twins(engine_compute_dtype).map(|t| t.id.as_str()).collect();
        self.floors
            .iter()
            .filter(|f| {
                let ids = f.reference_ids();
                ids.len() == 2 && ids.contains(&r.id) && ids.iter().any(|i| *i != r.id && twins.contains(&i.as_str()))
            })
            .max_by(|a, b| a.floors.logits.total_cmp(&b.floors.logits).then_with(|| b.name.cmp(&a.name)))
    }
}

/// Every reference of `suite`, grouped by model file, in name order; GGUF groups also hold
/// the model's HF FP32 prefill references.
pub fn discover(cache: &Path, suite: &str) -> Result<Vec<ModelGroup>, RefsError> {
    let root = cache.join("fixtures").join("refs").join(suite);
    let none = || RefsError::NoReferences { suite: suite.into(), dir: root.clone() };
    let mut groups: Vec<ModelGroup> = Vec::new();
    for model_dir in sorted_dirs(&root) {
        let model = file_name(&model_dir);
        let floors = load_floors(&model_dir.join("floors"))?;
        let first = groups.len();
        for ref_dir in sorted_dirs(&model_dir) {
            if !ref_dir.join("manifest.json").exists() {
                continue;
            }
            let (r, quant) = load_reference(&model_dir, &ref_dir)?;
            let gguf = r.request.model.path.extension().is_some_and(|e| e == "gguf");
            let key = if gguf {
                r.request.model.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
            } else {
                SAFETENSORS_KEY.to_string()
            };
            let sha = r.request.model.sha256.clone().unwrap_or_default();
            match groups[first..].iter_mut().find(|g| g.key == key) {
                Some(g) => g.references.push(r),
                None => groups.push(ModelGroup {
                    model: model.clone(),
                    key,
                    dtype: quant,
                    model_sha256: sha,
                    references: vec![r],
                    floors: floors.clone(),
                }),
            }
        }
        // a GGUF file is also judged against the unquantized model in FP32
        let hf_fp32: Vec<Reference> = groups[first..]
            .iter()
            .filter(|g| g.key == SAFETENSORS_KEY)
            .flat_map(|g| g.references.iter())
            .filter(|r| r.format == "safetensors" && r.compute_dtype == "f32" && r.mode == Mode::Prefill)
            .cloned()
            .collect();
        for g in groups[first..].iter_mut().filter(|g| g.key != SAFETENSORS_KEY) {
            g.references.extend(hf_fp32.iter().cloned().map(|r| Reference { same_file: false, ..r }));
        }
    }
    if groups.is_empty() { Err(none()) } else { Ok(groups) }
}

/// Every `*.json` floor file of a model, by name.
fn load_floors(dir: &Path) -> Result<Vec<NamedFloors>, RefsError> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "json")).collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let floors =
                NoiseFloors::load(&p).map_err(|e| RefsError::Bad { dir: p.clone(), message: e.to_string() })?;
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            Ok(NamedFloors { name, floors })
        })
        .collect()
}

/// A reference and the weight dtype of its model file (lower case).
fn load_reference(model_dir: &Path, dir: &Path) -> Result<(Reference, String), RefsError> {
    let id = file_name(dir);
    let bad = |message: String| RefsError::Bad { dir: dir.to_path_buf(), message };
    let req_path = [model_dir.join(format!("{id}.request.json")), dir.join(format!("{id}.request.json"))]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| bad(format!("no {id}.request.json beside it or inside it")))?;
    let request = Request::load(&req_path).map_err(|e| bad(e.to_string()))?;
    let dump = Dump::open(dir).map_err(|e| bad(e.to_string()))?;
    // `runner fixtures build` writes `refs/<suite>/fixture.json`, one level above the model.
    let suite_record = model_dir.parent().map(|p| p.join("fixture.json"));
    let fixture_id = [Some(dir.join("fixture.json")), Some(model_dir.join("fixture.json")), suite_record]
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("fixture_id").and_then(|x| x.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("{id}@{}", &dump.manifest.request_sha256));
    let m = &dump.manifest.model;
    let r = Reference {
        id,
        dir: dir.to_path_buf(),
        fixture_id,
        request,
        compute_dtype: m.compute_dtype.to_lowercase(),
        format: m.format.to_lowercase(),
        mode: dump.manifest.mode,
        same_file: true,
    };
    Ok((r, m.quant.to_lowercase()))
}

fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
