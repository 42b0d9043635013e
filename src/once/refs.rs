//! The reference dumps of a suite, and the engine requests built from them.
//!
//! Layout (written by `runner fixtures build`):
//! `<cache>/fixtures/refs/<suite>/<model>/<ref-id>/` holds a dump, `<ref-id>.request.json`
//! beside it (in `<model>/`, or inside the dump directory) is the request that produced it,
//! `fixture.json` (`{"fixture_id": ...}`) names it, and `<model>/floors/fp32-eager-vs-sdpa.json`
//! holds the noise floors. The engine is asked for exactly the reference's prompts, token
//! ids and positions (so every comparison is of identical inputs), with every capture point.

use std::path::{Path, PathBuf};

use crate::config::EngineConfig;
use crate::metrics::NoiseFloors;
use crate::protocol::{CapturePoint, CaptureSpec, ComputeDtype, Dump, Layers, Mode, Request, SCHEMA_VERSION};

/// The f32 noise-floor pair measured at fixture time.
pub const F32_FLOOR_PAIR: &str = "fp32-eager-vs-sdpa";

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
    /// The reference's compute dtype (`f32`, `f16`, a quant), for contract scopes.
    pub dtype: String,
    /// f32 safetensors weights (the model an incremental run is asked for).
    pub f32_safetensors: bool,
}

/// References that share one model file: the engine runs once per variant for all of them.
#[derive(Debug, Clone)]
pub struct ModelGroup {
    pub model: String,
    /// Distinguishes groups of one model (`st` for safetensors, else the file stem).
    pub key: String,
    pub model_sha256: String,
    pub references: Vec<Reference>,
    pub floors: Option<NoiseFloors>,
}

/// How the engine is asked to run.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub mode: Mode,
}

impl ModelGroup {
    /// Prefill always; incremental too for f32 safetensors models when the engine wants it.
    pub fn variants(&self, incremental: bool) -> Vec<Variant> {
        let mut v = vec![Variant { mode: Mode::Prefill }];
        if incremental && self.references.iter().any(|r| r.f32_safetensors) {
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
}

/// Every reference of `suite`, grouped by model file, in name order.
pub fn discover(cache: &Path, suite: &str) -> Result<Vec<ModelGroup>, RefsError> {
    let root = cache.join("fixtures").join("refs").join(suite);
    let none = || RefsError::NoReferences { suite: suite.into(), dir: root.clone() };
    let mut groups: Vec<ModelGroup> = Vec::new();
    for model_dir in sorted_dirs(&root) {
        let model = file_name(&model_dir);
        let floors_path = model_dir.join("floors").join(format!("{F32_FLOOR_PAIR}.json"));
        let floors = if floors_path.exists() {
            Some(
                NoiseFloors::load(&floors_path)
                    .map_err(|e| RefsError::Bad { dir: floors_path.clone(), message: e.to_string() })?,
            )
        } else {
            None
        };
        for ref_dir in sorted_dirs(&model_dir) {
            if !ref_dir.join("manifest.json").exists() {
                continue;
            }
            let r = load_reference(&model_dir, &ref_dir)?;
            let key = if r.request.model.path.extension().is_some_and(|e| e == "gguf") {
                r.request.model.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
            } else {
                "st".to_string()
            };
            let sha = r.request.model.sha256.clone().unwrap_or_default();
            match groups.iter_mut().find(|g| g.model == model && g.key == key) {
                Some(g) => g.references.push(r),
                None => groups.push(ModelGroup {
                    model: model.clone(),
                    key,
                    model_sha256: sha,
                    references: vec![r],
                    floors: floors.clone(),
                }),
            }
        }
    }
    if groups.is_empty() { Err(none()) } else { Ok(groups) }
}

fn load_reference(model_dir: &Path, dir: &Path) -> Result<Reference, RefsError> {
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
    let f32_safetensors = m.format.eq_ignore_ascii_case("safetensors") && m.quant.eq_ignore_ascii_case("f32");
    Ok(Reference {
        id,
        dir: dir.to_path_buf(),
        fixture_id,
        request,
        dtype: m.compute_dtype.to_lowercase(),
        f32_safetensors,
    })
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
