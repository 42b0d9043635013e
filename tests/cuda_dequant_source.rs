//! The GGUF dequantization kernels' source computes what the host computes, checked without
//! a GPU: the `pb_dequant_*` section of kernels.cu is compiled as C++ by the system compiler
//! (a few lines map CUDA's thread indices and `_rn` intrinsics onto plain single-threaded C++
//! with contraction off) and run on random blocks of every type, NaN, infinite and subnormal
//! f16 scales included; the output must equal `quants::dequantize` (bit-exact vs gguf-py) bit
//! for bit. The GPU's own semantics (its intrinsics, its NaN results) are checked on a GPU by
//! `runner engine dequant-check` on real files.
//!
//! Needs a C++ compiler (`c++`, or `$CXX`); without one the test fails under CI and is skipped
//! with a notice elsewhere.

use std::path::Path;
use std::process::Command;

use paritybench::engine::backend::cuda::{dequant, kernels};
use paritybench::engine::gguf::quants;

const SHIM: &str = r#"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
struct Dim { long x; };
static Dim blockIdx{0}, blockDim{1}, gridDim{1}, threadIdx{0};
#define __global__
#define __device__
#define __forceinline__ inline
typedef float T;
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static inline void st(T* p, long i, float v) { p[i] = v; }
"#;

const MAIN: &str = r#"
int main(int argc, char** argv) {
    if (argc != 5) return 2;
    std::string k = argv[1];
    FILE* f = std::fopen(argv[2], "rb");
    if (!f) return 3;
    std::fseek(f, 0, SEEK_END);
    long size = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    std::vector<unsigned char> in(size);
    if (std::fread(in.data(), 1, size, f) != (size_t)size) return 4;
    std::fclose(f);
    long n = std::atol(argv[3]);
    std::vector<float> out(n);
    bool found = false;
#define K(name) if (k == #name) { name(out.data(), in.data(), n); found = true; }
    K(pb_dequant_f32) K(pb_dequant_f16) K(pb_dequant_bf16) K(pb_dequant_q8_0) K(pb_dequant_q4_0)
    K(pb_dequant_q4_1) K(pb_dequant_q5_0) K(pb_dequant_q5_1) K(pb_dequant_q4_k) K(pb_dequant_q5_k)
    K(pb_dequant_q6_k)
    if (!found) return 5;
    FILE* o = std::fopen(argv[4], "wb");
    std::fwrite(out.data(), 4, n, o);
    std::fclose(o);
    return 0;
}
"#;

/// The kernels from the marker on: the dequantization section (it uses only `T` and `st`).
fn dequant_section() -> &'static str {
    let start =
        kernels::SOURCE.find("// ---- GGUF dequantization").expect("the dequantization section marker in kernels.cu");
    &kernels::SOURCE[start..]
}

fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    Command::new(&cxx).arg("--version").output().ok().filter(|o| o.status.success()).map(|_| cxx)
}

/// xorshift64*: random block bytes, fixed seed.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn build(dir: &Path, cxx: &str) -> std::path::PathBuf {
    let src = dir.join("dequant.cpp");
    std::fs::write(&src, format!("{SHIM}\n{}\n{MAIN}", dequant_section())).expect("write the C++ source");
    let exe = dir.join("dequant");
    let out = Command::new(cxx)
        .args(["-O2", "-ffp-contract=off", "-std=c++17", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("run the C++ compiler");
    assert!(
        out.status.success(),
        "kernels.cu's dequantization section does not compile as C++:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

#[test]
fn dequant_kernels_compute_the_host_values_bit_for_bit() {
    let Some(cxx) = compiler() else {
        assert!(std::env::var_os("CI").is_none(), "no C++ compiler (c++ or $CXX) to check the dequantization kernels");
        eprintln!("skipping: no C++ compiler (c++ or $CXX)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = build(dir.path(), &cxx);
    for (i, (ty, kernel)) in dequant::KINDS.into_iter().enumerate() {
        let (bs, ts) = ty.block_layout();
        let n_blocks = if bs == 1 { 40_000 } else { 4096 };
        let raw = random_bytes(n_blocks * ts as usize, 0x9E37_79B9_7F4A_7C15 ^ i as u64);
        let n = n_blocks * bs as usize;
        let mut want = vec![0f32; n];
        quants::dequantize(ty, &raw, &mut want).expect("host dequantization");
        let input = dir.path().join("in.bin");
        let output = dir.path().join("out.bin");
        std::fs::write(&input, &raw).expect("write the blocks");
        let st = Command::new(&exe).arg(kernel).arg(&input).arg(n.to_string()).arg(&output).status().expect("run");
        assert!(st.success(), "{kernel}: {st}");
        let got: Vec<u32> = std::fs::read(&output)
            .expect("read the output")
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got.len(), n, "{kernel}");
        let nan = want.iter().filter(|v| v.is_nan()).count();
        let diff: Vec<usize> = (0..n).filter(|&j| got[j] != want[j].to_bits()).collect();
        assert!(
            diff.is_empty(),
            "{kernel} ({}): {} of {n} elements differ; first [{}]: host {:#010x}, kernel {:#010x}",
            ty.name(),
            diff.len(),
            diff[0],
            want[diff[0]].to_bits(),
            got[diff[0]]
        );
        // random bytes make NaN (and infinite, subnormal) scales: the check covered them
        assert!(nan > 0, "{kernel}: no NaN among {n} random values, so NaN payloads went unchecked");
    }
}

#[test]
fn a_wrong_kernel_is_caught() {
    // the same harness on a deliberately broken Q4_0 (offset 7 instead of 8) must differ:
    // the comparison above is able to fail
    let Some(cxx) = compiler() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dequant_section().replace("(float)(q - 8)", "(float)(q - 7)");
    assert_ne!(broken, dequant_section(), "the Q4_0 expression moved: update this test");
    let src = dir.path().join("dequant.cpp");
    std::fs::write(&src, format!("{SHIM}\n{broken}\n{MAIN}")).expect("write");
    let exe = dir.path().join("dequant");
    let ok = Command::new(&cxx).args(["-O2", "-ffp-contract=off", "-std=c++17", "-o"]).arg(&exe).arg(&src).status();
    assert!(ok.expect("compile").success());
    let raw = random_bytes(18 * 64, 7);
    let mut want = vec![0f32; 32 * 64];
    quants::dequantize(paritybench::engine::gguf::GgmlType::Q4_0, &raw, &mut want).expect("host");
    std::fs::write(dir.path().join("in.bin"), &raw).expect("write");
    let st = Command::new(&exe)
        .args(["pb_dequant_q4_0"])
        .arg(dir.path().join("in.bin"))
        .arg("2048")
        .arg(dir.path().join("out.bin"))
        .status()
        .expect("run");
    assert!(st.success());
    let got = std::fs::read(dir.path().join("out.bin")).expect("read");
    let same = got
        .chunks_exact(4)
        .zip(&want)
        .filter(|(b, w)| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == w.to_bits())
        .count();
    assert!(same < want.len() / 2, "a broken kernel matched the host on {same} of {} elements", want.len());
}
