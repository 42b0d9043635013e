//! Where a forward pass's time goes on the GPU, step by step, for engine authors: with
//! `PARITYBENCH_CUDA_PROFILE=FILE` in the environment, the CUDA backend times every step of
//! [`super::forward::forward`] (embedding, each projection, attention, the MoE routing, ...)
//! and writes a table to FILE (tab-separated) when the backend closes.
//!
//! Each step gets two numbers, summed over its calls: the GPU's time running it, and the
//! host's time queueing it (the launches' cost). A stream timed as it runs mixes the two:
//! while the host is slower than the kernels, an event waits for the host's next launch. So
//! each stretch of work the host queues without waiting (a forward pass, or its part after a
//! sync such as a MoE layer's routing download) starts with `pb_spin`, which holds the stream
//! for [`SPIN_NS`]; the host queues the whole stretch behind it, and the events between steps
//! then time the kernels alone. A stretch whose queueing took longer than the spin is
//! counted in the table's last line (its GPU times include waits for the host).
//!
//! Profiling slows a run (a spin per stretch, an event per step) and changes no result.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, sys as cu};

use super::{BackendError, cuda_err};

/// The environment variable that turns profiling on and names the output file.
pub const ENV: &str = "PARITYBENCH_CUDA_PROFILE";

/// How long `pb_spin` holds the stream at the start of each stretch: longer than the host
/// takes to queue a forward pass of the models profiled so far (a few milliseconds).
pub const SPIN_NS: i64 = 20_000_000;

/// (phase, step): phase `prefill` for a call of several tokens, `decode` for one.
type Key = (&'static str, &'static str);

#[derive(Default, Clone, Copy)]
struct Stat {
    calls: u64,
    gpu_ms: f64,
    host_ms: f64,
}

/// The profile of one backend.
pub struct Profile {
    path: PathBuf,
    ctx: std::sync::Arc<CudaContext>,
    /// Events recorded so far, reused across stretches.
    pool: Vec<CudaEvent>,
    /// The steps of the running stretch: (key, host time at its start); step `i` runs on the
    /// GPU from event `i` to event `i + 1`.
    marks: Vec<(Key, Instant)>,
    phase: &'static str,
    stats: BTreeMap<Key, Stat>,
    /// Host-only steps (between stretches): downloads, host-side planning.
    host_steps: BTreeMap<Key, Stat>,
    stretches: u64,
    overran: u64,
}

impl Profile {
    /// A profile writing to the file named by [`ENV`], if it is set.
    pub fn from_env(ctx: &std::sync::Arc<CudaContext>) -> Option<Profile> {
        let path = std::env::var_os(ENV).filter(|v| !v.is_empty())?;
        Some(Profile {
            path: PathBuf::from(path),
            ctx: ctx.clone(),
            pool: Vec::new(),
            marks: Vec::new(),
            phase: "prefill",
            stats: BTreeMap::new(),
            host_steps: BTreeMap::new(),
            stretches: 0,
            overran: 0,
        })
    }

    /// The phase of the last stretch begun.
    pub fn phase(&self) -> &'static str {
        self.phase
    }

    /// Whether a stretch is being timed.
    pub fn in_stretch(&self) -> bool {
        !self.marks.is_empty()
    }

    fn event(&mut self, i: usize, stream: &CudaStream) -> Result<(), BackendError> {
        if self.pool.len() <= i {
            let e = self
                .ctx
                .new_event(Some(cu::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_err("cuEventCreate", e))?;
            self.pool.push(e);
        }
        self.pool[i].record(stream).map_err(|e| cuda_err("cuEventRecord", e))
    }

    /// Starts a stretch in `phase` (the caller has just queued the spin) with step `step`.
    pub fn begin(&mut self, phase: &'static str, step: &'static str, stream: &CudaStream) -> Result<(), BackendError> {
        self.phase = phase;
        self.marks.clear();
        self.event(0, stream)?;
        self.marks.push(((phase, step), Instant::now()));
        Ok(())
    }

    /// Ends the running step and starts `step`.
    pub fn step(&mut self, step: &'static str, stream: &CudaStream) -> Result<(), BackendError> {
        if self.marks.is_empty() {
            return Ok(());
        }
        let i = self.marks.len();
        self.event(i, stream)?;
        self.marks.push(((self.phase, step), Instant::now()));
        Ok(())
    }

    /// Ends the stretch: waits for the GPU and adds each step's times.
    pub fn end(&mut self, stream: &CudaStream) -> Result<(), BackendError> {
        if self.marks.is_empty() {
            return Ok(());
        }
        let n = self.marks.len();
        self.event(n, stream)?;
        let host_end = Instant::now();
        stream.synchronize().map_err(|e| cuda_err("cuStreamSynchronize", e))?;
        for i in 0..n {
            let (key, t0) = self.marks[i];
            let t1 = self.marks.get(i + 1).map(|m| m.1).unwrap_or(host_end);
            let gpu = self.pool[i].elapsed_ms(&self.pool[i + 1]).map_err(|e| cuda_err("cuEventElapsedTime", e))?;
            let s = self.stats.entry(key).or_default();
            s.calls += 1;
            s.gpu_ms += gpu as f64;
            s.host_ms += (t1 - t0).as_secs_f64() * 1e3;
        }
        self.stretches += 1;
        if (host_end - self.marks[0].1).as_nanos() as i64 >= SPIN_NS {
            self.overran += 1;
        }
        self.marks.clear();
        Ok(())
    }

    /// Adds `ms` of host-only work (outside any stretch) to `step`.
    pub fn host(&mut self, step: &'static str, ms: f64) {
        let s = self.host_steps.entry((self.phase, step)).or_default();
        s.calls += 1;
        s.host_ms += ms;
    }

    /// The table: one line per (phase, step), in the order of the totals' phase, then GPU time.
    pub fn table(&self) -> String {
        let mut rows: Vec<(Key, Stat, bool)> = self.stats.iter().map(|(k, s)| (*k, *s, false)).collect();
        rows.extend(self.host_steps.iter().map(|(k, s)| (*k, *s, true)));
        rows.sort_by(|a, b| {
            a.0.0.cmp(b.0.0).then(b.1.gpu_ms.total_cmp(&a.1.gpu_ms)).then(b.1.host_ms.total_cmp(&a.1.host_ms))
        });
        let mut out = String::from("phase\tstep\tcalls\tgpu_ms\tgpu_us_per_call\thost_ms\thost_us_per_call\n");
        let mut totals: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        for ((phase, step), s, host_only) in &rows {
            let per = |ms: f64| if s.calls > 0 { ms * 1e3 / s.calls as f64 } else { 0.0 };
            let step = if *host_only { format!("{step} (host)") } else { step.to_string() };
            out.push_str(&format!(
                "{phase}\t{step}\t{}\t{:.3}\t{:.2}\t{:.3}\t{:.2}\n",
                s.calls,
                s.gpu_ms,
                per(s.gpu_ms),
                s.host_ms,
                per(s.host_ms)
            ));
            let t = totals.entry(phase).or_default();
            t.0 += s.gpu_ms;
            t.1 += s.host_ms;
        }
        for (phase, (gpu, host)) in totals {
            out.push_str(&format!("{phase}\ttotal\t\t{gpu:.3}\t\t{host:.3}\t\n"));
        }
        out.push_str(&format!(
            "# {} stretches timed behind a {} ms spin; {} took the host longer than the spin to queue (their GPU times \
             include waits for the host)\n",
            self.stretches,
            SPIN_NS / 1_000_000,
            self.overran
        ));
        out
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let written = std::fs::File::create(&self.path).and_then(|mut f| f.write_all(self.table().as_bytes()));
        if let Err(e) = written {
            eprintln!("{ENV}: cannot write {}: {e}", self.path.display());
        }
    }
}
