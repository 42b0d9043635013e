//! The model's hyper-parameters, validated once, whatever file they came from.
//!
//! Two ways in: [`ModelConfig::from_hf_json`] reads an HF `config.json` (qwen2, qwen3,
//! qwen3_moe), and [`ModelConfig::new`] takes plain values (what a GGUF loader reads from
//! the file's metadata). Both end in [`ModelConfig::validate`], so a `ModelConfig` handed to
//! the model is consistent: heads divide into KV groups, the top-k fits the expert count,
//! every size is non-zero. Everything the engine does not implement (sliding-window
//! attention, RoPE scaling, activations other than SiLU) is refused here with its name,
//! rather than computed wrongly later.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The architectures the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Qwen2: q/k/v projections with bias, no q/k norm.
    Qwen2,
    /// Qwen3 dense: per-head RMSNorm on q and k before RoPE.
    Qwen3,
    /// Qwen3-MoE: Qwen3 attention, sparse (routed SwiGLU experts) and dense layers mixed.
    Qwen3Moe,
}

impl Architecture {
    pub const ALL: [Architecture; 3] = [Architecture::Qwen2, Architecture::Qwen3, Architecture::Qwen3Moe];

    /// The HF `model_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen3Moe => "qwen3_moe",
        }
    }

    /// Parses an HF `model_type` (also accepts llama.cpp's `general.architecture` spelling).
    pub fn parse(s: &str) -> Option<Architecture> {
        match s {
            "qwen2" => Some(Architecture::Qwen2),
            "qwen3" => Some(Architecture::Qwen3),
            "qwen3_moe" | "qwen3moe" => Some(Architecture::Qwen3Moe),
            _ => None,
        }
    }

    /// Whether attention has per-head q/k RMSNorm (Qwen3 family).
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Architecture::Qwen3 | Architecture::Qwen3Moe)
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a configuration cannot be used. Every variant names the file (or `values` when the
/// configuration came from plain values) and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: malformed JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: unknown architecture `{found}` (this engine implements {})", path.display(), known())]
    UnknownArchitecture { path: PathBuf, found: String },
    #[error("{}: missing field `{field}`", path.display())]
    Missing { path: PathBuf, field: &'static str },
    #[error("{}: field `{field}` = {value}: {message}", path.display())]
    Invalid { path: PathBuf, field: &'static str, value: String, message: String },
    #[error("{}: {feature} is not implemented by this engine ({detail})", path.display())]
    Unsupported { path: PathBuf, feature: &'static str, detail: String },
}

fn known() -> String {
    Architecture::ALL.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", ")
}

/// Mixture-of-experts hyper-parameters (Qwen3-MoE).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per sparse layer (`num_experts`, `num_local_experts`).
    pub n_experts: usize,
    /// Experts chosen per token (`num_experts_per_tok`).
    pub n_experts_per_tok: usize,
    /// Inner width of one expert's SwiGLU (`moe_intermediate_size`).
    pub expert_intermediate_size: usize,
    /// A layer is sparse when `(i + 1) % decoder_sparse_step == 0` ...
    pub decoder_sparse_step: usize,
    /// ... and `i` is not listed here.
    pub mlp_only_layers: Vec<usize>,
    /// Renormalise the chosen experts' probabilities to sum to one.
    pub norm_topk_prob: bool,
}

/// Everything the forward pass needs to know about the model's shape.
///
/// Build it with [`ModelConfig::from_hf_json`] or [`ModelConfig::new`]; both validate.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// Rows of the embedding and of the lm_head (`V`).
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Inner width of the dense SwiGLU MLP (dense layers of every architecture).
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// The lm_head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias.
    pub qkv_bias: bool,
    /// o_proj carries a bias.
    pub o_bias: bool,
    pub moe: Option<MoeConfig>,
    /// Values the source did not state and the engine assumed (field -> value), for the
    /// manifest's `model.assumed`.
    pub assumed: BTreeMap<String, String>,
}

impl ModelConfig {
    /// A configuration from plain values (e.g. GGUF metadata). `head_dim` defaults to
    /// `hidden_size / n_heads` when `None`. `source` names where the values came from, for
    /// error messages. Biases follow the architecture (qwen2: q/k/v; qwen3: none).
    #[expect(clippy::too_many_arguments, reason = "one argument per hyper-parameter reads clearer than a builder here")]
    pub fn new(
        source: &Path,
        architecture: Architecture,
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: Option<usize>,
        rms_norm_eps: f64,
        rope_theta: f64,
        tie_word_embeddings: bool,
        moe: Option<MoeConfig>,
    ) -> Result<ModelConfig, ConfigError> {
        let mut assumed = BTreeMap::new();
        let head_dim = match head_dim {
            Some(d) => d,
            None => {
                let d = hidden_size.checked_div(n_heads).unwrap_or(0);
                assumed.insert("head_dim".to_string(), d.to_string());
                d
            }
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings,
            qkv_bias: architecture == Architecture::Qwen2,
            o_bias: false,
            moe,
            assumed,
        };
        cfg.validate(source)?;
        Ok(cfg)
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<ModelConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|source| ConfigError::Json { path: path.to_path_buf(), source })?;
        let j = JsonFields { path, v: &v };

        let model_type =
            j.str("model_type")?.ok_or(ConfigError::Missing { path: path.to_path_buf(), field: "model_type" })?;
        let architecture = Architecture::parse(&model_type)
            .ok_or_else(|| ConfigError::UnknownArchitecture { path: path.to_path_buf(), found: model_type.clone() })?;

        let mut assumed = BTreeMap::new();
        let hidden_size = j.req_usize("hidden_size")?;
        let n_heads = j.req_usize("num_attention_heads")?;
        let n_kv_heads = match j.usize("num_key_value_heads")? {
            Some(n) => n,
            None => {
                assumed.insert("num_key_value_heads".into(), n_heads.to_string());
                n_heads
            }
        };
        let head_dim = match j.usize("head_dim")? {
            Some(d) => d,
            None => {
                let d = hidden_size.checked_div(n_heads).unwrap_or(0);
                assumed.insert("head_dim".into(), d.to_string());
                d
            }
        };
        let rope_theta = rope_theta(&j)?;
        let rms_norm_eps = j.f64("rms_norm_eps")?.unwrap_or_else(|| {
            assumed.insert("rms_norm_eps".into(), "1e-6".into());
            1e-6
        });
        let tie_word_embeddings = j.bool("tie_word_embeddings")?.unwrap_or_else(|| {
            assumed.insert("tie_word_embeddings".into(), "false".into());
            false
        });
        if let Some(act) = j.str("hidden_act")?
            && act != "silu"
        {
            return Err(ConfigError::Unsupported {
                path: path.to_path_buf(),
                feature: "hidden_act",
                detail: format!("`{act}`; only `silu` is implemented"),
            });
        }
        refuse_sliding_window(&j)?;
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Qwen3 | Architecture::Qwen3Moe => {
                let b = j.bool("attention_bias")?.unwrap_or(false);
                (b, b)
            }
        };
        let moe = match architecture {
            Architecture::Qwen3Moe => Some(moe_config(&j)?),
            _ => None,
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: j.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: j.req_usize("intermediate_size")?,
            n_layers: j.req_usize("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            moe,
            assumed,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The configuration of a GGUF file from its metadata (`cfg`) and whether it carries
    /// an `output.weight` tensor. Every value the file is silent about is assumed as
    /// llama.cpp assumes it, and recorded in [`ModelConfig::assumed`] under the GGUF key,
    /// as `value (why)`.
    pub fn from_gguf(
        path: &Path,
        cfg: &crate::engine::gguf::GgufConfig,
        has_output: bool,
    ) -> Result<ModelConfig, ConfigError> {
        let architecture = Architecture::parse(&cfg.architecture).ok_or_else(|| ConfigError::UnknownArchitecture {
            path: path.to_path_buf(),
            found: cfg.architecture.clone(),
        })?;
        let arch = cfg.architecture.as_str();
        let mut assumed = BTreeMap::new();
        let mut assume = |key: String, value: String, why: &str| {
            assumed.insert(key, format!("{value} ({why})"));
        };
        let size = |v: u64, field: &'static str| -> Result<usize, ConfigError> {
            usize::try_from(v).map_err(|_| ConfigError::Invalid {
                path: path.to_path_buf(),
                field,
                value: v.to_string(),
                message: "does not fit in usize".into(),
            })
        };
        let vocab_size =
            cfg.vocab_size().ok_or(ConfigError::Missing { path: path.to_path_buf(), field: "token_embd.weight" })?;
        let n_heads = size(cfg.head_count, "attention.head_count")?;
        let hidden_size = size(cfg.embedding_length, "embedding_length")?;
        let n_kv_heads = match cfg.head_count_kv {
            Some(n) => size(n, "attention.head_count_kv")?,
            None => {
                assume(
                    format!("{arch}.attention.head_count_kv"),
                    n_heads.to_string(),
                    "absent: no grouped-query attention, as llama.cpp",
                );
                n_heads
            }
        };
        let head_dim = match cfg.key_length {
            Some(d) => size(d, "attention.key_length")?,
            None => {
                let d = hidden_size.checked_div(n_heads).unwrap_or(0);
                assume(
                    format!("{arch}.attention.key_length"),
                    d.to_string(),
                    "absent: embedding_length / head_count, as llama.cpp",
                );
                d
            }
        };
        let rope_theta = cfg.rope_freq_base.unwrap_or_else(|| {
            assume(format!("{arch}.rope.freq_base"), "10000".into(), "absent: llama.cpp's default");
            10_000.0
        });
        let rms_norm_eps = cfg.layer_norm_rms_epsilon.unwrap_or_else(|| {
            assume(format!("{arch}.attention.layer_norm_rms_epsilon"), "1e-6".into(), "absent: the Qwen default");
            1e-6
        });
        if !has_output {
            assume(
                "tie_word_embeddings".into(),
                "true".into(),
                "output.weight absent: the lm_head reuses token_embd.weight, as llama.cpp does",
            );
        }
        let moe = match architecture {
            Architecture::Qwen3Moe => {
                let need = |v: Option<u64>, field: &'static str| -> Result<usize, ConfigError> {
                    size(v.ok_or(ConfigError::Missing { path: path.to_path_buf(), field })?, field)
                };
                let norm_topk_prob = cfg.expert_weights_norm.unwrap_or_else(|| {
                    assume(
                        format!("{arch}.expert_weights_norm"),
                        "true".into(),
                        "absent: llama.cpp's qwen3moe graph always renormalises the top-k router weights",
                    );
                    true
                });
                assume(
                    "decoder_sparse_step".into(),
                    "1".into(),
                    "GGUF does not record it: every layer is sparse, as llama.cpp's qwen3moe graph",
                );
                assume(
                    "mlp_only_layers".into(),
                    "[]".into(),
                    "GGUF does not record it: every layer is sparse, as llama.cpp's qwen3moe graph",
                );
                Some(MoeConfig {
                    n_experts: need(cfg.expert_count, "expert_count")?,
                    n_experts_per_tok: need(cfg.expert_used_count, "expert_used_count")?,
                    expert_intermediate_size: need(cfg.expert_feed_forward_length, "expert_feed_forward_length")?,
                    decoder_sparse_step: 1,
                    mlp_only_layers: Vec::new(),
                    norm_topk_prob,
                })
            }
            _ => None,
        };
        // Every qwen3moe layer is sparse, so the dense width is unused there; dense
        // architectures need it.
        let intermediate_size = match (cfg.feed_forward_length, &moe) {
            (Some(n), _) => size(n, "feed_forward_length")?,
            (None, Some(m)) => {
                assume(
                    format!("{arch}.feed_forward_length"),
                    m.expert_intermediate_size.to_string(),
                    "absent: unused, every layer is sparse",
                );
                m.expert_intermediate_size
            }
            (None, None) => {
                return Err(ConfigError::Missing { path: path.to_path_buf(), field: "feed_forward_length" });
            }
        };
        let mut c = ModelConfig::new(
            path,
            architecture,
            size(vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size,
            size(cfg.block_count, "block_count")?,
            n_heads,
            n_kv_heads,
            Some(head_dim),
            rms_norm_eps,
            rope_theta,
            !has_output,
            moe,
        )?;
        c.assumed = assumed;
        Ok(c)
    }

    /// Whether decoder layer `i` routes through experts (HF's rule for Qwen3-MoE).
    pub fn is_sparse_layer(&self, i: usize) -> bool {
        match &self.moe {
            Some(m) => {
                m.n_experts > 0 && !m.mlp_only_layers.contains(&i) && (i + 1).is_multiple_of(m.decoder_sparse_step)
            }
            None => false,
        }
    }

    /// Width of the query projection output, `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the key (and value) projection output, `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks that the sizes are usable together. `source` names the file for messages.
    pub fn validate(&self, source: &Path) -> Result<(), ConfigError> {
        let bad = |field: &'static str, value: String, message: &str| ConfigError::Invalid {
            path: source.to_path_buf(),
            field,
            value,
            message: message.to_string(),
        };
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(bad(field, "0".into(), "must be positive"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                self.n_kv_heads.to_string(),
                &format!("must divide num_attention_heads = {}", self.n_heads),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", self.head_dim.to_string(), "must be even (RoPE rotates pairs)"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(bad("rms_norm_eps", self.rms_norm_eps.to_string(), "must be a positive number"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad("rope_theta", self.rope_theta.to_string(), "must be a positive number"));
        }
        if let Some(m) = &self.moe {
            if m.n_experts == 0 {
                return Err(bad("num_experts", "0".into(), "must be positive"));
            }
            if m.n_experts_per_tok == 0 || m.n_experts_per_tok > m.n_experts {
                return Err(bad(
                    "num_experts_per_tok",
                    m.n_experts_per_tok.to_string(),
                    &format!("must be in 1..={} (num_experts)", m.n_experts),
                ));
            }
            if m.expert_intermediate_size == 0 {
                return Err(bad("moe_intermediate_size", "0".into(), "must be positive"));
            }
            if m.decoder_sparse_step == 0 {
                return Err(bad("decoder_sparse_step", "0".into(), "must be positive"));
            }
            if let Some(&l) = m.mlp_only_layers.iter().find(|&&l| l >= self.n_layers) {
                return Err(bad(
                    "mlp_only_layers",
                    l.to_string(),
                    &format!("is not a layer index below num_hidden_layers = {}", self.n_layers),
                ));
            }
        }
        Ok(())
    }
}

/// `rope_theta` at the top level (older files) or inside `rope_parameters` (transformers
/// 5.x); only the default RoPE type is implemented.
fn rope_theta(j: &JsonFields) -> Result<f64, ConfigError> {
    if let Some(params) = j.v.get("rope_parameters").filter(|p| !p.is_null()) {
        let sub = JsonFields { path: j.path, v: params };
        if let Some(t) = sub.str("rope_type")?
            && t != "default"
        {
            return Err(ConfigError::Unsupported {
                path: j.path.to_path_buf(),
                feature: "RoPE scaling",
                detail: format!("rope_parameters.rope_type = `{t}`; only `default`"),
            });
        }
        if let Some(theta) = sub.f64("rope_theta")? {
            return Ok(theta);
        }
    }
    if let Some(scaling) = j.v.get("rope_scaling").filter(|s| !s.is_null()) {
        let t = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("?");
        if t != "default" {
            return Err(ConfigError::Unsupported {
                path: j.path.to_path_buf(),
                feature: "RoPE scaling",
                detail: format!("rope_scaling type `{t}`; only `default`"),
            });
        }
    }
    j.f64("rope_theta")?.ok_or(ConfigError::Missing { path: j.path.to_path_buf(), field: "rope_theta" })
}

fn refuse_sliding_window(j: &JsonFields) -> Result<(), ConfigError> {
    let on = j.bool("use_sliding_window")?.unwrap_or(false);
    let sliding_layers =
        j.v.get("layer_types")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter(|t| t.as_str() == Some("sliding_attention")).count())
            .unwrap_or(0);
    if on || sliding_layers > 0 {
        return Err(ConfigError::Unsupported {
            path: j.path.to_path_buf(),
            feature: "sliding-window attention",
            detail: format!("use_sliding_window = {on}, {sliding_layers} layers of type sliding_attention"),
        });
    }
    Ok(())
}

fn moe_config(j: &JsonFields) -> Result<MoeConfig, ConfigError> {
    // transformers 5.x writes `num_local_experts`; older files `num_experts`.
    let n_experts = match j.usize("num_experts")? {
        Some(n) => n,
        None => j
            .usize("num_local_experts")?
            .ok_or(ConfigError::Missing { path: j.path.to_path_buf(), field: "num_experts" })?,
    };
    let mlp_only_layers = match j.v.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                ConfigError::Invalid {
                    path: j.path.to_path_buf(),
                    field: "mlp_only_layers",
                    value: Value::Array(a.clone()).to_string(),
                    message: "must be a list of layer indices".into(),
                }
            })?
        }
        Some(other) => {
            return Err(ConfigError::Invalid {
                path: j.path.to_path_buf(),
                field: "mlp_only_layers",
                value: other.to_string(),
                message: "must be a list of layer indices".into(),
            });
        }
    };
    Ok(MoeConfig {
        n_experts,
        n_experts_per_tok: j.req_usize("num_experts_per_tok")?,
        expert_intermediate_size: j.req_usize("moe_intermediate_size")?,
        decoder_sparse_step: j.usize("decoder_sparse_step")?.unwrap_or(1),
        mlp_only_layers,
        norm_topk_prob: j.bool("norm_topk_prob")?.unwrap_or(false),
    })
}

/// Typed access to the fields of one JSON object, every error naming file and field.
struct JsonFields<'a> {
    path: &'a Path,
    v: &'a Value,
}

impl JsonFields<'_> {
    fn get(&self, field: &'static str) -> Option<&Value> {
        self.v.get(field).filter(|x| !x.is_null())
    }
    fn invalid(&self, field: &'static str, value: &Value, message: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            field,
            value: value.to_string(),
            message: message.to_string(),
        }
    }
    fn usize(&self, field: &'static str) -> Result<Option<usize>, ConfigError> {
        self.get(field)
            .map(|x| {
                x.as_u64().map(|n| n as usize).ok_or_else(|| self.invalid(field, x, "must be a non-negative integer"))
            })
            .transpose()
    }
    fn req_usize(&self, field: &'static str) -> Result<usize, ConfigError> {
        self.usize(field)?.ok_or(ConfigError::Missing { path: self.path.to_path_buf(), field })
    }
    fn f64(&self, field: &'static str) -> Result<Option<f64>, ConfigError> {
        self.get(field).map(|x| x.as_f64().ok_or_else(|| self.invalid(field, x, "must be a number"))).transpose()
    }
    fn bool(&self, field: &'static str) -> Result<Option<bool>, ConfigError> {
        self.get(field).map(|x| x.as_bool().ok_or_else(|| self.invalid(field, x, "must be true or false"))).transpose()
    }
    fn str(&self, field: &'static str) -> Result<Option<String>, ConfigError> {
        self.get(field)
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| self.invalid(field, x, "must be a string")))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    const QWEN3: &str = r#"{"model_type":"qwen3","vocab_size":100,"hidden_size":64,"intermediate_size":96,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,
        "rms_norm_eps":1e-6,"rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},
        "tie_word_embeddings":true,"hidden_act":"silu"}"#;

    #[test]
    fn reads_qwen3_with_nested_rope_theta() {
        let d = tempfile::tempdir().unwrap();
        let c = ModelConfig::from_hf_json(&write(d.path(), QWEN3)).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.head_dim, 32);
        assert_eq!((c.q_dim(), c.kv_dim()), (128, 64));
        assert!(c.tie_word_embeddings && !c.qkv_bias && c.moe.is_none());
    }

    #[test]
    fn reads_qwen2_with_top_level_rope_theta_and_default_head_dim() {
        let d = tempfile::tempdir().unwrap();
        let j = r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,"intermediate_size":96,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rope_theta":10000.0}"#;
        let c = ModelConfig::from_hf_json(&write(d.path(), j)).unwrap();
        assert_eq!((c.head_dim, c.rope_theta, c.qkv_bias, c.o_bias), (16, 1e4, true, false));
        assert_eq!(c.assumed.get("head_dim").map(String::as_str), Some("16"));
    }

    #[test]
    fn reads_moe_layers_as_hf_decides_them() {
        let d = tempfile::tempdir().unwrap();
        let j = QWEN3.replace("\"qwen3\"", "\"qwen3_moe\"").replace(
            "\"hidden_act\":\"silu\"",
            "\"num_local_experts\":8,\"num_experts_per_tok\":2,\"moe_intermediate_size\":16,\"decoder_sparse_step\":2,\"mlp_only_layers\":[3],\"norm_topk_prob\":true",
        );
        let j = j.replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":6");
        let c = ModelConfig::from_hf_json(&write(d.path(), &j)).unwrap();
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.n_experts, m.n_experts_per_tok, m.norm_topk_prob), (8, 2, true));
        let sparse: Vec<usize> = (0..6).filter(|&i| c.is_sparse_layer(i)).collect();
        assert_eq!(sparse, vec![1, 5]);
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        let d = tempfile::tempdir().unwrap();
        let e = ModelConfig::from_hf_json(&write(d.path(), &QWEN3.replace("\"qwen3\"", "\"llama\"")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown architecture `llama`") && e.contains("qwen3_moe") && e.contains("config.json"),
            "{e}"
        );
        let e = ModelConfig::from_hf_json(&write(d.path(), &QWEN3.replace("\"default\"", "\"yarn\"")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RoPE scaling") && e.contains("yarn"), "{e}");
        let e = ModelConfig::from_hf_json(&write(
            d.path(),
            &QWEN3.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3"),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_key_value_heads") && e.contains("divide"), "{e}");
        let e = ModelConfig::from_hf_json(&write(d.path(), &QWEN3.replace("\"vocab_size\":100,", "")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `vocab_size`"), "{e}");
        let e =
            ModelConfig::from_hf_json(&write(d.path(), &QWEN3.replace("\"hidden_size\":64", "\"hidden_size\":\"64\"")))
                .unwrap_err()
                .to_string();
        assert!(e.contains("hidden_size") && e.contains("integer"), "{e}");
        let e = ModelConfig::from_hf_json(&write(d.path(), &QWEN3.replace("\"silu\"", "\"gelu\"")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gelu"), "{e}");
    }

    #[test]
    fn plain_values_are_validated_too() {
        let p = Path::new("m.gguf");
        let c = ModelConfig::new(p, Architecture::Qwen3, 10, 64, 96, 2, 4, 2, None, 1e-6, 1e6, false, None).unwrap();
        assert_eq!(c.head_dim, 16);
        let moe = MoeConfig {
            n_experts: 4,
            n_experts_per_tok: 5,
            expert_intermediate_size: 8,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
            norm_topk_prob: true,
        };
        let e = ModelConfig::new(p, Architecture::Qwen3Moe, 10, 64, 96, 2, 4, 2, None, 1e-6, 1e6, false, Some(moe))
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.gguf") && e.contains("num_experts_per_tok"), "{e}");
    }

    fn gguf_meta(arch: &str) -> crate::engine::gguf::GgufConfig {
        crate::engine::gguf::GgufConfig {
            architecture: arch.into(),
            file_type: Some(15),
            block_count: 2,
            embedding_length: 64,
            feed_forward_length: Some(96),
            head_count: 4,
            head_count_kv: Some(2),
            key_length: Some(32),
            value_length: Some(32),
            rope_freq_base: Some(1e6),
            layer_norm_rms_epsilon: Some(1e-6),
            context_length: Some(128),
            expert_count: None,
            expert_used_count: None,
            expert_feed_forward_length: None,
            expert_shared_feed_forward_length: None,
            expert_weights_norm: None,
            expert_gating_func: None,
            tokenizer_vocab_size: Some(10),
            embedding_rows: Some(10),
            absent: vec![],
        }
    }

    #[test]
    fn gguf_metadata_with_every_assumption_recorded() {
        let p = Path::new("m.gguf");
        // Everything stated, output.weight present: nothing assumed.
        let c = ModelConfig::from_gguf(p, &gguf_meta("qwen3"), true).unwrap();
        assert_eq!(
            (c.architecture, c.head_dim, c.n_kv_heads, c.tie_word_embeddings),
            (Architecture::Qwen3, 32, 2, false)
        );
        assert!(c.assumed.is_empty(), "{:?}", c.assumed);

        // Silent file: head_dim from hidden/heads, kv heads = heads, defaults, tied lm_head.
        let mut m = gguf_meta("qwen2");
        (m.key_length, m.head_count_kv, m.rope_freq_base, m.layer_norm_rms_epsilon) = (None, None, None, None);
        let c = ModelConfig::from_gguf(p, &m, false).unwrap();
        assert_eq!(
            (c.head_dim, c.n_kv_heads, c.rope_theta, c.tie_word_embeddings, c.qkv_bias),
            (16, 4, 10_000.0, true, true)
        );
        for k in [
            "qwen2.attention.key_length",
            "qwen2.attention.head_count_kv",
            "qwen2.rope.freq_base",
            "qwen2.attention.layer_norm_rms_epsilon",
            "tie_word_embeddings",
        ] {
            assert!(c.assumed.contains_key(k), "{k} not in {:?}", c.assumed);
        }
        assert!(c.assumed["qwen2.attention.key_length"].starts_with("16 ("), "{:?}", c.assumed);

        // qwen3moe: renormalised top-k and every layer sparse, both recorded.
        let mut m = gguf_meta("qwen3moe");
        (m.expert_count, m.expert_used_count, m.expert_feed_forward_length, m.feed_forward_length) =
            (Some(4), Some(2), Some(8), None);
        let c = ModelConfig::from_gguf(p, &m, true).unwrap();
        let moe = c.moe.as_ref().unwrap();
        assert!(moe.norm_topk_prob && (0..2).all(|i| c.is_sparse_layer(i)));
        for k in
            ["qwen3moe.expert_weights_norm", "decoder_sparse_step", "mlp_only_layers", "qwen3moe.feed_forward_length"]
        {
            assert!(c.assumed.contains_key(k), "{k} not in {:?}", c.assumed);
        }
        m.expert_weights_norm = Some(false);
        assert!(!ModelConfig::from_gguf(p, &m, true).unwrap().moe.unwrap().norm_topk_prob);

        // Errors name the file and the key.
        m.expert_used_count = None;
        let e = ModelConfig::from_gguf(p, &m, true).unwrap_err().to_string();
        assert!(e.contains("m.gguf") && e.contains("expert_used_count"), "{e}");
        let e = ModelConfig::from_gguf(p, &gguf_meta("llama"), true).unwrap_err().to_string();
        assert!(e.contains("m.gguf") && e.contains("llama"), "{e}");
        let mut m = gguf_meta("qwen3");
        m.feed_forward_length = None;
        let e = ModelConfig::from_gguf(p, &m, true).unwrap_err().to_string();
        assert!(e.contains("feed_forward_length"), "{e}");
    }
}
