//! The engine's quantized dot products against ggml's own, on real blocks.
//!
//! Weight rows come from the files `tests/support/gguf_make.py` makes with the real
//! `llama-quantize` (every quantized type the engine reads); activation rows are seeded
//! pseudo-random values of several scales. `tests/support/ggml_quant_dot.py` calls, through
//! ctypes on the `libggml-cpu` that llama-cpp-python ships, `from_float` of each type's
//! `vec_dot_type` and `vec_dot`. Checked:
//! - every byte of the quantized activation rows equals ggml's (Q8_0, Q8_1, Q8_K);
//! - every dot product is within 1e-6 × Σ|wᵢ·xᵢ| of ggml's (accumulation order only: one
//!   wrong quant moves it by about |w|·d, thousands of times more), and bit-identical for the
//!   types of the fixture files (Q8_0, Q4_K, Q5_K, Q6_K: ggml's eight FMA lanes, its
//!   horizontal sums);
//! - the portable, AVX2 and AVX-512 builds give the same bits;
//! - on F16 and quantized files with `QuantDot::F32`, every weight matrix's product is
//!   bit-identical to dequantizing the whole matrix and calling `kernels::matmul_t` (the
//!   path of the engine before weights stayed mapped).
//!
//! Missing data (gguf_make.py not run, llama-cpp-python absent): a notice and a pass, unless
//! `CI` is set.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use paritybench::engine::gguf::{GgmlType, GgufFile, GgufWeights};
use paritybench::engine::kernels;
use paritybench::engine::matrix::{self, QuantDot};
use paritybench::engine::quant_dot::{self, QuantRows, SimdLevel, VecDotType};
use paritybench::engine::weights::WeightSource;

const FILES: [&str; 8] = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K"];

fn skip(msg: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("NOTICE: skipping: {msg}");
}

/// `$PARITYBENCH_CACHE/test-gguf/qwen3-dense`, if gguf_make.py finished.
fn data_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("PARITYBENCH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/paritybench")))?;
    let root = cache.join("test-gguf");
    if root.join(".stamp").is_file() {
        return Some(root.join("qwen3-dense"));
    }
    skip(&format!(
        "GGUF test data missing in {}: run `$PARITYBENCH_PYTHON tests/support/gguf_make.py`",
        root.display()
    ));
    None
}

fn ggml_id(ty: GgmlType) -> u32 {
    (0..64).find(|&i| GgmlType::from_id(i) == Some(ty)).expect("a ggml type id")
}

/// One case: a weight row of `ty` from a real file and an activation row.
struct Case {
    what: String,
    ty: GgmlType,
    w: Vec<u8>,
    x: Vec<f32>,
}

/// Rows 0, 1 and the last of every 2-D tensor of each quantized type in `file`, each with
/// activations of three scales (one with an outlier) and one of exact rounding ties.
fn cases_of(file: &GgufFile, seed: &mut u64) -> Vec<Case> {
    let mut out = Vec::new();
    let mut seen = BTreeMap::new();
    for t in file.tensors().iter().filter(|t| t.dims.len() == 2 && VecDotType::of(t.ggml_type).is_some()) {
        // at most two tensors per type and file
        let n = seen.entry(t.ggml_type.name()).or_insert(0);
        *n += 1;
        if *n > 2 {
            continue;
        }
        let (bs, ts) = t.ggml_type.block_layout();
        let k = t.dims[0] as usize;
        let rows = t.dims[1] as usize;
        let rb = k / bs as usize * ts as usize;
        let bytes = file.tensor_bytes(t);
        for r in [0, 1, rows - 1] {
            for scale in [0.01f32, 1.0, 30.0] {
                *seed += 1;
                let mut x = support::Lcg::new(*seed).vec(k, scale);
                if scale == 30.0 {
                    x[k / 3] = -1000.0; // one outlier: most quants of its block round to 0
                }
                out.push(Case {
                    what: format!("{} {} row {r} x-scale {scale}", file.path().display(), t.name),
                    ty: t.ggml_type,
                    w: bytes[r * rb..(r + 1) * rb].to_vec(),
                    x,
                });
            }
            // exact rounding ties: 127 at the start of every block of 32 makes the scale 1
            // (Q8_0/Q8_1: `127 / amax`; Q8_K: `-127 / max`), and the rest are half-integers
            let x = (0..k).map(|i| if i % 32 == 0 { 127.0 } else { (i % 61) as f32 - 30.5 }).collect();
            out.push(Case {
                what: format!("{} {} row {r} half-integer ties", file.path().display(), t.name),
                ty: t.ggml_type,
                w: bytes[r * rb..(r + 1) * rb].to_vec(),
                x,
            });
        }
    }
    out
}

/// Runs ggml on the cases: (quantized activation bytes, dot product) per case.
fn ggml(cases: &[Case], tmp: &Path) -> Option<Vec<(Vec<u8>, f32)>> {
    let Some(py) = support::python() else {
        skip("no venv python (PARITYBENCH_PYTHON)");
        return None;
    };
    let mut meta = std::collections::HashMap::new();
    meta.insert("cases".to_string(), cases.len().to_string());
    let mut bufs: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        meta.insert(format!("type.{i}"), ggml_id(c.ty).to_string());
        bufs.push((format!("w.{i}"), vec![c.w.len()], safetensors::Dtype::U8, c.w.clone()));
        bufs.push((
            format!("x.{i}"),
            vec![c.x.len()],
            safetensors::Dtype::F32,
            c.x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(n, s, d, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let (inp, out) = (tmp.join("cases.safetensors"), tmp.join("ggml.safetensors"));
    safetensors::serialize_to_file(views, Some(meta), &inp).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ggml_quant_dot.py");
    let o = std::process::Command::new(&py).arg(&script).arg(&inp).arg(&out).output().unwrap();
    if o.status.code() == Some(2)
        || (!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not installed"))
    {
        skip(&format!("ggml library unavailable: {}", String::from_utf8_lossy(&o.stderr)));
        return None;
    }
    assert!(o.status.success(), "ggml_quant_dot.py failed: {}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    eprintln!("ggml library: {:?}", m.metadata().as_ref().and_then(|m| m.get("library")));
    Some(
        (0..cases.len())
            .map(|i| {
                let q = st.tensor(&format!("q.{i}")).unwrap().data().to_vec();
                let d = st.tensor(&format!("dot.{i}")).unwrap().data();
                (q, f32::from_le_bytes([d[0], d[1], d[2], d[3]]))
            })
            .collect(),
    )
}

#[test]
fn quantizers_and_dot_products_match_ggml_on_real_blocks() {
    let Some(dir) = data_dir() else { return };
    let mut seed = 100;
    let mut cases = Vec::new();
    for f in FILES {
        let path = dir.join(format!("qwen3-dense-{f}.gguf"));
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        cases.extend(cases_of(&file, &mut seed));
    }
    let types: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.ty.name()).collect();
    for want in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"] {
        assert!(types.contains(want), "no real blocks of {want} in {}: {types:?}", dir.display());
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(reference) = ggml(&cases, tmp.path()) else { return };
    let simd = SimdLevel::detect();
    let mut worst = BTreeMap::new();
    for (c, (q_ggml, dot_ggml)) in cases.iter().zip(&reference) {
        let vdt = VecDotType::of(c.ty).unwrap();
        let act = QuantRows::quantize(vdt, &c.x, c.x.len());
        assert_eq!(act.to_ggml_bytes(), *q_ggml, "{}: {} activation bytes differ from ggml", c.what, vdt.name());
        let row = act.row(0, c.x.len() / vdt.block_size());
        let got = quant_dot::vec_dot(c.ty, &c.w, row, SimdLevel::Portable).unwrap();
        for level in [SimdLevel::Avx2, SimdLevel::Avx512Vnni] {
            if level == SimdLevel::Avx512Vnni && simd != SimdLevel::Avx512Vnni
                || level == SimdLevel::Avx2 && simd == SimdLevel::Portable
            {
                continue;
            }
            let v = quant_dot::vec_dot(c.ty, &c.w, row, level).unwrap();
            assert_eq!(v.to_bits(), got.to_bits(), "{}: {level:?} build differs from the portable one", c.what);
        }
        // Σ|wᵢ·xᵢ| over the dequantized weights and activations
        let mut wf = vec![0f32; c.x.len()];
        paritybench::engine::gguf::quants::dequantize_seq(c.ty, &c.w, &mut wf).unwrap();
        let mag: f64 = wf.iter().zip(&c.x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        let err = (got as f64 - *dot_ggml as f64).abs() / mag.max(f64::MIN_POSITIVE);
        assert!(err <= 1e-6, "{}: engine {got} vs ggml {dot_ggml}: {err:.2e} of Σ|w·x| = {mag:.3e}", c.what);
        // the types of the fixture files follow ggml's lanes and FMAs to the bit
        if matches!(c.ty, GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) {
            assert_eq!(got.to_bits(), dot_ggml.to_bits(), "{}: engine {got} vs ggml {dot_ggml}: not the same bits", c.what);
        }
        let w = worst.entry(c.ty.name()).or_insert(0.0f64);
        *w = w.max(err);
    }
    eprintln!("RESULT {} cases; largest |engine − ggml| / Σ|w·x| per type: {worst:?}", cases.len());
}

/// Every weight matrix of a file: the engine's product on the mapped weights equals
/// `kernels::matmul_t` on the whole matrix dequantized at load, bit for bit.
fn assert_f32_path_is_the_dequantized_product(file: &str, qd: QuantDot) {
    let Some(dir) = data_dir() else { return };
    let path = dir.join(format!("qwen3-dense-{file}.gguf"));
    let w = GgufWeights::open(&path).unwrap();
    let mut checked = 0;
    for name in w.names() {
        let shape = w.shape(&name).unwrap();
        if shape.len() != 2 {
            continue;
        }
        let (n, k) = (shape[0], shape[1]);
        let n = n.min(1000); // the embedding: its first 1000 rows
        let m = w.load_matrix(&name, shape[0], k).unwrap();
        let full = w.load_f32(&name).unwrap();
        for t in [1usize, 5] {
            let x = support::Lcg::new(7 + t as u64).vec(t * k, 1.0);
            let mut want = vec![0f32; t * n];
            kernels::matmul_t(&mut want, &x, &full[..n * k], t, k, n);
            let mut got = vec![0f32; t * n];
            matrix::matmul(&mut got, &x, m.rows_view(0..n), t, qd);
            let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{}: {name} ({}) t={t}: product differs from matmul_t on f32", path.display(), m.type_name());
        }
        checked += 1;
    }
    assert!(checked >= 7, "{}: only {checked} matrices", path.display());
}

#[test]
fn f16_weights_give_the_bits_of_the_dequantized_f32_path() {
    // the quant_dot choice does not apply to float types: both give the f32 bits
    assert_f32_path_is_the_dequantized_product("F16", QuantDot::Ggml);
    assert_f32_path_is_the_dequantized_product("BF16", QuantDot::Ggml);
}

#[test]
fn quant_dot_f32_gives_the_bits_of_dequantizing_at_load() {
    for f in ["Q8_0", "Q4_K_M", "Q5_1"] {
        assert_f32_path_is_the_dequantized_product(f, QuantDot::F32);
    }
}
