//! Which process runs a run, so that a runner's own death is recorded.
//!
//! `runner once` records its run as `running` before the engine starts, and finishes it
//! whatever the engine does (crash, hang, NaN). What it cannot finish is a run during which
//! it is itself killed (SIGKILL from a time limit or the OOM killer, a power cut): that run
//! would stay `running` for ever. So each run records its owner, and the next `runner once`
//! on the same host finishes, as errored, every run whose owner is certainly gone
//! ([`Owner::alive`] is `Some(false)`).
//!
//! An owner is `<boot id>/<pid namespace>/<pid>/<start ticks>`: the kernel's boot id (a
//! reboot ends every process), the pid namespace (a pid means nothing in another container),
//! the pid, and the process's start time in clock ticks since boot (field 22 of
//! `/proc/PID/stat`), which tells a reused pid from the process that had it.

use std::fmt;

/// A process, as recorded on its runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub boot_id: String,
    pub pid_ns: String,
    pub pid: u32,
    pub start_ticks: u64,
}

impl Owner {
    /// This process; `None` where `/proc` cannot tell (not Linux).
    pub fn current() -> Option<Owner> {
        Owner::of(std::process::id())
    }

    /// Process `pid` as this machine sees it now.
    pub fn of(pid: u32) -> Option<Owner> {
        Some(Owner { boot_id: boot_id()?, pid_ns: pid_ns()?, pid, start_ticks: start_ticks(pid)? })
    }

    /// The recorded form back; `None` when `s` is not one.
    pub fn parse(s: &str) -> Option<Owner> {
        let mut it = s.split('/');
        let (boot_id, pid_ns, pid, start) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || boot_id.is_empty() || pid_ns.is_empty() {
            return None;
        }
        Some(Owner {
            boot_id: boot_id.to_string(),
            pid_ns: pid_ns.to_string(),
            pid: pid.parse().ok()?,
            start_ticks: start.parse().ok()?,
        })
    }

    /// Whether this process still runs: `Some(false)` when it certainly does not (the machine
    /// rebooted, or the pid is free or taken by a later process), `None` when this process
    /// cannot tell (another pid namespace, or no `/proc`).
    pub fn alive(&self) -> Option<bool> {
        if boot_id()? != self.boot_id {
            return Some(false);
        }
        if pid_ns()? != self.pid_ns {
            return None;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Err(_) => Some(false),
            Ok(stat) => {
                let (state, start) = parse_stat(&stat)?;
                Some(start == self.start_ticks && state != 'Z' && state != 'X')
            }
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}/{}", self.boot_id, self.pid_ns, self.pid, self.start_ticks)
    }
}

/// This machine's host name, as runs record it: `/etc/hostname`, else `gethostname(2)`.
pub fn hostname() -> Option<String> {
    let from_file = std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string());
    from_file.filter(|s| !s.is_empty()).or_else(|| {
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is writable for its length; gethostname NUL-terminates within it on success.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
        let end = buf.iter().position(|&b| b == 0)?;
        let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
        (rc == 0 && !name.is_empty()).then_some(name)
    })
}

fn boot_id() -> Option<String> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(s.trim().to_string()).filter(|s| !s.is_empty() && !s.contains('/'))
}

/// `pid:[4026531836]` -> `4026531836`.
fn pid_ns() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let s = link.to_string_lossy();
    let inner = s.strip_prefix("pid:[")?.strip_suffix(']')?;
    Some(inner.to_string()).filter(|s| !s.is_empty() && !s.contains('/'))
}

fn start_ticks(pid: u32) -> Option<u64> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).map(|(_, t)| t)
}

/// The state and start time of a `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself, so fields are counted from the
/// last `)`: state is field 3, start time field 22.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    Some((state, fields.get(19)?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_round_trips() {
        let me = Owner::current().expect("Linux has /proc");
        assert_eq!(Owner::parse(&me.to_string()), Some(me.clone()));
        assert_eq!(me.alive(), Some(true));
        // the same pid with another start time is a later process: the recorded one is gone
        let reused = Owner { start_ticks: me.start_ticks + 1, ..me.clone() };
        assert_eq!(reused.alive(), Some(false));
        // another boot: gone; another pid namespace: cannot tell
        assert_eq!(Owner { boot_id: "other-boot".into(), ..me.clone() }.alive(), Some(false));
        assert_eq!(Owner { pid_ns: "1".into(), ..me }.alive(), None);
    }

    #[test]
    fn this_host_has_a_name() {
        assert!(hostname().is_some_and(|h| !h.is_empty() && !h.contains('\n')));
    }

    #[test]
    fn a_finished_child_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let owner = Owner::of(pid);
        child.wait().unwrap();
        // reaped: its pid is free (or, rarely, already another process's with a new start time)
        if let Some(o) = owner {
            assert_eq!(o.alive(), Some(false));
        }
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "4242 (we(ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(Owner::parse("a/b/12/34").map(|o| (o.pid, o.start_ticks)), Some((12, 34)));
        for bad in ["", "a/b/12", "a/b/x/34", "a/b/12/34/5", "/b/12/34"] {
            assert_eq!(Owner::parse(bad), None, "{bad}");
        }
    }
}
