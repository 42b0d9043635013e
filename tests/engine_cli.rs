//! `runner engine describe | run` end to end on tiny checkpoints written from Rust:
//! determinism across thread counts, what the manifest records, and every kind of bad
//! input giving a clear error and exit code 2 (never a panic).

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use paritybench::protocol::{CapturePoint, ComputeDtype, Dump, Layers, Mode, Positions, Request};
use support::*;

fn prompts() -> Vec<(&'static str, Vec<i32>)> {
    vec![("a", vec![3, 14, 15, 92, 65, 35, 89, 79, 32, 38]), ("b", vec![2, 71, 82, 81, 82, 84])]
}

fn run_ok(req: &Request, dir: &Path, env: &[(&str, &str)]) -> Dump {
    let rp = dir.join("req.json");
    req.save(&rp).unwrap();
    let out = dir.join("dump");
    let o = engine_run(&rp, &out, env);
    assert!(o.status.success(), "engine failed: {}", stderr(&o));
    Dump::open_complete(&out).unwrap()
}

/// Runs a request that must fail; returns stderr after checking exit code 2 and no panic.
fn run_err(req: &Request, dir: &Path) -> String {
    let rp = dir.join("req.json");
    req.save(&rp).unwrap();
    let o = engine_run(&rp, &dir.join("dump"), &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, got {:?}: {e}", o.status.code());
    assert!(!e.contains("panicked"), "the engine panicked: {e}");
    e
}

#[test]
fn describe_lists_the_engine() {
    let o = runner().args(["engine", "describe"]).output().unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["name"], "paritybench-engine");
    assert_eq!(v["backends"], serde_json::json!(["cpu", "cuda"]));
    assert!(v["formats"].as_array().unwrap().contains(&"safetensors".into()));
    assert_eq!(v["architectures"], serde_json::json!(["qwen2", "qwen3", "qwen3_moe"]));
    assert_eq!(v["capabilities"]["captures"].as_array().unwrap().len(), CapturePoint::ALL.len());
}

#[test]
fn dumps_are_bit_identical_for_one_and_two_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("moe");
    tiny_checkpoint(&m, "qwen3_moe");
    let req = request(&m, &prompts(), Mode::Prefill, 4);
    let (d1, d2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let a = run_ok(&req, &d1, &[("RAYON_NUM_THREADS", "1")]);
    let b = run_ok(&req, &d2, &[("RAYON_NUM_THREADS", "2")]);
    assert_eq!(a.manifest.engine.versions["cpu_threads"], "1");
    assert_eq!(b.manifest.engine.versions["cpu_threads"], "2");
    for (pa, pb) in a.manifest.prompts.iter().zip(&b.manifest.prompts) {
        assert_eq!(pa.sha256, pb.sha256, "prompt {}: shards differ between 1 and 2 threads", pa.id);
    }
    assert_eq!(a.manifest.prompts.len(), 2);
}

#[test]
fn incremental_mode_agrees_with_prefill() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("dense");
    tiny_checkpoint(&m, "qwen3");
    let (dp, di) = (tmp.path().join("p"), tmp.path().join("i"));
    std::fs::create_dir_all(&dp).unwrap();
    std::fs::create_dir_all(&di).unwrap();
    let p = run_ok(&request(&m, &prompts(), Mode::Prefill, 3), &dp, &[]);
    let i = run_ok(&request(&m, &prompts(), Mode::Incremental, 3), &di, &[]);
    for id in ["a", "b"] {
        let (sp, si) = (p.shard(id).unwrap(), i.shard(id).unwrap());
        let e = rel_l2(&si.logits().unwrap().to_f32(), &sp.logits().unwrap().to_f32());
        assert!(e <= 1e-6, "prompt {id}: incremental vs prefill logits rel L2 {e:.3e}");
        assert_eq!(&*sp.generated().unwrap(), &*si.generated().unwrap());
        for (_, _, name) in sp.captures() {
            let e = rel_l2(&si.get(&name).unwrap().to_f32(), &sp.get(&name).unwrap().to_f32());
            assert!(e <= 1e-6, "prompt {id} {name}: rel L2 {e:.3e}");
        }
    }
}

#[test]
fn the_manifest_records_what_was_asked_and_measured() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("dense");
    tiny_checkpoint(&m, "qwen3");
    let mut req = request(&m, &prompts(), Mode::Prefill, 3);
    req.positions = Positions::List(vec![1, 4, 5]);
    req.captures.points =
        vec![CapturePoint::Embed, CapturePoint::AttnOut, CapturePoint::MoeRouter, CapturePoint::FinalNorm];
    req.captures.layers = Layers::List(vec![2]);
    req.warmup = 1;
    req.repeats = 3;
    let d = run_ok(&req, tmp.path(), &[]);
    let man = &d.manifest;
    assert_eq!(man.engine.name, "paritybench-engine");
    assert_eq!((man.engine.backend.as_str(), man.engine.device.as_str()), ("cpu", "cpu"));
    assert_eq!(man.model.architecture.as_deref(), Some("qwen3"));
    assert_eq!(
        (man.model.format.as_str(), man.model.quant.as_str(), man.model.compute_dtype.as_str()),
        ("safetensors", "f32", "f32")
    );
    assert_eq!(man.model.vocab_size, Some(TINY_V as u32));
    assert!(man.load_ms.is_some() && man.peak_rss_bytes.unwrap() > 0);
    assert!(man.captures.absent["moe_router"].contains("no MoE layers"));
    assert_eq!(man.captures.points, vec![CapturePoint::Embed, CapturePoint::AttnOut, CapturePoint::FinalNorm]);
    let rec = man.prompt("a").unwrap();
    assert_eq!((rec.timings.prefill_ms.len(), rec.timings.decode_ms.len(), rec.timings.ttft_ms.len()), (3, 3, 3));
    assert_eq!((rec.timings.prefill_tokens, rec.timings.decode_tokens), (10, 2));
    let s = d.shard("a").unwrap();
    assert_eq!(&*s.positions().unwrap(), &[1, 4, 5]);
    assert_eq!(s.logits().unwrap().shape, &[3, TINY_V]);
    assert_eq!(s.generated().unwrap().len(), 3);
    let names: Vec<String> = s.captures().into_iter().map(|c| c.2).collect();
    assert_eq!(names, vec!["hidden.attn_out.2", "hidden.embed.0", "hidden.final_norm.0"]);
    assert_eq!(s.get("hidden.attn_out.2").unwrap().shape, &[3, TINY_H]);
}

// ---- bad input: each a clear error naming what is wrong, exit 2, no panic ----

fn model_with(dir: &Path, arch: &str, edit_config: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let m = dir.join("model");
    tiny_checkpoint(&m, arch);
    let p = m.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit_config(&mut c);
    std::fs::write(&p, c.to_string()).unwrap();
    m
}

#[test]
fn an_unknown_architecture_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with(tmp.path(), "qwen3", |c| c["model_type"] = "llama".into());
    let e = run_err(&request(&m, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("unknown architecture `llama`") && e.contains("config.json") && e.contains("qwen3_moe"), "{e}");
}

#[test]
fn a_missing_tensor_names_tensor_file_and_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with(tmp.path(), "qwen3", |_| {});
    let f = m.join("model.safetensors");
    let mut t = read_safetensors(&f);
    t.remove("model.layers.1.self_attn.k_norm.weight");
    write_safetensors(&f, &t, &BTreeMap::new());
    let e = run_err(&request(&m, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(
        e.contains("model.layers.1.self_attn.k_norm.weight") && e.contains("model.safetensors") && e.contains("qwen3"),
        "{e}"
    );
}

#[test]
fn a_sparse_layer_never_falls_back_to_a_dense_mlp_and_vice_versa() {
    // The file has a dense MLP in layer 0; the config now says layer 0 is sparse.
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with(tmp.path(), "qwen3_moe", |c| c["mlp_only_layers"] = serde_json::json!([]));
    let e = run_err(&request(&m, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(
        e.contains("model.layers.0.mlp.gate.weight") && e.contains("sparse MoE layer") && e.contains("qwen3_moe"),
        "{e}"
    );
    // The file has experts in layer 1; the config now says layer 1 is dense.
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with(tmp.path(), "qwen3_moe", |c| c["mlp_only_layers"] = serde_json::json!([0, 1]));
    let e = run_err(&request(&m, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("model.layers.1.mlp.gate_proj.weight") && e.contains("dense layer"), "{e}");
}

#[test]
fn a_wrong_shape_names_tensor_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with(tmp.path(), "qwen3", |c| c["intermediate_size"] = 50.into());
    let e = run_err(&request(&m, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[48, 32]") && e.contains("[50, 32]"),
        "{e}"
    );
}

#[test]
fn a_truncated_checkpoint_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with(tmp.path(), "qwen3", |_| {});
    let f = m.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = run_err(&request(&m, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn an_unsupported_dtype_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with(tmp.path(), "qwen3", |_| {});
    let f = m.join("model.safetensors");
    let t = read_safetensors(&f);
    write_safetensors(&f, &t, &BTreeMap::from([("model.norm.weight".to_string(), ())]));
    let e = run_err(&request(&m, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("model.norm.weight") && e.contains("F64"), "{e}");
}

#[test]
fn a_token_id_outside_the_vocabulary_names_prompt_position_and_id() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with(tmp.path(), "qwen3", |_| {});
    let mut p = prompts();
    p[1].1[3] = TINY_V as i32;
    let e = run_err(&request(&m, &p, Mode::Incremental, 0), tmp.path());
    assert!(e.contains("prompt \"b\"") && e.contains("position 3") && e.contains(&format!("token id {TINY_V}")), "{e}");
    // the dump directory records the error and is not complete
    let d = Dump::open(&tmp.path().join("dump")).unwrap();
    assert!(!d.manifest.complete && d.manifest.error.as_deref().unwrap().contains("position 3"));
}

#[test]
fn cuda_without_a_driver_and_half_precision_on_cpu_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with(tmp.path(), "qwen3", |_| {});
    let mut req = request(&m, &prompts(), Mode::Prefill, 0);
    if !paritybench::engine::backend::cuda::library_loads(&["libcuda.so.1", "libcuda.so"]) {
        req.device = "cuda:0".into();
        let e = run_err(&req, tmp.path());
        assert!(e.contains("cuda:0") && e.contains("CUDA is not available") && e.contains("libcuda"), "{e}");
    }
    req.device = "cpu".into();
    req.dtype = ComputeDtype::Bf16;
    let e = run_err(&req, tmp.path());
    assert!(e.contains("bf16") && e.contains("f32"), "{e}");
}

#[test]
fn dequant_check_without_a_gpu_or_on_the_cpu_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("x.gguf");
    std::fs::write(&f, b"not a gguf").unwrap();
    let o = runner().args(["engine", "dequant-check", "--device", "cpu"]).arg(&f).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("needs a GPU"), "{}", stderr(&o));
    if !paritybench::engine::backend::cuda::library_loads(&["libcuda.so.1", "libcuda.so"]) {
        let o = runner().args(["engine", "dequant-check", "--device", "cuda:0"]).arg(&f).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("CUDA is not available"), "{}", stderr(&o));
    }
}

#[test]
fn gpu_references_are_hf_only_and_a_bad_device_is_named() {
    // before anything is built: the device and the reference set are checked first
    let tmp = tempfile::tempdir().unwrap();
    let build = |extra: &[&str]| {
        runner()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("PARITYBENCH_CACHE", tmp.path())
            .env("PARITYBENCH_PYTHON", "python3")
            .args(["fixtures", "build", "--models", "qwen3-dense"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = build(&["--device", "cuda:0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--references hf") && stderr(&o).contains("llama.cpp"), "{}", stderr(&o));
    let o = build(&["--device", "gpu0", "--references", "hf"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("gpu0"), "{}", stderr(&o));
    assert!(!tmp.path().join("fixtures").exists(), "nothing may be written before the arguments are checked");
}

#[test]
fn a_missing_request_or_model_directory_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let o = engine_run(&tmp.path().join("nope.json"), &tmp.path().join("d"), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nope.json"), "{}", stderr(&o));
    let e = run_err(&request(&tmp.path().join("no-model"), &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("no-model"), "{e}");
}

// ---- bad input in GGUF files: the same cases through the GGUF loader ----
//
// Tiny GGUF v3 files written here byte by byte (the format's layout from gguf-py's
// `GGUFWriter`: header, metadata, tensor table, 32-byte aligned data), tensor names written
// out independently of the engine's name table.

/// A metadata value.
enum Kv {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

/// A tensor: name, PyTorch shape (`[out, in]`), ggml type id, raw bytes.
struct GgufTensor {
    name: String,
    shape: Vec<usize>,
    ggml_type: u32,
    data: Vec<u8>,
}

const GGML_F32: u32 = 0;
const GGML_IQ4_NL: u32 = 20;

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn write_gguf(path: &Path, kvs: &[(String, Kv)], tensors: &[GgufTensor]) {
    const ALIGN: usize = 32;
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        gguf_string(&mut out, k);
        match v {
            Kv::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::Str(s) => {
                out.extend(8u32.to_le_bytes());
                gguf_string(&mut out, s);
            }
        }
    }
    let mut offset = 0usize;
    for t in tensors {
        gguf_string(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes()); // ne0 (the contiguous dimension) first
        }
        out.extend(t.ggml_type.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += t.data.len().next_multiple_of(ALIGN);
    }
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    for t in tensors {
        out.extend(&t.data);
        out.resize(out.len().next_multiple_of(ALIGN), 0);
    }
    std::fs::write(path, out).unwrap();
}

/// A tiny `qwen3` (dense) or `qwen3moe` (every layer sparse) GGUF file with f32 tensors of
/// the [`tiny_checkpoint`] sizes; `edit` may change the metadata and tensors before writing.
fn tiny_gguf(path: &Path, arch: &'static str, edit: impl FnOnce(&mut Vec<(String, Kv)>, &mut Vec<GgufTensor>)) {
    let moe = arch == "qwen3moe";
    let key = |k: &str| format!("{arch}.{k}");
    let mut kvs = vec![
        ("general.architecture".to_string(), Kv::Str(arch)),
        (key("block_count"), Kv::U32(TINY_L as u32)),
        (key("embedding_length"), Kv::U32(TINY_H as u32)),
        (key("feed_forward_length"), Kv::U32(TINY_I as u32)),
        (key("attention.head_count"), Kv::U32(TINY_HEADS as u32)),
        (key("attention.head_count_kv"), Kv::U32(TINY_KV as u32)),
        (key("attention.key_length"), Kv::U32(TINY_HD as u32)),
        (key("attention.value_length"), Kv::U32(TINY_HD as u32)),
        (key("rope.freq_base"), Kv::F32(1e6)),
        (key("attention.layer_norm_rms_epsilon"), Kv::F32(1e-6)),
    ];
    if moe {
        kvs.push((key("expert_count"), Kv::U32(TINY_E as u32)));
        kvs.push((key("expert_used_count"), Kv::U32(2)));
        kvs.push((key("expert_feed_forward_length"), Kv::U32(TINY_EI as u32)));
    }
    let mut rng = Lcg::new(11);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let data = rng.vec(n, 0.3).iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push(GgufTensor { name, shape, ggml_type: GGML_F32, data });
    };
    let (h, q, kv) = (TINY_H, TINY_HEADS * TINY_HD, TINY_KV * TINY_HD);
    add("token_embd.weight".into(), vec![TINY_V, h]);
    add("output_norm.weight".into(), vec![h]);
    for i in 0..TINY_L {
        let b = format!("blk.{i}");
        for (n, shape) in [
            ("attn_norm.weight", vec![h]),
            ("attn_q.weight", vec![q, h]),
            ("attn_k.weight", vec![kv, h]),
            ("attn_v.weight", vec![kv, h]),
            ("attn_output.weight", vec![h, q]),
            ("attn_q_norm.weight", vec![TINY_HD]),
            ("attn_k_norm.weight", vec![TINY_HD]),
            ("ffn_norm.weight", vec![h]),
        ] {
            add(format!("{b}.{n}"), shape);
        }
        if moe {
            add(format!("{b}.ffn_gate_inp.weight"), vec![TINY_E, h]);
            add(format!("{b}.ffn_gate_exps.weight"), vec![TINY_E, TINY_EI, h]);
            add(format!("{b}.ffn_up_exps.weight"), vec![TINY_E, TINY_EI, h]);
            add(format!("{b}.ffn_down_exps.weight"), vec![TINY_E, h, TINY_EI]);
        } else {
            add(format!("{b}.ffn_gate.weight"), vec![TINY_I, h]);
            add(format!("{b}.ffn_up.weight"), vec![TINY_I, h]);
            add(format!("{b}.ffn_down.weight"), vec![h, TINY_I]);
        }
    }
    edit(&mut kvs, &mut tensors);
    write_gguf(path, &kvs, &tensors);
}

fn tensor_mut<'a>(t: &'a mut [GgufTensor], name: &str) -> &'a mut GgufTensor {
    t.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"))
}

#[test]
fn an_intact_tiny_gguf_runs() {
    // the positive control of the GGUF cases below: the writer makes files the engine reads
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["qwen3", "qwen3moe"] {
        let dir = tmp.path().join(arch);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("{arch}.gguf"));
        tiny_gguf(&f, arch, |_, _| {});
        let d = run_ok(&request(&f, &prompts(), Mode::Prefill, 2), &dir, &[]);
        assert_eq!(d.manifest.model.format, "gguf");
        assert_eq!(d.manifest.model.vocab_size, Some(TINY_V as u32));
        assert_eq!(d.shard("a").unwrap().logits().unwrap().shape, &[10, TINY_V]);
    }
}

#[test]
fn gguf_an_unknown_architecture_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("llama.gguf");
    // a llama file: `general.architecture` and every hyper-parameter key say `llama`
    tiny_gguf(&f, "qwen3", |kvs, _| {
        for (k, v) in kvs.iter_mut() {
            *k = k.replace("qwen3.", "llama.");
            if k == "general.architecture" {
                *v = Kv::Str("llama");
            }
        }
    });
    let e = run_err(&request(&f, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("unknown architecture `llama`") && e.contains("llama.gguf") && e.contains("qwen3"), "{e}");
    // the architecture is checked before the keys it implies
    let f = tmp.path().join("gpt.gguf");
    tiny_gguf(&f, "qwen3", |kvs, _| kvs[0].1 = Kv::Str("gpt2"));
    let e = run_err(&request(&f, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("unknown architecture `gpt2`") && e.contains("gpt.gguf"), "{e}");
}

#[test]
fn gguf_the_dense_vs_moe_ffn_up_mix_up_names_the_tensor() {
    // A MoE file whose layer 1 carries a dense `ffn_up` where the experts belong.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("moe.gguf");
    tiny_gguf(&f, "qwen3moe", |_, t| {
        let up = tensor_mut(t, "blk.1.ffn_up_exps.weight");
        up.name = "blk.1.ffn_up.weight".into();
    });
    let e = run_err(&request(&f, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(
        e.contains("missing tensor `blk.1.ffn_up_exps.weight`")
            && e.contains("moe.gguf")
            && e.contains("qwen3_moe")
            && e.contains("sparse MoE"),
        "{e}"
    );
    // And a dense file whose layer 0 carries expert tensors: the dense loader does not
    // take them for its MLP.
    let f = tmp.path().join("dense.gguf");
    tiny_gguf(&f, "qwen3", |_, t| {
        let up = tensor_mut(t, "blk.0.ffn_up.weight");
        up.name = "blk.0.ffn_up_exps.weight".into();
        up.shape = vec![1, TINY_I, TINY_H];
    });
    let e = run_err(&request(&f, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(
        e.contains("missing tensor `blk.0.ffn_up.weight`") && e.contains("dense.gguf") && e.contains("qwen3"),
        "{e}"
    );
}

#[test]
fn gguf_a_wrong_shape_names_tensor_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("m.gguf");
    tiny_gguf(&f, "qwen3", |_, t| {
        let k = tensor_mut(t, "blk.2.attn_k.weight");
        k.shape = vec![TINY_KV * TINY_HD + 1, TINY_H];
        k.data.extend(vec![0u8; 4 * TINY_H]);
    });
    let e = run_err(&request(&f, &prompts(), Mode::Prefill, 0), tmp.path());
    let (got, want) = (format!("[{}, {TINY_H}]", TINY_KV * TINY_HD + 1), format!("[{}, {TINY_H}]", TINY_KV * TINY_HD));
    assert!(e.contains("blk.2.attn_k.weight") && e.contains(&got) && e.contains(&want) && e.contains("m.gguf"), "{e}");
}

#[test]
fn gguf_a_truncated_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("cut.gguf");
    tiny_gguf(&f, "qwen3", |_, _| {});
    let bytes = std::fs::read(&f).unwrap();
    // inside the tensor data
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = run_err(&request(&f, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    // inside the header
    std::fs::write(&f, &bytes[..200]).unwrap();
    let e = run_err(&request(&f, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
}

#[test]
fn gguf_an_unsupported_tensor_type_is_named() {
    // IQ4_NL: a real llama.cpp type (32-element blocks of 18 bytes) this engine does not
    // dequantize.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("iq.gguf");
    tiny_gguf(&f, "qwen3", |_, t| {
        let q = tensor_mut(t, "blk.0.attn_q.weight");
        q.ggml_type = GGML_IQ4_NL;
        q.data = vec![0u8; TINY_HEADS * TINY_HD * TINY_H / 32 * 18];
    });
    let e = run_err(&request(&f, &prompts(), Mode::Prefill, 0), tmp.path());
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("IQ4_NL") && e.contains("iq.gguf"), "{e}");
}

#[test]
fn gguf_a_token_id_outside_the_vocabulary_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("m.gguf");
    tiny_gguf(&f, "qwen3moe", |_, _| {});
    let mut p = prompts();
    p[0].1[5] = TINY_V as i32 + 1000;
    let e = run_err(&request(&f, &p, Mode::Prefill, 0), tmp.path());
    assert!(
        e.contains("prompt \"a\"") && e.contains("position 5") && e.contains(&format!("token id {}", TINY_V + 1000)),
        "{e}"
    );
    // a negative id is refused the same way
    p[0].1[5] = -1;
    let e = run_err(&request(&f, &p, Mode::Prefill, 0), tmp.path());
    assert!(e.contains("prompt \"a\"") && e.contains("negative token id -1"), "{e}");
}
