//! The Qwen architectures: weights by role, loaded from any [`WeightSource`], and the
//! forward pass as numbered steps.
//!
//! Loading asks for each tensor by its *role* (query projection of layer 3, router of
//! layer 5, ...); a per-format [`NameTable`] turns the role into the file's own name (HF
//! `model.layers.3.self_attn.q_proj.weight`, GGUF `blk.3.attn_q.weight`). Which roles a
//! layer has is decided by the config alone — a dense layer loads a SwiGLU MLP, a sparse
//! one a router and experts — so a missing tensor is an error that names the tensor, the
//! file, the architecture and what kind of layer wanted it. Shapes are checked once here.
//!
//! Field names follow the HF checkpoint's tensor names. Matrices ([`Matrix`]) keep the type
//! the file stores (GGUF blocks stay memory-mapped); vectors (norms, biases) are f32.

use crate::protocol::CapturePoint;

use super::EngineError;
use super::captures::{CapturePlan, CaptureSink};
use super::config::{Architecture, ModelConfig};
use super::ggml;
use super::kernels::{self, AttnShape};
use super::kv_cache::KvCache;
use super::matrix::{self, Matrix, QuantDot};
use super::weights::{WeightError, WeightSource};

/// What a tensor is for, independent of how a file format names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    TokenEmbd,
    OutputNorm,
    Output,
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOut,
    AttnQBias,
    AttnKBias,
    AttnVBias,
    AttnOutBias,
    AttnQNorm,
    AttnKNorm,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
    /// MoE router, `[E, H]`.
    FfnRouter,
    /// Expert gate projections, `[E, I, H]`.
    FfnGateExps,
    /// Expert up projections, `[E, I, H]`.
    FfnUpExps,
    /// Expert down projections, `[E, H, I]`.
    FfnDownExps,
}

/// How a file format names each role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameTable {
    /// HF transformers checkpoints (safetensors): one tensor per expert.
    Hf,
    /// llama.cpp GGUF (names from gguf-py `constants.py`): experts stacked `[E, out, in]`.
    Gguf,
}

impl NameTable {
    /// The table for a [`WeightSource::format`].
    pub fn for_format(format: &str) -> Option<NameTable> {
        match format {
            "safetensors" => Some(NameTable::Hf),
            "gguf" => Some(NameTable::Gguf),
            _ => None,
        }
    }

    /// The tensor name of `role` in layer `layer` (ignored by the global roles). For HF
    /// expert roles this is the name of expert 0; see [`NameTable::expert`].
    pub fn name(self, role: Role, layer: usize) -> String {
        match self {
            NameTable::Hf => hf_name(role, layer, 0),
            NameTable::Gguf => gguf_name(role, layer),
        }
    }

    /// Whether the experts of a layer are one stacked tensor (`[E, out, in]`).
    pub fn stacks_experts(self) -> bool {
        matches!(self, NameTable::Gguf)
    }

    /// The name of expert `e`'s tensor for an expert role (formats that store experts
    /// one by one).
    pub fn expert(self, role: Role, layer: usize, e: usize) -> String {
        match self {
            NameTable::Hf => hf_name(role, layer, e),
            NameTable::Gguf => gguf_name(role, layer),
        }
    }
}

fn hf_name(role: Role, i: usize, e: usize) -> String {
    let l = format!("model.layers.{i}");
    match role {
        Role::TokenEmbd => "model.embed_tokens.weight".into(),
        Role::OutputNorm => "model.norm.weight".into(),
        Role::Output => "lm_head.weight".into(),
        Role::AttnNorm => format!("{l}.input_layernorm.weight"),
        Role::AttnQ => format!("{l}.self_attn.q_proj.weight"),
        Role::AttnK => format!("{l}.self_attn.k_proj.weight"),
        Role::AttnV => format!("{l}.self_attn.v_proj.weight"),
        Role::AttnOut => format!("{l}.self_attn.o_proj.weight"),
        Role::AttnQBias => format!("{l}.self_attn.q_proj.bias"),
        Role::AttnKBias => format!("{l}.self_attn.k_proj.bias"),
        Role::AttnVBias => format!("{l}.self_attn.v_proj.bias"),
        Role::AttnOutBias => format!("{l}.self_attn.o_proj.bias"),
        Role::AttnQNorm => format!("{l}.self_attn.q_norm.weight"),
        Role::AttnKNorm => format!("{l}.self_attn.k_norm.weight"),
        Role::FfnNorm => format!("{l}.post_attention_layernorm.weight"),
        Role::FfnGate => format!("{l}.mlp.gate_proj.weight"),
        Role::FfnUp => format!("{l}.mlp.up_proj.weight"),
        Role::FfnDown => format!("{l}.mlp.down_proj.weight"),
        Role::FfnRouter => format!("{l}.mlp.gate.weight"),
        Role::FfnGateExps => format!("{l}.mlp.experts.{e}.gate_proj.weight"),
        Role::FfnUpExps => format!("{l}.mlp.experts.{e}.up_proj.weight"),
        Role::FfnDownExps => format!("{l}.mlp.experts.{e}.down_proj.weight"),
    }
}

fn gguf_name(role: Role, i: usize) -> String {
    let b = format!("blk.{i}");
    match role {
        Role::TokenEmbd => "token_embd.weight".into(),
        Role::OutputNorm => "output_norm.weight".into(),
        Role::Output => "output.weight".into(),
        Role::AttnNorm => format!("{b}.attn_norm.weight"),
        Role::AttnQ => format!("{b}.attn_q.weight"),
        Role::AttnK => format!("{b}.attn_k.weight"),
        Role::AttnV => format!("{b}.attn_v.weight"),
        Role::AttnOut => format!("{b}.attn_output.weight"),
        Role::AttnQBias => format!("{b}.attn_q.bias"),
        Role::AttnKBias => format!("{b}.attn_k.bias"),
        Role::AttnVBias => format!("{b}.attn_v.bias"),
        Role::AttnOutBias => format!("{b}.attn_output.bias"),
        Role::AttnQNorm => format!("{b}.attn_q_norm.weight"),
        Role::AttnKNorm => format!("{b}.attn_k_norm.weight"),
        Role::FfnNorm => format!("{b}.ffn_norm.weight"),
        Role::FfnGate => format!("{b}.ffn_gate.weight"),
        Role::FfnUp => format!("{b}.ffn_up.weight"),
        Role::FfnDown => format!("{b}.ffn_down.weight"),
        Role::FfnRouter => format!("{b}.ffn_gate_inp.weight"),
        Role::FfnGateExps => format!("{b}.ffn_gate_exps.weight"),
        Role::FfnUpExps => format!("{b}.ffn_up_exps.weight"),
        Role::FfnDownExps => format!("{b}.ffn_down_exps.weight"),
    }
}

/// A linear layer, `y = x Wᵀ (+ b)`.
pub struct Linear {
    /// `[out, in]`
    pub weight: Matrix,
    /// `[out]`
    pub bias: Option<Vec<f32>>,
    pub out_features: usize,
    pub in_features: usize,
}

impl Linear {
    /// `out = x Wᵀ + b`. `x`: `[t, in]`, `out`: `[t, out]`.
    fn forward(&self, out: &mut [f32], x: &[f32], t: usize, qd: QuantDot) {
        matrix::matmul(out, x, self.weight.view(), t, qd);
        if let Some(b) = &self.bias {
            kernels::add_bias(out, b);
        }
    }
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// `[head_dim]` (Qwen3)
    pub q_norm: Option<Vec<f32>>,
    /// `[head_dim]` (Qwen3)
    pub k_norm: Option<Vec<f32>>,
}

/// The dense SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// A sparse MoE block: router, softmax, top-k, (renormalise), weighted sum of SwiGLU experts.
pub struct SparseMoe {
    /// Router, `[E, H]` (HF `mlp.gate`).
    pub gate: Linear,
    /// `[E * I, H]` (expert `e`: rows `e * I..(e + 1) * I`)
    pub experts_gate_proj: Matrix,
    /// `[E * I, H]`
    pub experts_up_proj: Matrix,
    /// `[E * H, I]`
    pub experts_down_proj: Matrix,
    pub n_experts: usize,
    pub top_k: usize,
    pub intermediate_size: usize,
    pub norm_topk_prob: bool,
}

pub enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

pub struct DecoderLayer {
    /// `[H]`
    pub input_layernorm: Vec<f32>,
    pub self_attn: Attention,
    /// `[H]`
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: FeedForward,
}

/// A loaded model: configuration and weights by role.
pub struct Model {
    pub config: ModelConfig,
    /// `[V, H]`
    pub embed_tokens: Matrix,
    pub layers: Vec<DecoderLayer>,
    /// `[H]`
    pub norm: Vec<f32>,
    /// `[V, H]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Matrix>,
    /// How matmuls with quantized weights compute (default: as llama.cpp's CPU backend).
    pub quant_dot: QuantDot,
    /// llama.cpp's CPU numerics, to the bit (with [`QuantDot::Ggml`] on quantized weights):
    /// ggml's RMSNorm, RoPE (its angles and GCC's contraction of the rotation), SwiGLU and
    /// softmax (`ggml_v_expf` lanes, libm tails), K and V rounded to f16 as its cache stores
    /// them, attention over llama.cpp's `n_kv` cells with its f16 dot kernels, the MoE router
    /// and expert sums in ggml's order ([`super::ggml`]). `tests/ggml_numerics.rs` holds
    /// every capture to llama.cpp's tensor. Off: everything in f32, as HF FP32.
    pub llamacpp_numerics: bool,
    /// `[head_dim / 2]`
    inv_freq: Vec<f32>,
    /// RoPE θ (ggml's `freq_base`), for [`Model::llamacpp_numerics`].
    rope_base: f32,
    /// Tensors in the file that no role asked for (reported, not fatal).
    pub unused_tensors: Vec<String>,
    /// The bug injected for the mutation tests ([`super::mutation`]).
    #[cfg(feature = "mutation-testing")]
    pub mutation: Option<super::mutation::Mutation>,
}

/// Reads tensors by role with their expected shapes; every error names the tensor, the
/// file, the architecture and the layer kind that wanted it.
struct Loader<'a> {
    w: &'a dyn WeightSource,
    names: NameTable,
    arch: Architecture,
    used: std::collections::BTreeSet<String>,
}

impl Loader<'_> {
    fn by_name(&mut self, name: String, shape: &[usize], what: &str) -> Result<Vec<f32>, WeightError> {
        let path = self.w.path();
        let got = self.w.shape(&name).ok_or_else(|| WeightError::MissingTensor {
            path: path.clone(),
            tensor: name.clone(),
            architecture: format!("{}, {what}", self.arch),
        })?;
        if got != shape {
            return Err(WeightError::Shape { path, tensor: name, got, expected: shape.to_vec() });
        }
        let data = self.w.load_f32(&name)?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(WeightError::Shape { path, tensor: name, got: vec![data.len()], expected: shape.to_vec() });
        }
        self.used.insert(name);
        Ok(data)
    }

    fn tensor(&mut self, role: Role, layer: usize, shape: &[usize], what: &str) -> Result<Vec<f32>, WeightError> {
        let name = self.names.name(role, layer);
        self.by_name(name, shape, what)
    }

    /// A matrix `[rows, cols]` in its stored type; `shape` is the file's shape (`[rows, cols]`,
    /// or `[E, out, in]` for stacked experts, read as `[E * out, in]`).
    fn matrix(&mut self, role: Role, layer: usize, shape: &[usize], what: &str) -> Result<Matrix, WeightError> {
        let name = self.names.name(role, layer);
        self.check_shape(&name, shape, what)?;
        let cols = shape.last().copied().unwrap_or(0);
        let rows = shape.iter().product::<usize>() / cols.max(1);
        let m = self.w.load_matrix(&name, rows, cols)?;
        self.used.insert(name);
        Ok(m)
    }

    fn check_shape(&self, name: &str, shape: &[usize], what: &str) -> Result<(), WeightError> {
        let path = self.w.path();
        let got = self.w.shape(name).ok_or_else(|| WeightError::MissingTensor {
            path: path.clone(),
            tensor: name.to_string(),
            architecture: format!("{}, {what}", self.arch),
        })?;
        if got != shape {
            return Err(WeightError::Shape { path, tensor: name.to_string(), got, expected: shape.to_vec() });
        }
        Ok(())
    }

    fn linear(
        &mut self,
        role: Role,
        bias: Option<Role>,
        layer: usize,
        out: usize,
        inp: usize,
        what: &str,
    ) -> Result<Linear, WeightError> {
        let weight = self.matrix(role, layer, &[out, inp], what)?;
        let bias = match bias {
            Some(b) => Some(self.tensor(b, layer, &[out], what)?),
            None => None,
        };
        Ok(Linear { weight, bias, out_features: out, in_features: inp })
    }

    /// Experts of one layer as `[E, out, inp]`, stacked in the file or gathered one by one.
    fn experts(
        &mut self,
        role: Role,
        layer: usize,
        e: usize,
        out: usize,
        inp: usize,
        what: &str,
    ) -> Result<Matrix, WeightError> {
        if self.names.stacks_experts() {
            return self.matrix(role, layer, &[e, out, inp], what);
        }
        let mut all = Vec::with_capacity(e * out * inp);
        for x in 0..e {
            let name = self.names.expert(role, layer, x);
            all.extend(self.by_name(name, &[out, inp], what)?);
        }
        Ok(Matrix::f32(all, e * out, inp))
    }
}

impl Model {
    /// Loads every tensor the config calls for from `w`, checking each shape.
    pub fn load(config: ModelConfig, w: &dyn WeightSource) -> Result<Model, EngineError> {
        let names = NameTable::for_format(w.format())
            .ok_or_else(|| EngineError::UnsupportedFormat { path: w.path(), format: w.format().to_string() })?;
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let mut ld = Loader { w, names, arch: c.architecture, used: Default::default() };

        let embed_tokens = ld.matrix(Role::TokenEmbd, 0, &[v, h], "token embedding")?;
        let norm = ld.tensor(Role::OutputNorm, 0, &[h], "final norm")?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(ld.matrix(Role::Output, 0, &[v, h], "lm_head (tie_word_embeddings is false)")?)
        };

        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let what = format!("layer {i} attention");
            let bias = |r: Role| c.qkv_bias.then_some(r);
            let self_attn = Attention {
                q_proj: ld.linear(Role::AttnQ, bias(Role::AttnQBias), i, c.q_dim(), h, &what)?,
                k_proj: ld.linear(Role::AttnK, bias(Role::AttnKBias), i, c.kv_dim(), h, &what)?,
                v_proj: ld.linear(Role::AttnV, bias(Role::AttnVBias), i, c.kv_dim(), h, &what)?,
                o_proj: ld.linear(Role::AttnOut, c.o_bias.then_some(Role::AttnOutBias), i, h, c.q_dim(), &what)?,
                q_norm: match c.architecture.has_qk_norm() {
                    true => Some(ld.tensor(Role::AttnQNorm, i, &[c.head_dim], &what)?),
                    false => None,
                },
                k_norm: match c.architecture.has_qk_norm() {
                    true => Some(ld.tensor(Role::AttnKNorm, i, &[c.head_dim], &what)?),
                    false => None,
                },
            };
            let input_layernorm = ld.tensor(Role::AttnNorm, i, &[h], &what)?;
            let post_attention_layernorm = ld.tensor(Role::FfnNorm, i, &[h], &format!("layer {i} feed-forward"))?;
            let mlp = match (&c.moe, c.is_sparse_layer(i)) {
                (Some(m), true) => {
                    let what = format!("layer {i} is a sparse MoE layer");
                    let (e, im) = (m.n_experts, m.expert_intermediate_size);
                    FeedForward::Sparse(SparseMoe {
                        gate: ld.linear(Role::FfnRouter, None, i, e, h, &what)?,
                        experts_gate_proj: ld.experts(Role::FfnGateExps, i, e, im, h, &what)?,
                        experts_up_proj: ld.experts(Role::FfnUpExps, i, e, im, h, &what)?,
                        experts_down_proj: ld.experts(Role::FfnDownExps, i, e, h, im, &what)?,
                        n_experts: e,
                        top_k: m.n_experts_per_tok,
                        intermediate_size: im,
                        norm_topk_prob: m.norm_topk_prob,
                    })
                }
                _ => {
                    let what = match &c.moe {
                        Some(_) => format!("layer {i} is a dense layer (mlp_only_layers / decoder_sparse_step)"),
                        None => format!("layer {i} MLP"),
                    };
                    let im = c.intermediate_size;
                    FeedForward::Dense(Mlp {
                        gate_proj: ld.linear(Role::FfnGate, None, i, im, h, &what)?,
                        up_proj: ld.linear(Role::FfnUp, None, i, im, h, &what)?,
                        down_proj: ld.linear(Role::FfnDown, None, i, h, im, &what)?,
                    })
                }
            };
            layers.push(DecoderLayer { input_layernorm, self_attn, post_attention_layernorm, mlp });
        }
        let unused_tensors: Vec<String> = w.names().into_iter().filter(|n| !ld.used.contains(n)).collect();
        if !unused_tensors.is_empty() {
            tracing::warn!(count = unused_tensors.len(), first = %unused_tensors[0], "tensors in the checkpoint that the model does not use");
        }
        #[cfg(feature = "mutation-testing")]
        let m = super::mutation::Mutation::from_env()?;
        #[cfg(not(feature = "mutation-testing"))]
        let theta = c.rope_theta;
        #[cfg(feature = "mutation-testing")]
        let theta = super::mutation::rope_theta(m, c.rope_theta);
        let inv_freq = kernels::rope_inv_freq(c.head_dim, theta);
        #[cfg_attr(not(feature = "mutation-testing"), expect(unused_mut, reason = "mutated under mutation-testing"))]
        let mut model = Model {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            quant_dot: QuantDot::default(),
            llamacpp_numerics: false,
            inv_freq,
            rope_base: theta as f32,
            unused_tensors,
            #[cfg(feature = "mutation-testing")]
            mutation: m,
        };
        #[cfg(feature = "mutation-testing")]
        {
            super::mutation::apply_at_load(m, &mut model)?;
            if let Some(m) = m {
                tracing::warn!(mutation = %m, "a mutation is injected into the engine (mutation tests only)");
            }
        }
        Ok(model)
    }

    /// `[head_dim / 2]` RoPE inverse frequencies (f32, as HF computes them).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `[V, H]` the lm_head's weight (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Whether any matrix is stored in a quantized ggml type (so [`Model::quant_dot`]
    /// matters).
    pub fn has_quantized_weights(&self) -> bool {
        let q = |m: &Matrix| m.is_quantized();
        let lin = |l: &Linear| q(&l.weight);
        q(&self.embed_tokens)
            || self.lm_head.as_ref().is_some_and(q)
            || self.layers.iter().any(|l| {
                let a = &l.self_attn;
                lin(&a.q_proj)
                    || lin(&a.k_proj)
                    || lin(&a.v_proj)
                    || lin(&a.o_proj)
                    || match &l.mlp {
                        FeedForward::Dense(m) => lin(&m.gate_proj) || lin(&m.up_proj) || lin(&m.down_proj),
                        FeedForward::Sparse(m) => {
                            lin(&m.gate) || q(&m.experts_gate_proj) || q(&m.experts_up_proj) || q(&m.experts_down_proj)
                        }
                    }
            })
    }

    /// RMSNorm with the weight, HF's or (with [`Model::llamacpp_numerics`]) ggml's arithmetic.
    fn rmsnorm(&self, out: &mut [f32], x: &[f32], w: &[f32]) {
        if self.llamacpp_numerics {
            ggml::rmsnorm(out, x, w, self.config.rms_norm_eps as f32);
        } else {
            kernels::rmsnorm(out, x, w, self.config.rms_norm_eps);
        }
    }

    /// Runs `tokens` at positions `cache.len()..` through the model, appends their keys
    /// and values to `cache`, records the captures `io.plan` asks for at rows
    /// `io.capture_rows`, and writes the logits of rows `io.logit_rows` to `io.logits`
    /// (`[logit_rows.len(), V]`). Row lists are indices into `tokens`, ascending.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        io: &mut ForwardIo<'_>,
        s: &mut Scratch,
    ) -> Result<(), EngineError> {
        let c = &self.config;
        let (t, h, hd) = (tokens.len(), c.hidden_size, c.head_dim);
        let pos0 = cache.len();
        cache.reserve(t)?;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(EngineError::TokenOutOfVocab { id, vocab: c.vocab_size });
        }
        s.resize(c, t);

        // 1. Token embedding. x: [t, H]
        for (xr, &id) in s.x.chunks_mut(h).zip(tokens) {
            self.embed_tokens.row_f32(id as usize, xr); // dequantized, as ggml's get_rows
        }
        io.capture(CapturePoint::Embed, 0, &s.x, h);

        // RoPE cos/sin of this call's positions. [t, head_dim / 2] each
        let half = hd / 2;
        for ti in 0..t {
            let (cs, sn) = (&mut s.cos[ti * half..(ti + 1) * half], &mut s.sin[ti * half..(ti + 1) * half]);
            if self.llamacpp_numerics {
                kernels::rope_cos_sin_ggml(pos0 + ti, self.rope_base, cs, sn);
            } else {
                kernels::rope_cos_sin(pos0 + ti, &self.inv_freq, cs, sn);
            }
        }

        for (li, layer) in self.layers.iter().enumerate() {
            let a = &layer.self_attn;
            // 2. Input RMSNorm. hn: [t, H]
            self.rmsnorm(&mut s.hn, &s.x, &layer.input_layernorm);
            io.capture(CapturePoint::AttnNorm, li, &s.hn, h);

            // 3. q, k, v projections (+ bias on qwen2). q: [t, n_heads * hd], k, v: [t, n_kv * hd]
            let qd = self.quant_dot;
            a.q_proj.forward(&mut s.q, &s.hn, t, qd);
            a.k_proj.forward(&mut s.k, &s.hn, t, qd);
            a.v_proj.forward(&mut s.v, &s.hn, t, qd);

            // 4. Per-head RMSNorm of q and k (qwen3), then RoPE on both.
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                if self.llamacpp_numerics {
                    ggml::rmsnorm_in_place(&mut s.q, qn, c.rms_norm_eps as f32);
                    ggml::rmsnorm_in_place(&mut s.k, kn, c.rms_norm_eps as f32);
                } else {
                    kernels::rmsnorm_heads_in_place(&mut s.q, qn, c.rms_norm_eps);
                    kernels::rmsnorm_heads_in_place(&mut s.k, kn, c.rms_norm_eps);
                }
            }
            let rope = if self.llamacpp_numerics { ggml::rope_in_place } else { kernels::rope_in_place };
            for ti in 0..t {
                let (cs, sn) = (&s.cos[ti * half..(ti + 1) * half], &s.sin[ti * half..(ti + 1) * half]);
                rope(&mut s.q[ti * c.q_dim()..(ti + 1) * c.q_dim()], cs, sn);
                rope(&mut s.k[ti * c.kv_dim()..(ti + 1) * c.kv_dim()], cs, sn);
            }
            #[cfg(feature = "mutation-testing")]
            super::mutation::after_rope(self.mutation, &mut s.q, c.q_dim(), &self.inv_freq);

            if self.llamacpp_numerics {
                // the cache holds f16 (SET_ROWS rounds to nearest even); ggml converts Q to
                // f16 inside the product with K
                for buf in [&mut s.k, &mut s.v] {
                    kernels::round_to_f16(buf);
                }
            }

            // 5. Append k, v to the cache; causal GQA attention over positions 0..pos0 + t.
            let (kc, vc) = cache.layer_mut(li);
            let kv = c.kv_dim();
            #[cfg(not(feature = "mutation-testing"))]
            let w0 = pos0;
            #[cfg(feature = "mutation-testing")]
            let w0 = super::mutation::kv_write_start(self.mutation, pos0);
            kc[w0 * kv..(w0 + t) * kv].copy_from_slice(&s.k);
            vc[w0 * kv..(w0 + t) * kv].copy_from_slice(&s.v);
            let shape = AttnShape {
                t,
                pos0,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                f16_probs: self.llamacpp_numerics,
            };
            let (keys, values) = (&kc[..(pos0 + t) * kv], &vc[..(pos0 + t) * kv]);
            if self.llamacpp_numerics {
                let to16 = |x: &[f32]| x.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>();
                let g = ggml::AttnShape { t, pos0, n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: hd };
                ggml::attention(&mut s.attn, &s.q, &to16(keys), &to16(values), g);
            } else {
                #[cfg(not(feature = "mutation-testing"))]
                kernels::attention(&mut s.attn, &s.q, keys, values, shape);
                #[cfg(feature = "mutation-testing")]
                super::mutation::attention(self.mutation, &mut s.attn, &s.q, keys, values, shape);
            }

            // 6. Output projection, then the residual add. o: [t, H]
            a.o_proj.forward(&mut s.o, &s.attn, t, qd);
            io.capture(CapturePoint::AttnOut, li, &s.o, h);
            kernels::add_in_place(&mut s.x, &s.o);

            // 7. Post-attention RMSNorm.
            self.rmsnorm(&mut s.hn, &s.x, &layer.post_attention_layernorm);
            io.capture(CapturePoint::FfnNorm, li, &s.hn, h);

            // 8. Feed-forward: dense SwiGLU or routed experts. o: [t, H]
            match &layer.mlp {
                FeedForward::Dense(m) => dense_mlp(m, t, s, qd, self.llamacpp_numerics),
                FeedForward::Sparse(m) => sparse_moe(m, li, t, s, io, qd, self.llamacpp_numerics),
            }
            io.capture(CapturePoint::FfnOut, li, &s.o, h);

            // 9. Residual add.
            kernels::add_in_place(&mut s.x, &s.o);
            #[cfg(feature = "mutation-testing")]
            super::mutation::after_layer(self.mutation, li, &mut s.x);
            io.capture(CapturePoint::LayerOut, li, &s.x, h);
        }
        cache.advance(t)?;

        // 10. Final RMSNorm of the rows that need it (logits or the capture).
        let rows =
            merged_rows(io.logit_rows, if io.plan.wants(CapturePoint::FinalNorm, 0) { io.capture_rows } else { &[] });
        let mut fin = vec![0.0f32; rows.len() * h]; // [rows, H]
        for (fr, &r) in fin.chunks_mut(h).zip(&rows) {
            self.rmsnorm(fr, &s.x[r * h..(r + 1) * h], &self.norm);
        }
        if io.plan.wants(CapturePoint::FinalNorm, 0) {
            let sel: Vec<usize> = io.capture_rows.iter().map(|r| rows.binary_search(r).unwrap_or(0)).collect();
            io.sink.push_f32(CapturePoint::FinalNorm, 0, &fin, h, &sel);
        }

        // 11. Logits of the requested rows. [logit_rows, V]
        let sel: Vec<f32> = io
            .logit_rows
            .iter()
            .flat_map(|r| {
                let i = rows.binary_search(r).unwrap_or(0);
                fin[i * h..(i + 1) * h].iter().copied()
            })
            .collect();
        io.logits.resize(io.logit_rows.len() * c.vocab_size, 0.0);
        matrix::matmul(io.logits, &sel, self.lm_head_weight().view(), io.logit_rows.len(), self.quant_dot);
        Ok(())
    }
}

/// `gate = silu(gate) · up`, as HF computes it or (`ggml_numerics`) as ggml does.
fn swiglu(gate: &mut [f32], up: &[f32], width: usize, ggml_numerics: bool) {
    if ggml_numerics {
        // one GLU row at a time: ggml's 16 lanes start at each row
        let x = gate.to_vec();
        for ((y, xr), ur) in gate.chunks_mut(width).zip(x.chunks(width)).zip(up.chunks(width)) {
            ggml::swiglu(y, xr, ur);
        }
    } else {
        kernels::swiglu_in_place(gate, up);
    }
}

/// The union of two ascending row lists, ascending.
fn merged_rows(a: &[usize], b: &[usize]) -> Vec<usize> {
    let mut r: Vec<usize> = a.iter().chain(b).copied().collect();
    r.sort_unstable();
    r.dedup();
    r
}

/// `o = down(silu(gate(hn)) * up(hn))`.
fn dense_mlp(m: &Mlp, t: usize, s: &mut Scratch, qd: QuantDot, ggml_numerics: bool) {
    let im = m.gate_proj.out_features;
    let (g, u) = (&mut s.g[..t * im], &mut s.u[..t * im]);
    m.gate_proj.forward(g, &s.hn, t, qd);
    m.up_proj.forward(u, &s.hn, t, qd);
    swiglu(g, u, im, ggml_numerics);
    m.down_proj.forward(&mut s.o, g, t, qd);
}

/// Router logits, softmax (f32), top-k (ties: lower expert first), optional
/// renormalisation, then for each expert in index order the SwiGLU of the rows routed to
/// it, scaled by their routing weight and added to `o` (HF's order of accumulation).
fn sparse_moe(
    m: &SparseMoe,
    layer: usize,
    t: usize,
    s: &mut Scratch,
    io: &mut ForwardIo<'_>,
    qd: QuantDot,
    ggml_numerics: bool,
) {
    let (e, k, im) = (m.n_experts, m.top_k, m.intermediate_size);
    let h = m.gate.in_features;

    // Router logits. [t, E]
    let router = &mut s.router[..t * e];
    m.gate.forward(router, &s.hn, t, qd);
    io.capture(CapturePoint::MoeRouter, layer, router, e);

    // Softmax, top-k, renormalise. chosen: [t, k] (expert, weight)
    let mut ids = vec![0i32; t * k]; // [t, k]
    let mut routes: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e]; // per expert: (row, weight)
    let mut probs = vec![0.0f32; e];
    for ti in 0..t {
        let row = &router[ti * e..(ti + 1) * e];
        if ggml_numerics {
            ggml::softmax_row(&mut probs, row, 1.0, e);
        } else {
            probs.copy_from_slice(row);
            kernels::softmax_in_place(&mut probs);
        }
        let mut top = kernels::top_k(&probs, k);
        if m.norm_topk_prob {
            let sum = if ggml_numerics {
                // SUM_ROWS (f64), CLAMP to at least 2^-14, DIV
                (top.iter().map(|p| p.1 as f64).sum::<f64>() as f32).max(6.103_515_6e-5)
            } else {
                top.iter().map(|p| p.1).sum()
            };
            for p in &mut top {
                p.1 /= sum;
            }
        }
        for (j, &(x, wgt)) in top.iter().enumerate() {
            ids[ti * k + j] = x as i32;
            routes[x].push((ti * k + j, wgt));
        }
    }
    if io.plan.wants(CapturePoint::MoeTopkIds, layer) && !io.capture_rows.is_empty() {
        io.sink.push_i32(CapturePoint::MoeTopkIds, layer, &ids, k, io.capture_rows);
    }

    // Experts in index order, each over the rows routed to it. ggml adds the weighted
    // outputs of a row's picks in pick order (`ADD` of the top-k views), HF in expert order.
    s.o.fill(0.0);
    let mut picks = if ggml_numerics { vec![0.0f32; t * k * h] } else { Vec::new() }; // [t, k, H]
    for (x, rows) in routes.iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let n = rows.len();
        let xin = &mut s.moe_in[..n * h]; // [n, H]
        for (dst, &(rk, _)) in xin.chunks_mut(h).zip(rows) {
            let r = rk / k;
            dst.copy_from_slice(&s.hn[r * h..(r + 1) * h]);
        }
        let (g, u) = (&mut s.g[..n * im], &mut s.u[..n * im]); // [n, I]
        matrix::matmul_expert(g, xin, m.experts_gate_proj.rows_view(x * im..(x + 1) * im), n, qd);
        matrix::matmul_expert(u, xin, m.experts_up_proj.rows_view(x * im..(x + 1) * im), n, qd);
        swiglu(g, u, im, ggml_numerics);
        let d = &mut s.moe_out[..n * h]; // [n, H]
        matrix::matmul_expert(d, g, m.experts_down_proj.rows_view(x * h..(x + 1) * h), n, qd);
        for (dr, &(rk, wgt)) in d.chunks(h).zip(rows) {
            if ggml_numerics {
                for (pv, &dv) in picks[rk * h..(rk + 1) * h].iter_mut().zip(dr) {
                    *pv = dv * wgt;
                }
            } else {
                let r = rk / k;
                for (ov, &dv) in s.o[r * h..(r + 1) * h].iter_mut().zip(dr) {
                    *ov += dv * wgt;
                }
            }
        }
    }
    if ggml_numerics {
        for (o, p) in s.o[..t * h].chunks_mut(h).zip(picks.chunks(k * h)) {
            o.copy_from_slice(&p[..h]);
            for pick in p.chunks(h).skip(1) {
                for (ov, &pv) in o.iter_mut().zip(pick) {
                    *ov += pv;
                }
            }
        }
    }
}

/// What one forward call records and returns besides the KV cache.
pub struct ForwardIo<'a> {
    pub plan: &'a CapturePlan,
    /// Rows of this call whose activations are captured, ascending.
    pub capture_rows: &'a [usize],
    pub sink: &'a mut CaptureSink,
    /// Rows of this call whose logits are computed, ascending.
    pub logit_rows: &'a [usize],
    /// `[logit_rows.len(), V]`, resized by the call.
    pub logits: &'a mut Vec<f32>,
}

impl ForwardIo<'_> {
    #[inline]
    fn capture(&mut self, point: CapturePoint, layer: usize, buf: &[f32], width: usize) {
        if self.plan.wants(point, layer) && !self.capture_rows.is_empty() {
            self.sink.push_f32(point, layer, buf, width, self.capture_rows);
        }
    }
}

/// Activation buffers reused across forward calls (resized, never shrunk, so a decode loop
/// allocates nothing after its first step).
#[derive(Default)]
pub struct Scratch {
    /// `[t, H]` residual stream
    x: Vec<f32>,
    /// `[t, H]` normed input of attention / MLP
    hn: Vec<f32>,
    /// `[t, n_heads * hd]`
    q: Vec<f32>,
    /// `[t, n_kv * hd]`
    k: Vec<f32>,
    /// `[t, n_kv * hd]`
    v: Vec<f32>,
    /// `[t, n_heads * hd]`
    attn: Vec<f32>,
    /// `[t, H]` attention or MLP output
    o: Vec<f32>,
    /// `[t, max(I, I_expert)]`
    g: Vec<f32>,
    /// `[t, max(I, I_expert)]`
    u: Vec<f32>,
    /// `[t, E]`
    router: Vec<f32>,
    /// `[t, H]` rows gathered for one expert
    moe_in: Vec<f32>,
    /// `[t, H]` one expert's output rows
    moe_out: Vec<f32>,
    /// `[t, hd / 2]`
    cos: Vec<f32>,
    /// `[t, hd / 2]`
    sin: Vec<f32>,
}

impl Scratch {
    fn resize(&mut self, c: &ModelConfig, t: usize) {
        let h = c.hidden_size;
        let (ei, e) = c.moe.as_ref().map(|m| (m.expert_intermediate_size, m.n_experts)).unwrap_or((0, 0));
        let inner = c.intermediate_size.max(ei);
        for (buf, n) in [
            (&mut self.x, t * h),
            (&mut self.hn, t * h),
            (&mut self.q, t * c.q_dim()),
            (&mut self.k, t * c.kv_dim()),
            (&mut self.v, t * c.kv_dim()),
            (&mut self.attn, t * c.q_dim()),
            (&mut self.o, t * h),
            (&mut self.g, t * inner),
            (&mut self.u, t * inner),
            (&mut self.router, t * e),
            (&mut self.moe_in, t * h),
            (&mut self.moe_out, t * h),
            (&mut self.cos, t * c.head_dim / 2),
            (&mut self.sin, t * c.head_dim / 2),
        ] {
            buf.resize(n, 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::engine::config::MoeConfig;

    /// Tensors held in memory under a chosen format's names.
    struct MemWeights {
        format: &'static str,
        tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    }

    impl WeightSource for MemWeights {
        fn path(&self) -> PathBuf {
            PathBuf::from(format!("mem.{}", self.format))
        }
        fn format(&self) -> &'static str {
            self.format
        }
        fn shape(&self, name: &str) -> Option<Vec<usize>> {
            self.tensors.get(name).map(|t| t.0.clone())
        }
        fn storage_type(&self, name: &str) -> Option<String> {
            self.tensors.get(name).map(|_| "F32".into())
        }
        fn load_f32(&self, name: &str) -> Result<Vec<f32>, WeightError> {
            Ok(self.tensors[name].1.clone())
        }
        fn names(&self) -> Vec<String> {
            self.tensors.keys().cloned().collect()
        }
    }

    fn moe_config() -> ModelConfig {
        let moe = MoeConfig {
            n_experts: 4,
            n_experts_per_tok: 2,
            expert_intermediate_size: 8,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![0],
            norm_topk_prob: true,
        };
        ModelConfig::new(
            Path::new("mem"),
            Architecture::Qwen3Moe,
            50,
            16,
            24,
            2,
            4,
            2,
            Some(8),
            1e-6,
            1e6,
            false,
            Some(moe),
        )
        .unwrap()
    }

    /// The same random weights under HF names (experts one by one) and GGUF names
    /// (experts stacked `[E, out, in]`).
    fn both_layouts(c: &ModelConfig) -> (MemWeights, MemWeights) {
        let mut seed = 1u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
                })
                .collect()
        };
        let (mut hf, mut gg) = (BTreeMap::new(), BTreeMap::new());
        macro_rules! put {
            ($role:expr, $layer:expr, $shape:expr, $v:expr) => {{
                let (shape, v): (Vec<usize>, Vec<f32>) = ($shape, $v);
                hf.insert(NameTable::Hf.name($role, $layer), (shape.clone(), v.clone()));
                gg.insert(NameTable::Gguf.name($role, $layer), (shape, v));
            }};
        }
        let (h, v) = (c.hidden_size, c.vocab_size);
        put!(Role::TokenEmbd, 0, vec![v, h], rnd(v * h));
        put!(Role::Output, 0, vec![v, h], rnd(v * h));
        put!(Role::OutputNorm, 0, vec![h], rnd(h).iter().map(|x| 1.0 + x).collect());
        for i in 0..c.n_layers {
            put!(Role::AttnNorm, i, vec![h], rnd(h).iter().map(|x| 1.0 + x).collect());
            put!(Role::FfnNorm, i, vec![h], rnd(h).iter().map(|x| 1.0 + x).collect());
            put!(Role::AttnQ, i, vec![c.q_dim(), h], rnd(c.q_dim() * h));
            put!(Role::AttnK, i, vec![c.kv_dim(), h], rnd(c.kv_dim() * h));
            put!(Role::AttnV, i, vec![c.kv_dim(), h], rnd(c.kv_dim() * h));
            put!(Role::AttnOut, i, vec![h, c.q_dim()], rnd(c.q_dim() * h));
            put!(Role::AttnQNorm, i, vec![c.head_dim], rnd(c.head_dim).iter().map(|x| 1.0 + x).collect());
            put!(Role::AttnKNorm, i, vec![c.head_dim], rnd(c.head_dim).iter().map(|x| 1.0 + x).collect());
            if c.is_sparse_layer(i) {
                let m = c.moe.as_ref().unwrap();
                let (e, im) = (m.n_experts, m.expert_intermediate_size);
                put!(Role::FfnRouter, i, vec![e, h], rnd(e * h));
                for (role, out, inp) in
                    [(Role::FfnGateExps, im, h), (Role::FfnUpExps, im, h), (Role::FfnDownExps, h, im)]
                {
                    let all = rnd(e * out * inp);
                    gg.insert(NameTable::Gguf.name(role, i), (vec![e, out, inp], all.clone()));
                    for x in 0..e {
                        hf.insert(
                            NameTable::Hf.expert(role, i, x),
                            (vec![out, inp], all[x * out * inp..(x + 1) * out * inp].to_vec()),
                        );
                    }
                }
            } else {
                put!(Role::FfnGate, i, vec![c.intermediate_size, h], rnd(c.intermediate_size * h));
                put!(Role::FfnUp, i, vec![c.intermediate_size, h], rnd(c.intermediate_size * h));
                put!(Role::FfnDown, i, vec![h, c.intermediate_size], rnd(c.intermediate_size * h));
            }
        }
        (MemWeights { format: "safetensors", tensors: hf }, MemWeights { format: "gguf", tensors: gg })
    }

    fn logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
        let c = &model.config;
        let mut cache = KvCache::new(c.n_layers, tokens.len(), c.kv_dim());
        let mut sink = CaptureSink::new();
        let mut out = Vec::new();
        let rows: Vec<usize> = (0..tokens.len()).collect();
        let plan = CapturePlan::none();
        let mut io = ForwardIo { plan: &plan, capture_rows: &[], sink: &mut sink, logit_rows: &rows, logits: &mut out };
        model.forward(tokens, &mut cache, &mut io, &mut Scratch::default()).unwrap();
        out
    }

    #[test]
    fn gguf_names_follow_llama_cpp() {
        let g = NameTable::Gguf;
        assert_eq!(g.name(Role::TokenEmbd, 0), "token_embd.weight");
        assert_eq!(g.name(Role::AttnOut, 3), "blk.3.attn_output.weight");
        assert_eq!(g.name(Role::AttnQBias, 3), "blk.3.attn_q.bias");
        assert_eq!(g.name(Role::FfnRouter, 3), "blk.3.ffn_gate_inp.weight");
        assert_eq!(g.name(Role::FfnDownExps, 3), "blk.3.ffn_down_exps.weight");
        assert!(g.stacks_experts() && !NameTable::Hf.stacks_experts());
        assert_eq!(NameTable::Hf.expert(Role::FfnUpExps, 2, 5), "model.layers.2.mlp.experts.5.up_proj.weight");
    }

    #[test]
    fn stacked_and_per_expert_layouts_compute_the_same_bits() {
        let c = moe_config();
        let (hf, gg) = both_layouts(&c);
        let a = Model::load(c.clone(), &hf).unwrap();
        let b = Model::load(c, &gg).unwrap();
        assert!(a.unused_tensors.is_empty() && b.unused_tensors.is_empty());
        let tokens = [3, 1, 4, 1, 5, 9, 2, 6];
        let (la, lb) = (logits(&a, &tokens), logits(&b, &tokens));
        assert_eq!(la.len(), tokens.len() * 50);
        assert!(la.iter().all(|x| x.is_finite()));
        assert_eq!(la, lb);
    }

    #[test]
    fn a_missing_stacked_expert_tensor_is_named() {
        let c = moe_config();
        let (_, mut gg) = both_layouts(&c);
        gg.tensors.remove("blk.1.ffn_up_exps.weight");
        let e = Model::load(c, &gg).err().unwrap().to_string();
        assert!(e.contains("blk.1.ffn_up_exps.weight") && e.contains("mem.gguf") && e.contains("sparse MoE"), "{e}");
    }

    #[test]
    fn a_token_outside_the_vocabulary_is_an_error_not_a_panic() {
        let c = moe_config();
        let (hf, _) = both_layouts(&c);
        let m = Model::load(c, &hf).unwrap();
        let mut cache = KvCache::new(2, 2, m.config.kv_dim());
        let mut sink = CaptureSink::new();
        let mut out = Vec::new();
        let plan = CapturePlan::none();
        let mut io = ForwardIo { plan: &plan, capture_rows: &[], sink: &mut sink, logit_rows: &[0], logits: &mut out };
        let e = m.forward(&[50], &mut cache, &mut io, &mut Scratch::default()).unwrap_err().to_string();
        assert!(e.contains("token id 50") && e.contains("V = 50"), "{e}");
    }
}
