//! The protocol driver behind `runner engine run`: read the request, load the model, run
//! every prompt in the requested mode, and write each prompt's shard as it finishes.
//!
//! Per prompt: `warmup` untimed runs, then `repeats` timed runs; the dump holds the outputs
//! of the first timed run and the timings of all. A run is the prompt (one forward pass in
//! `prefill` mode, one per token through the KV cache in `incremental` mode) followed by
//! `decode_steps` greedy tokens. Timings: `prefill_ms` covers the prompt, `ttft_ms` the
//! prompt plus choosing the first token, `decode_ms` the forward passes of the remaining
//! `decode_steps - 1` tokens (`decode_tokens` counts those passes, so
//! `decode_tokens / decode_ms` is the decode rate).
//!
//! GGUF weights stay memory-mapped in their stored types. On the CPU, matmuls with quantized
//! weights compute as llama.cpp's CPU backend does by default (activations quantized to
//! 8 bits, integer block dot products: [`super::quant_dot`]); `options.quant_dot = "f32"`
//! dequantizes the weights to f32 inside each matmul and computes in f32 instead. The
//! manifest records the path (`extra.quant_dot`, and in words `extra.compute`). The CUDA
//! backend uploads the file's stored blocks and dequantizes them on the device (bit-exact vs
//! the host), into the request's dtype; `extra.compute` then says that. GGUF
//! hyper-parameters come from the file's metadata; every one the file is silent about is
//! listed in `model.assumed`. Their tokenizer is the request's `tokenizer.json`, else the
//! vocabulary embedded in the file.
//!
//! Errors before the dump directory exists (bad request, unknown device, model that cannot
//! be loaded) leave no dump; errors after it are recorded in the manifest, which keeps
//! every finished prompt.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use crate::protocol::{
    CaptureRecord, ComputeDtype, DumpWriter, EngineInfo, Manifest, Mode, ModelInfo, ModelRef, PromptShard, Request,
    SCHEMA_VERSION, Tensor, Timings, TokenizerInfo,
};

use super::backend::{self, Backend, Device};
use super::captures::{CapturePlan, CaptureSink};
use super::config::{Architecture, ConfigError, ModelConfig};
use super::gguf::{self, GgufConfig, GgufTokenizer, GgufWeights};
use super::kernels;
use super::kv_cache::KvCache;
use super::matrix::QuantDot;
use super::model::{ForwardIo, Model, Scratch};
use super::safetensors::SafetensorsWeights;
use super::tokenizer::Tokenizer;
use super::weights::WeightSource;
use super::{ENGINE_NAME, EngineError};

/// Model file formats this build reads.
pub const FORMATS: &[&str] = &["safetensors", "gguf"];

/// The engine's version (the crate's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git sha of the engine: `PARITYBENCH_GIT_SHA` at run time, else the commit the
/// binary was built from (recorded by build.rs), if known.
pub fn git_sha() -> Option<String> {
    std::env::var("PARITYBENCH_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| option_env!("PARITYBENCH_BUILD_GIT_SHA").map(str::to_string))
        .filter(|s| !s.is_empty())
}

/// Runs the request at `request_path` and writes the dump to `out`. `command` is recorded
/// in the manifest.
pub fn run(request_path: &Path, out: &Path, command: Vec<String>) -> Result<Manifest, EngineError> {
    let req = Request::load(request_path)?;
    let request_bytes = std::fs::read(request_path)
        .map_err(|source| crate::protocol::ProtocolError::Io { path: request_path.to_path_buf(), source })?;
    let device = Device::parse(&req.device)?;
    let threads = threads_option(&req)?;
    let backend = backend::open(device, threads)?;
    if !backend.supports_dtype(req.dtype) {
        return Err(EngineError::UnsupportedDtype {
            dtype: req.dtype.as_str().to_string(),
            backend: backend.name().to_string(),
        });
    }

    let quant_dot = quant_dot_option(&req, backend.name())?;
    let t_load = Instant::now();
    let mut loaded = load_model(&req.model)?;
    loaded.model.quant_dot = quant_dot;
    // llama.cpp's numerics go together: where the matmuls quantize activations as ggml-cpu
    // does, attention rounds as its f16 K/V cache does.
    loaded.model.llamacpp_numerics = loaded.format == "gguf"
        && backend.name() == "cpu"
        && quant_dot == QuantDot::Ggml
        && loaded.model.has_quantized_weights();
    if loaded.format == "gguf" {
        note_gguf_compute(&mut loaded, backend.name());
    }
    #[cfg(feature = "mutation-testing")]
    let loaded = note_mutation(loaded);
    let load_ms = ms(t_load);
    let tokenizer = loaded.tokenizer.as_ref();
    if let (None, Some(path)) = (tokenizer, &loaded.tokenizer_missing) {
        if let Some(p) = req.prompts.iter().find(|p| p.text.is_some()) {
            return Err(EngineError::NoTokenizer { path: path.clone(), prompt: p.id.clone() });
        }
    }
    let model = &loaded.model;
    let weights_note = match loaded.weights.as_deref() {
        Some(w) => backend.prepare_from(model, w, req.dtype)?,
        None => {
            backend.prepare(model, req.dtype)?;
            None
        }
    };
    let (plan, points, layers, absent) = CapturePlan::resolve(&req.captures, &model.config);

    let mut versions = BTreeMap::new();
    for (k, v) in backend.details() {
        versions.insert(k, v);
    }
    let manifest = Manifest {
        schema: SCHEMA_VERSION,
        complete: false,
        engine: EngineInfo {
            name: ENGINE_NAME.to_string(),
            version: VERSION.to_string(),
            git_sha: git_sha(),
            backend: backend.name().to_string(),
            device: backend.device(),
            device_name: backend.device_name(),
            driver: backend.driver(),
            versions,
        },
        model: ModelInfo {
            path: req.model.path.display().to_string(),
            sha256: loaded.sha256.clone().or_else(|| req.model.sha256.clone()),
            format: loaded.format.to_string(),
            quant: loaded.quant.clone(),
            compute_dtype: compute_dtype_name(req.dtype).to_string(),
            architecture: Some(model.config.architecture.as_str().to_string()),
            n_layers: Some(model.config.n_layers as u32),
            vocab_size: Some(model.config.vocab_size as u32),
            assumed: model.config.assumed.clone(),
        },
        tokenizer: TokenizerInfo {
            sha256: tokenizer.map(|t| t.sha256().to_string()),
            add_bos: tokenizer.is_some_and(PromptTokenizer::add_bos),
        },
        mode: req.mode,
        request_sha256: crate::protocol::sha256_hex(&request_bytes),
        prompt_ids: req.prompts.iter().map(|p| p.id.clone()).collect(),
        prompts: Vec::new(),
        captures: CaptureRecord { points, layers, absent },
        load_ms: Some(load_ms),
        peak_rss_bytes: peak_rss_bytes(),
        peak_gpu_bytes: backend.peak_gpu_bytes(),
        command,
        created_utc: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        error: None,
        extra: compute_note(loaded.extra.clone(), &loaded.quant, req.dtype, backend.name(), weights_note),
    };
    let mut writer = DumpWriter::create(out, manifest)?;
    let result = run_prompts(&req, model, backend.as_ref(), &plan, tokenizer, &mut writer);
    match result {
        Ok(()) => {
            writer.manifest_mut().peak_rss_bytes = peak_rss_bytes();
            writer.manifest_mut().peak_gpu_bytes = backend.peak_gpu_bytes();
            Ok(writer.finish()?)
        }
        Err(e) => {
            writer.fail(e.to_string())?;
            Err(e)
        }
    }
}

/// `extra.compute` for a run in f16 / bf16 (a GPU backend): the weights are dequantized to
/// f32 on the host, then stored on the device in the compute dtype. A backend that took the
/// file's stored tensors says how instead (`weights`), in any dtype.
fn compute_note(
    mut extra: serde_json::Map<String, serde_json::Value>,
    quant: &str,
    dtype: ComputeDtype,
    backend: &str,
    weights: Option<String>,
) -> serde_json::Map<String, serde_json::Value> {
    let d = compute_dtype_name(dtype);
    if let Some(w) = weights {
        extra.insert(
            "compute".into(),
            format!("{w}; activations in {d}, products and reductions accumulated in f32").into(),
        );
    } else if d != "f32" {
        extra.insert(
            "compute".into(),
            format!(
                "weights ({quant}) read as f32 at load, stored on the {backend} device in {d}; activations in {d}, \
                 products and reductions accumulated in f32"
            )
            .into(),
        );
    }
    extra
}

/// The dtype a run computes in (`auto`: f32).
fn compute_dtype_name(d: ComputeDtype) -> &'static str {
    match d {
        ComputeDtype::Auto | ComputeDtype::F32 => "f32",
        ComputeDtype::F16 => "f16",
        ComputeDtype::Bf16 => "bf16",
    }
}

/// A dump made with an injected bug says so in its manifest (`extra.mutation`).
#[cfg(feature = "mutation-testing")]
fn note_mutation(mut loaded: LoadedModel) -> LoadedModel {
    if let Some(m) = loaded.model.mutation {
        loaded.extra.insert("mutation".into(), m.to_string().into());
    }
    loaded
}

/// `options.quant_dot`: how the CPU backend multiplies quantized weights, `ggml` (the
/// default: as llama.cpp's CPU backend) or `f32` (dequantized weights, f32 arithmetic). The
/// CUDA backend always dequantizes, so `ggml` there is an error.
fn quant_dot_option(req: &Request, backend: &str) -> Result<QuantDot, EngineError> {
    let bad = |v: &serde_json::Value, message: String| EngineError::BadOption {
        option: "quant_dot".into(),
        value: v.to_string(),
        message,
    };
    let default = if backend == "cpu" { QuantDot::Ggml } else { QuantDot::F32 };
    match req.options.get("quant_dot") {
        None => Ok(default),
        Some(v) => match v.as_str().and_then(QuantDot::parse) {
            Some(QuantDot::Ggml) if backend != "cpu" => {
                Err(bad(v, format!("the {backend} backend has no quantized dot products; use \"f32\"")))
            }
            Some(q) => Ok(q),
            None => Err(bad(v, "must be \"ggml\" (llama.cpp's quantized dot products) or \"f32\"".into())),
        },
    }
}

/// `extra.compute` and `extra.quant_dot` of a GGUF model: which path its matmuls take.
fn note_gguf_compute(loaded: &mut LoadedModel, backend: &str) {
    let quant = &loaded.quant;
    let model = &loaded.model;
    let compute = match (backend, model.has_quantized_weights(), model.quant_dot) {
        ("cpu", true, QuantDot::Ggml) => format!(
            "weights kept in their GGUF types ({quant}); matmuls with quantized weights quantize each activation row \
             to the weight type's vec_dot_type (Q8_0, Q8_1 or Q8_K) as ggml-cpu does and take integer block dot \
             products with ggml's scale arithmetic (llama.cpp's CPU numerics; f32 accumulation in block order); \
             F16/BF16/F32 weights widened to f32 in the dot product; RoPE angles as ggml computes them; attention \
             as llama.cpp's CPU backend without flash attention: K and V cached in f16, Q and the softmax \
             probabilities rounded to f16 for the two products, f32 accumulation; every other operation in f32"
        ),
        ("cpu", true, QuantDot::F32) => format!(
            "weights kept in their GGUF types ({quant}), dequantized to f32 inside each matmul (the values of \
             dequantizing at load); activations and accumulation in f32 (higher precision than llama.cpp, which \
             quantizes activations to 8 bits for quantized matmuls)"
        ),
        ("cpu", false, _) => format!(
            "weights kept in their GGUF types ({quant}), widened to f32 inside each matmul (exact); activations \
             and accumulation in f32"
        ),
        _ => format!(
            "weights dequantized from {quant} to f32 at load; activations and accumulation in f32 \
             (higher precision than llama.cpp, which quantizes activations to 8 bits for quantized matmuls)"
        ),
    };
    let qd = if model.has_quantized_weights() { model.quant_dot.as_str() } else { "none (no quantized weights)" };
    loaded.extra.insert("compute".into(), compute.into());
    loaded.extra.insert("quant_dot".into(), qd.into());
}

/// `options.threads`: CPU worker threads.
fn threads_option(req: &Request) -> Result<Option<usize>, EngineError> {
    match req.options.get("threads") {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n as usize)),
            _ => Err(EngineError::BadOption {
                option: "threads".into(),
                value: v.to_string(),
                message: "must be a positive integer".into(),
            }),
        },
    }
}

/// A model ready to run, with what the manifest says about its file.
pub struct LoadedModel {
    pub model: Model,
    pub format: &'static str,
    /// Storage type(s) of the weights, e.g. `f32`, `bf16`, or a GGUF file type (`Q4_K_M`).
    pub quant: String,
    /// sha256 of the weights file, when the loader computed it (GGUF).
    pub sha256: Option<String>,
    /// The tokenizer for tokenizer parity, if one was found.
    pub tokenizer: Option<PromptTokenizer>,
    /// Set when a tokenizer was required but none could be built: the file to name.
    pub tokenizer_missing: Option<std::path::PathBuf>,
    /// Notes for the manifest's `extra`.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// The file the weights came from, kept open for a backend that uploads the stored
    /// tensors itself (GGUF); `None` where the host's f32 copy is all there is to upload.
    pub weights: Option<Box<dyn WeightSource>>,
}

/// The tokenizer a run checks prompt texts with: an HF `tokenizer.json`, or the vocabulary
/// embedded in a GGUF file.
pub enum PromptTokenizer {
    Json(Tokenizer),
    Gguf {
        tokenizer: GgufTokenizer,
        /// sha256 of the tokenizer.json given, or of the embedded tokenizer's JSON form.
        sha256: String,
    },
}

impl PromptTokenizer {
    /// Token ids of a prompt's `text`, encoded as the suite encoded it: no special tokens
    /// added, added tokens in the text (e.g. a chat template's `<|im_start|>`) recognised.
    pub fn encode(&self, prompt: &str, text: &str) -> Result<Vec<u32>, EngineError> {
        match self {
            PromptTokenizer::Json(t) => Ok(t.encode(prompt, text)?),
            PromptTokenizer::Gguf { tokenizer, .. } => Ok(tokenizer.encode(text)?),
        }
    }

    pub fn sha256(&self) -> &str {
        match self {
            PromptTokenizer::Json(t) => t.sha256(),
            PromptTokenizer::Gguf { sha256, .. } => sha256,
        }
    }

    /// Whether encoding prepends a BOS token.
    pub fn add_bos(&self) -> bool {
        match self {
            PromptTokenizer::Json(_) => false,
            PromptTokenizer::Gguf { tokenizer, .. } => tokenizer.add_bos && tokenizer.bos_token_id.is_some(),
        }
    }
}

/// Opens the checkpoint a request names and builds the model. The format is the request's
/// `format`, else inferred from the path (a directory or `.safetensors`: safetensors).
pub fn load_model(m: &ModelRef) -> Result<LoadedModel, EngineError> {
    let path = &m.path;
    let format = match m.format.as_deref() {
        Some(f) => f.to_string(),
        None if path.is_dir() || path.extension().is_some_and(|e| e == "safetensors") => "safetensors".to_string(),
        None if path.extension().is_some_and(|e| e == "gguf") => "gguf".to_string(),
        None => {
            if !path.exists() {
                return Err(crate::protocol::ProtocolError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "model path does not exist"),
                }
                .into());
            }
            "unknown".to_string()
        }
    };
    match format.as_str() {
        "safetensors" => {
            let weights = SafetensorsWeights::open(path)?;
            let dir =
                if path.is_dir() { path.clone() } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
            let config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
            let quant = storage_summary(&weights);
            let model = Model::load(config, &weights)?;
            let tokenizer = match Tokenizer::locate(path, m.tokenizer.as_deref()) {
                Some(p) => Some(PromptTokenizer::Json(Tokenizer::open(&p)?)),
                None => None,
            };
            Ok(LoadedModel {
                model,
                format: "safetensors",
                quant,
                sha256: None,
                tokenizer,
                tokenizer_missing: None,
                extra: Default::default(),
                weights: None,
            })
        }
        "gguf" => load_gguf(m),
        _ => Err(EngineError::UnsupportedFormat { path: path.clone(), format }),
    }
}

/// A GGUF file: hyper-parameters from its metadata, weights kept mapped in their types, the
/// request's tokenizer.json or else the embedded vocabulary.
fn load_gguf(m: &ModelRef) -> Result<LoadedModel, EngineError> {
    let path = &m.path;
    let weights = GgufWeights::open(path)?;
    let file = weights.file();
    // The architecture first: a file of another family is named as such, not by the first
    // `qwen3.*` key it lacks.
    let arch = file.get_str("general.architecture").map_err(|e| gguf::weights::to_weight_error(path, e))?;
    if Architecture::parse(arch).is_none() {
        return Err(ConfigError::UnknownArchitecture { path: path.clone(), found: arch.to_string() }.into());
    }
    let meta = weights.config()?;
    let config = ModelConfig::from_gguf(path, &meta, file.tensor("output.weight").is_some())?;
    let quant = gguf_quant(file, &meta);
    let sha256 = crate::protocol::sha256_file(path)
        .map_err(|source| crate::protocol::ProtocolError::Io { path: path.clone(), source })?;
    let (tokenizer, tokenizer_missing) = match gguf::load_tokenizer(file, m.tokenizer.as_deref()) {
        Ok(t) => {
            let sha256 = match &m.tokenizer {
                Some(json) => crate::protocol::sha256_file(json)
                    .map_err(|source| crate::protocol::ProtocolError::Io { path: json.clone(), source })?,
                None => crate::protocol::sha256_hex(
                    t.tokenizer
                        .to_string(false)
                        .map_err(|e| gguf::TokenizerError::Build { path: path.clone(), message: e.to_string() })?
                        .as_bytes(),
                ),
            };
            (Some(PromptTokenizer::Gguf { tokenizer: t, sha256 }), None)
        }
        // Token ids are all the engine needs; the tokenizer is required only for prompt
        // texts, which `run` checks.
        Err(gguf::TokenizerError::NoTokenizer { path }) => (None, Some(path)),
        Err(e) => return Err(e.into()),
    };
    let mut extra = serde_json::Map::new();
    extra.insert(
        "tokenizer_source".into(),
        match (&tokenizer, &m.tokenizer) {
            (Some(_), Some(json)) => json.display().to_string(),
            (Some(_), None) => format!("{} (embedded vocabulary)", path.display()),
            (None, _) => "none".to_string(),
        }
        .into(),
    );
    let model = Model::load(config, &weights)?;
    Ok(LoadedModel {
        model,
        format: "gguf",
        quant,
        sha256: Some(sha256),
        tokenizer,
        tokenizer_missing,
        extra,
        weights: Some(Box::new(weights)),
    })
}

/// The file type a GGUF file declares (`general.file_type`, llama.cpp's `llama_ftype`),
/// else its dominant tensor type.
fn gguf_quant(file: &gguf::GgufFile, meta: &GgufConfig) -> String {
    let named = meta.file_type.and_then(|t| {
        Some(match t {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            7 => "Q8_0",
            8 => "Q5_0",
            9 => "Q5_1",
            10 => "Q2_K",
            11 => "Q3_K_S",
            12 => "Q3_K_M",
            13 => "Q3_K_L",
            14 => "Q4_K_S",
            15 => "Q4_K_M",
            16 => "Q5_K_S",
            17 => "Q5_K_M",
            18 => "Q6_K",
            32 => "BF16",
            _ => return None,
        })
    });
    match (named, meta.file_type) {
        (Some(n), _) => n.to_string(),
        (None, ft) => {
            let dominant = GgufConfig::dominant_type(file).unwrap_or("unknown");
            match ft {
                Some(t) => format!("{dominant} (file_type {t})"),
                None => dominant.to_string(),
            }
        }
    }
}

/// The storage types of a file's tensors, lower-case: `f32`, or `bf16+f32` when mixed.
fn storage_summary(w: &dyn WeightSource) -> String {
    let types: std::collections::BTreeSet<String> =
        w.names().iter().filter_map(|n| w.storage_type(n)).map(|t| t.to_lowercase()).collect();
    types.into_iter().collect::<Vec<_>>().join("+")
}

fn run_prompts(
    req: &Request,
    model: &Model,
    backend: &dyn Backend,
    plan: &CapturePlan,
    tokenizer: Option<&PromptTokenizer>,
    writer: &mut DumpWriter,
) -> Result<(), EngineError> {
    let vocab = model.config.vocab_size;
    for p in &req.prompts {
        if let Some((position, &id)) = p.token_ids.iter().enumerate().find(|&(_, &id)| id < 0 || id as usize >= vocab) {
            return Err(EngineError::PromptTokenOutOfVocab { prompt: p.id.clone(), position, id: id as i64, vocab });
        }
    }
    for (index, p) in req.prompts.iter().enumerate() {
        let tokens: Vec<u32> = p.token_ids.iter().map(|&t| t as u32).collect();
        let positions: Vec<usize> = req.positions_of(index).iter().map(|&x| x as usize).collect();
        let job = PromptJob {
            tokens: &tokens,
            positions: &positions,
            decode_steps: req.decode_steps as usize,
            mode: req.mode,
        };
        let mut timings = Timings {
            prefill_tokens: tokens.len() as u32,
            decode_tokens: req.decode_steps.saturating_sub(1),
            ..Default::default()
        };
        let mut kept: Option<RunOutput> = None;
        let mut state = PromptState::new(model, &job);
        for run in 0..req.warmup + req.repeats {
            let out = run_once(model, backend, plan, &job, &mut state)?;
            if run >= req.warmup {
                timings.prefill_ms.push(out.prefill_ms);
                timings.decode_ms.push(out.decode_ms);
                if let Some(t) = out.ttft_ms {
                    timings.ttft_ms.push(t);
                }
                if kept.is_none() {
                    kept = Some(out);
                }
            }
        }
        let out = kept.expect("repeats >= 1 is validated with the request");
        // A chat prompt's text has its template applied already: encoded the same way.
        let tokenizer_match = match (tokenizer, &p.text) {
            (Some(t), Some(text)) => Some(t.encode(&p.id, text)? == tokens),
            _ => None,
        };
        let shard = PromptShard {
            index: index as u32,
            id: p.id.clone(),
            token_ids: p.token_ids.clone(),
            positions: positions.iter().map(|&x| x as i32).collect(),
            logits: Some(Tensor::f32(vec![positions.len(), vocab], out.logits)),
            generated: out.generated.iter().map(|&g| g as i32).collect(),
            hidden: out.captures,
            timings,
            tokenizer_match,
            peak_rss_bytes: peak_rss_bytes(),
            peak_gpu_bytes: backend.peak_gpu_bytes(),
        };
        writer.write_prompt(shard)?;
        tracing::info!(prompt = %p.id, tokens = tokens.len(), "prompt finished");
    }
    Ok(())
}

/// What one prompt asks for.
struct PromptJob<'a> {
    tokens: &'a [u32],
    /// Scored positions, ascending.
    positions: &'a [usize],
    decode_steps: usize,
    mode: Mode,
}

/// Buffers a prompt reuses across its runs.
struct PromptState {
    cache: KvCache,
    scratch: Scratch,
    sink: CaptureSink,
    /// `[rows, V]` logits of the last forward call
    call_logits: Vec<f32>,
}

impl PromptState {
    fn new(model: &Model, job: &PromptJob) -> PromptState {
        let c = &model.config;
        // The last generated token is never fed back, so the cache needs T + N - 1 slots.
        let capacity = job.tokens.len() + job.decode_steps.saturating_sub(1);
        PromptState {
            cache: KvCache::new(c.n_layers, capacity, c.kv_dim()),
            scratch: Scratch::default(),
            sink: CaptureSink::new(),
            call_logits: Vec::new(),
        }
    }
}

/// Outputs and timings of one run of a prompt.
struct RunOutput {
    /// `[P, V]`
    logits: Vec<f32>,
    generated: Vec<u32>,
    captures: BTreeMap<String, Tensor>,
    prefill_ms: f64,
    decode_ms: f64,
    ttft_ms: Option<f64>,
}

fn run_once(
    model: &Model,
    backend: &dyn Backend,
    plan: &CapturePlan,
    job: &PromptJob,
    st: &mut PromptState,
) -> Result<RunOutput, EngineError> {
    let v = model.config.vocab_size;
    let t = job.tokens.len();
    st.cache.clear();
    st.sink.clear();
    let mut logits = Vec::with_capacity(job.positions.len() * v); // [P, V]
    let mut last = vec![0.0f32; if job.decode_steps > 0 { v } else { 0 }]; // [V] logits of the last prompt token
    let t0 = Instant::now();

    // The prompt.
    match job.mode {
        Mode::Prefill => {
            let mut logit_rows = job.positions.to_vec();
            if job.decode_steps > 0 && logit_rows.last() != Some(&(t - 1)) {
                logit_rows.push(t - 1);
            }
            let mut io = ForwardIo {
                plan,
                capture_rows: job.positions,
                sink: &mut st.sink,
                logit_rows: &logit_rows,
                logits: &mut st.call_logits,
            };
            backend.forward(model, job.tokens, &mut st.cache, &mut io, &mut st.scratch)?;
            logits.extend_from_slice(&st.call_logits[..job.positions.len() * v]);
            if job.decode_steps > 0 {
                let r = logit_rows.len() - 1;
                last.copy_from_slice(&st.call_logits[r * v..(r + 1) * v]);
            }
        }
        Mode::Incremental => {
            let mut scored = job.positions.iter().peekable();
            for (p, &tok) in job.tokens.iter().enumerate() {
                let is_scored = scored.next_if(|&&x| x == p).is_some();
                let need_logits = is_scored || (p == t - 1 && job.decode_steps > 0);
                let rows: &[usize] = if is_scored { &[0] } else { &[] };
                let logit_rows: &[usize] = if need_logits { &[0] } else { &[] };
                let mut io =
                    ForwardIo { plan, capture_rows: rows, sink: &mut st.sink, logit_rows, logits: &mut st.call_logits };
                backend.forward(model, &[tok], &mut st.cache, &mut io, &mut st.scratch)?;
                if is_scored {
                    logits.extend_from_slice(&st.call_logits[..v]);
                }
                if p == t - 1 && job.decode_steps > 0 {
                    last.copy_from_slice(&st.call_logits[..v]);
                }
            }
        }
    }
    let prefill_ms = ms(t0);

    // Greedy decoding.
    let mut generated = Vec::with_capacity(job.decode_steps);
    let mut ttft_ms = None;
    let mut decode_ms = 0.0;
    if job.decode_steps > 0 {
        generated.push(kernels::argmax(&last) as u32);
        ttft_ms = Some(ms(t0));
        let t1 = Instant::now();
        let none = CapturePlan::none();
        for _ in 1..job.decode_steps {
            let tok = *generated.last().expect("one token was pushed above");
            let mut io = ForwardIo {
                plan: &none,
                capture_rows: &[],
                sink: &mut st.sink,
                logit_rows: &[0],
                logits: &mut st.call_logits,
            };
            backend.forward(model, &[tok], &mut st.cache, &mut io, &mut st.scratch)?;
            generated.push(kernels::argmax(&st.call_logits[..v]) as u32);
        }
        decode_ms = ms(t1);
    }
    Ok(RunOutput { logits, generated, captures: st.sink.take(), prefill_ms, decode_ms, ttft_ms })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Peak resident set size of this process (`VmHWM` in /proc/self/status), Linux only.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
