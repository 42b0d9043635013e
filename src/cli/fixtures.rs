//! `runner fixtures gen|build|verify`: seeded models, GGUF files and reference dumps.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use super::Outcome;
use crate::fixtures::{self, GenError, Lock, ModelSpec, TokenizerFiles};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Generate the seeded HF-format models (bit-identical on every machine) and check them
    /// against the lock file.
    Gen(GenArgs),
}

#[derive(clap::Args, Debug)]
pub struct GenArgs {
    /// Output directory [default: $PARITYBENCH_CACHE/fixtures/models].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Models to generate, comma-separated [default: the small models].
    #[arg(long, value_delimiter = ',', conflicts_with = "all")]
    models: Vec<String>,
    /// Generate every model, including the large qwen3-0.6b.
    #[arg(long)]
    all: bool,
    /// Record the generated files in the lock instead of failing on a difference.
    #[arg(long)]
    update_lock: bool,
    /// The lock file.
    #[arg(long, default_value = fixtures::DEFAULT_LOCK)]
    lock: PathBuf,
}

pub fn run(cmd: Command) -> anyhow::Result<Outcome> {
    match cmd {
        Command::Gen(args) => run_gen(args),
    }
}

fn run_gen(args: GenArgs) -> anyhow::Result<Outcome> {
    let specs = select_models(&args)?;
    let out = match args.out {
        Some(o) => o,
        None => fixtures::models_dir().context("neither PARITYBENCH_CACHE nor HOME is set: pass --out")?,
    };
    let tokenizer = TokenizerFiles::from_env()?;
    let lock = Lock::load(&args.lock)?;
    if lock.is_none() && !args.update_lock {
        anyhow::bail!("lock file {} does not exist (create it with --update-lock)", args.lock.display());
    }
    let mut lock = lock.unwrap_or_default();

    let mut mismatches = Vec::new();
    for spec in &specs {
        let started = Instant::now();
        let files = fixtures::write_model(spec, &out, Some(&tokenizer), true)
            .with_context(|| format!("generating {}", spec.name))?;
        let found = lock.check(spec, &files);
        let status = match (found.is_empty(), args.update_lock) {
            (true, _) => "matches lock",
            (false, true) => "lock updated",
            (false, false) => "DIFFERS FROM LOCK",
        };
        println!(
            "{:<16} {:>12} params  {:>6.1} s  {}  {}",
            spec.name,
            spec.n_params(),
            started.elapsed().as_secs_f64(),
            out.join(spec.name).display(),
            status
        );
        if args.update_lock {
            lock.update(spec, &files);
        }
        mismatches.extend(found);
    }
    if args.update_lock {
        lock.save(&args.lock)?;
        println!("wrote {}", args.lock.display());
    } else if !mismatches.is_empty() {
        return Err(GenError::LockMismatch { path: args.lock, mismatches }.into());
    }
    Ok(Outcome::Passed)
}

fn select_models(args: &GenArgs) -> Result<Vec<ModelSpec>, GenError> {
    if args.all {
        return Ok(fixtures::all_models());
    }
    if args.models.is_empty() {
        return Ok(fixtures::all_models().into_iter().filter(|m| m.default_set).collect());
    }
    args.models
        .iter()
        .map(|name| {
            fixtures::find_model(name.trim())
                .ok_or_else(|| GenError::UnknownModel { name: name.clone(), known: fixtures::model_names() })
        })
        .collect()
}
