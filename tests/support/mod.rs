//! Helpers shared by the engine's integration tests: the `runner` binary, tiny
//! checkpoints written from Rust (for tests that need no Python), requests, rel L2.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use paritybench::protocol::{
    CapturePoint, CaptureSpec, ComputeDtype, Layers, Mode, ModelRef, Positions, Prompt, Request,
};

/// The `runner` binary built for these tests.
pub fn runner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_runner"))
}

/// `runner engine run --request REQ --out OUT` with extra environment.
pub fn engine_run(request: &Path, out: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = runner();
    c.args(["engine", "run", "--request"]).arg(request).arg("--out").arg(out);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("the runner binary starts")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A request over `prompts` (id, ids), every capture point on every layer.
pub fn request(model: &Path, prompts: &[(&str, Vec<i32>)], mode: Mode, decode_steps: u32) -> Request {
    Request {
        schema: paritybench::protocol::SCHEMA_VERSION,
        model: ModelRef { path: model.to_path_buf(), sha256: None, format: None, tokenizer: None },
        prompts: prompts
            .iter()
            .map(|(id, ids)| Prompt {
                id: id.to_string(),
                token_ids: ids.clone(),
                text: None,
                chat: false,
                positions: None,
            })
            .collect(),
        positions: Positions::All,
        captures: CaptureSpec { points: CapturePoint::ALL.to_vec(), layers: Layers::All },
        decode_steps,
        mode,
        device: "cpu".into(),
        dtype: ComputeDtype::Auto,
        warmup: 0,
        repeats: 1,
        options: Default::default(),
    }
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// Deterministic pseudo-random numbers in [-scale, scale).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407))
    }
    pub fn next(&mut self, scale: f32) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next(scale)).collect()
    }
}

/// Sizes of the tiny checkpoints written by [`tiny_checkpoint`].
pub const TINY_V: usize = 97;
pub const TINY_H: usize = 32;
pub const TINY_I: usize = 48;
pub const TINY_L: usize = 3;
pub const TINY_HEADS: usize = 4;
pub const TINY_KV: usize = 2;
pub const TINY_HD: usize = 8;
pub const TINY_E: usize = 4;
pub const TINY_EI: usize = 16;

/// A tiny HF-layout checkpoint in `dir`: `qwen3` (tied embeddings) or `qwen3_moe`
/// (layer 0 dense via mlp_only_layers, layers 1.. sparse, top-2 of 4 experts). Tensor
/// names are written out here independently of the engine's own name table.
pub fn tiny_checkpoint(dir: &Path, arch: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let moe = arch == "qwen3_moe";
    let mut config = serde_json::json!({
        "model_type": arch, "vocab_size": TINY_V, "hidden_size": TINY_H, "intermediate_size": TINY_I,
        "num_hidden_layers": TINY_L, "num_attention_heads": TINY_HEADS, "num_key_value_heads": TINY_KV,
        "head_dim": TINY_HD, "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "tie_word_embeddings": !moe, "hidden_act": "silu",
    });
    if moe {
        let o = config.as_object_mut().unwrap();
        o.insert("num_experts".into(), TINY_E.into());
        o.insert("num_experts_per_tok".into(), 2.into());
        o.insert("moe_intermediate_size".into(), TINY_EI.into());
        o.insert("decoder_sparse_step".into(), 1.into());
        o.insert("mlp_only_layers".into(), serde_json::json!([0]));
        o.insert("norm_topk_prob".into(), true.into());
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();

    let mut rng = Lcg::new(7);
    let mut t: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Lcg| {
        let n = shape.iter().product();
        let v = rng.vec(n, scale).into_iter().map(|x| x + offset).collect();
        t.insert(name, (shape, v));
    };
    let (h, q, kv) = (TINY_H, TINY_HEADS * TINY_HD, TINY_KV * TINY_HD);
    add("model.embed_tokens.weight".into(), vec![TINY_V, h], 1.0, 0.0, &mut rng);
    add("model.norm.weight".into(), vec![h], 0.2, 1.0, &mut rng);
    if moe {
        add("lm_head.weight".into(), vec![TINY_V, h], 0.3, 0.0, &mut rng);
    }
    for i in 0..TINY_L {
        let l = format!("model.layers.{i}");
        add(format!("{l}.input_layernorm.weight"), vec![h], 0.2, 1.0, &mut rng);
        add(format!("{l}.post_attention_layernorm.weight"), vec![h], 0.2, 1.0, &mut rng);
        add(format!("{l}.self_attn.q_proj.weight"), vec![q, h], 0.3, 0.0, &mut rng);
        add(format!("{l}.self_attn.k_proj.weight"), vec![kv, h], 0.3, 0.0, &mut rng);
        add(format!("{l}.self_attn.v_proj.weight"), vec![kv, h], 0.3, 0.0, &mut rng);
        add(format!("{l}.self_attn.o_proj.weight"), vec![h, q], 0.3, 0.0, &mut rng);
        add(format!("{l}.self_attn.q_norm.weight"), vec![TINY_HD], 0.2, 1.0, &mut rng);
        add(format!("{l}.self_attn.k_norm.weight"), vec![TINY_HD], 0.2, 1.0, &mut rng);
        if moe && i > 0 {
            add(format!("{l}.mlp.gate.weight"), vec![TINY_E, h], 0.5, 0.0, &mut rng);
            for e in 0..TINY_E {
                add(format!("{l}.mlp.experts.{e}.gate_proj.weight"), vec![TINY_EI, h], 0.3, 0.0, &mut rng);
                add(format!("{l}.mlp.experts.{e}.up_proj.weight"), vec![TINY_EI, h], 0.3, 0.0, &mut rng);
                add(format!("{l}.mlp.experts.{e}.down_proj.weight"), vec![h, TINY_EI], 0.3, 0.0, &mut rng);
            }
        } else {
            add(format!("{l}.mlp.gate_proj.weight"), vec![TINY_I, h], 0.3, 0.0, &mut rng);
            add(format!("{l}.mlp.up_proj.weight"), vec![TINY_I, h], 0.3, 0.0, &mut rng);
            add(format!("{l}.mlp.down_proj.weight"), vec![h, TINY_I], 0.2, 0.0, &mut rng);
        }
    }
    write_safetensors(&dir.join("model.safetensors"), &t, &BTreeMap::new());
}

/// Writes f32 tensors, except those listed in `f64_tensors`, stored as F64.
pub fn write_safetensors(
    path: &Path,
    t: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    f64_tensors: &BTreeMap<String, ()>,
) {
    let bytes: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = t
        .iter()
        .map(|(n, (s, v))| {
            if f64_tensors.contains_key(n) {
                (
                    n.clone(),
                    s.clone(),
                    safetensors::Dtype::F64,
                    v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
                )
            } else {
                (n.clone(), s.clone(), safetensors::Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, d, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Reads every tensor of a safetensors file as f32 (F32 files only).
pub fn read_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            let data = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (n, (v.shape().to_vec(), data))
        })
        .collect()
}

/// The venv python, if it is there: `$PARITYBENCH_PYTHON`, else the cached venv.
pub fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PARITYBENCH_PYTHON") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Some(p);
        }
    }
    let cache = std::env::var("PARITYBENCH_CACHE")
        .map(PathBuf::from)
        .ok()
        .or_else(|| std::env::var("HOME").ok().map(|h| PathBuf::from(h).join(".cache/paritybench")))?;
    let p = cache.join("venv/bin/python");
    p.exists().then_some(p)
}

/// The llama.cpp build (`runners/setup.sh`'s `PARITYBENCH_LLAMACPP_ISA`) whose CPU numerics
/// the engine reproduces bit for bit (`src/engine/ggml.rs`): ggml compiled for AVX-512
/// F/BW/DQ/VL/VBMI/VNNI/BF16 without AMX. Another build takes other kernels (AMX tiles,
/// 8-lane AVX2 sums), so the bit-for-bit claims do not apply to its references.
pub const GGML_ISA: &str = "x86-64-avx512";

/// Why a llama.cpp build named `isa` cannot be held to the engine's bits, or `None` when it
/// can (also when the build is not named: a reference made outside `runners/setup.sh`).
pub fn ggml_bits_not_applicable(isa: Option<&str>) -> Option<String> {
    match isa {
        Some(isa) if isa != GGML_ISA => Some(format!(
            "llama.cpp here is built for {isa}, not {GGML_ISA} (this CPU lacks an AVX-512 extension): \
             its kernels are not the ones the engine reproduces bit for bit"
        )),
        _ => None,
    }
}
