//! The GGUF loader against the real thing: files written by llama.cpp's
//! `convert_hf_to_gguf.py`, `llama-quantize` and gguf-py's `GGUFWriter`, dequantized by
//! gguf-py (`gguf.quants.dequantize`, the spec), and the real Qwen3 tokenizer.json.
//!
//! The data comes from `tests/support/gguf_make.py` (run it with `$PARITYBENCH_PYTHON`). When
//! it is missing the tests print a notice and pass, unless `CI` is set: then they fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use paritybench::engine::gguf::file::{GgufHeader, MetaValue, ValueType};
use paritybench::engine::gguf::quants;
use paritybench::engine::gguf::{GgmlType, GgufConfig, GgufError, GgufFile, GgufWeights, TokenizerError};
use paritybench::engine::gguf::{embedded_tokenizer, load_tokenizer};
use paritybench::engine::weights::{WeightError, WeightSource};
use serde_json::Value;
use tokenizers::Tokenizer;

const MODELS: [&str; 2] = ["qwen3-dense", "qwen3-moe"];
const PRESETS: [&str; 11] = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K"];

/// `$PARITYBENCH_CACHE/test-gguf`, if gguf_make.py finished there.
fn data_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("PARITYBENCH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/paritybench")))
        .unwrap_or_else(|| PathBuf::from(".cache/paritybench"));
    let root = cache.join("test-gguf");
    if root.join(".stamp").is_file() {
        return Some(root);
    }
    let msg = format!(
        "GGUF test data missing in {}: run `$PARITYBENCH_PYTHON tests/support/gguf_make.py` (after `source /tmp/setup.env`)",
        root.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// gguf-py's reference tensors of `<file>.ref.safetensors`: name -> (ggml type, shape, values).
fn read_reference(gguf: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<f32>)> {
    let path = PathBuf::from(format!("{}.ref.safetensors", gguf.display()));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("reference header");
    let types = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference file");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let ty = types.get(&name).cloned().unwrap_or_else(|| panic!("{}: no type for {name}", path.display()));
            (name, (ty, view.shape().to_vec(), values))
        })
        .collect()
}

/// Distance in units in the last place between two floats (NaNs: 0 if both NaN with equal
/// bits, else u32::MAX).
fn ulps(a: f32, b: f32) -> u32 {
    if a.to_bits() == b.to_bits() {
        return 0;
    }
    if a.is_nan() || b.is_nan() {
        return u32::MAX;
    }
    // map to a monotonic integer line: negative floats below positive ones
    let ord = |x: f32| {
        let i = x.to_bits() as i32;
        if i < 0 { i32::MIN - i } else { i }
    };
    (ord(a) as i64 - ord(b) as i64).unsigned_abs().min(u32::MAX as u64) as u32
}

/// Compare bit for bit; on mismatch panic listing the first few differences.
fn assert_bit_exact(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: element count");
    let diffs: Vec<(usize, f32, f32, u32)> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
        .map(|(i, (&g, &w))| (i, g, w, ulps(g, w)))
        .collect();
    if !diffs.is_empty() {
        let max = diffs.iter().map(|d| d.3).max().unwrap_or(0);
        panic!(
            "{what}: {} of {} elements differ from gguf-py (max {max} ulp); first: {:?}",
            diffs.len(),
            got.len(),
            &diffs[..diffs.len().min(5)]
        );
    }
}

/// Dequantize rows `a..b` of a 2-D tensor straight from the file's bytes.
fn load_rows(file: &GgufFile, name: &str, a: usize, b: usize) -> Vec<f32> {
    let info = file.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
    let (block, size) = info.ggml_type.block_layout();
    let ne0 = info.dims[0] as usize;
    let row_bytes = ne0 / block as usize * size as usize;
    let bytes = &file.tensor_bytes(info)[a * row_bytes..b * row_bytes];
    let mut out = vec![0f32; (b - a) * ne0];
    quants::dequantize(info.ggml_type, bytes, &mut out).expect("supported type");
    out
}

/// Check every reference tensor of one GGUF file against `load_f32` (or a row range).
/// Returns the ggml types seen.
fn check_file_against_reference(path: &Path) -> BTreeMap<String, usize> {
    let weights = GgufWeights::open(path).unwrap_or_else(|e| panic!("{e}"));
    let reference = read_reference(path);
    let mut seen = BTreeMap::new();
    for (key, (ty, shape, want)) in &reference {
        *seen.entry(ty.clone()).or_default() += 1;
        let what = format!("{}: {key} ({ty})", path.display());
        if let Some((name, rows)) = key.split_once("#rows=") {
            let (a, b) = rows.split_once('-').expect("row range");
            let (a, b): (usize, usize) = (a.parse().expect("row"), b.parse().expect("row"));
            assert_eq!(weights.storage_type(name).as_deref(), Some(ty.as_str()), "{what}");
            assert_bit_exact(&what, &load_rows(weights.file(), name, a, b), want);
        } else if ty == "Q3_K" {
            let err = weights.load_f32(key).expect_err("Q3_K is not supported");
            assert!(
                matches!(&err, WeightError::UnsupportedType { tensor, dtype, .. } if tensor == key && dtype == "Q3_K"),
                "{err}"
            );
        } else {
            assert_eq!(weights.shape(key).as_ref(), Some(shape), "{what}: shape in PyTorch order");
            assert_eq!(weights.storage_type(key).as_deref(), Some(ty.as_str()), "{what}");
            let got = weights.load_f32(key).unwrap_or_else(|e| panic!("{e}"));
            assert_bit_exact(&what, &got, want);
        }
    }
    // the reference covers every tensor of the file
    for name in weights.names() {
        assert!(
            reference.contains_key(&name) || reference.keys().any(|k| k.starts_with(&format!("{name}#rows="))),
            "{}: {name} has no reference",
            path.display()
        );
    }
    seen
}

// ---- parsing ------------------------------------------------------------------------------

#[test]
fn every_metadata_type_parses_as_gguf_py_reads_it() {
    let Some(root) = data_dir() else { return };
    let path = root.join("all-types.gguf");
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let meta = read_json(&root.join("all-types.gguf.meta.json"));

    assert_eq!(file.header().version, 3);
    assert_eq!(file.header().alignment, meta["alignment"].as_u64().unwrap());
    assert_eq!(file.header().data_offset, meta["data_offset"].as_u64().unwrap());

    let get = |k: &str| file.get(k).unwrap_or_else(|| panic!("{k} missing"));
    assert_eq!(get("test.u8"), &MetaValue::U8(200));
    assert_eq!(get("test.i8"), &MetaValue::I8(-100));
    assert_eq!(get("test.u16"), &MetaValue::U16(60000));
    assert_eq!(get("test.i16"), &MetaValue::I16(-30000));
    assert_eq!(get("test.u32"), &MetaValue::U32(4_000_000_000));
    assert_eq!(get("test.i32"), &MetaValue::I32(-2_000_000_000));
    assert_eq!(get("test.f32"), &MetaValue::F32(0.1));
    assert_eq!(get("test.u64"), &MetaValue::U64(18_000_000_000_000_000_000));
    assert_eq!(get("test.i64"), &MetaValue::I64(-9_000_000_000_000_000_000));
    assert_eq!(get("test.f64"), &MetaValue::F64(0.1));
    assert_eq!(get("test.bool_true"), &MetaValue::Bool(true));
    assert_eq!(get("test.bool_false"), &MetaValue::Bool(false));
    assert_eq!(get("test.string").as_str(), Some("héllo ✓ 世界"));
    assert_eq!(get("test.empty_string").as_str(), Some(""));
    assert_eq!(file.get_int_array("test.array_i32").unwrap(), Some(vec![1, -2, 3]));
    assert_eq!(file.get_str_array("test.array_str").unwrap(), Some(vec!["a", "", "Ġthe", "<|im_start|>"]));
    let (item_type, nested) = get("test.array_nested").as_array().expect("array");
    assert_eq!(item_type, ValueType::Array);
    let nested: Vec<Vec<i64>> = nested
        .iter()
        .map(|inner| inner.as_array().expect("inner array").1.iter().map(|v| v.as_i64().unwrap()).collect())
        .collect();
    assert_eq!(nested, vec![vec![1, 2], vec![3]]);
    assert_eq!(
        get("test.array_u64").as_array().map(|(_, v)| v.to_vec()),
        Some(vec![MetaValue::U64(1), MetaValue::U64(1 << 63)])
    );
    // 2^63 does not fit i64: the integer accessor refuses rather than wraps
    assert!(matches!(file.get_int_array("test.array_u64"), Err(GgufError::WrongType { .. })));
    assert_eq!(
        get("test.array_u8").as_array().map(|(t, v)| (t, v.to_vec())),
        Some((ValueType::U8, vec![MetaValue::U8(1), MetaValue::U8(2), MetaValue::U8(255)]))
    );
    assert_eq!(
        get("test.array_f64").as_array().map(|(_, v)| v.to_vec()),
        Some(vec![MetaValue::F64(1.5), MetaValue::F64(-0.1)])
    );
    assert_eq!(
        get("test.array_bool").as_array().map(|(_, v)| v.to_vec()),
        Some(vec![MetaValue::Bool(true), MetaValue::Bool(false), MetaValue::Bool(true)])
    );

    // every key gguf-py saw, with the same type and (where recorded) the same value
    let keys: Vec<&str> = file.header().metadata().iter().map(|(k, _)| k.as_str()).collect();
    let want_keys: Vec<&str> = meta["metadata"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), want_keys.len(), "metadata keys: {keys:?} vs {want_keys:?}");
    for (key, entry) in meta["metadata"].as_object().unwrap() {
        check_meta_entry(&file, key, entry);
    }
    // the tensor table, as gguf-py reads it
    check_tensor_table(&file, &meta);
}

fn check_meta_entry(file: &GgufFile, key: &str, entry: &Value) {
    let v = file.get(key).unwrap_or_else(|| panic!("{key} missing"));
    let ty = entry["type"].as_str().unwrap();
    let name_of = |t: ValueType| match t {
        ValueType::U8 => "UINT8",
        ValueType::I8 => "INT8",
        ValueType::U16 => "UINT16",
        ValueType::I16 => "INT16",
        ValueType::U32 => "UINT32",
        ValueType::I32 => "INT32",
        ValueType::F32 => "FLOAT32",
        ValueType::Bool => "BOOL",
        ValueType::String => "STRING",
        ValueType::Array => "ARRAY",
        ValueType::U64 => "UINT64",
        ValueType::I64 => "INT64",
        ValueType::F64 => "FLOAT64",
    };
    let to_json = |v: &MetaValue| -> Value {
        match v {
            MetaValue::String(s) => Value::from(s.as_str()),
            MetaValue::Bool(b) => Value::from(*b),
            MetaValue::F32(x) => Value::from(f64::from(*x)),
            MetaValue::F64(x) => Value::from(*x),
            other => other.as_i64().map(Value::from).or_else(|| other.as_u64().map(Value::from)).unwrap_or(Value::Null),
        }
    };
    if ty == "array" {
        let (item_type, items) = v.as_array().unwrap_or_else(|| panic!("{key}: not an array"));
        if let Some(want) = entry["item_type"].as_str() {
            assert_eq!(name_of(item_type), want, "{key}: item type");
        }
        if let Some(len) = entry.get("len") {
            assert_eq!(items.len() as u64, len.as_u64().unwrap(), "{key}: length");
        }
        if let Some(values) = entry.get("value") {
            let got: Vec<Value> = items.iter().map(to_json).collect();
            assert_eq!(&Value::from(got), values, "{key}");
        }
        if let Some(first) = entry.get("first") {
            assert_eq!(&to_json(&items[0]), first, "{key}[0]");
            assert_eq!(&to_json(&items[items.len() - 1]), &entry["last"], "{key}[-1]");
        }
    } else {
        assert_eq!(name_of(v.value_type()), ty, "{key}: type");
        assert_eq!(to_json(v), entry["value"], "{key}: value");
    }
}

fn check_tensor_table(file: &GgufFile, meta: &Value) {
    let table = meta["tensors"].as_array().unwrap();
    assert_eq!(file.tensors().len(), table.len());
    for (t, want) in file.tensors().iter().zip(table) {
        assert_eq!(t.name, want["name"].as_str().unwrap());
        assert_eq!(t.ggml_type.name(), want["type"].as_str().unwrap(), "{}", t.name);
        let dims: Vec<u64> = want["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!(file.header().data_offset + t.offset, want["offset"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(t.n_bytes, want["n_bytes"].as_u64().unwrap(), "{}", t.name);
    }
}

#[test]
fn model_files_parse_as_gguf_py_reads_them() {
    let Some(root) = data_dir() else { return };
    for model in MODELS {
        for preset in PRESETS {
            let path = root.join(model).join(format!("{model}-{preset}.gguf"));
            let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
            let meta = read_json(&PathBuf::from(format!("{}.meta.json", path.display())));
            assert_eq!(file.header().data_offset, meta["data_offset"].as_u64().unwrap(), "{}", path.display());
            for (key, entry) in meta["metadata"].as_object().unwrap() {
                check_meta_entry(&file, key, entry);
            }
            check_tensor_table(&file, &meta);
        }
    }
}

// ---- dequantization -----------------------------------------------------------------------

#[test]
fn random_blocks_of_every_type_dequantize_bit_exact() {
    let Some(root) = data_dir() else { return };
    let seen = check_file_against_reference(&root.join("all-types.gguf"));
    for ty in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K"] {
        assert!(seen.contains_key(ty), "all-types.gguf has no {ty} tensor: {seen:?}");
    }
}

#[test]
fn model_files_dequantize_bit_exact() {
    let Some(root) = data_dir() else { return };
    let mut seen = BTreeMap::new();
    for model in MODELS {
        for preset in PRESETS {
            let path = root.join(model).join(format!("{model}-{preset}.gguf"));
            for (ty, n) in check_file_against_reference(&path) {
                *seen.entry(ty).or_insert(0) += n;
            }
        }
    }
    eprintln!("tensors checked bit-exact per ggml type: {seen:?}");
    for ty in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"] {
        assert!(seen.contains_key(ty), "no model tensor of type {ty}: {seen:?}");
    }
}

// ---- metadata and shapes ------------------------------------------------------------------

#[test]
fn metadata_matches_the_hf_config() {
    let Some(root) = data_dir() else { return };
    for model in MODELS {
        let hf = read_json(&root.join(model).join("hf/config.json"));
        let u = |k: &str| hf[k].as_u64().unwrap_or_else(|| panic!("config.json {k}"));
        let path = root.join(model).join(format!("{model}-Q4_K_M.gguf"));
        let weights = GgufWeights::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let c = weights.config().unwrap_or_else(|e| panic!("{e}"));
        let arch = if model == "qwen3-moe" { "qwen3moe" } else { "qwen3" };
        let absent = |k: &str| c.absent.iter().any(|a| a == &format!("{arch}.{k}"));
        assert_eq!(c.architecture, arch);
        assert_eq!(c.block_count, u("num_hidden_layers"));
        assert_eq!(c.embedding_length, u("hidden_size"));
        assert_eq!(c.feed_forward_length, Some(u("intermediate_size")));
        assert_eq!(c.head_count, u("num_attention_heads"));
        assert_eq!(c.head_count_kv, Some(u("num_key_value_heads")));
        // convert_hf_to_gguf.py writes key/value_length only when config.json has head_dim
        assert_eq!(c.key_length, hf["head_dim"].as_u64());
        assert_eq!(c.value_length, hf["head_dim"].as_u64());
        assert_eq!(c.key_length.is_none(), absent("attention.key_length"), "{:?}", c.absent);
        let theta = hf["rope_parameters"]["rope_theta"].as_f64().or(hf["rope_theta"].as_f64()).unwrap();
        assert_eq!(c.rope_freq_base, Some(f64::from(theta as f32)), "stored as f32");
        assert_eq!(c.layer_norm_rms_epsilon, Some(f64::from(hf["rms_norm_eps"].as_f64().unwrap() as f32)));
        assert_eq!(c.context_length, Some(u("max_position_embeddings")));
        assert_eq!(c.embedding_rows, Some(u("vocab_size")));
        assert_eq!(c.tokenizer_vocab_size, Some(u("vocab_size")));
        assert_eq!(c.vocab_size(), Some(151_936));
        assert_eq!(GgufConfig::dominant_type(weights.file()), Some("Q4_K"));
        if model == "qwen3-moe" {
            // transformers 5 writes num_experts as `num_local_experts`
            let experts = hf["num_experts"].as_u64().or(hf["num_local_experts"].as_u64());
            assert_eq!(c.expert_count, experts);
            assert_eq!(experts, Some(4));
            assert_eq!(c.expert_used_count, Some(u("num_experts_per_tok")));
            assert_eq!(c.expert_feed_forward_length, Some(u("moe_intermediate_size")));
            // convert_hf_to_gguf.py does not carry norm_topk_prob for qwen3moe
            assert_eq!(c.expert_weights_norm, None);
            assert!(absent("expert_weights_norm"), "{:?}", c.absent);
        } else {
            assert_eq!(c.expert_count, None);
            assert!(absent("expert_count") && absent("expert_used_count"), "{:?}", c.absent);
        }
        eprintln!("{model}: absent keys {:?}", c.absent);
    }
}

/// The HF name of a GGUF tensor of a Qwen3 dense model (convert_hf_to_gguf's mapping).
fn hf_name(gguf: &str) -> String {
    let fixed = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    if let Some((_, hf)) = fixed.iter().find(|(g, _)| *g == gguf) {
        return hf.to_string();
    }
    let rest = gguf.strip_prefix("blk.").expect("block tensor");
    let (layer, part) = rest.split_once('.').expect("blk.N.part");
    let part = match part.trim_end_matches(".weight") {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "ffn_gate_inp" => "mlp.gate",
        other => panic!("unmapped GGUF tensor {other}"),
    };
    format!("model.layers.{layer}.{part}.weight")
}

#[test]
fn f32_gguf_tensors_equal_the_hf_checkpoint_in_pytorch_order() {
    let Some(root) = data_dir() else { return };
    let model = "qwen3-dense";
    let st_path = root.join(model).join("hf/model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap_or_else(|e| panic!("{}: {e}", st_path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("HF checkpoint");
    let weights = GgufWeights::open(&root.join(model).join(format!("{model}-F32.gguf"))).expect("F32 file");
    let names = weights.names();
    assert_eq!(names.len(), st.names().len(), "tensor count GGUF vs HF: {names:?}");
    for name in names {
        let view = st.tensor(&hf_name(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(weights.shape(&name).as_deref(), Some(view.shape()), "{name}");
        let want: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_bit_exact(&name, &weights.load_f32(&name).expect("load"), &want);
    }
    // unambiguous shapes (hidden 256, intermediate 512, 4 x 64 query heads, 2 x 64 KV heads)
    assert_eq!(weights.shape("blk.0.attn_k.weight"), Some(vec![128, 256]));
    assert_eq!(weights.shape("blk.0.ffn_down.weight"), Some(vec![256, 512]));
    assert_eq!(weights.shape("blk.1.ffn_up.weight"), Some(vec![512, 256]));
    assert_eq!(weights.shape("token_embd.weight"), Some(vec![151_936, 256]));

    let moe = GgufWeights::open(&root.join("qwen3-moe/qwen3-moe-F32.gguf")).expect("MoE F32 file");
    assert_eq!(moe.shape("blk.0.ffn_gate_inp.weight"), Some(vec![4, 256]));
    assert_eq!(moe.shape("blk.0.ffn_gate_exps.weight"), Some(vec![4, 256, 256]));
    assert_eq!(moe.shape("blk.1.ffn_down_exps.weight"), Some(vec![4, 256, 256]));
    let err = moe.load_f32("blk.9.attn_q.weight").expect_err("no layer 9");
    assert!(matches!(&err, WeightError::MissingTensor { architecture, .. } if architecture == "qwen3moe"), "{err}");
}

// ---- malformed input ----------------------------------------------------------------------

/// Parse every prefix of the header and a spread of prefixes into the data: all must be
/// errors naming the file; then corrupt every header byte three ways: never a panic.
#[test]
fn truncated_and_corrupted_copies_error_without_panicking() {
    let Some(root) = data_dir() else { return };
    let path = root.join("all-types.gguf");
    let bytes = std::fs::read(&path).expect("all-types.gguf");
    let header = GgufHeader::parse(&path, &bytes).expect("intact file parses");
    let data_end = header.tensors().iter().map(|t| header.data_offset + t.offset + t.n_bytes).max().unwrap() as usize;
    let mut cuts: Vec<usize> = (0..header.data_offset as usize).collect();
    cuts.extend((header.data_offset as usize..data_end).step_by(97));
    for n in cuts {
        let err = GgufHeader::parse(&path, &bytes[..n]).expect_err("a truncated file must not parse");
        assert!(err.to_string().starts_with(&path.display().to_string()), "{err}");
        if n >= header.data_offset as usize {
            assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "cut at {n}: {err}");
        }
    }
    let mut parsed = 0;
    let mut copy = bytes.clone();
    for i in 0..header.data_offset as usize {
        for v in [0x00, 0xFF, bytes[i] ^ 0x80] {
            copy[i] = v;
            if GgufHeader::parse(&path, &copy).is_ok() {
                parsed += 1;
            }
        }
        copy[i] = bytes[i];
    }
    eprintln!("{} corrupted headers, {parsed} still parsed (changed values or names)", 3 * header.data_offset);

    // a big real file truncated inside its vocabulary and inside its data
    let q = root.join("qwen3-dense/qwen3-dense-Q4_K_M.gguf");
    let file = GgufFile::open(&q).expect("Q4_K_M file");
    let all = std::fs::read(&q).expect("read");
    let err = GgufHeader::parse(&q, &all[..file.header().data_offset as usize / 2]).expect_err("truncated header");
    assert!(matches!(&err, GgufError::Truncated { what, .. } if what.contains("tokenizer.ggml")), "{err}");
    let err = GgufHeader::parse(&q, &all[..all.len() - 1]).expect_err("truncated data");
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
}

/// Patch specific fields of a real file and check each error names the problem.
#[test]
fn specific_corruptions_give_specific_errors() {
    let Some(root) = data_dir() else { return };
    let path = root.join("all-types.gguf");
    let bytes = std::fs::read(&path).expect("all-types.gguf");
    let patched = |at: usize, with: &[u8]| {
        let mut b = bytes.clone();
        b[at..at + with.len()].copy_from_slice(with);
        GgufHeader::parse(&path, &b).expect_err("corrupted")
    };
    assert!(matches!(patched(0, b"GGML"), GgufError::BadMagic { .. }));
    assert!(matches!(patched(4, &1u32.to_le_bytes()), GgufError::UnsupportedVersion { version: 1, .. }));
    assert!(matches!(patched(4, &4u32.to_le_bytes()), GgufError::UnsupportedVersion { version: 4, .. }));
    assert!(matches!(patched(4, &3u32.to_be_bytes()), GgufError::BigEndian { .. }));
    // the tensor entry of `plain.f32`: name, n_dims u32, dims u64 x n, type u32, offset u64
    let name = b"plain.f32";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("tensor name") + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    let err = patched(type_at, &99u32.to_le_bytes());
    assert!(matches!(&err, GgufError::UnknownGgmlType { tensor, type_id: 99, .. } if tensor == "plain.f32"), "{err}");
    let err = patched(type_at + 4, &1u64.to_le_bytes());
    assert!(matches!(err, GgufError::Misaligned { offset: 1, .. }), "{err}");
    let err = patched(type_at + 4, &(1u64 << 40).to_le_bytes());
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
    let err = patched(at, &5u32.to_le_bytes());
    assert!(matches!(err, GgufError::TooManyDims { n_dims: 5, .. }), "{err}");
    let err = patched(at + 4, &u64::MAX.to_le_bytes());
    assert!(matches!(err, GgufError::BadDims { .. }), "{err}");
    // a Q8_0 tensor whose row is not a whole number of 32-element blocks
    let name = b"quant.Q8_0";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("tensor name") + name.len();
    let err = patched(at + 4, &100u64.to_le_bytes());
    assert!(matches!(err, GgufError::PartialBlock { ne0: 100, block_size: 32, .. }), "{err}");
    // a metadata value type that does not exist
    let key = b"test.u8";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("key") + key.len();
    let err = patched(at, &77u32.to_le_bytes());
    assert!(matches!(&err, GgufError::UnknownValueType { key, type_id: 77, .. } if key == "test.u8"), "{err}");
    let key = b"test.bool_true";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("key") + key.len();
    let err = patched(at + 4, &[2]);
    assert!(matches!(err, GgufError::InvalidBool { value: 2, .. }), "{err}");
    // a string length far beyond the file
    let err = patched(at - key.len() - 8, &(u64::MAX / 2).to_le_bytes());
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    // an array claiming 2^60 items must fail before allocating
    let key = b"test.array_i32";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("key") + key.len();
    let err = patched(at + 8, &(1u64 << 60).to_le_bytes());
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
}

// ---- tokenizer ----------------------------------------------------------------------------

#[test]
fn embedded_tokenizer_matches_tokenizer_json() {
    let Some(root) = data_dir() else { return };
    let file = GgufFile::open(&root.join("qwen3-dense/qwen3-dense-Q8_0.gguf")).expect("Q8_0 file");
    let embedded = embedded_tokenizer(&file).unwrap_or_else(|e| panic!("{e}"));
    let json_path = std::env::var_os("PARITYBENCH_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("qwen3-dense/hf/tokenizer.json"));
    let reference = Tokenizer::from_file(&json_path).unwrap_or_else(|e| panic!("{}: {e}", json_path.display()));

    // 1. the strings transformers tokenized (ASCII, code, CJK, emoji, numbers, chat tokens)
    let cases = read_json(&root.join("tokenizer_cases.json"));
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = embedded.encode(text, false).expect("encode");
        assert_eq!(got.get_ids(), &want[..], "embedded vs transformers for {text:?}");
        assert_eq!(reference.encode(text, false).expect("encode").get_ids(), &want[..], "tokenizer.json for {text:?}");
        assert_eq!(embedded.decode(&want, false).unwrap(), reference.decode(&want, false).unwrap(), "{text:?}");
    }

    // 2. the whole vocabulary: same string for every id, none for the padding rows
    let n_json = reference.get_vocab_size(true) as u32;
    assert_eq!(n_json, 151_669);
    for id in 0..n_json {
        assert_eq!(embedded.id_to_token(id), reference.id_to_token(id), "id {id}");
    }
    for id in n_json..151_936 {
        assert_eq!(embedded.id_to_token(id), None, "padding id {id}");
    }

    // 3. text made of random vocabulary pieces (deterministic), mixed with specials
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..50 {
        let ids: Vec<u32> = (0..200).map(|_| (next() % n_json as u64) as u32).collect();
        let text = reference.decode(&ids, false).expect("decode");
        let want = reference.encode(text.as_str(), false).expect("encode");
        let got = embedded.encode(text.as_str(), false).expect("encode");
        assert_eq!(got.get_ids(), want.get_ids(), "random text {text:?}");
    }
}

#[test]
fn tokenizer_errors_name_the_file() {
    let Some(root) = data_dir() else { return };
    let path = root.join("all-types.gguf");
    let file = GgufFile::open(&path).expect("all-types.gguf");
    let err = embedded_tokenizer(&file).expect_err("no vocabulary");
    assert!(matches!(err, TokenizerError::NoTokenizer { .. }), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()) && err.to_string().contains("tokenizer.json"));
    // with an explicit tokenizer.json the same file gets a tokenizer
    let json = root.join("qwen3-dense/hf/tokenizer.json");
    let t = load_tokenizer(&file, Some(&json)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.encode("<|im_start|>user").unwrap(), vec![151_644, 872]);
    // the model files say: no BOS, eos = <|im_end|> (from tokenizer_config.json)
    let q = GgufFile::open(&root.join("qwen3-dense/qwen3-dense-Q8_0.gguf")).expect("Q8_0 file");
    let t = load_tokenizer(&q, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(!t.add_bos);
    assert!(t.embedded);
    assert_eq!(t.source, q.path());
    eprintln!("bos {:?} eos {:?}", t.bos_token_id, t.eos_token_id);
}

// ---- speed --------------------------------------------------------------------------------

/// `cargo test --release --test gguf -- --ignored --nocapture q4_k_throughput`
#[test]
#[ignore = "timing; run in release"]
fn q4_k_throughput() {
    let Some(root) = data_dir() else { return };
    let file = GgufFile::open(&root.join("qwen3-dense/qwen3-dense-Q4_K_M.gguf")).expect("Q4_K_M file");
    let t = file
        .tensors()
        .iter()
        .filter(|t| t.ggml_type == GgmlType::Q4K)
        .max_by_key(|t| t.n_bytes)
        .expect("a Q4_K tensor");
    let bytes = file.tensor_bytes(t);
    let mut out = vec![0f32; t.n_elements as usize];
    quants::dequantize(t.ggml_type, bytes, &mut out).expect("warm-up");
    let reps = 10;
    let start = std::time::Instant::now();
    for _ in 0..reps {
        quants::dequantize(t.ggml_type, bytes, &mut out).expect("dequantize");
    }
    let s = start.elapsed().as_secs_f64() / reps as f64;
    eprintln!(
        "Q4_K {} ({} elements, {:.1} MB): {:.2} ms, {:.2} GB/s of Q4_K in, {:.2} GB/s of f32 out, {} threads",
        t.name,
        t.n_elements,
        t.n_bytes as f64 / 1e6,
        s * 1e3,
        t.n_bytes as f64 / s / 1e9,
        t.n_elements as f64 * 4.0 / s / 1e9,
        rayon::current_num_threads()
    );
}
