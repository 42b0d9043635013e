//! `runner once`: build an engine at a commit, run it on the suite, compare it with every
//! reference, judge the comparison against contracts and record the run.
//!
//! The order matters for the promise "never a silent gap": everything that can be checked
//! without the engine (the revision, the contracts, the references) is checked first and is
//! a plain error (exit 2, nothing recorded); from the moment the run is recorded as
//! `running`, every failure — a build that fails, an engine that crashes, hangs or prints
//! NaN — ends in a finished run record holding what was measured and why it stopped.
//!
//! - [`git`] — revision -> [`git::CommitSha`], worktrees under the cache
//! - [`refs`] — the reference dumps of a suite and the requests built from them
//! - [`judge`] — contracts (seam onto `src/contracts`)
//! - [`record`] — the run record: the store's types and the seam onto `src/store`

pub mod git;
pub mod judge;
pub mod owner;
pub mod record;
pub mod refs;
pub mod store_recorder;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, EngineConfig};
use crate::contracts::Severity;
use crate::exec;
use crate::metrics::{self, Report};
use crate::protocol::Dump;
use judge::{Contracts, Subject};
use record::{
    LayerParity, Measurement, Recorder, RunResults, RunStart, RunStatus, SeriesSubject, StoredVerdict, series_reference,
};
use refs::{ModelGroup, Variant};

/// Why `runner once` could not start a run (exit 2; nothing recorded).
#[derive(Debug, thiserror::Error)]
pub enum OnceError {
    #[error("unknown engine `{name}`; configured engines: {known}")]
    UnknownEngine { name: String, known: String },
    #[error(transparent)]
    Git(#[from] git::GitError),
    #[error(transparent)]
    Contract(#[from] judge::ContractError),
    #[error(transparent)]
    Refs(#[from] refs::RefsError),
    #[error("recording the run")]
    Record(#[from] record::RecordError),
    #[error("no contracts: configure `contracts` (files or directories) or add {}", dir.display())]
    NoContracts { dir: PathBuf },
}

/// The recorder runs are kept in: the database `db`, else the configured one, else the
/// embedded default (a SQLite file in the data directory).
pub fn open_recorder(cfg: &Config, db: Option<&str>) -> Result<Box<dyn Recorder>, OnceError> {
    let url = db.map(str::to_string).unwrap_or_else(|| cfg.db_url());
    Ok(Box::new(store_recorder::StoreRecorder::connect(&url, &cfg.data_dir)?))
}

/// What the caller asked for.
#[derive(Debug, Clone)]
pub struct OnceArgs {
    pub rev: String,
    pub engine: Option<String>,
    pub suite: Option<String>,
}

/// Progress callbacks (the CLI draws a bar; tests pass nothing).
pub trait Progress {
    fn start(&self, total: u64);
    fn step(&self, message: &str);
    fn done(&self);
}

/// No progress display.
pub struct Quiet;
impl Progress for Quiet {
    fn start(&self, _: u64) {}
    fn step(&self, _: &str) {}
    fn done(&self) {}
}

/// One row of the summary table: engine × model × mode × reference × prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub model: String,
    pub mode: String,
    pub reference: String,
    pub prompt: String,
    #[serde(with = "crate::metrics::report::num_opt")]
    pub cosine_min: Option<f64>,
    #[serde(with = "crate::metrics::report::num_opt")]
    pub rel_l2_max: Option<f64>,
    #[serde(with = "crate::metrics::report::num_opt")]
    pub kld_p99: Option<f64>,
    #[serde(with = "crate::metrics::report::num_opt")]
    pub top1: Option<f64>,
    #[serde(with = "crate::metrics::report::num_opt")]
    pub top1_margin_aware: Option<f64>,
    /// The first capture (or `logits`) whose rel-L2 exceeds `floor_k ×` the pair's noise
    /// floor; `None` when nothing does, or when the pair has no floor (see `floor`).
    pub first_divergent: Option<String>,
    /// The noise floor file of the pair (`fp16-vs-fp32`, ...); `None`: no floor is measured
    /// for this kind of pair, so no layer is named.
    pub floor: Option<String>,
    /// The margin-aware top-1 tie threshold derived from the floor.
    #[serde(with = "crate::metrics::report::num")]
    pub tie_threshold: f64,
    #[serde(with = "crate::metrics::report::num_opt")]
    pub decode_tok_s: Option<f64>,
    #[serde(with = "crate::metrics::report::num_opt")]
    pub prefill_tok_s: Option<f64>,
}

/// The outcome of `runner once`, printed as a table or as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct OnceOutcome {
    pub run_id: i64,
    pub run_dir: PathBuf,
    pub engine: String,
    pub commit: String,
    pub generation: i64,
    pub status: RunStatus,
    pub error: Option<String>,
    pub rows: Vec<Row>,
    pub verdicts: Vec<StoredVerdict>,
    /// Log files kept (build and engine stdout/stderr), relative to `run_dir`.
    pub logs: Vec<String>,
}

/// Resolves, checks, records, builds, runs, compares, judges, finishes the record.
pub fn run(
    cfg: &Config,
    args: &OnceArgs,
    cwd: &Path,
    recorder: &mut dyn Recorder,
    progress: &dyn Progress,
) -> Result<OnceOutcome, OnceError> {
    let name = args.engine.clone().unwrap_or_else(|| cfg.default_engine.clone());
    let engine = cfg.engines.get(&name).cloned().ok_or_else(|| OnceError::UnknownEngine {
        name: name.clone(),
        known: cfg.engines.keys().cloned().collect::<Vec<_>>().join(", "),
    })?;
    let suite = args.suite.clone().unwrap_or_else(|| cfg.suite.clone());

    // 1. the revision, once
    let repo = match &engine.repo {
        Some(r) => git::local_repo(r, &engine.name, &cfg.cache_dir)?,
        None => git::toplevel(cwd)?,
    };
    let commit = git::resolve(&repo, &args.rev)?;

    // 2. everything that needs no engine
    let contract_paths = if cfg.contracts.is_empty() {
        vec![git::toplevel(cwd).unwrap_or(repo.clone()).join("contracts")]
    } else {
        cfg.contracts.clone()
    };
    if cfg.contracts.is_empty() && !contract_paths[0].is_dir() {
        return Err(OnceError::NoContracts { dir: contract_paths[0].clone() });
    }
    let contracts = Contracts::load(&contract_paths)?;
    let groups = refs::discover(&cfg.cache_dir, &suite)?;

    // 3. the record, before anything can crash; first, the runs of runners on this host that
    // died without finishing theirs (killed, crashed) are finished as errored
    let host = owner::hostname();
    if let Some(h) = &host {
        for a in recorder.sweep_abandoned(h)? {
            eprintln!("note: run {} was left running by pid {}, which is gone: recorded as errored", a.run, a.pid);
        }
    }
    let new = RunStart {
        engine: engine.name.clone(),
        repo: engine.repo.clone().or_else(|| Some(repo.display().to_string())),
        commit_sha: commit.sha.to_string(),
        generation: commit.generation,
        commit_title: commit.title.clone(),
        suite: suite.clone(),
        device_key: device_key(&engine.device),
        host,
        owner: owner::Owner::current().map(|o| o.to_string()),
        fixture_ids: {
            let mut ids: Vec<String> =
                groups.iter().flat_map(|g| g.references.iter().map(|r| r.fixture_id.clone())).collect();
            ids.sort();
            ids.dedup();
            ids
        },
        contracts: contracts.ids(),
    };
    let run_id = recorder.create_run(&new)?;
    let run_dir = recorder.run_dir(run_id);
    let mut state = RunState::default();
    let total = 1
        + u64::from(engine.build.is_some())
        + groups.iter().map(|g| g.variants(engine.incremental).len() as u64).sum::<u64>();
    progress.start(total);
    let error = measure(cfg, &engine, &repo, &commit.sha, &groups, &run_dir, &contracts, progress, &mut state).err();
    progress.done();

    let blocked = state.verdicts.iter().any(|v| v.severity == Severity::Error && !v.passed);
    let status = match (&error, blocked) {
        (Some(_), _) => RunStatus::Errored,
        (None, true) => RunStatus::Failed,
        (None, false) => RunStatus::Passed,
    };
    let results = RunResults {
        status,
        error: error.clone(),
        timings: state.timings,
        series: state.series,
        measurements: state.measurements,
        layers: state.layers,
        verdicts: state.verdicts.clone(),
    };
    recorder.finish_run(run_id, &results)?;
    Ok(OnceOutcome {
        run_id,
        run_dir,
        engine: engine.name,
        commit: commit.sha.to_string(),
        generation: commit.generation,
        status,
        error,
        rows: state.rows,
        verdicts: state.verdicts,
        logs: state.logs,
    })
}

/// What a run has measured so far; kept when it stops half-way.
#[derive(Default)]
struct RunState {
    timings: BTreeMap<String, f64>,
    series: Vec<SeriesSubject>,
    measurements: Vec<Measurement>,
    layers: Vec<LayerParity>,
    verdicts: Vec<StoredVerdict>,
    rows: Vec<Row>,
    logs: Vec<String>,
}

/// Build, then every model × variant; the first error stops the run (its text is the
/// run's error), what was measured before it stays in `state`.
#[expect(clippy::too_many_arguments, reason = "one call site; the pieces of a run")]
fn measure(
    cfg: &Config,
    engine: &EngineConfig,
    repo: &Path,
    sha: &git::CommitSha,
    groups: &[ModelGroup],
    run_dir: &Path,
    contracts: &Contracts,
    progress: &dyn Progress,
    state: &mut RunState,
) -> Result<(), String> {
    let t0 = Instant::now();
    progress.step(&format!("checking out {}", sha.short()));
    let worktree = git::worktree(repo, sha, &cfg.cache_dir).map_err(|e| format!("{e}"))?;
    let target = cfg.cache_dir.join("targets").join(&engine.name);
    let vars = Vars { worktree: &worktree, target: &target, sha };
    if let Some(build) = &engine.build {
        progress.step(&format!("building {} at {}", engine.name, sha.short()));
        let cmd = shell(&vars.fill(build, None), &worktree, engine, &target);
        let f = exec::run_logged(cmd, run_dir, "build", Duration::from_secs(engine.build_timeout_s))
            .map_err(|e| e.to_string())?;
        state.logs.extend(["build.stdout".to_string(), "build.stderr".to_string()]);
        state.timings.insert("build".into(), f.elapsed_ms as f64);
        if !f.ending.is_success() {
            return Err(format!("the build (`{build}`) {}; stderr ends:\n{}", describe(&f.ending), f.stderr_tail(20)));
        }
    }
    let mut first_error: Option<String> = None;
    for g in groups {
        for variant in g.variants(engine.incremental) {
            progress.step(&format!("{} {} ({})", engine.name, g.label(), variant.mode.as_str()));
            if let Err(e) = run_variant(cfg, engine, &vars, g, &variant, run_dir, contracts, state) {
                first_error.get_or_insert(e);
            }
        }
    }
    state.timings.insert("total".into(), t0.elapsed().as_secs_f64() * 1000.0);
    first_error.map_or(Ok(()), Err)
}

/// How a child ended; a shell that ran the engine reports a signal as status 128 + N.
fn describe(e: &exec::Ending) -> String {
    match e {
        exec::Ending::Failed { code } if (129..160).contains(code) => {
            let name = match code - 128 {
                4 => "SIGILL",
                6 => "SIGABRT",
                7 => "SIGBUS",
                8 => "SIGFPE",
                9 => "SIGKILL",
                11 => "SIGSEGV",
                15 => "SIGTERM",
                _ => "a signal",
            };
            format!("{} (the shell's report of signal {}: {name})", e.describe(), code - 128)
        }
        _ => e.describe(),
    }
}

struct Vars<'a> {
    worktree: &'a Path,
    target: &'a Path,
    sha: &'a git::CommitSha,
}

impl Vars<'_> {
    /// The command template with its placeholders replaced by shell-quoted values.
    fn fill(&self, template: &str, io: Option<(&Path, &Path)>) -> String {
        let mut s = template
            .replace("{worktree}", &quote(self.worktree))
            .replace("{target}", &quote(self.target))
            .replace("{sha}", self.sha.as_str());
        if let Some((request, out)) = io {
            s = s.replace("{request}", &quote(request)).replace("{out}", &quote(out));
        }
        s
    }
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

fn shell(script: &str, cwd: &Path, engine: &EngineConfig, target: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).current_dir(cwd).envs(&engine.env);
    c.env("CARGO_TARGET_DIR", target);
    c
}

/// One model × variant: request, adapter run, comparisons, verdicts. Whatever the engine
/// finished is compared and judged even when it then failed.
#[expect(clippy::too_many_arguments, reason = "the pieces of one engine run")]
fn run_variant(
    cfg: &Config,
    engine: &EngineConfig,
    vars: &Vars<'_>,
    g: &ModelGroup,
    variant: &Variant,
    run_dir: &Path,
    contracts: &Contracts,
    state: &mut RunState,
) -> Result<(), String> {
    let dir = run_dir.join(&g.model).join(format!("{}-{}", g.key, variant.mode.as_str()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let request_path = dir.join("request.json");
    let out = dir.join("dump");
    let request = g.request(engine, variant);
    request.save(&request_path).map_err(|e| e.to_string())?;
    let cmd = shell(&vars.fill(&engine.run, Some((&request_path, &out))), vars.worktree, engine, vars.target);
    let f = exec::run_logged(cmd, &dir, "engine", Duration::from_secs(engine.timeout_s)).map_err(|e| e.to_string())?;
    let rel = |n: &str| dir.join(n).strip_prefix(run_dir).map(|p| p.display().to_string()).unwrap_or_default();
    state.logs.extend([rel("engine.stdout"), rel("engine.stderr")]);
    let key = format!("engine.{}.{}.{}", g.model, g.key, variant.mode.as_str());
    state.timings.insert(key, f.elapsed_ms as f64);
    let ended = if f.ending.is_success() {
        None
    } else {
        Some(format!(
            "engine {} on {} ({}) {}; stderr ends:\n{}",
            engine.name,
            g.label(),
            variant.mode.as_str(),
            describe(&f.ending),
            f.stderr_tail(20)
        ))
    };
    let dump = match Dump::open(&out) {
        Ok(d) => d,
        Err(e) => {
            return Err(ended.unwrap_or_else(|| {
                format!("engine {} on {}: exited 0 but left no readable dump: {e}", engine.name, g.label())
            }));
        }
    };
    let ended = ended.or_else(|| {
        (!dump.manifest.complete)
            .then(|| format!("engine {} on {}: exited 0 but the dump is incomplete", engine.name, g.label()))
    });
    if dump.manifest.prompts.is_empty() {
        return Err(ended.unwrap_or_else(|| format!("engine {} on {}: no prompt finished", engine.name, g.label())));
    }
    let engine_dtype = dump.manifest.model.compute_dtype.to_lowercase();
    let mut compare_error = None;
    for r in &g.references {
        let reference = match Dump::open_complete(&r.dir) {
            Ok(d) => d,
            Err(e) => {
                compare_error.get_or_insert(format!("reference {}: {e}", r.id));
                continue;
            }
        };
        let floor = g.pair_floor(r, &engine_dtype);
        let tie_threshold = match floor {
            Some(f) => match logits_rms(&reference) {
                Ok(rms) => tie_threshold(f.floors.logits, rms),
                Err(e) => {
                    compare_error.get_or_insert(format!("reference {}: {e}", r.id));
                    continue;
                }
            },
            None => MIN_TIE_THRESHOLD,
        };
        // a capture the pair's floor does not cover (llama.cpp records none) is never named
        // divergent by an absolute fallback: without its floor it is not judged at all
        let opts = metrics::Options {
            floors: floor.map(|f| f.floors.clone()),
            floor_k: cfg.floor_k,
            tie_threshold,
            layer_threshold: if floor.is_some() { f64::INFINITY } else { metrics::Options::default().layer_threshold },
            ..metrics::Options::default()
        };
        let report = match metrics::compare(&dump, &reference, &opts) {
            Ok(rep) => rep,
            Err(e) => {
                compare_error.get_or_insert(format!("comparing {} with {}: {e}", g.label(), r.id));
                continue;
            }
        };
        let pair = Pair { reference: r, floor, tie_threshold };
        record_report(engine, g, &pair, variant, &dump, &report, contracts, state);
    }
    match ended.or(compare_error) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The tie threshold of an exact f32 pair: logit margins at or below it are f32 rounding.
pub const MIN_TIE_THRESHOLD: f64 = 1e-3;

/// How many standard deviations of the pair's logit noise make a margin a tie.
pub const TIE_Z: f64 = 3.0;

/// The margin-aware top-1 tie threshold of a pair whose logits noise floor (the largest
/// per-position rel-L2 measured between two references of this kind) is `floor`, for
/// reference logits of root-mean-square `rms`.
///
/// A rel-L2 of `floor` at a position is a perturbation of per-logit size about
/// `floor × rms`; the top-1/top-2 margin moves by the difference of two such
/// perturbations, about `√2 × floor × rms`. A margin within `TIE_Z` of that is a tie the
/// pair's own noise can flip, so there the engine's token need only be tied with the
/// reference's top-1 (within the threshold of it: its top 2, and any as close). Never below
/// [`MIN_TIE_THRESHOLD`] (f32 rounding of the logits themselves).
pub fn tie_threshold(floor: f64, rms: f64) -> f64 {
    let t = TIE_Z * std::f64::consts::SQRT_2 * floor * rms;
    if t.is_finite() { t.max(MIN_TIE_THRESHOLD) } else { MIN_TIE_THRESHOLD }
}

/// Root-mean-square of every finite logit of a dump (f64, prompts in manifest order).
pub fn logits_rms(dump: &Dump) -> Result<f64, crate::protocol::ProtocolError> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for p in &dump.manifest.prompts {
        let shard = dump.shard(&p.id)?;
        let logits = shard.logits()?;
        for &x in logits.to_f32().iter().filter(|x| x.is_finite()) {
            sum += f64::from(x) * f64::from(x);
            n += 1;
        }
    }
    Ok(if n == 0 { 0.0 } else { (sum / n as f64).sqrt() })
}

/// One engine dump compared with one reference: the reference, the noise floor of the
/// pair (see [`refs`]) and the tie threshold derived from it.
struct Pair<'a> {
    reference: &'a refs::Reference,
    floor: Option<&'a refs::NamedFloors>,
    tie_threshold: f64,
}

/// Samples a contract needs that are facts of the dumps rather than numbers:
/// `tokenizer_parity` (per compared prompt with text: 1 when the engine's own tokenization
/// equals the ids it was given) and `layer.count_parity` (per compared prompt: 1 when the
/// engine recorded every capture tensor the reference holds; positions and shapes are
/// already equal, or the comparison would have refused). Used where the report does not
/// carry them itself.
fn structural_samples(dump: &Dump, report: &Report) -> BTreeMap<String, Vec<f64>> {
    let bit = |b: bool| if b { 1.0 } else { 0.0 };
    let tokenizer = report
        .prompts
        .iter()
        .filter_map(|p| dump.manifest.prompt(&p.id).and_then(|r| r.tokenizer_match).map(bit))
        .collect();
    let counts =
        report.prompts.iter().map(|p| bit(!p.absent.iter().any(|a| a.absent_in == metrics::Side::Engine))).collect();
    BTreeMap::from([("tokenizer_parity".to_string(), tokenizer), ("layer.count_parity".to_string(), counts)])
}

#[expect(clippy::too_many_arguments, reason = "the pieces of one comparison")]
fn record_report(
    engine: &EngineConfig,
    g: &ModelGroup,
    pair: &Pair<'_>,
    variant: &Variant,
    dump: &Dump,
    report: &Report,
    contracts: &Contracts,
    state: &mut RunState,
) {
    let r = pair.reference;
    let label = g.label().to_string();
    let mode = variant.mode.as_str().to_string();
    // a series per (model file, reference, mode): incremental runs are stored as `<ref>/incremental`
    let stored_ref = series_reference(&r.id, &mode);
    let subject_series = SeriesSubject {
        model: label.clone(),
        model_sha256: g.model_sha256.clone(),
        reference: stored_ref.clone(),
        fixture_id: r.fixture_id.clone(),
    };
    if !state.series.contains(&subject_series) {
        state.series.push(subject_series);
    }
    let perf = perf_samples(dump);
    let m = |prompt: Option<&str>, metric: &str, statistic: &str, value: f64| Measurement {
        model: label.clone(),
        reference: stored_ref.clone(),
        prompt: prompt.map(str::to_string),
        metric: metric.into(),
        statistic: statistic.into(),
        value,
    };
    for p in &report.prompts {
        let s = &p.summary;
        let id = Some(p.id.as_str());
        let pp = perf.get(&p.id).copied().unwrap_or_default();
        let (pre, dec) = (pp.prefill_tok_s.map(|s| s.median), pp.decode_tok_s.map(|s| s.median));
        if let Some(v) = s.cosine_min {
            state.measurements.push(m(id, "logits.cosine", "min", v));
        }
        if let Some(v) = s.rel_l2_max {
            state.measurements.push(m(id, "logits.rel_l2", "max", v));
        }
        if let Some(k) = s.kld {
            state.measurements.push(m(id, "kld", "p99", k.p99));
        }
        if let Some(t) = s.top1 {
            state.measurements.push(m(id, "top1", "mean", t.rate));
        }
        state.measurements.push(m(id, "nonfinite", "value", s.nonfinite as f64));
        for (metric, t) in pp.metrics() {
            for (stat, v) in [("median", t.median), ("min", t.min), ("max", t.max)] {
                state.measurements.push(m(id, metric, stat, v));
            }
        }
        state.rows.push(Row {
            model: label.clone(),
            mode: mode.clone(),
            reference: r.id.clone(),
            prompt: p.id.clone(),
            cosine_min: s.cosine_min,
            rel_l2_max: s.rel_l2_max,
            kld_p99: s.kld.map(|k| k.p99),
            top1: s.top1.map(|t| t.rate),
            top1_margin_aware: s.top1_margin_aware.map(|t| t.rate),
            first_divergent: pair.floor.and(p.first_divergent.as_ref()).map(|d| d.tensor.clone()),
            floor: pair.floor.map(|f| f.name.clone()),
            tie_threshold: pair.tie_threshold,
            decode_tok_s: dec,
            prefill_tok_s: pre,
        });
    }
    let ov = &report.overall.summary;
    for (metric, stat, v) in [
        ("logits.cosine", "min", ov.cosine_min),
        ("logits.cosine", "mean", ov.cosine_mean),
        ("logits.rel_l2", "max", ov.rel_l2_max),
        ("logits.rel_l2", "mean", ov.rel_l2_mean),
        ("logits.nmse", "mean", ov.nmse_mean),
        ("logits.max_abs", "max", ov.max_abs),
        ("kld", "mean", ov.kld.map(|k| k.mean)),
        ("kld", "median", ov.kld.map(|k| k.median)),
        ("kld", "p99", ov.kld.map(|k| k.p99)),
        ("kld", "max", ov.kld.map(|k| k.max)),
        ("top1", "mean", ov.top1.map(|t| t.rate)),
        ("top1", "wilson_lower", ov.top1.map(|t| t.wilson_lower)),
        ("top1", "n", ov.top1.map(|t| t.n as f64)),
        ("top1_margin_aware", "mean", ov.top1_margin_aware.map(|t| t.rate)),
        ("top1_margin_aware", "tie_threshold", Some(pair.tie_threshold)),
        ("nonfinite", "value", Some(ov.nonfinite as f64)),
    ] {
        if let Some(v) = v {
            state.measurements.push(m(None, metric, stat, v));
        }
    }
    // timings pooled over the compared prompts: the series' tok/s trend and its band
    let compared: Vec<PromptPerf> = report.prompts.iter().filter_map(|p| perf.get(&p.id).copied()).collect();
    let pooled = [
        ("prefill_tok_s", Spread::pool(compared.iter().filter_map(|p| p.prefill_tok_s))),
        ("decode_tok_s", Spread::pool(compared.iter().filter_map(|p| p.decode_tok_s))),
        ("ttft_ms", Spread::pool(compared.iter().filter_map(|p| p.ttft_ms))),
    ];
    for (metric, t) in pooled {
        if let Some(t) = t {
            for (stat, v) in [("median", t.median), ("min", t.min), ("max", t.max)] {
                state.measurements.push(m(None, metric, stat, v));
            }
        }
    }
    for l in &report.overall.layers {
        if let metrics::report::LayerSummaryValues::Float { rel_l2, cosine, .. } = l.values {
            state.layers.push(LayerParity {
                model: label.clone(),
                reference: stored_ref.clone(),
                prompt: None,
                capture: l.capture.as_str().into(),
                layer: i64::from(l.layer),
                rel_l2,
                cosine,
            });
        }
    }

    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (k, v) in report.samples().iter() {
        samples.entry(k.metric.clone()).or_default().extend_from_slice(v);
    }
    for (k, v) in structural_samples(dump, report) {
        samples.entry(k).or_insert(v);
    }
    // a contract's timing gates see one sample per compared prompt: its median
    let median =
        |f: fn(&PromptPerf) -> Option<Spread>| compared.iter().filter_map(|p| f(p).map(|s| s.median)).collect();
    samples.insert("prefill_tok_s".into(), median(|p| p.prefill_tok_s));
    samples.insert("decode_tok_s".into(), median(|p| p.decode_tok_s));
    samples.insert("ttft_ms".into(), median(|p| p.ttft_ms));
    let subject = Subject {
        engine: engine.name.clone(),
        model: label,
        reference: r.id.clone(),
        dtype: Some(g.dtype.clone()),
        mode: Some(mode.clone()),
        samples,
        noise_floors: contract_floors(pair.floor),
    };
    let verdicts = contracts.evaluate(std::slice::from_ref(&subject));
    state.verdicts.extend(verdicts.into_iter().map(|v| StoredVerdict { reference: stored_ref.clone(), ..v }));
}

/// The noise floors a contract's floor-relative gates see: the pair's logits floor, for
/// `layer.rel_l2` (whose samples pool every capture point and layer) the largest capture
/// floor, and for `kld` the pair's mean KLD (meant for gates with reduction `mean`).
fn contract_floors(floor: Option<&refs::NamedFloors>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if let Some(f) = floor {
        out.insert("logits.rel_l2".to_string(), f.floors.logits);
        let layer = f.floors.captures.values().flat_map(|l| l.values().copied()).reduce(f64::max);
        if let Some(x) = layer {
            out.insert("layer.rel_l2".to_string(), x);
        }
        if let Some(k) = f.floors.kld_mean {
            out.insert("kld".to_string(), k);
        }
    }
    out
}

/// The timing metrics `runner once` stores from the manifests' timings, each as `median`,
/// `min` and `max` over the timed repeats (per prompt, and pooled over prompts). They are
/// not parity numbers: they change from run to run.
pub const TIMING_METRICS: [&str; 3] = ["prefill_tok_s", "decode_tok_s", "ttft_ms"];

/// Whether `metric` is one of [`TIMING_METRICS`].
pub fn is_timing_metric(metric: &str) -> bool {
    TIMING_METRICS.contains(&metric)
}

/// A timing over the timed repeats of one prompt, or pooled over prompts.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    /// Pooled over prompts: the nearest-rank median of the prompts' medians, the smallest
    /// minimum and the largest maximum (so min..max spans every timed repeat).
    fn pool(of: impl Iterator<Item = Spread>) -> Option<Spread> {
        let all: Vec<Spread> = of.collect();
        let mut medians: Vec<f64> = all.iter().map(|s| s.median).collect();
        medians.sort_by(f64::total_cmp);
        Some(Spread {
            median: metrics::stats::percentile_sorted(&medians, 50.0)?,
            min: all.iter().map(|s| s.min).fold(f64::INFINITY, f64::min),
            max: all.iter().map(|s| s.max).fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

/// One prompt's timings: prefill and decode tok/s, time to first token (ms).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct PromptPerf {
    prefill_tok_s: Option<Spread>,
    decode_tok_s: Option<Spread>,
    ttft_ms: Option<Spread>,
}

impl PromptPerf {
    /// `(metric, spread)` for each of [`TIMING_METRICS`] that was measured.
    fn metrics(&self) -> impl Iterator<Item = (&'static str, Spread)> {
        let all = [self.prefill_tok_s, self.decode_tok_s, self.ttft_ms];
        TIMING_METRICS.into_iter().zip(all).filter_map(|(m, s)| s.map(|s| (m, s)))
    }
}

/// Prompt id -> its timings over the timed repeats. A rate's median is `tokens` over the
/// median time (the upper middle time for an even count), its min and max come from the
/// slowest and fastest repeat; times that are not positive are left out.
fn perf_samples(dump: &Dump) -> BTreeMap<String, PromptPerf> {
    let sorted = |ms: &[f64]| {
        let mut v: Vec<f64> = ms.iter().copied().filter(|x| *x > 0.0 && x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let rate = |tokens: u32, ms: &[f64]| {
        let v = sorted(ms);
        let per_s = |ms: f64| f64::from(tokens) / (ms / 1000.0);
        (tokens > 0 && !v.is_empty()).then(|| Spread {
            median: per_s(v[v.len() / 2]),
            min: per_s(v[v.len() - 1]),
            max: per_s(v[0]),
        })
    };
    let time = |ms: &[f64]| {
        let v = sorted(ms);
        (!v.is_empty()).then(|| Spread { median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] })
    };
    dump.manifest
        .prompts
        .iter()
        .map(|p| {
            let t = &p.timings;
            let perf = PromptPerf {
                prefill_tok_s: rate(t.prefill_tokens, &t.prefill_ms),
                decode_tok_s: rate(t.decode_tokens, &t.decode_ms),
                ttft_ms: time(&t.ttft_ms),
            };
            (p.id.clone(), perf)
        })
        .collect()
}

/// `cpu|<CPU model>`, or for `cuda:N` the GPU's fingerprint from the CUDA backend
/// (`cuda|<name> (sm_XY, N MiB)|driver=..|cuda=..`; `cuda|unavailable: <why>` without a GPU).
pub fn device_key(device: &str) -> String {
    if let Ok(crate::engine::backend::Device::Cuda(n)) = crate::engine::backend::Device::parse(device) {
        return match crate::engine::backend::cuda::probe_fingerprint(n) {
            Ok(f) => f.key(),
            Err(e) => format!("cuda|unavailable: {e}"),
        };
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    format!("{}|{cpu}", if device.starts_with("cuda") { "cuda" } else { "cpu" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_timings_span_every_repeat() {
        let s = |median, min, max| Spread { median, min, max };
        let pooled = Spread::pool(
            [s(20.0, 10.0, 30.0), s(40.0, 35.0, 90.0), s(25.0, 5.0, 26.0), s(30.0, 29.0, 31.0)].into_iter(),
        );
        // the lower middle of the four medians (nearest rank), every repeat inside min..max
        assert_eq!(pooled, Some(s(25.0, 5.0, 90.0)));
        assert_eq!(Spread::pool(std::iter::empty()), None);
        assert!(is_timing_metric("decode_tok_s") && is_timing_metric("ttft_ms") && !is_timing_metric("kld"));
    }
}
