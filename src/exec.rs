//! Running engines and adapters as child processes: a timeout, logs kept on disk, and a
//! clear account of how the process ended.
//!
//! An engine under test may crash, hang or print garbage; paritybench must survive all of
//! it and record what happened. Each child runs in its own process group so that a timeout
//! kills the whole tree (an adapter's Python, its server, its threads), and its stdout and
//! stderr go to files that the run keeps.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a child process ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ending {
    /// Exit status 0.
    Success,
    /// A non-zero exit status.
    Failed { code: i32 },
    /// Killed by a signal it did not ask for (a crash: SIGSEGV, SIGABRT, an OOM kill).
    Signaled { signal: i32 },
    /// Still running after the timeout; the whole process group was killed.
    TimedOut { after_ms: u64 },
}

impl Ending {
    pub fn is_success(&self) -> bool {
        matches!(self, Ending::Success)
    }
    pub fn describe(&self) -> String {
        match self {
            Ending::Success => "exited 0".into(),
            Ending::Failed { code } => format!("exited with status {code}"),
            Ending::Signaled { signal } => format!("killed by signal {signal}{}", signal_name(*signal)),
            Ending::TimedOut { after_ms } => {
                format!("timed out after {:.1} s and was killed", *after_ms as f64 / 1000.0)
            }
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        4 => " (SIGILL)",
        6 => " (SIGABRT)",
        7 => " (SIGBUS)",
        8 => " (SIGFPE)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        15 => " (SIGTERM)",
        _ => "",
    }
}

/// The result of a finished child: how it ended, how long it took, where its logs are.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Finished {
    pub ending: Ending,
    pub elapsed_ms: u64,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Finished {
    /// The last `n` lines of stderr, for error messages.
    pub fn stderr_tail(&self, n: usize) -> String {
        tail_lines(&self.stderr, n)
    }
}

/// Could not start the child at all.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot create log file {}: {source}", path.display())]
    Log { path: PathBuf, source: std::io::Error },
    #[error("cannot start `{program}`: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("waiting for `{program}` failed: {source}")]
    Wait { program: String, source: std::io::Error },
}

/// Runs `cmd` with its output sent to `log_dir/{name}.stdout` / `.stderr`, killing its
/// process group after `timeout`.
pub fn run_logged(mut cmd: Command, log_dir: &Path, name: &str, timeout: Duration) -> Result<Finished, ExecError> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    std::fs::create_dir_all(log_dir).map_err(|source| ExecError::Log { path: log_dir.to_path_buf(), source })?;
    let stdout = log_dir.join(format!("{name}.stdout"));
    let stderr = log_dir.join(format!("{name}.stderr"));
    let out = File::create(&stdout).map_err(|source| ExecError::Log { path: stdout.clone(), source })?;
    let err = File::create(&stderr).map_err(|source| ExecError::Log { path: stderr.clone(), source })?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn { program: program.clone(), source })?;
    let pgid = child.id() as i32;
    let ending = loop {
        match child.try_wait().map_err(|source| ExecError::Wait { program: program.clone(), source })? {
            Some(status) => {
                break match (status.code(), status.signal()) {
                    (Some(0), _) => Ending::Success,
                    (Some(code), _) => Ending::Failed { code },
                    (None, Some(signal)) => Ending::Signaled { signal },
                    (None, None) => Ending::Failed { code: -1 },
                };
            }
            None if start.elapsed() >= timeout => {
                kill_group(pgid);
                let _ = child.wait();
                break Ending::TimedOut { after_ms: start.elapsed().as_millis() as u64 };
            }
            None => std::thread::sleep(poll_interval(start.elapsed())),
        }
    };
    // Whatever the child left behind in its group (a server it started) goes too.
    kill_group(pgid);
    Ok(Finished { ending, elapsed_ms: start.elapsed().as_millis() as u64, stdout, stderr })
}

/// Short polls first (most adapters finish quickly in tests), then at most 50 ms.
fn poll_interval(elapsed: Duration) -> Duration {
    if elapsed < Duration::from_millis(200) { Duration::from_millis(5) } else { Duration::from_millis(50) }
}

fn kill_group(pgid: i32) {
    // SAFETY: killpg with a process group id we created (process_group(0) made the child
    // its leader); sending SIGKILL to an already-empty group only returns ESRCH.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// The last `n` lines of a text file (lossy UTF-8), empty if unreadable.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else { return String::new() };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn success_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let f = run_logged(sh("echo out; echo err >&2"), dir.path(), "a", Duration::from_secs(10)).unwrap();
        assert_eq!(f.ending, Ending::Success);
        assert_eq!(std::fs::read_to_string(&f.stdout).unwrap(), "out\n");
        assert_eq!(f.stderr_tail(5), "err");
    }

    #[test]
    fn failure_code_and_signal() {
        let dir = tempfile::tempdir().unwrap();
        let f = run_logged(sh("exit 3"), dir.path(), "b", Duration::from_secs(10)).unwrap();
        assert_eq!(f.ending, Ending::Failed { code: 3 });
        let f = run_logged(sh("kill -SEGV $$"), dir.path(), "c", Duration::from_secs(10)).unwrap();
        assert_eq!(f.ending, Ending::Signaled { signal: 11 });
        assert!(f.ending.describe().contains("SIGSEGV"));
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild-alive");
        // The grandchild would write the marker after 3 s if it survived the kill.
        let script = format!("(sleep 3; touch {}) & sleep 30", marker.display());
        let f = run_logged(sh(&script), dir.path(), "d", Duration::from_millis(300)).unwrap();
        assert!(matches!(f.ending, Ending::TimedOut { .. }), "{:?}", f.ending);
        assert!(f.elapsed_ms < 10_000);
        std::thread::sleep(Duration::from_millis(3500));
        assert!(!marker.exists(), "a process of the timed-out group survived");
    }

    #[test]
    fn missing_program_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = run_logged(Command::new("/nonexistent/engine"), dir.path(), "e", Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/engine"), "{e}");
    }
}
