//! Every CUDA kernel compiles to PTX with NVRTC, for every storage type, without a GPU.
//!
//! NVRTC comes from the PyPI wheel `nvidia-cuda-nvrtc` (13.0 line) that runners/setup.sh
//! unpacks into the cache and names in `PARITYBENCH_NVRTC_LIB`; this test puts that folder on
//! the loader's path for itself (cudarc loads libnvrtc by name). Without NVRTC the test
//! fails and says how to install it (set `PARITYBENCH_SKIP_NVRTC=1` to skip it knowingly).

use paritybench::engine::backend::cuda::kernels::{self, StorageType};
use paritybench::engine::backend::cuda::library_loads;

/// Makes libnvrtc loadable by name: `dlopen` by full path first, so later loads by soname
/// find the already loaded library.
fn load_nvrtc() -> bool {
    if library_loads(&["libnvrtc.so.13"]) {
        return true;
    }
    let Ok(dir) = std::env::var("PARITYBENCH_NVRTC_LIB") else { return false };
    for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
        let path = std::ffi::CString::new(format!("{dir}/{name}")).expect("no NUL in a path");
        // SAFETY: a valid C string; the handle is kept open for the life of the test process
        // (so the soname stays resolvable), never closed.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if h.is_null() {
            return false;
        }
    }
    library_loads(&["libnvrtc.so.13"])
}

#[test]
fn every_kernel_compiles_for_every_type_and_arch() {
    if std::env::var("PARITYBENCH_SKIP_NVRTC").is_ok_and(|v| v == "1") {
        eprintln!("PARITYBENCH_SKIP_NVRTC=1: kernel compilation not checked");
        return;
    }
    assert!(
        load_nvrtc(),
        "NVRTC cannot be loaded: run `eval \"$(bash runners/setup.sh)\"` (it installs the nvidia-cuda-nvrtc \
         13.0 wheel and exports PARITYBENCH_NVRTC_LIB), or set PARITYBENCH_SKIP_NVRTC=1"
    );
    for arch in ["compute_80", "compute_90"] {
        for ty in StorageType::ALL {
            let ptx = kernels::compile_ptx(ty, arch).unwrap_or_else(|e| panic!("{ty:?} for {arch}: {e}"));
            let text = ptx.to_src();
            for k in kernels::KERNELS {
                assert!(text.contains(&format!(".entry {k}(")), "{ty:?}/{arch}: no entry {k} in the PTX");
            }
            assert!(!text.contains("atom."), "{ty:?}/{arch}: an atomic in the PTX (reductions must be repeatable)");
        }
    }
}

#[test]
fn a_kernel_that_does_not_compile_is_an_error_naming_the_line() {
    if std::env::var("PARITYBENCH_SKIP_NVRTC").is_ok_and(|v| v == "1") || !load_nvrtc() {
        return; // covered by the assertion of the test above
    }
    let bad = cudarc::nvrtc::compile_ptx("extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }");
    let e = format!("{:?}", bad.expect_err("must not compile"));
    assert!(e.contains("undefined_name") || e.contains("CompileError"), "{e}");
}

/// The PTX text of one entry: from `.entry NAME(` to the next entry (or the end).
fn entry<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx.find(&format!(".entry {name}(")).unwrap_or_else(|| panic!("no entry {name}"));
    let rest = &ptx[start + 1..];
    let end = rest.find(".entry ").map_or(ptx.len(), |e| start + 1 + e);
    &ptx[start..end]
}

/// The GGUF dequantization kernels compile for every storage type, and NVRTC fused none of
/// their multiplies and adds into an FMA (the host evaluates them with two roundings, so a
/// contracted one could differ in the last bit: bit-exactness needs the `_rn` intrinsics).
#[test]
fn dequant_kernels_compile_without_contraction() {
    if std::env::var("PARITYBENCH_SKIP_NVRTC").is_ok_and(|v| v == "1") {
        eprintln!("PARITYBENCH_SKIP_NVRTC=1: kernel compilation not checked");
        return;
    }
    assert!(load_nvrtc(), "NVRTC cannot be loaded (see every_kernel_compiles_for_every_type_and_arch)");
    use paritybench::engine::backend::cuda::dequant;
    for ty in StorageType::ALL {
        let ptx = kernels::compile_ptx(ty, "compute_90").unwrap_or_else(|e| panic!("{ty:?}: {e}"));
        let text = ptx.to_src();
        for (ggml, k) in dequant::KINDS {
            let body = entry(&text, k);
            assert!(!body.contains("fma."), "{ty:?}: {k} ({}) has a fused multiply-add", ggml.name());
            if ty == StorageType::F16 {
                assert!(body.contains("cvt.rn.f16.f32"), "{k}: f16 output is not rounded to nearest even");
            }
        }
        // the offset types keep both roundings
        for k in ["pb_dequant_q4_1", "pb_dequant_q5_1", "pb_dequant_q4_k", "pb_dequant_q5_k"] {
            let body = entry(&text, k);
            assert!(body.contains("mul.rn.f32"), "{ty:?}: {k} has no rounded multiply");
            assert!(body.contains("add.rn.f32") || body.contains("sub.rn.f32"), "{ty:?}: {k} has no rounded add");
        }
    }
}
