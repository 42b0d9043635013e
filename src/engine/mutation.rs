//! Fault injection for the mutation tests (`tests/mutations.rs`): one deliberate, realistic
//! engine bug at a time, so that the tests can prove the shipped contracts catch it and the
//! per-layer report names where it starts.
//!
//! Compiled only with the cargo feature `mutation-testing`; default builds carry neither this
//! module nor any of its hooks in [`super::model`]. The bug is chosen by the environment
//! variable [`ENV`] when a model is loaded (an unknown name is an error, never ignored), and a
//! dump made under a mutation says so in its manifest (`extra.mutation`).
//!
//! | name | the bug | what should see it first |
//! |---|---|---|
//! | `rope-theta` | RoPE θ = 10,000 instead of the config's (the classic fallback when a loader misses `rope_parameters.rope_theta`; 10⁶ when the config says 10,000) | `attn_out` of layer 0 |
//! | `query-position-off-by-one` | queries rotated one position ahead of their keys | `attn_out` of layer 0 |
//! | `no-qk-norm` | Qwen3's per-head q/k RMSNorm skipped | `attn_out` of layer 0 |
//! | `no-causal-mask` | every row attends to every key of its forward call | `attn_out` of layer 0 (prefill only) |
//! | `no-qkv-bias` | Qwen2's q/k/v biases dropped | `attn_out` of layer 0 |
//! | `flip-norm-topk-prob` | MoE top-k weights renormalised when the config says not to, and the reverse | `ffn_out` of the first sparse layer |
//! | `scale-layer-output:L[:F]` | layer L's output (the residual stream) multiplied by F (default 1.001) | `layer_out` of layer L |
//! | `kv-write-off-by-one` | a forward call starting past position 0 writes its keys and values one cache slot early | `attn_out` of layer 0 (incremental mode) |
//!
//! A uniform shift of *every* position is not on the list: RoPE scores depend only on the
//! distance between query and key, so such a shift changes nothing but rounding; the
//! off-by-one that matters moves queries against their keys.

use super::kernels::{self, AttnShape};
use super::model::{FeedForward, Model};

/// The environment variable naming the mutation to inject.
pub const ENV: &str = "PARITYBENCH_MUTATION";

/// The default factor of `scale-layer-output`.
pub const DEFAULT_SCALE: f32 = 1.001;

/// One injected bug.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mutation {
    RopeTheta,
    QueryPositionOffByOne,
    NoQkNorm,
    NoCausalMask,
    NoQkvBias,
    FlipNormTopkProb,
    ScaleLayerOutput { layer: usize, factor: f32 },
    KvWriteOffByOne,
}

#[derive(Debug, thiserror::Error)]
pub enum MutationError {
    #[error("{ENV}={value:?}: unknown mutation (known: {})", NAMES.join(", "))]
    Unknown { value: String },
    #[error("{ENV}={value:?}: {message}")]
    BadArgument { value: String, message: String },
    #[error("{ENV}={value:?}: layer {layer} does not exist (the model has {n_layers})")]
    NoSuchLayer { value: String, layer: usize, n_layers: usize },
}

/// Every mutation's name, as [`ENV`] spells it.
pub const NAMES: &[&str] = &[
    "rope-theta",
    "query-position-off-by-one",
    "no-qk-norm",
    "no-causal-mask",
    "no-qkv-bias",
    "flip-norm-topk-prob",
    "scale-layer-output:LAYER[:FACTOR]",
    "kv-write-off-by-one",
];

impl Mutation {
    /// Parses a name of [`NAMES`]; `scale-layer-output` takes `:LAYER` and an optional `:FACTOR`.
    pub fn parse(value: &str) -> Result<Mutation, MutationError> {
        let bad = |message: String| MutationError::BadArgument { value: value.to_string(), message };
        let mut parts = value.split(':');
        let name = parts.next().unwrap_or_default();
        let m = match name {
            "rope-theta" => Mutation::RopeTheta,
            "query-position-off-by-one" => Mutation::QueryPositionOffByOne,
            "no-qk-norm" => Mutation::NoQkNorm,
            "no-causal-mask" => Mutation::NoCausalMask,
            "no-qkv-bias" => Mutation::NoQkvBias,
            "flip-norm-topk-prob" => Mutation::FlipNormTopkProb,
            "kv-write-off-by-one" => Mutation::KvWriteOffByOne,
            "scale-layer-output" => {
                let layer = parts
                    .next()
                    .ok_or_else(|| bad("scale-layer-output needs a layer: scale-layer-output:LAYER[:FACTOR]".into()))?;
                let layer = layer.parse().map_err(|_| bad(format!("layer `{layer}` is not a number")))?;
                let factor = match parts.next() {
                    None => DEFAULT_SCALE,
                    Some(f) => f.parse().map_err(|_| bad(format!("factor `{f}` is not a number")))?,
                };
                Mutation::ScaleLayerOutput { layer, factor }
            }
            _ => return Err(MutationError::Unknown { value: value.to_string() }),
        };
        if parts.next().is_some() {
            return Err(bad("too many `:` arguments".into()));
        }
        Ok(m)
    }

    /// The mutation named by [`ENV`], if it is set and not empty.
    pub fn from_env() -> Result<Option<Mutation>, MutationError> {
        match std::env::var(ENV) {
            Ok(v) if !v.trim().is_empty() => Mutation::parse(v.trim()).map(Some),
            _ => Ok(None),
        }
    }
}

impl std::fmt::Display for Mutation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mutation::RopeTheta => f.write_str("rope-theta"),
            Mutation::QueryPositionOffByOne => f.write_str("query-position-off-by-one"),
            Mutation::NoQkNorm => f.write_str("no-qk-norm"),
            Mutation::NoCausalMask => f.write_str("no-causal-mask"),
            Mutation::NoQkvBias => f.write_str("no-qkv-bias"),
            Mutation::FlipNormTopkProb => f.write_str("flip-norm-topk-prob"),
            Mutation::ScaleLayerOutput { layer, factor } => write!(f, "scale-layer-output:{layer}:{factor}"),
            Mutation::KvWriteOffByOne => f.write_str("kv-write-off-by-one"),
        }
    }
}

/// The RoPE base the model is built with: the config's, or the wrong one under `rope-theta`.
pub fn rope_theta(m: Option<Mutation>, theta: f64) -> f64 {
    match m {
        Some(Mutation::RopeTheta) if theta == 10_000.0 => 1e6,
        Some(Mutation::RopeTheta) => 10_000.0,
        _ => theta,
    }
}

/// Weight-level mutations, applied once to a loaded model.
pub fn apply_at_load(m: Option<Mutation>, model: &mut Model) -> Result<(), MutationError> {
    let n_layers = model.layers.len();
    for layer in &mut model.layers {
        match m {
            Some(Mutation::NoQkNorm) => {
                layer.self_attn.q_norm = None;
                layer.self_attn.k_norm = None;
            }
            Some(Mutation::NoQkvBias) => {
                layer.self_attn.q_proj.bias = None;
                layer.self_attn.k_proj.bias = None;
                layer.self_attn.v_proj.bias = None;
            }
            Some(Mutation::FlipNormTopkProb) => {
                if let FeedForward::Sparse(moe) = &mut layer.mlp {
                    moe.norm_topk_prob = !moe.norm_topk_prob;
                }
            }
            _ => {}
        }
    }
    if let Some(Mutation::ScaleLayerOutput { layer, .. }) = m
        && layer >= n_layers
    {
        return Err(MutationError::NoSuchLayer {
            value: m.map(|m| m.to_string()).unwrap_or_default(),
            layer,
            n_layers,
        });
    }
    Ok(())
}

/// After RoPE: under `query-position-off-by-one`, rotates every query row by one more
/// position (rotations compose, so a query at `p` ends at `p + 1` while its key stays at `p`).
/// `q`: `[t, q_dim]`.
pub fn after_rope(m: Option<Mutation>, q: &mut [f32], q_dim: usize, inv_freq: &[f32]) {
    if m != Some(Mutation::QueryPositionOffByOne) {
        return;
    }
    let half = inv_freq.len();
    let (mut cos, mut sin) = (vec![0.0f32; half], vec![0.0f32; half]); // [head_dim / 2] each
    kernels::rope_cos_sin(1, inv_freq, &mut cos, &mut sin);
    for row in q.chunks_mut(q_dim) {
        kernels::rope_in_place(row, &cos, &sin);
    }
}

/// The cache row a forward call starting at `pos0` writes its keys and values to.
pub fn kv_write_start(m: Option<Mutation>, pos0: usize) -> usize {
    match m {
        Some(Mutation::KvWriteOffByOne) => pos0.saturating_sub(1),
        _ => pos0,
    }
}

/// Attention; under `no-causal-mask` every row of the call sees every key up to the call's
/// last position. Shapes as [`kernels::attention`].
pub fn attention(m: Option<Mutation>, out: &mut [f32], q: &[f32], k_cache: &[f32], v_cache: &[f32], s: AttnShape) {
    if m != Some(Mutation::NoCausalMask) {
        kernels::attention(out, q, k_cache, v_cache, s);
        return;
    }
    let q_dim = s.n_heads * s.head_dim;
    // Each row alone, placed at the call's last position, sees keys 0..pos0 + t.
    let last = AttnShape { t: 1, pos0: s.pos0 + s.t - 1, ..s };
    for (o, qr) in out.chunks_mut(q_dim).zip(q.chunks(q_dim)) {
        kernels::attention(o, qr, k_cache, v_cache, last);
    }
}

/// After layer `layer`'s residual add: under `scale-layer-output` the residual stream
/// `x` (`[t, H]`) of that layer is scaled.
pub fn after_layer(m: Option<Mutation>, layer: usize, x: &mut [f32]) {
    if let Some(Mutation::ScaleLayerOutput { layer: l, factor }) = m
        && l == layer
    {
        x.iter_mut().for_each(|v| *v *= factor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for n in ["rope-theta", "no-qk-norm", "no-causal-mask", "kv-write-off-by-one", "flip-norm-topk-prob"] {
            assert_eq!(Mutation::parse(n).unwrap().to_string(), n);
        }
        assert_eq!(
            Mutation::parse("scale-layer-output:2").unwrap(),
            Mutation::ScaleLayerOutput { layer: 2, factor: DEFAULT_SCALE }
        );
        assert_eq!(
            Mutation::parse("scale-layer-output:1:1.5").unwrap(),
            Mutation::ScaleLayerOutput { layer: 1, factor: 1.5 }
        );
        let e = Mutation::parse("no-rope").unwrap_err().to_string();
        assert!(e.contains("no-rope") && e.contains("rope-theta"), "{e}");
        let e = Mutation::parse("scale-layer-output").unwrap_err().to_string();
        assert!(e.contains("needs a layer"), "{e}");
        let e = Mutation::parse("scale-layer-output:x").unwrap_err().to_string();
        assert!(e.contains("`x`"), "{e}");
    }

    #[test]
    fn off_by_one_rotation_equals_rotating_one_position_further() {
        let inv = kernels::rope_inv_freq(8, 10_000.0);
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        let rot = |pos: usize, v: &mut [f32]| {
            let (mut c, mut s) = (vec![0.0; 4], vec![0.0; 4]);
            kernels::rope_cos_sin(pos, &inv, &mut c, &mut s);
            kernels::rope_in_place(v, &c, &s);
        };
        let (mut a, mut b) = (x.clone(), x);
        rot(5, &mut a);
        after_rope(Some(Mutation::QueryPositionOffByOne), &mut a, 8, &inv);
        rot(6, &mut b);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn unmasked_attention_lets_the_first_row_see_the_last_key() {
        // 1 head, head_dim 1, 2 positions: causal row 0 sees only value 0.
        let s = AttnShape { t: 2, pos0: 0, n_heads: 1, n_kv_heads: 1, head_dim: 1, f16_probs: false };
        let (q, k, v) = ([1.0f32, 1.0], [0.0f32, 0.0], [1.0f32, 3.0]);
        let mut causal = [0.0f32; 2];
        attention(None, &mut causal, &q, &k, &v, s);
        assert_eq!(causal, [1.0, 2.0]);
        let mut open = [0.0f32; 2];
        attention(Some(Mutation::NoCausalMask), &mut open, &q, &k, &v, s);
        assert_eq!(open, [2.0, 2.0]);
    }

    #[test]
    fn kv_write_and_theta_and_scale() {
        assert_eq!(kv_write_start(Some(Mutation::KvWriteOffByOne), 0), 0);
        assert_eq!(kv_write_start(Some(Mutation::KvWriteOffByOne), 7), 6);
        assert_eq!(kv_write_start(None, 7), 7);
        assert_eq!(rope_theta(Some(Mutation::RopeTheta), 1e6), 10_000.0);
        assert_eq!(rope_theta(Some(Mutation::RopeTheta), 10_000.0), 1e6);
        assert_eq!(rope_theta(None, 1e6), 1e6);
        let mut x = [1.0f32, 2.0];
        after_layer(Some(Mutation::ScaleLayerOutput { layer: 1, factor: 2.0 }), 0, &mut x);
        assert_eq!(x, [1.0, 2.0]);
        after_layer(Some(Mutation::ScaleLayerOutput { layer: 1, factor: 2.0 }), 1, &mut x);
        assert_eq!(x, [2.0, 4.0]);
    }
}
