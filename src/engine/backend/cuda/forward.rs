//! The forward pass on the GPU: the same numbered steps as [`Model::forward`], each a kernel
//! launch or a cuBLAS product on device buffers.
//!
//! Storage and rounding follow HF transformers run in the same dtype: weights and every
//! activation are stored in the compute dtype; each kernel computes in f32 and rounds its
//! result once (RMSNorm rounds the normalised value before the weight multiply, RoPE rounds
//! cos/sin and each product, eager attention rounds scores and probabilities); matrix
//! products accumulate in f32 (`cublasGemmEx`, compute type 32F, so TF32 stays off).
//! With f32 storage every rounding is the identity.
//!
//! MoE: routing (softmax, top-k, renormalisation) runs on the GPU; the per-expert row lists
//! are built on the host from the chosen ids (one small copy per MoE layer), then each expert
//! in index order gathers its rows, runs its SwiGLU with three products and adds its scaled
//! output into the block's output: no atomics, a fixed order, repeatable results.

use cudarc::cublas::sys as blas;
use cudarc::driver::{LaunchConfig, PushKernelArg, result as cur, sys as cu};

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::dequant;
use super::kernels::{self, Geometry, StorageType};
use super::{BackendError, DevBuf, Gpu, cuda_err};
use crate::engine::EngineError;
use crate::engine::kv_cache::KvCache;
use crate::engine::matrix::Matrix;
use crate::engine::model::{FeedForward, ForwardIo, Linear, Model, NameTable, Role};
use crate::engine::weights::WeightSource;
use crate::protocol::CapturePoint;

/// A linear layer on the device.
pub struct DevLinear {
    /// `[out, in]`
    pub w: DevBuf,
    /// `[out]`
    pub b: Option<DevBuf>,
    pub out_features: usize,
    pub in_features: usize,
}

pub struct DevMoe {
    /// `[E, H]`
    pub router: DevLinear,
    /// `[E, I, H]`
    pub gate: DevBuf,
    /// `[E, I, H]`
    pub up: DevBuf,
    /// `[E, H, I]`
    pub down: DevBuf,
    pub n_experts: usize,
    pub top_k: usize,
    pub inter: usize,
    pub renorm: bool,
}

pub enum DevFfn {
    Dense { gate: DevLinear, up: DevLinear, down: DevLinear },
    Sparse(DevMoe),
}

pub struct DevLayer {
    /// `[H]`
    pub attn_norm: DevBuf,
    /// `[H]`
    pub ffn_norm: DevBuf,
    pub q: DevLinear,
    pub k: DevLinear,
    pub v: DevLinear,
    pub o: DevLinear,
    /// `[head_dim]`
    pub q_norm: Option<DevBuf>,
    /// `[head_dim]`
    pub k_norm: Option<DevBuf>,
    pub ffn: DevFfn,
}

/// A model's weights on the device in one storage type.
pub struct DevModel {
    /// Address of the host [`Model`] these weights came from (re-uploaded if it changes).
    pub source: usize,
    pub ty: StorageType,
    /// `[V, H]`
    pub embed: DevBuf,
    /// `[V, H]`; `None`: tied to `embed`.
    pub lm_head: Option<DevBuf>,
    /// `[H]`
    pub norm: DevBuf,
    /// `[head_dim / 2]` f32
    pub inv_freq: DevBuf,
    pub layers: Vec<DevLayer>,
    /// How the weights reached the device (see [`upload_model`]).
    pub note: Option<String>,
}

/// Device buffers of the running sequence: KV cache and activations, grown on demand.
#[derive(Default)]
pub struct DevState {
    /// Per layer `[capacity, kv_dim]` keys and values.
    pub k_cache: Vec<DevBuf>,
    pub v_cache: Vec<DevBuf>,
    pub cache_capacity: usize,
    /// Rows the activation buffers hold.
    pub rows: usize,
    pub bufs: Option<Acts>,
    /// Rows the logits buffer holds.
    pub logit_rows: usize,
    /// `[logit_rows, V]`, `[logit_rows, H]`, `[logit_rows]` i32
    pub logits: Option<(DevBuf, DevBuf, DevBuf)>,
}

/// Activation buffers for `rows` rows.
pub struct Acts {
    /// `[t]` i32 token ids
    ids: DevBuf,
    /// `[t, H]` residual stream
    x: DevBuf,
    /// `[t, H]` normed input of attention / MLP / lm_head
    hn: DevBuf,
    /// `[t, q_dim]`
    q: DevBuf,
    /// `[t, kv_dim]`
    k: DevBuf,
    /// `[t, kv_dim]`
    v: DevBuf,
    /// `[t, q_dim]`
    attn: DevBuf,
    /// `[t, H]`
    o: DevBuf,
    /// `[t, max(I, I_expert)]`
    g: DevBuf,
    /// `[t, max(I, I_expert)]`
    u: DevBuf,
    /// `[t, E]`
    router: DevBuf,
    /// `[t, k]` i32
    topk_ids: DevBuf,
    /// `[t, k]` f32
    topk_w: DevBuf,
    /// `[t * k]` i32 rows, expert by expert
    route_rows: DevBuf,
    /// `[t * k]` f32 weights, expert by expert
    route_w: DevBuf,
    /// `[t, H]` gathered rows of one expert
    moe_in: DevBuf,
    /// `[t, H]` one expert's output rows
    moe_out: DevBuf,
}

fn upload_bytes(g: &mut Gpu, bytes: &[u8]) -> Result<DevBuf, BackendError> {
    let buf = g.alloc(bytes.len())?;
    // SAFETY: `buf` holds at least `bytes.len()` bytes; the copy is synchronous.
    unsafe { cur::memcpy_htod_sync(buf.ptr, bytes) }.map_err(|e| cuda_err("cuMemcpyHtoD", e))?;
    Ok(buf)
}

fn upload(g: &mut Gpu, ty: StorageType, v: &[f32]) -> Result<DevBuf, BackendError> {
    upload_bytes(g, &ty.encode(v))
}

/// A weight's host copy: f32 values, or a [`Matrix`] in its stored type (widened only when
/// the device copy has to come from the host).
trait HostWeight {
    fn elements(&self) -> usize;
    fn values(&self) -> Cow<'_, [f32]>;
}

impl HostWeight for [f32] {
    fn elements(&self) -> usize {
        self.len()
    }
    fn values(&self) -> Cow<'_, [f32]> {
        Cow::Borrowed(self)
    }
}

impl HostWeight for Vec<f32> {
    fn elements(&self) -> usize {
        self.len()
    }
    fn values(&self) -> Cow<'_, [f32]> {
        Cow::Borrowed(self)
    }
}

impl HostWeight for Matrix {
    fn elements(&self) -> usize {
        self.rows * self.cols
    }
    fn values(&self) -> Cow<'_, [f32]> {
        self.to_f32()
    }
}

/// Where the device copy of each weight comes from: the file's stored blocks, dequantized
/// on the device ([`dequant`]), when the source keeps them ([`WeightSource::raw`]); else the
/// host's f32 copy in the model, rounded to the storage type on the host.
struct Uploader<'a> {
    ty: StorageType,
    source: Option<(&'a dyn WeightSource, NameTable)>,
    /// Tensors dequantized on the device, by stored type.
    on_device: BTreeMap<&'static str, usize>,
    from_host: usize,
}

impl Uploader<'_> {
    fn weight<H: HostWeight + ?Sized>(
        &mut self,
        g: &mut Gpu,
        role: Role,
        layer: usize,
        host: &H,
    ) -> Result<DevBuf, BackendError> {
        let stacked = matches!(role, Role::FfnGateExps | Role::FfnUpExps | Role::FfnDownExps);
        if let Some((src, names)) = self.source.filter(|(_, n)| !stacked || n.stacks_experts()) {
            let name = names.name(role, layer);
            if let Some(raw) = src.raw(&name) {
                let elements: usize = raw.shape.iter().product();
                if elements != host.elements() {
                    return Err(BackendError::Dequant {
                        tensor: name,
                        source: dequant::DequantError::Shape { shape: raw.shape.clone(), expected: host.elements() },
                    });
                }
                let buf = dequant::dequantize(g, self.ty, &name, &raw)?;
                *self.on_device.entry(raw.storage_type).or_insert(0) += 1;
                return Ok(buf);
            }
        }
        self.from_host += 1;
        upload(g, self.ty, &host.values())
    }

    fn linear(
        &mut self,
        g: &mut Gpu,
        (role, bias): (Role, Role),
        layer: usize,
        l: &Linear,
    ) -> Result<DevLinear, BackendError> {
        Ok(DevLinear {
            w: self.weight(g, role, layer, &l.weight)?,
            b: match &l.bias {
                Some(b) => Some(self.weight(g, bias, layer, b)?),
                None => None,
            },
            out_features: l.out_features,
            in_features: l.in_features,
        })
    }

    fn opt(
        &mut self,
        g: &mut Gpu,
        role: Role,
        layer: usize,
        w: &Option<Vec<f32>>,
    ) -> Result<Option<DevBuf>, BackendError> {
        match w {
            Some(w) => Ok(Some(self.weight(g, role, layer, w)?)),
            None => Ok(None),
        }
    }

    /// How the weights reached the device, for the manifest; `None` when all came from the host.
    fn note(&self) -> Option<String> {
        if self.on_device.is_empty() {
            return None;
        }
        let types: Vec<String> = self.on_device.iter().map(|(t, n)| format!("{t} x{n}")).collect();
        Some(format!(
            "weights uploaded as stored ({}) and dequantized on the GPU to {} by NVRTC kernels (bit-exact vs the host \
             dequantization){}",
            types.join(", "),
            self.ty.as_str(),
            match self.from_host {
                0 => String::new(),
                n => format!("; {n} tensors from the host's f32 copy"),
            }
        ))
    }
}

/// Uploads `model`'s weights in `ty` (once; again only if the model or the type changes),
/// and compiles the kernels for `ty`. With `source` (the file the model was loaded from),
/// tensors it stores as blocks are dequantized on the device; returns how, for the manifest.
pub fn upload_model(
    g: &mut Gpu,
    model: &Model,
    source: Option<&dyn WeightSource>,
    ty: StorageType,
) -> Result<Option<String>, BackendError> {
    let key = model as *const Model as usize;
    if let Some(m) = g.model.as_ref().filter(|m| m.source == key && m.ty == ty) {
        return Ok(m.note.clone());
    }
    if let Some(old) = g.model.take() {
        release_model(g, old);
    }
    g.func(ty, "pb_embed")?;
    if let Some(m) = model.config.moe.as_ref().filter(|m| m.n_experts > kernels::MAX_EXPERTS) {
        return Err(BackendError::Cuda {
            call: "pb_moe_route".into(),
            message: format!("{} experts; the routing kernel takes at most {}", m.n_experts, kernels::MAX_EXPERTS),
        });
    }
    if model.config.head_dim > kernels::MAX_HEAD_DIM {
        return Err(BackendError::Cuda {
            call: "pb_attention".into(),
            message: format!(
                "head_dim {}; the attention kernel takes at most {}",
                model.config.head_dim,
                kernels::MAX_HEAD_DIM
            ),
        });
    }
    // An injected bug (mutation tests) lives in the host copy: upload that one.
    #[cfg(feature = "mutation-testing")]
    let source = source.filter(|_| model.mutation.is_none());
    let source = source.and_then(|s| NameTable::for_format(s.format()).map(|n| (s, n)));
    let mut up = Uploader { ty, source, on_device: BTreeMap::new(), from_host: 0 };
    let embed = up.weight(g, Role::TokenEmbd, 0, &model.embed_tokens)?;
    let lm_head = match &model.lm_head {
        Some(w) => Some(up.weight(g, Role::Output, 0, w)?),
        None => None,
    };
    let norm = up.weight(g, Role::OutputNorm, 0, &model.norm)?;
    let inv_freq = upload(g, StorageType::F32, model.inv_freq())?;
    let mut layers = Vec::with_capacity(model.layers.len());
    for (i, l) in model.layers.iter().enumerate() {
        let a = &l.self_attn;
        let ffn = match &l.mlp {
            FeedForward::Dense(m) => DevFfn::Dense {
                gate: up.linear(g, (Role::FfnGate, Role::FfnGate), i, &m.gate_proj)?,
                up: up.linear(g, (Role::FfnUp, Role::FfnUp), i, &m.up_proj)?,
                down: up.linear(g, (Role::FfnDown, Role::FfnDown), i, &m.down_proj)?,
            },
            FeedForward::Sparse(m) => DevFfn::Sparse(DevMoe {
                router: up.linear(g, (Role::FfnRouter, Role::FfnRouter), i, &m.gate)?,
                gate: up.weight(g, Role::FfnGateExps, i, &m.experts_gate_proj)?,
                up: up.weight(g, Role::FfnUpExps, i, &m.experts_up_proj)?,
                down: up.weight(g, Role::FfnDownExps, i, &m.experts_down_proj)?,
                n_experts: m.n_experts,
                top_k: m.top_k,
                inter: m.intermediate_size,
                renorm: m.norm_topk_prob,
            }),
        };
        layers.push(DevLayer {
            attn_norm: up.weight(g, Role::AttnNorm, i, &l.input_layernorm)?,
            ffn_norm: up.weight(g, Role::FfnNorm, i, &l.post_attention_layernorm)?,
            q: up.linear(g, (Role::AttnQ, Role::AttnQBias), i, &a.q_proj)?,
            k: up.linear(g, (Role::AttnK, Role::AttnKBias), i, &a.k_proj)?,
            v: up.linear(g, (Role::AttnV, Role::AttnVBias), i, &a.v_proj)?,
            o: up.linear(g, (Role::AttnOut, Role::AttnOutBias), i, &a.o_proj)?,
            q_norm: up.opt(g, Role::AttnQNorm, i, &a.q_norm)?,
            k_norm: up.opt(g, Role::AttnKNorm, i, &a.k_norm)?,
            ffn,
        });
    }
    let note = up.note();
    g.model = Some(DevModel { source: key, ty, embed, lm_head, norm, inv_freq, layers, note: note.clone() });
    Ok(note)
}

fn release_model(g: &mut Gpu, m: DevModel) {
    let mut bufs = vec![m.embed, m.norm, m.inv_freq];
    bufs.extend(m.lm_head);
    let lin = |l: DevLinear, out: &mut Vec<DevBuf>| {
        out.push(l.w);
        out.extend(l.b);
    };
    for l in m.layers {
        bufs.push(l.attn_norm);
        bufs.push(l.ffn_norm);
        for x in [l.q, l.k, l.v, l.o] {
            lin(x, &mut bufs);
        }
        bufs.extend(l.q_norm);
        bufs.extend(l.k_norm);
        match l.ffn {
            DevFfn::Dense { gate, up, down } => {
                for x in [gate, up, down] {
                    lin(x, &mut bufs);
                }
            }
            DevFfn::Sparse(s) => {
                lin(s.router, &mut bufs);
                bufs.extend([s.gate, s.up, s.down]);
            }
        }
    }
    for b in bufs {
        g.release(b);
    }
}

fn launch_cfg(geo: Geometry) -> LaunchConfig {
    LaunchConfig { grid_dim: geo.grid, block_dim: geo.block, shared_mem_bytes: geo.shared_bytes }
}

/// Launches kernel `name` of type `ty` with `geo` and the arguments pushed by `args`.
macro_rules! launch {
    ($g:expr, $ty:expr, $name:literal, $geo:expr, $($arg:expr),* $(,)?) => {{
        let geo: Geometry = $geo;
        let stream = $g.stream.clone();
        let f = $g.func($ty, $name)?;
        let mut b = stream.launch_builder(f);
        $( b.arg(&$arg); )*
        // SAFETY: the arguments match the kernel's parameters in kernels.cu in number, order
        // and type (device addresses as u64, ints as i32, floats as f32), and every buffer
        // holds the elements the geometry makes the kernel touch.
        unsafe { b.launch(launch_cfg(geo)) }.map_err(|e| cuda_err($name, e))?;
    }};
}

/// `out[t, n] = x[t, k] · w[n, k]ᵀ` with cuBLAS (column-major: `outᵀ = w · xᵀ`).
#[allow(clippy::too_many_arguments)]
fn gemm(
    g: &Gpu,
    ty: StorageType,
    out: cu::CUdeviceptr,
    x: cu::CUdeviceptr,
    w: cu::CUdeviceptr,
    t: usize,
    k: usize,
    n: usize,
) -> Result<(), BackendError> {
    let dt = match ty {
        StorageType::F32 => blas::cudaDataType::CUDA_R_32F,
        StorageType::F16 => blas::cudaDataType::CUDA_R_16F,
        StorageType::Bf16 => blas::cudaDataType::CUDA_R_16BF,
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: `w` holds `n * k`, `x` `t * k` and `out` `t * n` elements of `ty` (the callers'
    // buffers are sized so); alpha and beta are host f32 as compute type 32F requires.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *g.blas.handle(),
            blas::cublasOperation_t::CUBLAS_OP_T,
            blas::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            t as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            w as *const _,
            dt,
            k as i32,
            x as *const _,
            dt,
            k as i32,
            &beta as *const f32 as *const _,
            out as *mut _,
            dt,
            n as i32,
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| cuda_err("cublasGemmEx", e))
}

/// Profiling ([`super::profile`]): starts a stretch of `phase` with `step`, behind `pb_spin`.
fn prof_begin(g: &mut Gpu, ty: StorageType, phase: &'static str, step: &'static str) -> Result<(), BackendError> {
    if g.profile.is_none() {
        return Ok(());
    }
    let ns = super::profile::SPIN_NS;
    launch!(g, ty, "pb_spin", kernels::spin_geometry(), ns);
    let p = g.profile.as_mut().expect("checked above");
    p.begin(phase, step, &g.stream)
}

/// Profiling: the next kernels belong to `step`.
fn prof_step(g: &mut Gpu, step: &'static str) -> Result<(), BackendError> {
    match g.profile.as_mut() {
        Some(p) => p.step(step, &g.stream),
        None => Ok(()),
    }
}

/// Profiling: ends the stretch (before a sync); returns its phase, to begin the next one.
fn prof_end(g: &mut Gpu) -> Result<Option<&'static str>, BackendError> {
    match g.profile.as_mut() {
        Some(p) if p.in_stretch() => {
            let phase = p.phase();
            p.end(&g.stream)?;
            Ok(Some(phase))
        }
        _ => Ok(None),
    }
}

/// Host work that waits for the GPU (a download, the MoE plan). When profiling, the running
/// stretch ends before it, its time counts as the host-only `step`, and a new stretch begins
/// after it with the step `resume` (`None`: the forward pass ends there).
fn off_stream<R>(
    g: &mut Gpu,
    ty: StorageType,
    step: &'static str,
    resume: Option<&'static str>,
    work: impl FnOnce(&mut Gpu) -> Result<R, BackendError>,
) -> Result<R, BackendError> {
    let phase = prof_end(g)?;
    let t0 = std::time::Instant::now();
    let r = work(g)?;
    if let (Some(phase), Some(p)) = (phase, g.profile.as_mut()) {
        p.host(step, t0.elapsed().as_secs_f64() * 1e3);
        if let Some(next) = resume {
            prof_begin(g, ty, phase, next)?;
        }
    }
    Ok(r)
}

/// `out_s[t, n_s] = x[t, k] · w_s[n_s, k]ᵀ` for up to three products `(out_s, w_s, n_s)` of the
/// same `x`: one `pb_gemv` launch for the few rows of a decode step (a tiled product cannot
/// fill the GPU with them), cuBLAS per product otherwise; f32 accumulation either way.
fn matmuls(
    g: &mut Gpu,
    ty: StorageType,
    x: u64,
    t: usize,
    k: usize,
    products: &[(u64, u64, usize)],
) -> Result<(), BackendError> {
    assert!(products.len() <= 3, "pb_gemv takes at most three products");
    if t > kernels::GEMV_ROWS {
        for &(out, w, n) in products {
            gemm(g, ty, out, x, w, t, k, n)?;
        }
        return Ok(());
    }
    let seg = |i: usize| products.get(i).map(|&(o, w, n)| (o, w, n as i32)).unwrap_or((0, 0, 0));
    let ((o0, w0, n0), (o1, w1, n1), (o2, w2, n2)) = (seg(0), seg(1), seg(2));
    let n = products.iter().map(|p| p.2).sum::<usize>();
    let cols = kernels::gemv_cols(n, g.sms);
    let (ti, ki, ci) = (t as i32, k as i32, cols as i32);
    launch!(g, ty, "pb_gemv", kernels::gemv_geometry(n, cols), x, ti, ki, ci, o0, w0, n0, o1, w1, n1, o2, w2, n2);
    Ok(())
}

/// `out[t, n] = x[t, k] · w[n, k]ᵀ` (see [`matmuls`]).
#[allow(clippy::too_many_arguments)]
fn matmul(
    g: &mut Gpu,
    ty: StorageType,
    out: u64,
    x: u64,
    w: u64,
    t: usize,
    k: usize,
    n: usize,
) -> Result<(), BackendError> {
    matmuls(g, ty, x, t, k, &[(out, w, n)])
}

/// Adds `l`'s bias, if any, to `out` (`t` rows).
fn add_bias(g: &mut Gpu, ty: StorageType, l: &DevLinear, out: u64, t: usize) -> Result<(), BackendError> {
    if let Some(b) = &l.b {
        let n = l.out_features as i32;
        launch!(g, ty, "pb_add_bias", kernels::rows_geometry(t, l.out_features), out, b.ptr, n);
    }
    Ok(())
}

/// `out_i = x W_iᵀ + b_i` for `t` rows, for linear layers of the same input (one launch when
/// `t` is a decode step's).
fn linears(g: &mut Gpu, ty: StorageType, x: u64, t: usize, layers: &[(&DevLinear, u64)]) -> Result<(), BackendError> {
    let k = layers[0].0.in_features;
    debug_assert!(layers.iter().all(|(l, _)| l.in_features == k));
    let products: Vec<(u64, u64, usize)> = layers.iter().map(|(l, out)| (*out, l.w.ptr, l.out_features)).collect();
    matmuls(g, ty, x, t, k, &products)?;
    for (l, out) in layers {
        add_bias(g, ty, l, *out, t)?;
    }
    Ok(())
}

/// `out = x Wᵀ + b` for `t` rows.
fn linear(g: &mut Gpu, ty: StorageType, l: &DevLinear, out: u64, x: u64, t: usize) -> Result<(), BackendError> {
    linears(g, ty, x, t, &[(l, out)])
}

#[allow(clippy::too_many_arguments)]
fn rmsnorm(
    g: &mut Gpu,
    ty: StorageType,
    out: u64,
    x: u64,
    w: u64,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<(), BackendError> {
    let n = n as i32;
    launch!(g, ty, "pb_rmsnorm", kernels::rmsnorm_geometry(rows), out, x, w, n, eps);
    Ok(())
}

/// Copies `[t, width]` elements of `ty` at `src` to the host as f32.
fn download(g: &Gpu, ty: StorageType, src: u64, elems: usize) -> Result<Vec<f32>, BackendError> {
    let mut bytes = vec![0u8; elems * ty.size()];
    // SAFETY: `src` holds `elems` elements of `ty`; the stream is synchronised before the
    // host reads `bytes`.
    unsafe { cur::memcpy_dtoh_async(&mut bytes, src, g.stream.cu_stream()) }
        .map_err(|e| cuda_err("cuMemcpyDtoH", e))?;
    g.stream.synchronize().map_err(|e| cuda_err("cuStreamSynchronize", e))?;
    Ok(ty.decode(&bytes))
}

fn download_i32(g: &Gpu, src: u64, elems: usize) -> Result<Vec<i32>, BackendError> {
    let mut v = vec![0i32; elems];
    // SAFETY: `src` holds `elems` i32; synchronised before `v` is read.
    unsafe { cur::memcpy_dtoh_async(&mut v, src, g.stream.cu_stream()) }.map_err(|e| cuda_err("cuMemcpyDtoH", e))?;
    g.stream.synchronize().map_err(|e| cuda_err("cuStreamSynchronize", e))?;
    Ok(v)
}

fn upload_into<T>(g: &Gpu, dst: u64, v: &[T]) -> Result<(), BackendError> {
    // SAFETY: `dst` holds at least `v.len()` elements of `T`; the synchronous copy has read
    // `v` when it returns.
    unsafe { cur::memcpy_htod_sync(dst, v) }.map_err(|e| cuda_err("cuMemcpyHtoD", e))?;
    let _ = g;
    Ok(())
}

/// Records capture `point` of layer `layer` from `[t, width]` at `src`, if the plan wants it.
#[allow(clippy::too_many_arguments)]
fn capture(
    g: &mut Gpu,
    ty: StorageType,
    io: &mut ForwardIo<'_>,
    point: CapturePoint,
    layer: usize,
    src: u64,
    t: usize,
    width: usize,
) -> Result<(), BackendError> {
    if io.plan.wants(point, layer) && !io.capture_rows.is_empty() {
        off_stream(g, ty, "capture_download", Some("after_capture"), |g| {
            let v = download(g, ty, src, t * width)?;
            io.sink.push_f32(point, layer, &v, width, io.capture_rows);
            Ok(())
        })?;
    }
    Ok(())
}

/// Makes the KV cache hold `capacity` positions of `n_layers` layers.
fn ensure_cache(g: &mut Gpu, n_layers: usize, capacity: usize, kv_bytes: usize) -> Result<(), BackendError> {
    if g.state.cache_capacity >= capacity && g.state.k_cache.len() == n_layers {
        return Ok(());
    }
    let old: Vec<DevBuf> = g.state.k_cache.drain(..).chain(g.state.v_cache.drain(..)).collect();
    for b in old {
        g.release(b);
    }
    for _ in 0..n_layers {
        let k = g.alloc(capacity * kv_bytes)?;
        let v = g.alloc(capacity * kv_bytes)?;
        g.state.k_cache.push(k);
        g.state.v_cache.push(v);
    }
    g.state.cache_capacity = capacity;
    Ok(())
}

/// Makes the activation buffers hold `t` rows.
fn ensure_acts(g: &mut Gpu, model: &Model, ty: StorageType, t: usize) -> Result<(), BackendError> {
    if g.state.rows >= t && g.state.bufs.is_some() {
        return Ok(());
    }
    if let Some(a) = g.state.bufs.take() {
        for b in [
            a.ids,
            a.x,
            a.hn,
            a.q,
            a.k,
            a.v,
            a.attn,
            a.o,
            a.g,
            a.u,
            a.router,
            a.topk_ids,
            a.topk_w,
            a.route_rows,
            a.route_w,
            a.moe_in,
            a.moe_out,
        ] {
            g.release(b);
        }
    }
    let c = &model.config;
    let s = ty.size();
    let (ei, e, k) =
        c.moe.as_ref().map(|m| (m.expert_intermediate_size, m.n_experts, m.n_experts_per_tok)).unwrap_or((0, 0, 0));
    let inner = c.intermediate_size.max(ei);
    let h = c.hidden_size;
    // a decode step's experts (one row, k experts) use k rows of g, u and moe_out
    let kt = t.max(k);
    let acts = Acts {
        ids: g.alloc(t * 4)?,
        x: g.alloc(t * h * s)?,
        hn: g.alloc(t * h * s)?,
        q: g.alloc(t * c.q_dim() * s)?,
        k: g.alloc(t * c.kv_dim() * s)?,
        v: g.alloc(t * c.kv_dim() * s)?,
        attn: g.alloc(t * c.q_dim() * s)?,
        o: g.alloc(t * h * s)?,
        g: g.alloc(kt * inner * s)?,
        u: g.alloc(kt * inner * s)?,
        router: g.alloc(t * e * s)?,
        topk_ids: g.alloc(t * k * 4)?,
        topk_w: g.alloc(t * k * 4)?,
        route_rows: g.alloc(t * k * 4)?,
        route_w: g.alloc(t * k * 4)?,
        moe_in: g.alloc(t * h * s)?,
        moe_out: g.alloc(kt * h * s)?,
    };
    g.state.bufs = Some(acts);
    g.state.rows = t;
    Ok(())
}

/// Makes the logits buffers hold `n` rows.
fn ensure_logits(g: &mut Gpu, model: &Model, ty: StorageType, n: usize) -> Result<(), BackendError> {
    if g.state.logit_rows >= n && g.state.logits.is_some() {
        return Ok(());
    }
    if let Some((a, b, c)) = g.state.logits.take() {
        g.release(a);
        g.release(b);
        g.release(c);
    }
    let c = &model.config;
    let bufs = (g.alloc(n * c.vocab_size * ty.size())?, g.alloc(n * c.hidden_size * ty.size())?, g.alloc(n * 4)?);
    g.state.logits = Some(bufs);
    g.state.logit_rows = n;
    Ok(())
}

/// Addresses of the activation buffers (plain numbers, so the borrow of `g` ends here).
struct Ptrs {
    ids: u64,
    x: u64,
    hn: u64,
    q: u64,
    k: u64,
    v: u64,
    attn: u64,
    o: u64,
    g: u64,
    u: u64,
    router: u64,
    topk_ids: u64,
    topk_w: u64,
    route_rows: u64,
    route_w: u64,
    moe_in: u64,
    moe_out: u64,
}

fn ptrs(a: &Acts) -> Ptrs {
    Ptrs {
        ids: a.ids.ptr,
        x: a.x.ptr,
        hn: a.hn.ptr,
        q: a.q.ptr,
        k: a.k.ptr,
        v: a.v.ptr,
        attn: a.attn.ptr,
        o: a.o.ptr,
        g: a.g.ptr,
        u: a.u.ptr,
        router: a.router.ptr,
        topk_ids: a.topk_ids.ptr,
        topk_w: a.topk_w.ptr,
        route_rows: a.route_rows.ptr,
        route_w: a.route_w.ptr,
        moe_in: a.moe_in.ptr,
        moe_out: a.moe_out.ptr,
    }
}

/// One forward call on the GPU; the contract of [`Model::forward`].
pub fn forward(
    g: &mut Gpu,
    model: &Model,
    tokens: &[u32],
    cache: &mut KvCache,
    io: &mut ForwardIo<'_>,
) -> Result<(), EngineError> {
    let c = &model.config;
    let (t, h, hd) = (tokens.len(), c.hidden_size, c.head_dim);
    let pos0 = cache.len();
    cache.reserve(t)?;
    if let Some(&id) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
        return Err(EngineError::TokenOutOfVocab { id, vocab: c.vocab_size });
    }
    if t == 0 {
        io.logits.clear();
        return Ok(());
    }
    let ty = match &g.model {
        Some(m) if m.source == model as *const Model as usize => m.ty,
        _ => {
            upload_model(g, model, None, StorageType::F32)?;
            StorageType::F32
        }
    };
    let s = ty.size();
    let max_keys = kernels::max_attention_keys(g.shared_limit);
    if pos0 + t > max_keys {
        return Err(BackendError::Cuda {
            call: "pb_attention".into(),
            message: format!("{} positions; this GPU's attention kernel holds at most {max_keys}", pos0 + t),
        }
        .into());
    }
    let kv = c.kv_dim();
    ensure_cache(g, c.n_layers, cache.capacity(), kv * s)?;
    ensure_acts(g, model, ty, t)?;
    let p = ptrs(g.state.bufs.as_ref().expect("ensure_acts allocated the buffers"));
    let ids: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
    upload_into(g, p.ids, &ids)?;
    let eps = c.rms_norm_eps as f32;
    let scale = (hd as f64).powf(-0.5) as f32;
    let (nh, nkv) = (c.n_heads as i32, c.n_kv_heads as i32);

    // Weight addresses, copied out so the launches can borrow `g` mutably.
    let dm = g.model.as_ref().expect("uploaded above");
    let embed = dm.embed.ptr;
    let lm_head = dm.lm_head.as_ref().map(|b| b.ptr).unwrap_or(embed);
    let norm = dm.norm.ptr;
    let inv_freq = dm.inv_freq.ptr;
    // The layers are read through a raw pointer while `g` is borrowed mutably by launches:
    // `g.model` is not touched by anything below (no upload happens during a forward call).
    let layers: *const Vec<DevLayer> = &dm.layers;

    // 1. Token embedding. x: [t, H]
    let hi = h as i32;
    prof_begin(g, ty, if t > 1 { "prefill" } else { "decode" }, "embed")?;
    launch!(g, ty, "pb_embed", kernels::rows_geometry(t, h), p.x, embed, p.ids, hi);
    capture(g, ty, io, CapturePoint::Embed, 0, p.x, t, h)?;

    // SAFETY: see `layers` above: the Vec lives in `g.model`, which nothing below replaces.
    let layers = unsafe { &*layers };
    for (li, l) in layers.iter().enumerate() {
        // 2. Input RMSNorm. hn: [t, H]
        prof_step(g, "attn_norm")?;
        rmsnorm(g, ty, p.hn, p.x, l.attn_norm.ptr, t, h, eps)?;
        capture(g, ty, io, CapturePoint::AttnNorm, li, p.hn, t, h)?;

        // 3. q, k, v projections (+ bias). q: [t, q_dim], k, v: [t, kv_dim]
        prof_step(g, "qkv")?;
        linears(g, ty, p.hn, t, &[(&l.q, p.q), (&l.k, p.k), (&l.v, p.v)])?;

        // 4. Per-head RMSNorm of q and k (qwen3), then RoPE.
        prof_step(g, "qk_norm_rope")?;
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            rmsnorm(g, ty, p.q, p.q, qn.ptr, t * c.n_heads, hd, eps)?;
            rmsnorm(g, ty, p.k, p.k, kn.ptr, t * c.n_kv_heads, hd, eps)?;
        }
        let (pos, hdi) = (pos0 as i32, hd as i32);
        launch!(g, ty, "pb_rope", kernels::rope_geometry(t, c.n_heads, hd), p.q, inv_freq, pos, nh, hdi);
        launch!(g, ty, "pb_rope", kernels::rope_geometry(t, c.n_kv_heads, hd), p.k, inv_freq, pos, nkv, hdi);

        // 5. Append k, v to the cache; causal GQA attention.
        prof_step(g, "kv_append")?;
        let (kc, vc) = (g.state.k_cache[li].ptr, g.state.v_cache[li].ptr);
        let off = (pos0 * kv * s) as u64;
        // SAFETY: the cache holds `capacity >= pos0 + t` rows of `kv` elements; k and v hold t rows.
        unsafe {
            cur::memcpy_dtod_async(kc + off, p.k, t * kv * s, g.stream.cu_stream())
                .map_err(|e| cuda_err("cuMemcpyDtoD", e))?;
            cur::memcpy_dtod_async(vc + off, p.v, t * kv * s, g.stream.cu_stream())
                .map_err(|e| cuda_err("cuMemcpyDtoD", e))?;
        }
        prof_step(g, "attention")?;
        launch!(
            g,
            ty,
            "pb_attention",
            kernels::attention_geometry(t, pos0, c.n_heads),
            p.attn,
            p.q,
            kc,
            vc,
            pos,
            nh,
            nkv,
            hdi,
            scale
        );

        // 6. Output projection, residual add.
        prof_step(g, "o_proj")?;
        linear(g, ty, &l.o, p.o, p.attn, t)?;
        capture(g, ty, io, CapturePoint::AttnOut, li, p.o, t, h)?;
        let n_th = (t * h) as i64;
        prof_step(g, "residual")?;
        launch!(g, ty, "pb_add", kernels::elementwise_geometry(t * h), p.x, p.o, n_th);

        // 7. Post-attention RMSNorm.
        prof_step(g, "ffn_norm")?;
        rmsnorm(g, ty, p.hn, p.x, l.ffn_norm.ptr, t, h, eps)?;
        capture(g, ty, io, CapturePoint::FfnNorm, li, p.hn, t, h)?;

        // 8. Feed-forward. o: [t, H]
        match &l.ffn {
            DevFfn::Dense { gate, up, down } => {
                prof_step(g, "gate_up")?;
                linears(g, ty, p.hn, t, &[(gate, p.g), (up, p.u)])?;
                let n = (t * gate.out_features) as i64;
                prof_step(g, "swiglu")?;
                launch!(g, ty, "pb_swiglu", kernels::elementwise_geometry(t * gate.out_features), p.g, p.u, n);
                prof_step(g, "down")?;
                linear(g, ty, down, p.o, p.g, t)?;
            }
            DevFfn::Sparse(m) => sparse_moe(g, ty, m, &p, li, t, h, io)?,
        }
        capture(g, ty, io, CapturePoint::FfnOut, li, p.o, t, h)?;

        // 9. Residual add.
        prof_step(g, "residual")?;
        launch!(g, ty, "pb_add", kernels::elementwise_geometry(t * h), p.x, p.o, n_th);
        capture(g, ty, io, CapturePoint::LayerOut, li, p.x, t, h)?;
    }
    cache.advance(t)?;

    // 10. Final RMSNorm of every row (hn: [t, H]).
    prof_step(g, "final_norm")?;
    rmsnorm(g, ty, p.hn, p.x, norm, t, h, eps)?;
    capture(g, ty, io, CapturePoint::FinalNorm, 0, p.hn, t, h)?;

    // 11. Logits of the requested rows. [logit_rows, V]
    let n = io.logit_rows.len();
    io.logits.clear();
    if n > 0 {
        ensure_logits(g, model, ty, n)?;
        let (lg, lin, rows) = {
            let (a, b, c) = g.state.logits.as_ref().expect("ensure_logits allocated the buffers");
            (a.ptr, b.ptr, c.ptr)
        };
        let sel: Vec<i32> = io.logit_rows.iter().map(|&r| r as i32).collect();
        upload_into(g, rows, &sel)?;
        prof_step(g, "lm_head")?;
        launch!(g, ty, "pb_gather_rows", kernels::rows_geometry(n, h), lin, p.hn, rows, hi);
        matmul(g, ty, lg, lin, lm_head, n, h, c.vocab_size)?;
        *io.logits = off_stream(g, ty, "logits_download", None, |g| download(g, ty, lg, n * c.vocab_size))?;
    } else {
        prof_end(g)?;
        g.stream.synchronize().map_err(|e| cuda_err("cuStreamSynchronize", e))?;
    }
    Ok(())
}

/// Router, routing on the GPU, per-expert row lists on the host, then each expert in index
/// order over its rows; `o` gets the weighted sum.
#[allow(clippy::too_many_arguments)]
fn sparse_moe(
    g: &mut Gpu,
    ty: StorageType,
    m: &DevMoe,
    p: &Ptrs,
    layer: usize,
    t: usize,
    h: usize,
    io: &mut ForwardIo<'_>,
) -> Result<(), BackendError> {
    let (e, k, im) = (m.n_experts, m.top_k, m.inter);
    let s = ty.size();
    prof_step(g, "moe_router")?;
    linear(g, ty, &m.router, p.router, p.hn, t)?;
    capture(g, ty, io, CapturePoint::MoeRouter, layer, p.router, t, e)?;
    let (ti, ei, ki, renorm) = (t as i32, e as i32, k as i32, m.renorm as i32);
    prof_step(g, "moe_route")?;
    launch!(g, ty, "pb_moe_route", kernels::route_geometry(t), p.topk_ids, p.topk_w, p.router, ti, ei, ki, renorm);
    if t == 1 {
        return experts_of_one_row(g, ty, m, p, layer, h, io);
    }
    let plan = off_stream(g, ty, "moe_plan", Some("moe_experts"), |g| {
        let ids = download_i32(g, p.topk_ids, t * k)?;
        let mut w = vec![0f32; t * k];
        // SAFETY: `topk_w` holds t * k f32; synchronised before `w` is read.
        unsafe { cur::memcpy_dtoh_async(&mut w, p.topk_w, g.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemcpyDtoH", e))?;
        g.stream.synchronize().map_err(|e| cuda_err("cuStreamSynchronize", e))?;
        if io.plan.wants(CapturePoint::MoeTopkIds, layer) && !io.capture_rows.is_empty() {
            io.sink.push_i32(CapturePoint::MoeTopkIds, layer, &ids, k, io.capture_rows);
        }
        let plan = plan_experts(&ids, &w, k, e).map_err(|x| BackendError::Cuda {
            call: "pb_moe_route".into(),
            message: format!("layer {layer}: routed to expert {x} of {e}"),
        })?;
        upload_into(g, p.route_rows, &plan.rows)?;
        upload_into(g, p.route_w, &plan.weights)?;
        Ok(plan)
    })?;

    // SAFETY: `o` holds t * H elements.
    unsafe { cur::memset_d8_async(p.o, 0, t * h * s, g.stream.cu_stream()) }.map_err(|e| cuda_err("cuMemset", e))?;
    let hi = h as i32;
    let mut start = 0usize;
    for (x, &n) in plan.counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let (rows_x, w_x) = (p.route_rows + (start * 4) as u64, p.route_w + (start * 4) as u64);
        launch!(g, ty, "pb_gather_rows", kernels::rows_geometry(n, h), p.moe_in, p.hn, rows_x, hi);
        matmul(g, ty, p.g, p.moe_in, m.gate.at(x * im * h, s), n, h, im)?;
        matmul(g, ty, p.u, p.moe_in, m.up.at(x * im * h, s), n, h, im)?;
        let ni = (n * im) as i64;
        launch!(g, ty, "pb_swiglu", kernels::elementwise_geometry(n * im), p.g, p.u, ni);
        matmul(g, ty, p.moe_out, p.g, m.down.at(x * h * im, s), n, im, h)?;
        launch!(g, ty, "pb_scatter_add_scaled", kernels::rows_geometry(n, h), p.o, p.moe_out, rows_x, w_x, hi);
        start += n;
    }
    Ok(())
}

/// A decode step's experts (one row), dispatched on the device from the routing's ids: no
/// wait for the host. The same products and sums, in the same order, as the planned path.
#[allow(clippy::too_many_arguments)]
fn experts_of_one_row(
    g: &mut Gpu,
    ty: StorageType,
    m: &DevMoe,
    p: &Ptrs,
    layer: usize,
    h: usize,
    io: &mut ForwardIo<'_>,
) -> Result<(), BackendError> {
    let (e, k, im) = (m.n_experts, m.top_k, m.inter);
    if io.plan.wants(CapturePoint::MoeTopkIds, layer) && !io.capture_rows.is_empty() {
        off_stream(g, ty, "capture_download", Some("after_capture"), |g| {
            let ids = download_i32(g, p.topk_ids, k)?;
            io.sink.push_i32(CapturePoint::MoeTopkIds, layer, &ids, k, io.capture_rows);
            Ok(())
        })?;
    }
    prof_step(g, "moe_experts")?;
    let (ei, hi, imi, ki) = (e as i32, h as i32, im as i32, k as i32);
    let (gate, up, down) = (m.gate.ptr, m.up.ptr, m.down.ptr);
    launch!(g, ty, "pb_moe_gate_up", kernels::moe_geometry(im, k), p.g, p.u, p.hn, gate, up, p.topk_ids, ei, hi, imi);
    let n = (k * im) as i64;
    launch!(g, ty, "pb_swiglu", kernels::elementwise_geometry(k * im), p.g, p.u, n);
    launch!(g, ty, "pb_moe_down", kernels::moe_geometry(h, k), p.moe_out, p.g, down, p.topk_ids, ei, hi, imi);
    launch!(g, ty, "pb_moe_combine", kernels::elementwise_geometry(h), p.o, p.moe_out, p.topk_ids, p.topk_w, ki, hi);
    Ok(())
}

/// The expert dispatch of one MoE layer: for each expert (in index order) the rows routed to
/// it (ascending) and their routing weights, concatenated.
#[derive(Debug, PartialEq)]
pub struct ExpertPlan {
    /// `[E]` rows per expert
    pub counts: Vec<usize>,
    /// `[t * k]` row indices, expert by expert
    pub rows: Vec<i32>,
    /// `[t * k]` routing weights, same order
    pub weights: Vec<f32>,
}

/// Groups the routing `ids` / `w` (`[t, k]` each) by expert. An id outside `0..e` is returned
/// as the error.
pub fn plan_experts(ids: &[i32], w: &[f32], k: usize, e: usize) -> Result<ExpertPlan, i32> {
    let mut per: Vec<Vec<(i32, f32)>> = vec![Vec::new(); e];
    for (j, (&x, &wt)) in ids.iter().zip(w).enumerate() {
        let xi = usize::try_from(x).ok().filter(|&xi| xi < e).ok_or(x)?;
        per[xi].push(((j / k) as i32, wt));
    }
    Ok(ExpertPlan {
        counts: per.iter().map(Vec::len).collect(),
        rows: per.iter().flatten().map(|r| r.0).collect(),
        weights: per.iter().flatten().map(|r| r.1).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experts_are_planned_in_index_order_with_ascending_rows() {
        // 3 rows, top-2 of 4 experts
        let ids = [2, 0, 0, 3, 2, 0];
        let w = [0.6, 0.4, 0.7, 0.3, 0.5, 0.5];
        let p = plan_experts(&ids, &w, 2, 4).unwrap();
        assert_eq!(p.counts, vec![3, 0, 2, 1]);
        assert_eq!(p.rows, vec![0, 1, 2, 0, 2, 1]);
        assert_eq!(p.weights, vec![0.4, 0.7, 0.5, 0.6, 0.5, 0.3]);
        assert_eq!(plan_experts(&[0, 4], &[0.5, 0.5], 2, 4), Err(4));
        assert_eq!(plan_experts(&[-1, 0], &[0.5, 0.5], 2, 4), Err(-1));
    }
}
