//! `runner once --commit REV`: measure one commit of an engine and record it.
//!
//! Exit codes: 0 every gate passed; 1 a gate failed; 2 the run could not be made (a bad
//! revision, contract or configuration — nothing recorded — or an engine that failed to
//! build, crashed or hung: recorded as `errored` with its stderr).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::Outcome;
use crate::config::Config;
use crate::contracts::Severity;
use crate::once::record::RunStatus;
use crate::once::{self, OnceArgs, OnceOutcome, Progress};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The revision to measure: a sha, HEAD, a tag or a branch (resolved once to a full sha).
    #[arg(long, value_name = "REV")]
    pub commit: String,
    /// The engine (a name from the configuration; default: the built-in engine).
    #[arg(long)]
    pub engine: Option<String>,
    /// The prompt suite whose reference dumps to compare with.
    #[arg(long)]
    pub suite: Option<String>,
    /// The database URL (default: a SQLite file in the data directory).
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// Print the outcome as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// A TOML configuration file (engines, paths); `PARITYBENCH_*` variables override it.
    #[arg(long, value_name = "FILE", env = "PARITYBENCH_CONFIG")]
    pub config: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let cfg = Config::load(args.config.as_deref()).context("reading the configuration")?;
    let cwd = std::env::current_dir().context("the current directory")?;
    let mut recorder = once::open_recorder(&cfg, args.db.as_deref())?;
    let bar = Bar::new(!args.json && std::io::stderr().is_terminal());
    let a = OnceArgs { rev: args.commit.clone(), engine: args.engine.clone(), suite: args.suite.clone() };
    let outcome = once::run(&cfg, &a, &cwd, recorder.as_mut(), &bar)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome).context("serializing the outcome")?);
    } else {
        print!("{}", render(&outcome));
    }
    match outcome.status {
        RunStatus::Passed => Ok(Outcome::Passed),
        RunStatus::Failed => Ok(Outcome::GateFailed),
        RunStatus::Errored | RunStatus::Running | RunStatus::Queued => Err(anyhow::anyhow!(
            "run {} of {} at {} errored: {}",
            outcome.run_id,
            outcome.engine,
            &outcome.commit[..12],
            outcome.error.as_deref().unwrap_or("unknown")
        )),
    }
}

/// An indicatif bar on stderr, or nothing when stderr is not a terminal or `--json`.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(show: bool) -> Bar {
        Bar(show.then(|| {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                    .expect("a valid template"),
            );
            pb.enable_steady_tick(Duration::from_millis(200));
            pb
        }))
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
        }
    }
    fn step(&self, message: &str) {
        if let Some(b) = &self.0 {
            if !b.message().is_empty() {
                b.inc(1);
            }
            b.set_message(message.to_string());
        }
    }
    fn done(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// The summary table, then each verdict, then the status line.
pub fn render(o: &OnceOutcome) -> String {
    use std::fmt::Write;
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    let sci = |v: f64| if v == 0.0 { "0".to_string() } else { format!("{v:.3e}") };
    let mut s = String::new();
    let _ = writeln!(s, "run {} — {} at {} (generation {})", o.run_id, o.engine, o.commit, o.generation);
    let _ = writeln!(
        s,
        "{:<18} {:<11} {:<26} {:<14} {:>9} {:>10} {:>10} {:>7} {:>7} {:>9}  first divergent",
        "model", "mode", "reference", "prompt", "min cos", "max relL2", "KLD p99", "top-1", "margin", "tok/s"
    );
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    for r in &o.rows {
        let divergent = match (&r.floor, &r.first_divergent) {
            (None, _) => "- (no floor for this pair)".to_string(),
            (Some(f), None) => format!("none (floor {f})"),
            (Some(f), Some(d)) => format!("{d} (floor {f})"),
        };
        let _ = writeln!(
            s,
            "{:<18} {:<11} {:<26} {:<14} {:>9} {:>10} {:>10} {:>7} {:>7} {:>9}  {}",
            r.model,
            r.mode,
            r.reference,
            r.prompt,
            opt(r.cosine_min, &|v| format!("{v:.6}")),
            opt(r.rel_l2_max, &sci),
            opt(r.kld_p99, &sci),
            opt(r.top1, &pct),
            opt(r.top1_margin_aware, &pct),
            opt(r.decode_tok_s.or(r.prefill_tok_s), &|v| format!("{v:.1}")),
            divergent
        );
    }
    let _ = writeln!(s);
    for v in &o.verdicts {
        let _ = writeln!(
            s,
            "{:<7} {}/{} {} {} {} {} {} = {} ({} samples; {} {} {}){}",
            v.outcome.as_str().to_uppercase(),
            v.contract.id,
            v.gate_id,
            v.reduction,
            v.metric,
            v.comparison,
            v.threshold,
            if v.severity == Severity::Error { "" } else { "[warning]" },
            v.observed.map_or("-".into(), |x| format!("{x:.6e}")),
            v.n_samples,
            v.model,
            v.mode.as_deref().unwrap_or("-"),
            v.reference,
            v.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
        );
    }
    let _ = writeln!(s, "\nstatus: {} (run directory {})", o.status.as_str(), o.run_dir.display());
    if let Some(e) = &o.error {
        let _ = writeln!(s, "error: {e}");
    }
    s
}
