//! The CPU backend: the model's forward pass on a rayon pool of its own.
//!
//! The kernels parallelise over independent outputs only, so the pool's size changes the
//! speed, never the numbers (dumps are bit-identical for 1 and N threads).

use super::{Backend, BackendError};
use crate::engine::EngineError;
use crate::engine::kv_cache::KvCache;
use crate::engine::model::{ForwardIo, Model, Scratch};

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    cpu_name: Option<String>,
}

impl CpuBackend {
    /// A pool of `threads` workers (`None`: rayon's default, honouring `RAYON_NUM_THREADS`).
    pub fn new(threads: Option<usize>) -> Result<CpuBackend, BackendError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.unwrap_or(0))
            .thread_name(|i| format!("engine-cpu-{i}"))
            .build()
            .map_err(|e| BackendError::ThreadPool { threads: threads.unwrap_or(0), message: e.to_string() })?;
        Ok(CpuBackend { pool, cpu_name: cpu_model_name() })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

/// The `model name` line of /proc/cpuinfo (Linux), if there is one.
fn cpu_model_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device(&self) -> String {
        "cpu".to_string()
    }

    fn device_name(&self) -> Option<String> {
        self.cpu_name.clone()
    }

    fn details(&self) -> Vec<(String, String)> {
        vec![
            ("cpu_threads".to_string(), self.threads().to_string()),
            ("cpu_kernels".to_string(), crate::engine::kernels::simd_path().to_string()),
        ]
    }

    fn forward(
        &self,
        model: &Model,
        tokens: &[u32],
        cache: &mut KvCache,
        io: &mut ForwardIo<'_>,
        scratch: &mut Scratch,
    ) -> Result<(), EngineError> {
        self.pool.install(|| model.forward(tokens, cache, io, scratch))
    }
}
