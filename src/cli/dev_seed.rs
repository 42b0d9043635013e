//! `runner dev-seed` (hidden): fills an empty database with a year-shaped history for
//! measuring the dashboard (see `src/service/seed.rs` and BENCHMARKS.md).

use std::time::Instant;

use anyhow::Context;

use super::Outcome;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The database URL (an empty database).
    #[arg(long, value_name = "URL")]
    pub db: String,
    /// How many series (a multiple of 20).
    #[arg(long, default_value_t = 200)]
    pub series: usize,
    /// How many commits per engine (one run per series and commit).
    #[arg(long, default_value_t = 500)]
    pub commits: usize,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let t0 = Instant::now();
    let s = rt.block_on(crate::service::seed::seed(&args.db, args.series, args.commits)).context("seeding")?;
    println!(
        "seeded {} series × {} commits = {} runs, {} rows in {:.1} s",
        s.series,
        s.commits,
        s.runs,
        s.rows,
        t0.elapsed().as_secs_f64()
    );
    Ok(Outcome::Passed)
}
