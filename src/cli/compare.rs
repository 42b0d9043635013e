//! `runner compare DUMP_A DUMP_B [--json]`: the metrics of SPEC between two dumps.

use std::path::PathBuf;

use super::Outcome;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The dump under test (an engine's output directory).
    pub engine: PathBuf,
    /// The reference dump.
    pub reference: PathBuf,
    /// Print the full report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: Args) -> anyhow::Result<Outcome> {
    anyhow::bail!("compare: not built yet")
}
