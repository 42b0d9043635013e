//! Where the forward pass runs, chosen at run time from the request's `device`.
//!
//! `cpu` runs [`cpu::CpuBackend`]. `cuda` / `cuda:N` are parsed and refused with a clear
//! error: the CUDA backend (cudarc, kernels compiled at run time, cuBLAS) is not in this
//! build yet, and will be a second implementation of [`Backend`] beside the CPU one.

pub mod cpu;

use super::EngineError;
use super::kv_cache::KvCache;
use super::model::{ForwardIo, Model, Scratch};

/// The backends this build can run, for `describe`.
pub const BACKENDS: &[&str] = &["cpu"];

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
    #[error("device `{device}`: the CUDA backend is not in this build yet (backends here: {}); use device `cpu`", BACKENDS.join(", "))]
    CudaNotBuilt { device: String },
    #[error("cannot start {threads} CPU worker threads: {message}")]
    ThreadPool { threads: usize, message: String },
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
        Device::Cuda(_) => Err(BackendError::CudaNotBuilt { device: device.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_refuses_cuda_clearly() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        assert!(Device::parse("gpu").unwrap_err().to_string().contains("`gpu`"));
        assert!(Device::parse("cuda:x").is_err());
        let e = open(Device::Cuda(1), None).err().unwrap().to_string();
        assert!(e.contains("cuda:1") && e.contains("not in this build"), "{e}");
        assert_eq!(open(Device::Cpu, Some(2)).unwrap().name(), "cpu");
    }
}
