//! The CUDA kernels' source, its compilation by NVRTC, and the launch geometry of each kernel.
//!
//! One source file (`kernels.cu`) is compiled once per storage type ([`StorageType`]) at run
//! time, so the binary needs no CUDA toolkit at build time and the same kernels run on any
//! GPU the driver supports. The geometry functions are plain arithmetic, tested without a GPU;
//! [`compile_ptx`] is tested wherever NVRTC can be loaded (CI installs it from PyPI).

use cudarc::nvrtc::{CompileOptions, Ptx};

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Every kernel the forward pass launches (the `extern "C"` names in [`SOURCE`]).
pub const KERNELS: &[&str] = &[
    "pb_embed",
    "pb_rmsnorm",
    "pb_rope",
    "pb_attention",
    "pb_swiglu",
    "pb_add",
    "pb_add_bias",
    "pb_moe_route",
    "pb_gather_rows",
    "pb_scatter_add_scaled",
    "pb_gemv",
    "pb_moe_gate_up",
    "pb_moe_down",
    "pb_moe_combine",
    "pb_spin",
    "pb_dequant_f32",
    "pb_dequant_f16",
    "pb_dequant_bf16",
    "pb_dequant_q8_0",
    "pb_dequant_q4_0",
    "pb_dequant_q4_1",
    "pb_dequant_q5_0",
    "pb_dequant_q5_1",
    "pb_dequant_q4_k",
    "pb_dequant_q5_k",
    "pb_dequant_q6_k",
];

/// Threads per block of the reducing kernels; `PB_BLOCK` in [`SOURCE`].
pub const BLOCK: u32 = 256;

/// Threads per block of the element-wise kernels.
pub const ELEMWISE: u32 = 256;

/// Warps (output columns) per block of `pb_gemv`; `PB_GEMV_WARPS` in [`SOURCE`].
pub const GEMV_WARPS: u32 = 4;

/// The most rows `pb_gemv` multiplies at once (`PB_GEMV_ROWS`); more go to cuBLAS.
pub const GEMV_ROWS: usize = 8;

/// The most output columns one warp of `pb_gemv` takes (`PB_GEMV_COLS`).
pub const GEMV_COLS: usize = 4;

/// The largest head dimension `pb_attention` takes (`PB_MAX_HD`).
pub const MAX_HEAD_DIM: usize = 256;

/// The most experts `pb_moe_route` handles (`PB_MAX_EXPERTS`: its probabilities in shared memory).
pub const MAX_EXPERTS: usize = 1024;

/// How weights and activations are stored on the GPU. Arithmetic is f32 in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageType {
    F32,
    F16,
    Bf16,
}

impl StorageType {
    pub const ALL: [StorageType; 3] = [StorageType::F32, StorageType::F16, StorageType::Bf16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StorageType::F32 => 4,
            StorageType::F16 | StorageType::Bf16 => 2,
        }
    }

    /// The `#define` that selects this type in [`SOURCE`].
    pub fn define(self) -> &'static str {
        match self {
            StorageType::F32 => "PB_F32",
            StorageType::F16 => "PB_F16",
            StorageType::Bf16 => "PB_BF16",
        }
    }

    /// The name a manifest records (`compute_dtype`).
    pub fn as_str(self) -> &'static str {
        match self {
            StorageType::F32 => "f32",
            StorageType::F16 => "f16",
            StorageType::Bf16 => "bf16",
        }
    }

    /// f32 values in this type's bytes, rounded to nearest even.
    pub fn encode(self, src: &[f32]) -> Vec<u8> {
        match self {
            StorageType::F32 => bytemuck::cast_slice(src).to_vec(),
            StorageType::F16 => {
                let v: Vec<half::f16> = src.iter().map(|&x| half::f16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            StorageType::Bf16 => {
                let v: Vec<half::bf16> = src.iter().map(|&x| half::bf16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
        }
    }

    /// This type's bytes as f32 values (exact).
    pub fn decode(self, src: &[u8]) -> Vec<f32> {
        match self {
            StorageType::F32 => src.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            StorageType::F16 => src.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            StorageType::Bf16 => {
                src.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
        }
    }
}

/// The NVRTC virtual architecture for a compute capability (PTX for it runs on it and on
/// every later GPU). Capabilities below 7.5 are not supported by NVRTC 13.
pub fn arch_for(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (m, _) if m >= 12 => "compute_120",
        (10, _) | (11, _) => "compute_100",
        (9, _) => "compute_90",
        (8, n) if n >= 9 => "compute_89",
        (8, n) if n >= 6 => "compute_86",
        (8, _) => "compute_80",
        _ => "compute_75",
    }
}

/// Compiles [`SOURCE`] for `ty` and `arch` (e.g. `compute_90`) to PTX. Precise division,
/// square root and no flush-to-zero, so results follow IEEE f32 as the CPU kernels do.
pub fn compile_ptx(ty: StorageType, arch: &'static str) -> Result<Ptx, String> {
    let src = format!("#define {}\n{SOURCE}", ty.define());
    let opts = CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(true),
        arch: Some(arch),
        name: Some(format!("paritybench_{}.cu", ty.as_str())),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| format!("{e:?}"))
}

/// A launch's grid, block and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

fn blocks(n: usize, per: u32) -> u32 {
    (n as u64).div_ceil(per as u64) as u32
}

/// `pb_embed`, `pb_gather_rows`, `pb_scatter_add_scaled`, `pb_add_bias`: columns of `width`
/// in blocks of [`ELEMWISE`], one grid row per data row.
pub fn rows_geometry(rows: usize, width: usize) -> Geometry {
    Geometry { grid: (blocks(width, ELEMWISE), rows as u32, 1), block: (ELEMWISE, 1, 1), shared_bytes: 0 }
}

/// `pb_swiglu`, `pb_add`: `n` elements.
pub fn elementwise_geometry(n: usize) -> Geometry {
    Geometry { grid: (blocks(n, ELEMWISE), 1, 1), block: (ELEMWISE, 1, 1), shared_bytes: 0 }
}

/// `pb_rmsnorm`: one block per row.
pub fn rmsnorm_geometry(rows: usize) -> Geometry {
    Geometry { grid: (rows as u32, 1, 1), block: (BLOCK, 1, 1), shared_bytes: 0 }
}

/// `pb_rope`: one block per (head, row), one thread per rotated pair.
pub fn rope_geometry(t: usize, n_heads: usize, head_dim: usize) -> Geometry {
    Geometry { grid: (n_heads as u32, t as u32, 1), block: ((head_dim / 2) as u32, 1, 1), shared_bytes: 0 }
}

/// `pb_attention`: one block per (head, query row); the scores of the longest row in shared
/// memory (`pos0 + t` f32).
pub fn attention_geometry(t: usize, pos0: usize, n_heads: usize) -> Geometry {
    Geometry { grid: (n_heads as u32, t as u32, 1), block: (BLOCK, 1, 1), shared_bytes: ((pos0 + t) * 4) as u32 }
}

/// The longest sequence `pb_attention` can take with `shared_limit` bytes of shared memory
/// per block (beside the scores: its reduction buffer of [`BLOCK`] f32, the query of
/// [`MAX_HEAD_DIM`] f32 and the p.v partial sums of [`BLOCK`] x 8 f32).
pub fn max_attention_keys(shared_limit: usize) -> usize {
    shared_limit.saturating_sub((BLOCK as usize * 9 + MAX_HEAD_DIM) * 4) / 4
}

/// Output columns per warp of `pb_gemv` for `n` columns on a GPU of `sms` multiprocessors:
/// the most (up to [`GEMV_COLS`]) that still give every multiprocessor two blocks.
pub fn gemv_cols(n: usize, sms: usize) -> usize {
    [4, 2].into_iter().find(|&c| n.div_ceil(GEMV_WARPS as usize * c) >= 2 * sms).unwrap_or(1)
}

/// `pb_gemv`: `cols` output columns per warp, `n` columns in all.
pub fn gemv_geometry(n: usize, cols: usize) -> Geometry {
    Geometry { grid: (blocks(n, GEMV_WARPS * cols as u32), 1, 1), block: (32 * GEMV_WARPS, 1, 1), shared_bytes: 0 }
}

/// `pb_moe_gate_up`, `pb_moe_down`: a warp per output column of each of `k` experts.
pub fn moe_geometry(columns: usize, k: usize) -> Geometry {
    Geometry { grid: (blocks(columns, GEMV_WARPS), k as u32, 1), block: (32 * GEMV_WARPS, 1, 1), shared_bytes: 0 }
}

/// `pb_spin`: one thread.
pub fn spin_geometry() -> Geometry {
    Geometry { grid: (1, 1, 1), block: (1, 1, 1), shared_bytes: 0 }
}

/// `pb_moe_route`: one block per row.
pub fn route_geometry(t: usize) -> Geometry {
    Geometry { grid: (t as u32, 1, 1), block: (BLOCK, 1, 1), shared_bytes: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_is_in_the_source_and_vice_versa() {
        for k in KERNELS {
            assert!(SOURCE.contains(&format!("__global__ void {k}(")), "{k} missing from kernels.cu");
        }
        let defined = SOURCE.matches("extern \"C\" __global__ void ").count();
        assert_eq!(defined, KERNELS.len(), "kernels.cu defines {defined} kernels, KERNELS lists {}", KERNELS.len());
        assert!(SOURCE.contains(&format!("#define PB_BLOCK {BLOCK}")));
        assert!(SOURCE.contains(&format!("#define PB_GEMV_WARPS {GEMV_WARPS}")));
        assert!(SOURCE.contains(&format!("#define PB_GEMV_ROWS {GEMV_ROWS}")));
        assert!(SOURCE.contains(&format!("#define PB_MAX_HD {MAX_HEAD_DIM}")));
        assert!(SOURCE.contains(&format!("#define PB_GEMV_COLS {GEMV_COLS}")));
        assert!(SOURCE.contains(&format!("#define PB_MAX_EXPERTS {MAX_EXPERTS}")));
        for op in ["atomicAdd(", "atomicCAS(", "atomicMax(", "atomicExch(", "atom."] {
            assert!(!SOURCE.contains(op), "reductions must not use atomics (repeatability): {op}");
        }
    }

    #[test]
    fn geometry_covers_every_element_once() {
        let g = elementwise_geometry(1000);
        assert_eq!(g.grid.0 * g.block.0, 1024);
        assert_eq!(elementwise_geometry(256).grid.0, 1);
        let r = rows_geometry(7, 1025);
        assert_eq!((r.grid.0, r.grid.1), (5, 7));
        assert_eq!(rope_geometry(3, 16, 128), Geometry { grid: (16, 3, 1), block: (64, 1, 1), shared_bytes: 0 });
        let a = attention_geometry(5, 100, 8);
        assert_eq!((a.grid, a.shared_bytes), ((8, 5, 1), 420));
        assert_eq!(max_attention_keys(48 * 1024), 9728);
        assert_eq!(route_geometry(65).grid.0, 65);
        assert_eq!(rmsnorm_geometry(9).grid.0, 9);
        let v = gemv_geometry(1025, 1);
        assert_eq!((v.grid.0, v.block.0), (257, 128), "a warp for each of 1025 columns");
        assert_eq!(gemv_geometry(1025, 4).grid.0, 65, "4 columns per warp, 16 per block");
        // H200: 132 multiprocessors
        assert_eq!(gemv_cols(1024, 132), 1);
        assert_eq!(gemv_cols(4096, 132), 2);
        assert_eq!(gemv_cols(9728, 132), 4);
        assert_eq!(gemv_cols(151_936, 132), 4);
        assert_eq!(moe_geometry(768, 8).grid, (192, 8, 1));
    }

    #[test]
    fn storage_types_round_trip_and_round_to_nearest_even() {
        let x = [1.0f32, -2.5, 3.140625, 1.0e-3, 65504.0];
        for ty in StorageType::ALL {
            let bytes = ty.encode(&x);
            assert_eq!(bytes.len(), x.len() * ty.size());
            let back = ty.decode(&bytes);
            assert_eq!(back[..2], x[..2], "{ty:?}");
            assert_eq!(ty.decode(&ty.encode(&back)), back, "{ty:?}: decode . encode is the identity on its values");
        }
        // 1 + 2^-11 is halfway between two f16 values: ties to even gives 1.0
        assert_eq!(StorageType::F16.decode(&StorageType::F16.encode(&[1.0 + 2f32.powi(-11)]))[0], 1.0);
        assert_eq!(StorageType::Bf16.decode(&StorageType::Bf16.encode(&[1.0 + 2f32.powi(-8)]))[0], 1.0);
    }

    #[test]
    fn arch_follows_the_compute_capability() {
        assert_eq!(arch_for(9, 0), "compute_90");
        assert_eq!(arch_for(8, 0), "compute_80");
        assert_eq!(arch_for(8, 6), "compute_86");
        assert_eq!(arch_for(8, 9), "compute_89");
        assert_eq!(arch_for(10, 0), "compute_100");
        assert_eq!(arch_for(7, 5), "compute_75");
    }
}
