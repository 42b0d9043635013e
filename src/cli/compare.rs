//! `runner compare DUMP_A DUMP_B [--json]`: the metrics of SPEC between two dumps.
//!
//! Exit codes: 0 compared and every value finite; 1 a value is non-finite (the message
//! names the prompt, tensor and positions); 2 a refusal (token ids or positions differ,
//! shapes differ, a dump cannot be read, nothing to compare).

use std::path::PathBuf;

use anyhow::Context;

use super::Outcome;
use crate::metrics::{self, NoiseFloors, Options};
use crate::protocol::Dump;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The dump under test (an engine's output directory).
    pub engine: PathBuf,
    /// The reference dump.
    pub reference: PathBuf,
    /// Print the full report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Noise floors (JSON: capture -> layer -> rel-L2, plus `logits`) measured between two
    /// references; the first divergent layer is then the first above k × its floor.
    #[arg(long, value_name = "FILE")]
    pub floors: Option<PathBuf>,
    /// Multiple of the noise floor that flags a layer.
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    pub floor_k: f64,
    /// Floors below this are raised to it, so a zero floor does not flag f32 rounding.
    #[arg(long, default_value_t = 1e-6, value_parser = non_negative)]
    pub min_floor: f64,
    /// rel-L2 that flags a layer (and a deviating position) where no floor is known.
    #[arg(long, default_value_t = 1e-3, value_parser = non_negative)]
    pub layer_threshold: f64,
    /// Reference top-1/top-2 logit margin at or below which a position counts as a tie.
    #[arg(long, default_value_t = 1e-3, value_parser = non_negative, conflicts_with = "tie_from_floors")]
    pub tie_threshold: f64,
    /// Derive the tie threshold from `--floors` as `runner once` does for a pair:
    /// max(1e-3, 3·√2·floor·rms of the reference's logits), the pair's own noise on a margin.
    #[arg(long, requires = "floors")]
    pub tie_from_floors: bool,
    /// Write the noise floors of this comparison (the largest rel-L2 of the logits and of
    /// every capture, the mean KLD) to FILE, for `--floors` of later comparisons: compare two
    /// references of one kind first, then an engine against one of them.
    #[arg(long, value_name = "FILE")]
    pub save_floors: Option<PathBuf>,
}

fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if v.is_finite() && v >= 0.0 { Ok(v) } else { Err(format!("{s} must be a finite number ≥ 0")) }
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let engine = Dump::open(&args.engine).context("reading the engine's dump")?;
    let reference = Dump::open(&args.reference).context("reading the reference dump")?;
    let floors = args.floors.as_deref().map(NoiseFloors::load).transpose()?;
    let tie_threshold = match (&floors, args.tie_from_floors) {
        (Some(f), true) => {
            let rms = crate::once::logits_rms(&reference).context("reading the reference's logits")?;
            crate::once::tie_threshold(f.logits, rms)
        }
        _ => args.tie_threshold,
    };
    let opts = Options {
        tie_threshold,
        layer_threshold: args.layer_threshold,
        floors,
        floor_k: args.floor_k,
        min_floor: args.min_floor,
    };
    let report = metrics::compare(&engine, &reference, &opts)
        .with_context(|| format!("comparing {} with {}", args.engine.display(), args.reference.display()))?;
    if let Some(path) = &args.save_floors {
        let what = format!("{} vs {}", args.engine.display(), args.reference.display());
        NoiseFloors::from_report(&report, what).save(path)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("serializing the report")?);
    } else {
        print!("{}", report.render_text());
    }
    if report.nonfinite_total() > 0 {
        eprintln!("FAILED: {} non-finite value(s); every gate fails:", report.nonfinite_total());
        for line in report.nonfinite_lines() {
            eprintln!("  {line}");
        }
        return Ok(Outcome::GateFailed);
    }
    Ok(Outcome::Passed)
}
