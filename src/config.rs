//! The runner's configuration: defaults, then a TOML file, then `PARITYBENCH_*` variables.
//!
//! With no configuration at all, `runner once --commit HEAD` in a checkout of paritybench
//! measures the built-in engine of that checkout on the bundled suite and stores the result
//! in a SQLite file under the data directory. A TOML file adds engines driven by command
//! templates (see `runners/apr.example.toml`) and moves paths; environment variables win over
//! both. Secrets (a database URL's password) are redacted wherever the config is printed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The name of the built-in engine.
pub const BUILTIN_ENGINE: &str = "paritybench";

/// Why the configuration could not be read; each variant names the file or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Toml { path: PathBuf, source: Box<toml::de::Error> },
    #[error("environment variable {name}={value:?}: {message}")]
    Env { name: &'static str, value: String, message: String },
    #[error("{}: engine `{engine}`: {message}", path.display())]
    Engine { path: PathBuf, engine: String, message: String },
    #[error("{}: `{key}`: {message}", path.display())]
    Setting { path: PathBuf, key: String, message: String },
    #[error("no home directory to put the cache under: set PARITYBENCH_CACHE")]
    NoHome,
}

/// A string that is never printed by `Debug`: a URL shows without its password, anything
/// else (a webhook secret, an API token) as `***`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.contains("://") { f.write_str(&redact_url(&self.0)) } else { f.write_str("***") }
    }
}

/// A URL with its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// How an engine is built and run at a commit.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub name: String,
    /// A local repository path or a URL; `None`: the git repository holding the current
    /// directory.
    pub repo: Option<String>,
    /// Shell command run in the worktree; `CARGO_TARGET_DIR` is the shared target dir.
    pub build: Option<String>,
    /// Shell command of the adapter's `run`, with `{request}` and `{out}` (and optionally
    /// `{worktree}`, `{target}`, `{sha}`) placeholders.
    pub run: String,
    /// Limit of one adapter run, seconds.
    pub timeout_s: u64,
    /// Limit of the build, seconds.
    pub build_timeout_s: u64,
    /// Extra environment for build and run.
    pub env: BTreeMap<String, String>,
    /// Device asked of the engine (`cpu`, `cuda`, `cuda:N`).
    pub device: String,
    /// Whether to also run in incremental mode on f32 safetensors models.
    pub incremental: bool,
    /// Greedy decode steps asked of the engine.
    pub decode_steps: u32,
}

impl EngineConfig {
    /// The built-in engine of the repository being measured.
    pub fn builtin() -> EngineConfig {
        EngineConfig {
            name: BUILTIN_ENGINE.to_string(),
            repo: None,
            build: Some("cargo build --release --bin runner".to_string()),
            run: "{target}/release/runner engine run --request {request} --out {out}".to_string(),
            timeout_s: 1800,
            build_timeout_s: 3600,
            env: BTreeMap::new(),
            device: "cpu".to_string(),
            incremental: true,
            decode_steps: 32,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `$PARITYBENCH_CACHE`, default `~/.cache/paritybench`: fixtures, worktrees, targets.
    pub cache_dir: PathBuf,
    /// `$PARITYBENCH_DATA`, default `<cache>/data`: the SQLite file and run directories.
    pub data_dir: PathBuf,
    /// `$PARITYBENCH_DB`; default `sqlite://<data>/paritybench.sqlite`.
    pub db: Option<Secret>,
    /// `$PARITYBENCH_SUITE`, default `default`.
    pub suite: String,
    /// `$PARITYBENCH_ENGINE`, default the built-in engine.
    pub default_engine: String,
    /// Contract files (or directories of them); empty: `<repo>/contracts/`.
    pub contracts: Vec<PathBuf>,
    /// Multiple of the fixture noise floor that flags the first divergent layer.
    pub floor_k: f64,
    pub engines: BTreeMap<String, EngineConfig>,
    /// `[queue]`: leases, retries and the worker's device.
    pub queue: QueueConfig,
    /// `[github]`: the webhook and the commit statuses.
    pub github: GithubConfig,
    /// `[nightly]`: which branch heads `runner nightly` measures.
    pub nightly: NightlyConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    cache_dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    db: Option<Secret>,
    suite: Option<String>,
    default_engine: Option<String>,
    contracts: Option<Vec<PathBuf>>,
    floor_k: Option<f64>,
    #[serde(default)]
    engines: BTreeMap<String, FileEngine>,
    #[serde(default)]
    queue: QueueConfig,
    #[serde(default)]
    github: GithubConfig,
    #[serde(default)]
    nightly: NightlyConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEngine {
    repo: Option<String>,
    build: Option<String>,
    run: Option<String>,
    timeout_s: Option<u64>,
    build_timeout_s: Option<u64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    device: Option<String>,
    incremental: Option<bool>,
    decode_steps: Option<u32>,
}

impl Config {
    /// Defaults, then `file` (when given), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with(file, |k| std::env::var(k).ok())
    }

    /// [`Config::load`] with the environment given as a lookup (for tests).
    pub fn load_with(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let parsed = match file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
                let f: FileConfig =
                    toml::from_str(&text).map_err(|e| ConfigError::Toml { path: path.into(), source: Box::new(e) })?;
                Some((path.to_path_buf(), f))
            }
            None => None,
        };
        let (path, f) = parsed.unwrap_or_default();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let rel = |p: PathBuf| if p.is_relative() && !base.as_os_str().is_empty() { base.join(p) } else { p };

        let cache_dir = match env("PARITYBENCH_CACHE") {
            Some(v) => PathBuf::from(v),
            None => match f.cache_dir {
                Some(p) => rel(p),
                None => default_cache()?,
            },
        };
        let data_dir = match env("PARITYBENCH_DATA") {
            Some(v) => PathBuf::from(v),
            None => f.data_dir.map(rel).unwrap_or_else(|| cache_dir.join("data")),
        };
        let db = env("PARITYBENCH_DB").map(Secret::new).or(f.db);
        let suite = env("PARITYBENCH_SUITE").or(f.suite).unwrap_or_else(|| "default".to_string());
        let default_engine =
            env("PARITYBENCH_ENGINE").or(f.default_engine).unwrap_or_else(|| BUILTIN_ENGINE.to_string());
        let contracts = match env("PARITYBENCH_CONTRACTS") {
            Some(v) => std::env::split_paths(&v).collect(),
            None => f.contracts.unwrap_or_default().into_iter().map(rel).collect(),
        };
        let floor_k = match env("PARITYBENCH_FLOOR_K") {
            Some(v) => v.parse::<f64>().ok().filter(|k| k.is_finite() && *k > 0.0).ok_or_else(|| ConfigError::Env {
                name: "PARITYBENCH_FLOOR_K",
                value: v.clone(),
                message: "expected a positive number".into(),
            })?,
            None => f.floor_k.unwrap_or(10.0),
        };

        let mut engines = BTreeMap::new();
        engines.insert(BUILTIN_ENGINE.to_string(), EngineConfig::builtin());
        for (name, e) in f.engines {
            let mut c = engines.remove(&name).unwrap_or_else(|| EngineConfig {
                name: name.clone(),
                build: None,
                ..EngineConfig::builtin()
            });
            let Some(run) = e.run.or_else(|| (name == BUILTIN_ENGINE).then(|| c.run.clone())) else {
                return Err(ConfigError::Engine {
                    path,
                    engine: name,
                    message: "`run` is required (a command with {request} and {out})".into(),
                });
            };
            if !(run.contains("{request}") && run.contains("{out}")) {
                return Err(ConfigError::Engine {
                    path,
                    engine: name,
                    message: format!("`run` = {run:?} must contain both {{request}} and {{out}}"),
                });
            }
            c.run = run;
            c.repo =
                e.repo.map(|r| if is_url(&r) { r } else { rel(PathBuf::from(r)).display().to_string() }).or(c.repo);
            c.build = e.build.or(c.build);
            c.timeout_s = e.timeout_s.unwrap_or(c.timeout_s);
            c.build_timeout_s = e.build_timeout_s.unwrap_or(c.build_timeout_s);
            c.env = e.env;
            c.device = e.device.unwrap_or(c.device);
            c.incremental = e.incremental.unwrap_or(c.incremental);
            c.decode_steps = e.decode_steps.unwrap_or(c.decode_steps);
            engines.insert(name, c);
        }
        let mut queue = f.queue;
        if let Some(v) = env("PARITYBENCH_WORKER_DEVICE") {
            queue.device = Some(v);
        }
        let mut github = f.github;
        github.secret = env("PARITYBENCH_GITHUB_SECRET").map(Secret::new).or(github.secret);
        github.token = env("PARITYBENCH_GITHUB_TOKEN").map(Secret::new).or(github.token);
        queue.check(&path)?;
        github.check(&path, &engines)?;
        f.nightly.check(&path, &engines)?;
        let nightly = f.nightly;
        Ok(Config {
            cache_dir,
            data_dir,
            db,
            suite,
            default_engine,
            contracts,
            floor_k,
            engines,
            queue,
            github,
            nightly,
        })
    }

    /// The database URL: the configured one, or the SQLite file under the data directory.
    pub fn db_url(&self) -> String {
        match &self.db {
            Some(s) => s.expose().to_string(),
            None => format!("sqlite://{}", self.data_dir.join("paritybench.sqlite").display()),
        }
    }
}

/// `[queue]`: how workers hold and retry jobs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// How long a claim holds a job without a heartbeat, seconds.
    pub lease_s: f64,
    /// How often a worker renews its lease, seconds (well under `lease_s`).
    pub heartbeat_s: f64,
    /// How long an idle worker waits before looking for work again, seconds.
    pub poll_s: f64,
    /// Attempts per job before it is given up (and recorded as an errored run).
    pub max_attempts: i64,
    /// The first retry waits this long, seconds; each next one twice as long ...
    pub backoff_s: f64,
    /// ... up to this cap, seconds.
    pub backoff_max_s: f64,
    /// This worker's device: a fingerprint key such as `cuda|NVIDIA H100 80GB HBM3` or `cpu|…`
    /// (`$PARITYBENCH_WORKER_DEVICE`); default: detected (`nvidia-smi`, else the CPU model).
    pub device: Option<String>,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            lease_s: 300.0,
            heartbeat_s: 30.0,
            poll_s: 5.0,
            max_attempts: 3,
            backoff_s: 60.0,
            backoff_max_s: 3600.0,
            device: None,
        }
    }
}

impl QueueConfig {
    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, value: f64, want: &str| ConfigError::Setting {
            path: path.to_path_buf(),
            key: format!("queue.{key}"),
            message: format!("{value} {want}"),
        };
        for (key, v) in [
            ("lease_s", self.lease_s),
            ("heartbeat_s", self.heartbeat_s),
            ("poll_s", self.poll_s),
            ("backoff_s", self.backoff_s),
            ("backoff_max_s", self.backoff_max_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(key, v, "must be a positive number of seconds"));
            }
        }
        if self.heartbeat_s >= self.lease_s {
            return Err(bad("heartbeat_s", self.heartbeat_s, "must be shorter than queue.lease_s"));
        }
        if self.max_attempts < 1 {
            return Err(bad("max_attempts", self.max_attempts as f64, "must be at least 1"));
        }
        Ok(())
    }
}

/// `[github]`: the webhook of `runner serve` and the commit statuses posted back.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GithubConfig {
    /// The webhook secret (`$PARITYBENCH_GITHUB_SECRET`); without it the webhook refuses
    /// every delivery.
    pub secret: Option<Secret>,
    /// A token allowed to write commit statuses (`$PARITYBENCH_GITHUB_TOKEN`); without it
    /// nothing is posted.
    pub token: Option<Secret>,
    /// The REST API root.
    pub api_url: String,
    /// The run page a status links to; `{run}` is replaced by the run id.
    pub run_url: Option<String>,
    /// The status context, e.g. `paritybench/<engine>`.
    pub context: String,
    /// Repository `owner/name` -> the engines a merge or push there queues.
    pub repos: BTreeMap<String, Vec<String>>,
    /// Whether a push to a repository's default branch queues a run of the pushed head
    /// (a merged pull request always does).
    pub queue_pushes: bool,
    /// The largest webhook body accepted, bytes (GitHub caps payloads at 25 MB).
    pub max_body_bytes: usize,
    /// Priority of the jobs the webhook queues (nightly jobs have 0).
    pub priority: i64,
}

impl Default for GithubConfig {
    fn default() -> GithubConfig {
        GithubConfig {
            secret: None,
            token: None,
            api_url: "https://api.github.com".to_string(),
            run_url: None,
            context: "paritybench".to_string(),
            repos: BTreeMap::new(),
            queue_pushes: false,
            max_body_bytes: 25 * 1024 * 1024,
            priority: 10,
        }
    }
}

impl GithubConfig {
    fn check(&self, path: &Path, engines: &BTreeMap<String, EngineConfig>) -> Result<(), ConfigError> {
        for (repo, names) in &self.repos {
            if let Some(n) = names.iter().find(|n| !engines.contains_key(*n)) {
                return Err(ConfigError::Setting {
                    path: path.to_path_buf(),
                    key: format!("github.repos.\"{repo}\""),
                    message: format!("unknown engine `{n}`; configured engines: {}", engine_names(engines)),
                });
            }
        }
        Ok(())
    }
}

/// Whether `runner nightly` queues jobs for the workers or runs them itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NightlyMode {
    /// Queue a job per branch head (a fleet of `runner work` picks them up).
    #[default]
    Queue,
    /// Run each branch head here, one after the other (a single GPU box).
    Run,
}

/// `[nightly]`: the branch heads measured every night.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NightlyConfig {
    /// Engine -> branches; default: the default engine's `main`.
    pub branches: BTreeMap<String, Vec<String>>,
    pub mode: NightlyMode,
    /// The device the queued jobs must run on (a kind such as `cuda`, or a full key).
    pub device: Option<String>,
}

impl Default for NightlyConfig {
    fn default() -> NightlyConfig {
        NightlyConfig { branches: BTreeMap::new(), mode: NightlyMode::Queue, device: None }
    }
}

impl NightlyConfig {
    fn check(&self, path: &Path, engines: &BTreeMap<String, EngineConfig>) -> Result<(), ConfigError> {
        if let Some(n) = self.branches.keys().find(|n| !engines.contains_key(*n)) {
            return Err(ConfigError::Setting {
                path: path.to_path_buf(),
                key: format!("nightly.branches.{n}"),
                message: format!("unknown engine `{n}`; configured engines: {}", engine_names(engines)),
            });
        }
        Ok(())
    }
}

fn engine_names(engines: &BTreeMap<String, EngineConfig>) -> String {
    engines.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// True for `scheme://...` and `user@host:path` repository addresses.
pub fn is_url(s: &str) -> bool {
    s.contains("://") || (s.contains('@') && s.contains(':') && !s.starts_with('/'))
}

fn default_cache() -> Result<PathBuf, ConfigError> {
    let home = std::env::var_os("HOME").ok_or(ConfigError::NoHome)?;
    Ok(PathBuf::from(home).join(".cache").join("paritybench"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn defaults_need_nothing() {
        let c = Config::load_with(None, env_of(&[("PARITYBENCH_CACHE", "/c")])).unwrap();
        assert_eq!(c.cache_dir, PathBuf::from("/c"));
        assert_eq!(c.data_dir, PathBuf::from("/c/data"));
        assert_eq!(c.db_url(), "sqlite:///c/data/paritybench.sqlite");
        assert_eq!(c.default_engine, BUILTIN_ENGINE);
        assert!(c.engines[BUILTIN_ENGINE].run.contains("engine run --request {request} --out {out}"));
    }

    #[test]
    fn file_then_env_and_secrets_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(
            &path,
            "db = \"postgres://pb:hunter2@db/pb\"\nsuite = \"small\"\n[engines.apr]\nrepo = \"apr\"\nrun = \"apr run {request} {out}\"\ntimeout_s = 5\n",
        )
        .unwrap();
        let c = Config::load_with(Some(&path), env_of(&[("PARITYBENCH_CACHE", "/c"), ("PARITYBENCH_SUITE", "env")]))
            .unwrap();
        assert_eq!(c.suite, "env");
        let apr = &c.engines["apr"];
        assert_eq!(apr.timeout_s, 5);
        assert_eq!(apr.repo.as_deref(), Some(dir.path().join("apr").to_str().unwrap()));
        assert_eq!(apr.build, None);
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2") && debug.contains("pb:***@db"), "{debug}");
    }

    #[test]
    fn bad_engine_and_unknown_keys_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "[engines.x]\nrun = \"x --req {request}\"\n").unwrap();
        let e = Config::load_with(Some(&path), env_of(&[("PARITYBENCH_CACHE", "/c")])).unwrap_err().to_string();
        assert!(e.contains("r.toml") && e.contains("engine `x`") && e.contains("{out}"), "{e}");
        std::fs::write(&path, "suit = \"x\"\n").unwrap();
        let e = Config::load_with(Some(&path), env_of(&[("PARITYBENCH_CACHE", "/c")])).unwrap_err().to_string();
        assert!(e.contains("r.toml") && e.contains("suit"), "{e}");
    }

    #[test]
    fn shipped_examples_load() {
        for name in ["apr.example.toml", "paritybench.example.toml", "gpu-box.example.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("runners").join(name);
            let c = Config::load_with(Some(&path), env_of(&[("PARITYBENCH_CACHE", "/c")]))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(c.engines.contains_key(BUILTIN_ENGINE), "{name}");
        }
        let apr = Path::new(env!("CARGO_MANIFEST_DIR")).join("runners/apr.example.toml");
        let c = Config::load_with(Some(&apr), env_of(&[("PARITYBENCH_CACHE", "/c")])).unwrap();
        assert_eq!(c.default_engine, "apr");
        assert_eq!(c.engines["apr"].timeout_s, 900);
        assert!(is_url(c.engines["apr"].repo.as_deref().unwrap()));
        let gpu = Path::new(env!("CARGO_MANIFEST_DIR")).join("runners/gpu-box.example.toml");
        let c = Config::load_with(Some(&gpu), env_of(&[("PARITYBENCH_GITHUB_SECRET", "s3cret")])).unwrap();
        assert_eq!((c.queue.lease_s, c.queue.heartbeat_s), (300.0, 30.0));
        assert_eq!(c.github.repos["paiml/aprender"], ["apr"]);
        assert_eq!(c.nightly.mode, NightlyMode::Queue);
        assert_eq!(c.github.secret.as_ref().map(Secret::expose), Some("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"), "secrets never show in Debug output");
    }

    #[test]
    fn queue_and_github_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        for (text, want) in [
            ("[queue]\nlease_s = 10\nheartbeat_s = 10\n", "queue.heartbeat_s"),
            ("[queue]\nmax_attempts = 0\n", "queue.max_attempts"),
            ("[queue]\npoll_s = -1\n", "queue.poll_s"),
            ("[github]\nrepos = { \"a/b\" = [\"nope\"] }\n", "unknown engine `nope`"),
            ("[nightly]\nbranches = { nope = [\"main\"] }\n", "nightly.branches.nope"),
            ("[nightly]\nmode = \"sometimes\"\n", "sometimes"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Config::load_with(Some(&path), env_of(&[("PARITYBENCH_CACHE", "/c")])).unwrap_err().to_string();
            assert!(e.contains("r.toml") && e.contains(want), "{text}: {e}");
        }
    }
}
