//! Weight matrices in the type their file stores, and the product `x · Wᵀ` over them.
//!
//! A GGUF weight stays memory-mapped in its ggml type; a safetensors weight (or a small
//! GGUF tensor such as a norm) is f32 in memory. [`matmul`] multiplies f32 activations
//! with either, by one of two paths ([`QuantDot`]):
//! - **f32** (every float type, and quantized types when asked for): each task widens or
//!   dequantizes its block of weight rows into f32 and runs the f32 kernel
//!   ([`kernels::matmul_t_rows`]); the result is bit-identical to dequantizing the whole
//!   matrix at load and calling [`kernels::matmul_t`] (widening f16/bf16 is exact, and the
//!   dequantizers are block-wise and deterministic), so an F16 file gives the bits it gave
//!   before weights stayed mapped.
//! - **ggml** (the default for quantized types): each activation row is quantized to the
//!   weight type's `vec_dot_type` and multiplied by integer block dot products, as
//!   llama.cpp's CPU backend does ([`super::quant_dot`], which says what matches exactly).

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use super::gguf::{GgmlType, MappedBytes, quants};
use super::kernels;
use super::quant_dot::{self, Batch, QuantRows, SimdLevel, VecDotType};

/// How matmuls with quantized weights compute (the request's `options.quant_dot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantDot {
    /// Activations quantized to 8 bits as ggml-cpu does; integer block dot products
    /// (llama.cpp-compatible).
    #[default]
    Ggml,
    /// Weights dequantized to f32, activations and accumulation in f32.
    F32,
}

impl QuantDot {
    pub fn parse(s: &str) -> Option<QuantDot> {
        match s {
            "ggml" => Some(QuantDot::Ggml),
            "f32" => Some(QuantDot::F32),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QuantDot::Ggml => "ggml",
            QuantDot::F32 => "f32",
        }
    }
}

/// Where a matrix's values live.
#[derive(Debug, Clone)]
pub enum Storage {
    /// Row-major f32 in memory.
    F32(Vec<f32>),
    /// Rows of ggml blocks of `ty`, inside a mapped file.
    Mapped { ty: GgmlType, bytes: MappedBytes },
}

/// A row-major matrix `[rows, cols]` (a linear layer's `[out, in]`; stacked experts as
/// `[E * out, in]`).
#[derive(Debug, Clone)]
pub struct Matrix {
    pub storage: Storage,
    pub rows: usize,
    pub cols: usize,
}

/// A run of rows of a [`Matrix`] (one expert of a stacked tensor, or all of it).
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: RowData<'a>,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Debug, Clone, Copy)]
enum RowData<'a> {
    F32(&'a [f32]),
    Blocks { ty: GgmlType, bytes: &'a [u8], row_bytes: usize },
}

impl Matrix {
    /// An f32 matrix; `data.len()` must be `rows * cols`.
    pub fn f32(data: Vec<f32>, rows: usize, cols: usize) -> Matrix {
        debug_assert_eq!(data.len(), rows * cols);
        Matrix { storage: Storage::F32(data), rows, cols }
    }

    /// The storage type: `F32` or the ggml type's name.
    pub fn type_name(&self) -> &'static str {
        match &self.storage {
            Storage::F32(_) => "F32",
            Storage::Mapped { ty, .. } => ty.name(),
        }
    }

    /// Whether the matrix is stored in a quantized ggml type (one with a `vec_dot_type`).
    pub fn is_quantized(&self) -> bool {
        matches!(&self.storage, Storage::Mapped { ty, .. } if VecDotType::of(*ty).is_some())
    }

    /// Bytes of one row in memory.
    pub fn row_bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(_) => self.cols * 4,
            Storage::Mapped { ty, .. } => row_bytes(*ty, self.cols),
        }
    }

    /// The whole matrix.
    pub fn view(&self) -> MatRef<'_> {
        self.rows_view(0..self.rows)
    }

    /// Rows `r` of the matrix.
    pub fn rows_view(&self, r: Range<usize>) -> MatRef<'_> {
        let data = match &self.storage {
            Storage::F32(v) => RowData::F32(&v[r.start * self.cols..r.end * self.cols]),
            Storage::Mapped { ty, bytes } => {
                let rb = row_bytes(*ty, self.cols);
                RowData::Blocks { ty: *ty, bytes: &bytes[r.start * rb..r.end * rb], row_bytes: rb }
            }
        };
        MatRef { data, rows: r.len(), cols: self.cols }
    }

    /// Row `r` as f32 (dequantized if stored quantized, as ggml's `get_rows` does).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.rows_view(r..r + 1).rows_f32(0..1, out);
    }

    /// Every value as f32: borrowed when stored as f32, else dequantized (in parallel).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match &self.storage {
            Storage::F32(v) => Cow::Borrowed(v),
            Storage::Mapped { ty, bytes } => {
                let mut out = vec![0.0f32; self.rows * self.cols];
                // The loader checked the type and the byte count of every mapped tensor.
                let ok = quants::dequantize(*ty, bytes, &mut out);
                debug_assert!(ok.is_ok());
                Cow::Owned(out)
            }
        }
    }
}

/// Bytes of a row of `cols` elements of `ty`.
fn row_bytes(ty: GgmlType, cols: usize) -> usize {
    let (bs, ts) = ty.block_layout();
    cols / bs as usize * ts as usize
}

impl MatRef<'_> {
    /// Rows `r` of this view as f32 into `out` (`[r.len(), cols]`), on the calling thread.
    fn rows_f32(&self, r: Range<usize>, out: &mut [f32]) {
        let k = self.cols;
        match self.data {
            RowData::F32(v) => out.copy_from_slice(&v[r.start * k..r.end * k]),
            RowData::Blocks { ty, bytes, row_bytes } => {
                let bytes = &bytes[r.start * row_bytes..r.end * row_bytes];
                // F16: F16C's widening where the CPU has it (exact; it differs from
                // `dequantize` only by quieting a signalling NaN).
                if ty == GgmlType::F16
                    && let Ok(h) = bytemuck::try_cast_slice::<u8, half::f16>(bytes)
                {
                    half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, out);
                    return;
                }
                // The loader checked the type and the byte count of every mapped tensor.
                let ok = quants::dequantize_seq(ty, bytes, out);
                debug_assert!(ok.is_ok());
            }
        }
    }

    /// The activation type the ggml path quantizes to, for quantized storage.
    fn vec_dot_type(&self) -> Option<VecDotType> {
        match self.data {
            RowData::F32(_) => None,
            RowData::Blocks { ty, .. } => VecDotType::of(ty),
        }
    }
}

/// Weight rows each task of the ggml path handles (rows are independent; the block only
/// sets the grain of the parallel split).
const QUANT_ROW_BLOCK: usize = 16;

/// The output of [`matmul`]'s ggml path, shared by tasks that fill disjoint columns.
struct SharedOut(*mut f32);

// SAFETY: each task of `matmul_quantized` writes only the output columns of its own block
// of weight rows, and nothing reads `out` during the call.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Writes `v` at element `i`.
    ///
    /// # Safety
    /// `i` is inside the output, and no other thread writes or reads element `i` during the
    /// call (see `SharedOut`).
    unsafe fn put(&self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(i) = v };
    }
}

/// `out = x · Wᵀ`. `x`: `[t, w.cols]`, `out`: `[t, w.rows]`. Every element's value is
/// independent of the blocking and of the thread count; on the ggml path it depends on `t`
/// as ggml's does (the kernel ggml-cpu picks for a batch of `t` rows, see
/// [`quant_dot::dot_rows_batched`]), elsewhere not.
pub fn matmul(out: &mut [f32], x: &[f32], w: MatRef<'_>, t: usize, qd: QuantDot) {
    matmul_op(out, x, w, t, qd, false)
}

/// [`matmul`] for one expert's rows of a MoE layer: ggml's `MUL_MAT_ID`, which takes
/// `gemv` for every row of a repacked weight.
pub fn matmul_expert(out: &mut [f32], x: &[f32], w: MatRef<'_>, t: usize, qd: QuantDot) {
    matmul_op(out, x, w, t, qd, true)
}

fn matmul_op(out: &mut [f32], x: &[f32], w: MatRef<'_>, t: usize, qd: QuantDot, expert: bool) {
    let (k, n) = (w.cols, w.rows);
    match (w.data, w.vec_dot_type(), qd) {
        (RowData::F32(wf), _, _) => kernels::matmul_t(out, x, wf, t, k, n),
        (RowData::Blocks { ty, bytes, row_bytes }, Some(vdt), QuantDot::Ggml) => {
            matmul_quantized(out, x, t, k, n, ty, vdt, bytes, row_bytes, expert)
        }
        _ => kernels::matmul_t_rows(out, x, t, k, n, &|r, buf| w.rows_f32(r, buf)),
    }
}

/// The ggml path: quantize the rows of `x`, then integer dot products per weight row.
#[expect(clippy::too_many_arguments, reason = "one call site; the shapes and the storage of one product")]
fn matmul_quantized(
    out: &mut [f32],
    x: &[f32],
    t: usize,
    k: usize,
    n: usize,
    ty: GgmlType,
    vdt: VecDotType,
    bytes: &[u8],
    row_bytes: usize,
    expert: bool,
) {
    assert!(
        x.len() == t * k && out.len() == t * n && bytes.len() == n * row_bytes,
        "matmul {ty}: x {} out {} bytes {} for t={t} k={k} n={n}",
        x.len(),
        out.len(),
        bytes.len()
    );
    // [t, k / block] activation blocks, quantized row by row (rows are independent).
    let act = if t > 1 {
        let rows: Vec<QuantRows> = x.par_chunks(k).map(|r| QuantRows::quantize(vdt, r, k)).collect();
        concat(rows, vdt)
    } else {
        QuantRows::quantize(vdt, x, k)
    };
    let blocks_per_row = k / vdt.block_size();
    let simd = SimdLevel::detect();
    let shared = SharedOut(out.as_mut_ptr());
    (0..n.div_ceil(QUANT_ROW_BLOCK)).into_par_iter().for_each_init(Vec::new, |tmp: &mut Vec<f32>, blk| {
        let rows = blk * QUANT_ROW_BLOCK..((blk + 1) * QUANT_ROW_BLOCK).min(n);
        tmp.resize(rows.len(), 0.0);
        let w = &bytes[rows.start * row_bytes..rows.end * row_bytes];
        for ti in 0..t {
            // The pair of types was chosen by `VecDotType::of(ty)`, so this cannot fail.
            let ok = quant_dot::dot_rows_batched(ty, w, row_bytes, act.row(ti, blocks_per_row), tmp, simd, Batch { rows: t, row: ti, weight_rows: n, expert });
            debug_assert!(ok.is_ok());
            for (j, &v) in tmp.iter().enumerate() {
                // SAFETY: `ti * n + rows.start + j < t * n = out.len()` (asserted above), and
                // the columns `rows` belong to this task alone (see `SharedOut`).
                unsafe { shared.put(ti * n + rows.start + j, v) };
            }
        }
    });
}

/// Rows quantized one by one, joined in order.
fn concat(rows: Vec<QuantRows>, vdt: VecDotType) -> QuantRows {
    let mut all = QuantRows::quantize(vdt, &[], 0);
    for r in rows {
        match (&mut all, r) {
            (QuantRows::Q8_0(a), QuantRows::Q8_0(b)) => a.extend(b),
            (QuantRows::Q8_1(a), QuantRows::Q8_1(b)) => a.extend(b),
            (QuantRows::Q8K(a), QuantRows::Q8K(b)) => a.extend(b),
            _ => {}
        }
    }
    all
}
