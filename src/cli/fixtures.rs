//! `runner fixtures gen|build|verify`: seeded models, GGUF files and reference dumps.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::Outcome;
use crate::fixtures::{self, GenError, Lock, ModelSpec, TokenizerFiles, build, build::BuildConfig};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Generate the seeded HF-format models (bit-identical on every machine) and check them
    /// against the lock file.
    Gen(GenArgs),
    /// Build every model, GGUF file and reference dump of a suite, measure the noise floors
    /// and cross-check the references (cached: unchanged requests are not re-run).
    Build(BuildArgs),
    /// Check every sha256 the fixture records (models also against the committed lock).
    Verify(BuildArgs),
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The prompt suite (a name under fixtures/suites, or a path).
    #[arg(long, default_value = "default")]
    suite: String,
    /// Models, comma-separated [default: the small models].
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Re-run every reference even when its request is unchanged.
    #[arg(long)]
    force: bool,
    /// Timeout of one adapter run, seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_s: u64,
    /// The lock file.
    #[arg(long, default_value = fixtures::DEFAULT_LOCK)]
    lock: PathBuf,
    /// Print the fixture record as JSON.
    #[arg(long)]
    json: bool,
    /// The device the HF references compute on: `cpu`, `cuda` or `cuda:N` (a GPU box builds
    /// its GPU references in its own cache; `cuda` needs `--references hf`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Which references to build: `all` (HF, GGUF files and llama.cpp, on the CPU) or `hf`
    /// (the HF references only, on `--device`).
    #[arg(long, value_enum, default_value_t = RefSet::All)]
    references: RefSet,
}

/// `--references`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum RefSet {
    All,
    Hf,
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
        Command::Build(args) => run_build(args),
        Command::Verify(args) => run_verify(args),
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

fn build_config(args: &BuildArgs) -> anyhow::Result<BuildConfig> {
    let repo = std::env::current_dir().context("current directory")?;
    let suite_path = if args.suite.contains('/') || args.suite.ends_with(".jsonl") {
        PathBuf::from(&args.suite)
    } else {
        repo.join("fixtures/suites").join(format!("{}.jsonl", args.suite))
    };
    let suite = fixtures::Suite::load(&suite_path)?;
    let models = if args.models.is_empty() {
        fixtures::all_models().into_iter().filter(|m| m.default_set).collect()
    } else {
        args.models
            .iter()
            .map(|name| {
                fixtures::find_model(name.trim())
                    .ok_or_else(|| GenError::UnknownModel { name: name.clone(), known: fixtures::model_names() })
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let root = fixtures::cache_dir().context("neither PARITYBENCH_CACHE nor HOME is set")?.join("fixtures");
    let python = std::env::var_os("PARITYBENCH_PYTHON")
        .map(PathBuf::from)
        .context("PARITYBENCH_PYTHON is not set: run `eval \"$(bash runners/setup.sh)\"` first")?;
    let device = crate::engine::backend::Device::parse(&args.device)
        .map_err(|e| anyhow::anyhow!("--device {:?}: {e}", args.device))?;
    if device != crate::engine::backend::Device::Cpu && args.references == RefSet::All {
        anyhow::bail!(
            "--device {}: llama.cpp references run on the CPU (llama-cpp-python); build the GPU's HF references with `--references hf`",
            args.device
        );
    }
    Ok(BuildConfig {
        repo,
        root,
        suite,
        models,
        python,
        force: args.force,
        timeout: Duration::from_secs(args.timeout_s),
        device: args.device.clone(),
        hf_only: args.references == RefSet::Hf,
        llamacpp_isa: std::env::var("PARITYBENCH_LLAMACPP_ISA").ok().filter(|s| !s.is_empty()),
    })
}

fn load_lock(path: &std::path::Path) -> anyhow::Result<Lock> {
    Lock::load(path)?.with_context(|| format!("lock file {} does not exist", path.display()))
}

fn run_build(args: BuildArgs) -> anyhow::Result<Outcome> {
    let cfg = build_config(&args)?;
    let lock = load_lock(&args.lock)?;
    let tokenizer = TokenizerFiles::from_env()?;
    let started = Instant::now();
    let built = build::build(&cfg, &lock, &tokenizer)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&built.record)?);
    } else {
        println!(
            "\nNoise floors and cross-checks (A vs B; relL2 = |A-B|/|B| of the logits, per position; KLD = KL(B||A)):"
        );
        print!("{}", build::render_floors(&built.record.floors));
        println!(
            "\nfixture {} ({} models, suite {} with {} scored positions) in {:.0} s: {}",
            built.record.fixture_id,
            built.record.models.len(),
            built.record.suite.name,
            built.record.suite.scored_positions,
            started.elapsed().as_secs_f64(),
            cfg.record_path().display()
        );
    }
    if built.checks_failed > 0 {
        eprintln!(
            "\nWARNING: {} cross-check(s) FAILED: a reference disagrees with the others beyond its dtype's floor; do not trust it until explained (see the table above).",
            built.checks_failed
        );
        return Ok(Outcome::GateFailed);
    }
    Ok(Outcome::Passed)
}

fn run_verify(args: BuildArgs) -> anyhow::Result<Outcome> {
    let cfg = build_config(&args)?;
    let lock = load_lock(&args.lock)?;
    let (rec, checked, problems) = build::verify(&cfg, &lock)?;
    for p in &problems {
        eprintln!("MISMATCH {}: {}", p.path.display(), p.problem);
    }
    if problems.is_empty() {
        println!("fixture {}: {checked} files verified, every sha256 matches", rec.fixture_id);
        Ok(Outcome::Passed)
    } else {
        println!("fixture {}: {} of {checked} files do not match", rec.fixture_id, problems.len());
        Ok(Outcome::GateFailed)
    }
}
