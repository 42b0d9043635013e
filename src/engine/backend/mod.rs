//! Where the forward pass runs, chosen at run time from the request's `device`.
//!
//! `cpu` runs [`cpu::CpuBackend`]; `cuda` / `cuda:N` runs [`cuda::CudaBackend`] (cudarc,
//! kernels compiled at run time by NVRTC, cuBLAS), which fails with a clear error on a
//! machine without a CUDA driver.

pub mod cpu;
pub mod cuda;

use super::EngineError;
use super::kv_cache::KvCache;
use super::model::{ForwardIo, Model, Scratch};
use super::weights::WeightSource;
use crate::protocol::ComputeDtype;

/// The backends this build can run, for `describe`.
pub const BACKENDS: &[&str] = &["cpu", "cuda"];

/// A device named by a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Device, BackendError> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| BackendError::UnknownDevice { device: s.to_string() }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown device `{device}` (expected `cpu`, `cuda` or `cuda:N`)")]
    UnknownDevice { device: String },
    #[error("device `{device}`: CUDA is not available on this machine: {message}")]
    NoCuda { device: String, message: String },
    #[error("CUDA call {call} failed: {message}")]
    Cuda { call: String, message: String },
    #[error("cannot start {threads} CPU worker threads: {message}")]
    ThreadPool { threads: usize, message: String },
    #[error("tensor `{tensor}` cannot be dequantized on the GPU: {source}")]
    Dequant { tensor: String, source: cuda::dequant::DequantError },
}

/// An execution backend: runs [`Model::forward`]'s steps on its device.
pub trait Backend: Send + Sync {
    /// `cpu`, `cuda`.
    fn name(&self) -> &'static str;
    /// The device as the manifest records it (`cpu`, `cuda:0`).
    fn device(&self) -> String;
    /// A human-readable device name (CPU model, GPU name).
    fn device_name(&self) -> Option<String>;
    /// Provenance worth keeping in the manifest (thread count, driver, ...).
    fn details(&self) -> Vec<(String, String)>;
    /// The driver version, for GPU backends.
    fn driver(&self) -> Option<String> {
        None
    }
    /// Whether this backend computes in `dtype` (the CPU backend: f32 only).
    fn supports_dtype(&self, dtype: ComputeDtype) -> bool {
        matches!(dtype, ComputeDtype::Auto | ComputeDtype::F32)
    }
    /// Readies `model` for forward calls in `dtype` (a GPU backend uploads the weights).
    fn prepare(&self, _model: &Model, _dtype: ComputeDtype) -> Result<(), EngineError> {
        Ok(())
    }
    /// [`Backend::prepare`] with the file `model` was loaded from, for a backend that takes
    /// the stored tensors ([`WeightSource::raw`]) instead of the host's f32 copies. Returns
    /// how the weights reached the device, for the manifest (`None`: as `prepare` does).
    fn prepare_from(
        &self,
        model: &Model,
        _source: &dyn WeightSource,
        dtype: ComputeDtype,
    ) -> Result<Option<String>, EngineError> {
        self.prepare(model, dtype).map(|()| None)
    }
    /// The most device memory the backend has held, for GPU backends.
    fn peak_gpu_bytes(&self) -> Option<u64> {
        None
    }
    /// One forward call; see [`Model::forward`].
    fn forward(
        &self,
        model: &Model,
        tokens: &[u32],
        cache: &mut KvCache,
        io: &mut ForwardIo<'_>,
        scratch: &mut Scratch,
    ) -> Result<(), EngineError>;
}

/// Opens the backend for `device`. `threads`: CPU worker threads (`None`: rayon's default,
/// which honours `RAYON_NUM_THREADS`).
pub fn open(device: Device, threads: Option<usize>) -> Result<Box<dyn Backend>, BackendError> {
    match device {
        Device::Cpu => Ok(Box::new(cpu::CpuBackend::new(threads)?)),
        Device::Cuda(n) => Ok(Box::new(cuda::CudaBackend::new(n)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_opens_cpu() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        assert!(Device::parse("gpu").unwrap_err().to_string().contains("`gpu`"));
        assert!(Device::parse("cuda:x").is_err());
        // cuda: tests/cuda_backend.rs (needs a driver, or checks the error without one)
        assert_eq!(open(Device::Cpu, Some(2)).unwrap().name(), "cpu");
    }
}
