//! `runner fixtures gen|build|verify`: seeded models, GGUF files and reference dumps.

use super::Outcome;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Generate the seeded HF-format models (bit-identical on every machine).
    Gen,
}

pub fn run(_cmd: Command) -> anyhow::Result<Outcome> {
    anyhow::bail!("fixtures: not built yet")
}
