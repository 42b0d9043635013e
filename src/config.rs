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
    #[error("no home directory to put the cache under: set PARITYBENCH_CACHE")]
    NoHome,
}

/// A string that is never printed by `Debug` (a database URL may carry a password).
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
        f.write_str(&redact_url(&self.0))
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
        Ok(Config { cache_dir, data_dir, db, suite, default_engine, contracts, floor_k, engines })
    }

    /// The database URL: the configured one, or the SQLite file under the data directory.
    pub fn db_url(&self) -> String {
        match &self.db {
            Some(s) => s.expose().to_string(),
            None => format!("sqlite://{}", self.data_dir.join("paritybench.sqlite").display()),
        }
    }
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
        for name in ["apr.example.toml", "paritybench.example.toml"] {
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
    }
}
