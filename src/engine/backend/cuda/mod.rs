//! The CUDA backend: the model's forward pass on an NVIDIA GPU through cudarc.
//!
//! The libraries (libcuda, NVRTC, cuBLAS) are loaded at run time, so the binary builds and
//! runs without a CUDA toolkit; opening the backend on a machine without them is a clear
//! [`BackendError`], never a crash (cudarc panics when a library is missing, so each one is
//! checked with `dlopen` first, and the whole start-up also runs under `catch_unwind`).
//!
//! Kernels ([`kernels`]) are CUDA C compiled by NVRTC for the GPU found, once per storage type;
//! matrix products are cuBLAS `GemmEx` with f32 accumulation (TF32 off). Weights are uploaded
//! once per model in the compute dtype (f32, f16 or bf16): a GGUF file's tensors as stored,
//! dequantized on the GPU ([`dequant`], bit-exact vs the host), others from the loaded
//! [`Model`]'s f32 copy; activations are stored in the same dtype, rounded where HF
//! transformers rounds ([`forward`]).
//!
//! One sequence at a time: the device KV cache follows the host [`KvCache`]'s length, so a
//! backend serves the prompts of a run one after another, as `engine run` does.

pub mod dequant;
pub mod forward;
pub mod kernels;
pub mod profile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, sys as cu};

use super::{Backend, BackendError};
use crate::engine::EngineError;
use crate::engine::kv_cache::KvCache;
use crate::engine::model::{ForwardIo, Model, Scratch};
use crate::engine::weights::{RawTensor, WeightSource};
use crate::protocol::ComputeDtype;
use kernels::StorageType;

/// The shared libraries the backend needs, each with the names tried in order.
const LIBRARIES: &[(&str, &[&str])] = &[
    ("the CUDA driver (libcuda)", &["libcuda.so.1", "libcuda.so"]),
    ("NVRTC (libnvrtc)", &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]),
    ("cuBLAS (libcublas)", &["libcublas.so.13", "libcublas.so.12", "libcublas.so"]),
];

/// Whether a shared library can be loaded under one of `names` (the loader's own search:
/// `LD_LIBRARY_PATH`, the ld cache, ...).
pub fn library_loads(names: &[&str]) -> bool {
    names.iter().any(|n| {
        let Ok(c) = std::ffi::CString::new(*n) else { return false };
        // SAFETY: `c` is a valid NUL-terminated string; the handle is closed at once (the
        // library stays loaded only if something else holds it).
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if h.is_null() {
                false
            } else {
                libc::dlclose(h);
                true
            }
        }
    })
}

/// The first library of [`LIBRARIES`] that cannot be loaded, if any.
fn missing_library() -> Option<(&'static str, &'static [&'static str])> {
    LIBRARIES.iter().copied().find(|(_, names)| !library_loads(names))
}

/// What identifies the GPU a run used: recorded in the manifest and in the series key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub name: String,
    pub total_memory_bytes: u64,
    pub compute_capability: (i32, i32),
    /// `cuDriverGetVersion`, e.g. 13000 for 13.0.
    pub driver_version: i32,
    /// NVRTC's version (the CUDA version kernels were compiled with), e.g. (13, 0).
    pub nvrtc_version: (i32, i32),
    pub cublas_version: i32,
}

impl Fingerprint {
    /// `12040` -> `12.4`.
    pub fn driver_string(&self) -> String {
        format!("{}.{}", self.driver_version / 1000, (self.driver_version % 1000) / 10)
    }

    /// The device part of a series key, in the store's `kind|name|driver=..|cuda=..` form: the
    /// same GPU model, memory size, capability, driver and CUDA (NVRTC) versions give the same key.
    pub fn key(&self) -> String {
        format!(
            "cuda|{} (sm_{}{}, {} MiB)|driver={}|cuda={}.{}",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_memory_bytes / (1 << 20),
            self.driver_string(),
            self.nvrtc_version.0,
            self.nvrtc_version.1
        )
    }
}

/// A block of device memory, freed on drop.
pub struct DevBuf {
    pub ptr: cu::CUdeviceptr,
    pub bytes: usize,
}

impl DevBuf {
    /// The address `elems` elements of `size` bytes past the start.
    pub fn at(&self, elems: usize, size: usize) -> cu::CUdeviceptr {
        debug_assert!(elems * size <= self.bytes);
        self.ptr + (elems * size) as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: `ptr` came from `malloc_sync` and is freed once, here; work that uses it
            // was queued on the backend's stream, which `free_sync` waits for.
            let _ = unsafe { cudarc::driver::result::free_sync(self.ptr) };
        }
    }
}

/// Everything that needs the GPU: context, stream, cuBLAS, kernels, the uploaded model and
/// the device buffers of the running sequence.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub arch: &'static str,
    /// Kernels by (storage type, name), compiled on first use of a type.
    pub funcs: HashMap<(StorageType, &'static str), CudaFunction>,
    pub model: Option<forward::DevModel>,
    pub state: forward::DevState,
    /// Bytes allocated now / at most, by this backend (weights, cache, scratch).
    pub allocated: u64,
    pub peak: u64,
    /// Shared memory per block for `pb_attention`.
    pub shared_limit: usize,
    /// Multiprocessors (how many blocks fill the GPU).
    pub sms: usize,
    /// Step timings, when [`profile::ENV`] is set.
    pub profile: Option<profile::Profile>,
}

// SAFETY: the context and stream are cudarc's Send + Sync types; `DevBuf` holds plain
// device addresses; the whole value is only used behind the backend's Mutex, one thread at
// a time, and every entry point binds the context to the calling thread first.
unsafe impl Send for Gpu {}

impl Gpu {
    /// Allocates `bytes` of device memory (zeroed).
    pub fn alloc(&mut self, bytes: usize) -> Result<DevBuf, BackendError> {
        let n = bytes.max(4);
        // SAFETY: a plain allocation of `n` bytes; the pointer is owned by the returned `DevBuf`.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(n) }.map_err(|e| cuda_err("cuMemAlloc", e))?;
        // SAFETY: `ptr` holds `n` bytes.
        unsafe { cudarc::driver::result::memset_d8_sync(ptr, 0, n) }.map_err(|e| cuda_err("cuMemset", e))?;
        self.allocated += n as u64;
        self.peak = self.peak.max(self.allocated);
        Ok(DevBuf { ptr, bytes: n })
    }

    /// Gives back a buffer's bytes to the accounting (the memory itself is freed on drop).
    pub fn release(&mut self, buf: DevBuf) {
        self.allocated = self.allocated.saturating_sub(buf.bytes as u64);
        drop(buf);
    }

    /// The kernel `name` for `ty`, compiling the module for `ty` on first use.
    pub fn func(&mut self, ty: StorageType, name: &'static str) -> Result<&CudaFunction, BackendError> {
        if !self.funcs.contains_key(&(ty, name)) {
            let ptx = kernels::compile_ptx(ty, self.arch)
                .map_err(|message| BackendError::Cuda { call: "nvrtcCompileProgram".into(), message })?;
            let module = self.ctx.load_module(ptx).map_err(|e| cuda_err("cuModuleLoadData", e))?;
            for k in kernels::KERNELS {
                let f = module.load_function(k).map_err(|e| cuda_err(&format!("cuModuleGetFunction({k})"), e))?;
                self.funcs.insert((ty, k), f);
            }
        }
        self.funcs.get(&(ty, name)).ok_or_else(|| BackendError::Cuda {
            call: "kernel lookup".into(),
            message: format!("no kernel `{name}` in the compiled module"),
        })
    }
}

/// A cudarc error as a [`BackendError`] naming the call.
pub fn cuda_err(call: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Cuda { call: call.to_string(), message: format!("{e:?}") }
}

/// The CUDA backend for one GPU.
pub struct CudaBackend {
    ordinal: usize,
    fingerprint: Fingerprint,
    gpu: Mutex<Gpu>,
}

impl CudaBackend {
    /// Opens GPU `ordinal`: checks the libraries, creates the context, stream and cuBLAS
    /// handle, and reads the fingerprint. Kernels are compiled on first use.
    pub fn new(ordinal: usize) -> Result<CudaBackend, BackendError> {
        let device = format!("cuda:{ordinal}");
        if let Some((what, names)) = missing_library() {
            return Err(BackendError::NoCuda {
                device,
                message: format!("{what} cannot be loaded (tried {}; set LD_LIBRARY_PATH)", names.join(", ")),
            });
        }
        match std::panic::catch_unwind(|| open_gpu(ordinal)) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(BackendError::NoCuda { device, message: msg })
            }
        }
    }

    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// One tensor dequantized on this GPU in every storage type vs the host ([`dequant::check_tensor`]).
    pub fn check_dequant(&self, name: &str, raw: &RawTensor<'_>) -> Result<dequant::TensorCheck, BackendError> {
        let mut g = self.lock();
        g.ctx.bind_to_thread().map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
        dequant::check_tensor(&mut g, name, raw)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gpu> {
        self.gpu.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn open_gpu(ordinal: usize) -> Result<CudaBackend, BackendError> {
    let count = CudaContext::device_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
    if ordinal as i32 >= count {
        return Err(BackendError::NoCuda {
            device: format!("cuda:{ordinal}"),
            message: format!("this machine has {count} CUDA device(s)"),
        });
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("cuCtxCreate", e))?;
    // One stream, one sequence: cudarc's per-buffer event tracking is not needed.
    // SAFETY: every buffer of this backend is used on `stream` only.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.default_stream();
    let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("cublasCreate", e))?;
    let name = ctx.name().map_err(|e| cuda_err("cuDeviceGetName", e))?;
    let total = ctx.total_mem().map_err(|e| cuda_err("cuDeviceTotalMem", e))? as u64;
    let cc = ctx.compute_capability().map_err(|e| cuda_err("cuDeviceGetAttribute", e))?;
    let shared_limit = ctx
        .attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)
        .map_err(|e| cuda_err("cuDeviceGetAttribute", e))? as usize;
    let sms = ctx
        .attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| cuda_err("cuDeviceGetAttribute", e))? as usize;
    let mut driver_version = 0;
    // SAFETY: writes one int.
    unsafe { cu::cuDriverGetVersion(&mut driver_version) }.result().map_err(|e| cuda_err("cuDriverGetVersion", e))?;
    let (mut nv_major, mut nv_minor) = (0, 0);
    // SAFETY: writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut nv_major, &mut nv_minor) }
        .result()
        .map_err(|e| cuda_err("nvrtcVersion", e))?;
    let mut cublas_version = 0;
    // SAFETY: a valid handle; writes one int.
    unsafe { cudarc::cublas::sys::cublasGetVersion_v2(*blas.handle(), &mut cublas_version) }
        .result()
        .map_err(|e| cuda_err("cublasGetVersion", e))?;
    let fingerprint = Fingerprint {
        name,
        total_memory_bytes: total,
        compute_capability: cc,
        driver_version,
        nvrtc_version: (nv_major, nv_minor),
        cublas_version,
    };
    let profile = profile::Profile::from_env(&ctx);
    let gpu = Gpu {
        profile,
        arch: kernels::arch_for(cc.0, cc.1),
        ctx,
        stream,
        blas,
        funcs: HashMap::new(),
        model: None,
        state: forward::DevState::default(),
        allocated: 0,
        peak: 0,
        shared_limit,
        sms,
    };
    Ok(CudaBackend { ordinal, fingerprint, gpu: Mutex::new(gpu) })
}

/// The fingerprint of GPU `ordinal` (opens the backend, compiles nothing), for series keys.
pub fn probe_fingerprint(ordinal: usize) -> Result<Fingerprint, BackendError> {
    CudaBackend::new(ordinal).map(|b| b.fingerprint.clone())
}

/// The storage type for a requested compute dtype (`auto` computes in f32, like the CPU).
pub fn storage_for(d: ComputeDtype) -> StorageType {
    match d {
        ComputeDtype::Auto | ComputeDtype::F32 => StorageType::F32,
        ComputeDtype::F16 => StorageType::F16,
        ComputeDtype::Bf16 => StorageType::Bf16,
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn device_name(&self) -> Option<String> {
        Some(self.fingerprint.name.clone())
    }

    fn driver(&self) -> Option<String> {
        Some(self.fingerprint.driver_string())
    }

    fn details(&self) -> Vec<(String, String)> {
        let f = &self.fingerprint;
        vec![
            ("gpu_name".into(), f.name.clone()),
            ("gpu_memory_bytes".into(), f.total_memory_bytes.to_string()),
            ("gpu_compute_capability".into(), format!("{}.{}", f.compute_capability.0, f.compute_capability.1)),
            ("cuda_driver".into(), f.driver_string()),
            ("nvrtc".into(), format!("{}.{}", f.nvrtc_version.0, f.nvrtc_version.1)),
            ("cublas".into(), f.cublas_version.to_string()),
            ("device_key".into(), f.key()),
            ("cuda_kernels".into(), format!("nvrtc {}; cublasGemmEx f32 accumulate, TF32 off", self.lock().arch)),
        ]
    }

    fn supports_dtype(&self, _d: ComputeDtype) -> bool {
        true
    }

    fn prepare(&self, model: &Model, dtype: ComputeDtype) -> Result<(), EngineError> {
        let mut g = self.lock();
        g.ctx.bind_to_thread().map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
        forward::upload_model(&mut g, model, None, storage_for(dtype))?;
        Ok(())
    }

    fn prepare_from(
        &self,
        model: &Model,
        source: &dyn WeightSource,
        dtype: ComputeDtype,
    ) -> Result<Option<String>, EngineError> {
        let mut g = self.lock();
        g.ctx.bind_to_thread().map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
        Ok(forward::upload_model(&mut g, model, Some(source), storage_for(dtype))?)
    }

    fn peak_gpu_bytes(&self) -> Option<u64> {
        Some(self.lock().peak)
    }

    fn forward(
        &self,
        model: &Model,
        tokens: &[u32],
        cache: &mut KvCache,
        io: &mut ForwardIo<'_>,
        _scratch: &mut Scratch,
    ) -> Result<(), EngineError> {
        let mut g = self.lock();
        g.ctx.bind_to_thread().map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
        forward::forward(&mut g, model, tokens, cache, io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_key_and_driver_string() {
        let f = Fingerprint {
            name: "NVIDIA H100 80GB HBM3".into(),
            total_memory_bytes: 85_520_809_984,
            compute_capability: (9, 0),
            driver_version: 13000,
            nvrtc_version: (13, 0),
            cublas_version: 130001,
        };
        assert_eq!(f.driver_string(), "13.0");
        assert_eq!(f.key(), "cuda|NVIDIA H100 80GB HBM3 (sm_90, 81559 MiB)|driver=13.0|cuda=13.0");
    }

    #[test]
    fn a_missing_library_is_reported_not_loaded() {
        assert!(!library_loads(&["libparitybench-no-such-library.so"]));
        assert!(library_loads(&["libc.so.6"]));
    }

    #[test]
    fn dtypes_map_to_storage() {
        assert_eq!(storage_for(ComputeDtype::Auto), StorageType::F32);
        assert_eq!(storage_for(ComputeDtype::F16), StorageType::F16);
        assert_eq!(storage_for(ComputeDtype::Bf16), StorageType::Bf16);
    }
}
