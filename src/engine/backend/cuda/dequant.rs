//! GGUF weights dequantized on the GPU: the file's blocks are uploaded as stored and the
//! `pb_dequant_*` kernels of `kernels.cu` write them out in the compute dtype.
//!
//! The device values are the host's: each kernel evaluates the expressions of
//! [`crate::engine::gguf::quants`] (bit-exact vs gguf-py) in the same order, in f32, with no
//! multiply-add contraction, and stores them with the same round-to-nearest-even as
//! [`StorageType::encode`]. [`check_tensor`] compares the two bit for bit on a real GPU
//! (`runner engine dequant-check`); the plan below (which kernel, how many blocks, the launch)
//! is plain arithmetic, tested without one, and `tests/cuda_dequant_source.rs` runs the kernels'
//! source as C++ against the host on random blocks. One known difference: a NaN scale makes the
//! GPU's arithmetic return its canonical NaN where the host keeps the payload (F32/F16/BF16
//! tensors, which need no arithmetic, keep payloads on both); llama-quantize writes no NaN
//! scales, and no real file checked had one.

use cudarc::driver::{LaunchConfig, PushKernelArg, result as cur};

use super::kernels::{Geometry, StorageType};
use super::{BackendError, DevBuf, Gpu, cuda_err};
use crate::engine::gguf::GgmlType;
use crate::engine::gguf::quants;
use crate::engine::weights::RawTensor;

/// Each storage type the device dequantizes, with its kernel.
pub const KINDS: [(GgmlType, &str); 11] = [
    (GgmlType::F32, "pb_dequant_f32"),
    (GgmlType::F16, "pb_dequant_f16"),
    (GgmlType::Bf16, "pb_dequant_bf16"),
    (GgmlType::Q8_0, "pb_dequant_q8_0"),
    (GgmlType::Q4_0, "pb_dequant_q4_0"),
    (GgmlType::Q4_1, "pb_dequant_q4_1"),
    (GgmlType::Q5_0, "pb_dequant_q5_0"),
    (GgmlType::Q5_1, "pb_dequant_q5_1"),
    (GgmlType::Q4K, "pb_dequant_q4_k"),
    (GgmlType::Q5K, "pb_dequant_q5_k"),
    (GgmlType::Q6K, "pb_dequant_q6_k"),
];

/// Threads per block of the dequantization kernels.
pub const DEQUANT_BLOCK: u32 = 256;

/// The most blocks one dequantization launch uses; the kernels loop (grid-stride) past it.
pub const DEQUANT_MAX_GRID: u32 = 1 << 20;

/// Why a tensor's bytes cannot be dequantized on the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("storage type {storage_type} has no device dequantization (supported: {})", supported().join(", "))]
    Unsupported { storage_type: String },
    #[error(
        "{storage_type}: {n_bytes} bytes do not hold shape {shape:?} ({block_size} elements per block of {type_size} bytes)"
    )]
    Size { storage_type: String, shape: Vec<usize>, n_bytes: usize, block_size: usize, type_size: usize },
    #[error("the file's shape {shape:?} does not hold the {expected} elements the model loaded")]
    Shape { shape: Vec<usize>, expected: usize },
}

/// The names of the storage types in [`KINDS`].
pub fn supported() -> Vec<&'static str> {
    KINDS.iter().map(|(t, _)| t.name()).collect()
}

/// One tensor's dequantization launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DequantPlan {
    pub ggml_type: GgmlType,
    pub kernel: &'static str,
    pub n_elements: usize,
    pub n_blocks: usize,
    pub geometry: Geometry,
}

/// The launch for `n_bytes` of `storage_type` holding a tensor of `shape`: the sizes must be
/// whole blocks exactly.
pub fn plan(storage_type: &str, shape: &[usize], n_bytes: usize) -> Result<DequantPlan, DequantError> {
    let (ggml_type, kernel) = KINDS
        .iter()
        .copied()
        .find(|(t, _)| t.name() == storage_type)
        .ok_or_else(|| DequantError::Unsupported { storage_type: storage_type.to_string() })?;
    let (bs, ts) = ggml_type.block_layout();
    let (block_size, type_size) = (bs as usize, ts as usize);
    let n_elements: usize = shape.iter().product();
    let size_err = || DequantError::Size {
        storage_type: storage_type.to_string(),
        shape: shape.to_vec(),
        n_bytes,
        block_size,
        type_size,
    };
    if !n_elements.is_multiple_of(block_size) {
        return Err(size_err());
    }
    let n_blocks = n_elements / block_size;
    if n_blocks.checked_mul(type_size) != Some(n_bytes) {
        return Err(size_err());
    }
    let grid = (n_elements as u64).div_ceil(u64::from(DEQUANT_BLOCK)).min(u64::from(DEQUANT_MAX_GRID)) as u32;
    Ok(DequantPlan {
        ggml_type,
        kernel,
        n_elements,
        n_blocks,
        geometry: Geometry { grid: (grid.max(1), 1, 1), block: (DEQUANT_BLOCK, 1, 1), shared_bytes: 0 },
    })
}

/// Uploads `raw`'s bytes, dequantizes them on the device into `ty`, and returns the buffer
/// (`n_elements` values of `ty`, the element order of the host's `load_f32`). `name` is for
/// messages.
pub fn dequantize(g: &mut Gpu, ty: StorageType, name: &str, raw: &RawTensor<'_>) -> Result<DevBuf, BackendError> {
    let p = plan(raw.storage_type, &raw.shape, raw.bytes.len())
        .map_err(|source| BackendError::Dequant { tensor: name.to_string(), source })?;
    let src = g.alloc(raw.bytes.len())?;
    // SAFETY: `src` holds `raw.bytes.len()` bytes; the copy is synchronous.
    unsafe { cur::memcpy_htod_sync(src.ptr, raw.bytes) }.map_err(|e| cuda_err("cuMemcpyHtoD", e))?;
    let out = g.alloc(p.n_elements * ty.size())?;
    let n = p.n_elements as i64;
    let stream = g.stream.clone();
    let f = g.func(ty, p.kernel)?;
    let mut b = stream.launch_builder(f);
    b.arg(&out.ptr);
    b.arg(&src.ptr);
    b.arg(&n);
    let cfg = LaunchConfig { grid_dim: p.geometry.grid, block_dim: p.geometry.block, shared_mem_bytes: 0 };
    // SAFETY: the kernel takes (T* dst, const unsigned char* src, long n): `out` holds
    // `n` elements of `ty`, `src` holds the `n_blocks` whole blocks those elements come from
    // (checked by `plan`), and the grid-stride loop touches no element at or past `n`.
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err(p.kernel, e))?;
    // the upload buffer is freed only after the kernel has read it
    g.stream.synchronize().map_err(|e| cuda_err("cuStreamSynchronize", e))?;
    g.release(src);
    Ok(out)
}

/// What [`check_tensor`] found for one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorCheck {
    pub name: String,
    pub storage_type: &'static str,
    pub n_elements: usize,
    /// Per compute type: elements whose device bits differ from the host's.
    pub mismatches: Vec<(StorageType, usize)>,
    /// The first differing element: (type, index, host bits, device bits).
    pub first: Option<(StorageType, usize, u32, u32)>,
}

/// Dequantizes `raw` on the host ([`quants::dequantize`]) and on the device in every
/// [`StorageType`], and counts the elements whose bits differ (for f16 / bf16 the host's f32
/// values are rounded by [`StorageType::encode`], the path of host-dequantized uploads).
pub fn check_tensor(g: &mut Gpu, name: &str, raw: &RawTensor<'_>) -> Result<TensorCheck, BackendError> {
    let p = plan(raw.storage_type, &raw.shape, raw.bytes.len())
        .map_err(|source| BackendError::Dequant { tensor: name.to_string(), source })?;
    let mut host = vec![0f32; p.n_elements];
    quants::dequantize(p.ggml_type, raw.bytes, &mut host).map_err(|e| BackendError::Dequant {
        tensor: name.to_string(),
        source: DequantError::Unsupported { storage_type: format!("{} (host: {e})", raw.storage_type) },
    })?;
    let mut check = TensorCheck {
        name: name.to_string(),
        storage_type: p.ggml_type.name(),
        n_elements: p.n_elements,
        mismatches: Vec::new(),
        first: None,
    };
    for ty in StorageType::ALL {
        let want = ty.encode(&host);
        let buf = dequantize(g, ty, name, raw)?;
        let mut got = vec![0u8; want.len()];
        // SAFETY: `buf` holds `want.len()` bytes (n_elements of `ty`); synchronised below
        // before `got` is read.
        unsafe { cur::memcpy_dtoh_async(&mut got, buf.ptr, g.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemcpyDtoH", e))?;
        g.stream.synchronize().map_err(|e| cuda_err("cuStreamSynchronize", e))?;
        g.release(buf);
        let (n, first) = diff_bits(ty, &want, &got);
        check.mismatches.push((ty, n));
        if check.first.is_none() {
            check.first = first.map(|(i, h, d)| (ty, i, h, d));
        }
    }
    Ok(check)
}

/// Elements of `ty` whose bytes differ, and the first one (index, want bits, got bits).
pub fn diff_bits(ty: StorageType, want: &[u8], got: &[u8]) -> (usize, Option<(usize, u32, u32)>) {
    let size = ty.size();
    let bits = |c: &[u8]| c.iter().rev().fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    let mut n = 0;
    let mut first = None;
    for (i, (w, g)) in want.chunks_exact(size).zip(got.chunks_exact(size)).enumerate() {
        if w != g {
            n += 1;
            first.get_or_insert((i, bits(w), bits(g)));
        }
    }
    n += want.len().abs_diff(got.len()) / size;
    (n, first)
}

#[cfg(test)]
mod tests {
    use super::super::kernels;
    use super::*;

    #[test]
    fn every_type_the_host_dequantizes_has_a_listed_kernel() {
        for (t, k) in KINDS {
            assert!(quants::is_supported(t), "{t:?}");
            assert!(kernels::KERNELS.contains(&k), "{k} is not in KERNELS");
            assert!(kernels::SOURCE.contains(&format!("__global__ void {k}(")), "{k} missing from kernels.cu");
        }
        let listed: Vec<&str> = kernels::KERNELS.iter().copied().filter(|k| k.starts_with("pb_dequant_")).collect();
        assert_eq!(listed.len(), KINDS.len(), "{listed:?}");
    }

    #[test]
    fn plans_follow_the_block_layouts() {
        // [out, in] = [64, 512]: 32768 elements
        let cases = [
            ("F32", 4 * 32768, 32768, "pb_dequant_f32"),
            ("F16", 2 * 32768, 32768, "pb_dequant_f16"),
            ("BF16", 2 * 32768, 32768, "pb_dequant_bf16"),
            ("Q8_0", 34 * 1024, 1024, "pb_dequant_q8_0"),
            ("Q4_0", 18 * 1024, 1024, "pb_dequant_q4_0"),
            ("Q4_1", 20 * 1024, 1024, "pb_dequant_q4_1"),
            ("Q5_0", 22 * 1024, 1024, "pb_dequant_q5_0"),
            ("Q5_1", 24 * 1024, 1024, "pb_dequant_q5_1"),
            ("Q4_K", 144 * 128, 128, "pb_dequant_q4_k"),
            ("Q5_K", 176 * 128, 128, "pb_dequant_q5_k"),
            ("Q6_K", 210 * 128, 128, "pb_dequant_q6_k"),
        ];
        for (name, bytes, blocks, kernel) in cases {
            let p = plan(name, &[64, 512], bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((p.kernel, p.n_blocks, p.n_elements), (kernel, blocks, 32768), "{name}");
            assert_eq!(p.ggml_type.name(), name);
            assert_eq!(p.geometry.grid, (128, 1, 1), "{name}: one thread per element");
            assert_eq!(p.geometry.block, (DEQUANT_BLOCK, 1, 1));
            // one byte more or less is not whole blocks
            assert!(matches!(plan(name, &[64, 512], bytes + 1), Err(DequantError::Size { .. })), "{name}");
            assert!(matches!(plan(name, &[64, 512], bytes - 1), Err(DequantError::Size { .. })), "{name}");
        }
    }

    #[test]
    fn shapes_that_are_not_whole_blocks_and_unknown_types_are_errors() {
        let e = plan("Q4_K", &[3, 100], 144).unwrap_err();
        assert!(matches!(e, DequantError::Size { block_size: 256, type_size: 144, .. }), "{e}");
        assert!(e.to_string().contains("[3, 100]"), "{e}");
        let e = plan("Q3_K", &[256], 110).unwrap_err();
        assert_eq!(e, DequantError::Unsupported { storage_type: "Q3_K".into() });
        assert!(e.to_string().contains("Q6_K"), "the message lists the supported types: {e}");
        assert!(plan("IQ4_NL", &[32], 18).is_err());
    }

    #[test]
    fn large_tensors_are_covered_by_a_grid_stride_loop() {
        // Qwen3-4B's embedding: 151936 x 2560 in Q6_K
        let n = 151_936usize * 2560;
        let p = plan("Q6_K", &[151_936, 2560], n / 256 * 210).expect("whole blocks");
        assert_eq!(p.geometry.grid.0, DEQUANT_MAX_GRID);
        assert!(u64::from(p.geometry.grid.0) * u64::from(DEQUANT_BLOCK) <= n as u64);
        let small = plan("F32", &[3], 12).expect("three f32");
        assert_eq!(small.geometry.grid, (1, 1, 1));
    }

    #[test]
    fn diff_bits_counts_differing_elements() {
        let want = StorageType::F16.encode(&[1.0, 2.0, 3.0]);
        let mut got = want.clone();
        got[2] ^= 1; // element 1
        let (n, first) = diff_bits(StorageType::F16, &want, &got);
        assert_eq!(n, 1);
        let (i, w, g) = first.expect("one difference");
        assert_eq!((i, w ^ g), (1, 1));
        assert_eq!(w, u32::from(half::f16::from_f32(2.0).to_bits()));
        assert_eq!(diff_bits(StorageType::F32, &want, &want), (0, None));
    }
}
