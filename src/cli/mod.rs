//! The `runner` command line: one file per subcommand, each with a thin `run`.
//!
//! Exit codes: 0 every gate passed, 1 a gate failed, 2 the run could not be made (the
//! error, printed with its cause chain, says why).

mod compare;
mod dev_seed;
mod engine;
mod fixtures;
mod nightly;
mod once;
mod serve;
mod work;

use clap::{Parser, Subcommand};

/// What a subcommand decided, mapped to the documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything ran and every gate passed (exit 0).
    Passed,
    /// Everything ran and at least one gate failed (exit 1).
    GateFailed,
}

pub const EXIT_PASSED: i32 = 0;
pub const EXIT_GATE_FAILED: i32 = 1;
pub const EXIT_COULD_NOT_RUN: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "runner",
    version,
    about = "paritybench: parity and regression benchmarking for LLM inference engines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Metrics between two dumps: `runner compare ENGINE_DUMP REFERENCE_DUMP`.
    Compare(compare::Args),
    /// Make or check the seeded models, GGUF files and reference dumps.
    #[command(subcommand)]
    Fixtures(fixtures::Command),
    /// The built-in engine's adapter: `describe`, `run --request FILE --out DIR`.
    #[command(subcommand)]
    Engine(engine::Command),
    /// Build an engine at a commit, run the suite, judge it against contracts, record it.
    Once(once::Args),
    /// Resolve each configured branch head, queue it (or run it here), and report.
    Nightly(nightly::Args),
    /// A worker: claim queued jobs matching this device and run them, until stopped.
    Work(work::Args),
    /// The dashboard, the JSON API and /metrics.
    Serve(serve::Args),
    /// Fill an empty database with a year-shaped history (for measuring the dashboard).
    #[command(hide = true)]
    DevSeed(dev_seed::Args),
}

/// Parses the command line, runs it, and returns the process exit code.
pub fn main() -> i32 {
    init_tracing();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_COULD_NOT_RUN } else { EXIT_PASSED };
            let _ = e.print();
            return code;
        }
    };
    let result = match cli.command {
        Command::Compare(args) => compare::run(args),
        Command::Fixtures(cmd) => fixtures::run(cmd),
        Command::Engine(cmd) => engine::run(cmd),
        Command::Once(args) => once::run(args),
        Command::Nightly(args) => nightly::run(args),
        Command::Work(args) => work::run(args),
        Command::Serve(args) => serve::run(args),
        Command::DevSeed(args) => dev_seed::run(args),
    };
    match result {
        Ok(Outcome::Passed) => EXIT_PASSED,
        Ok(Outcome::GateFailed) => EXIT_GATE_FAILED,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_COULD_NOT_RUN
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PARITYBENCH_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}
