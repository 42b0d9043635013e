//! Contracts: the versioned thresholds a run is judged against.
//!
//! A contract is a YAML file in `contracts/` (or a `parity_gates:` block inside a paiml
//! provable-contracts file) holding gates of the form
//! `metric × reduction × comparison × value × severity`, each scoped to engines, models,
//! references, dtypes and modes by glob patterns. A value is absolute or a multiple of the
//! noise floor measured between two references when the fixture was made.
//!
//! Reading a contract rejects what cannot be judged — an unknown metric, reduction,
//! comparison or severity (with its line and the closest valid name), an unknown key, a bad
//! glob, a duplicate gate id — so a typo fails when the file is read, not silently at the
//! end of a run.
//! [`Contract::evaluate`] turns metric samples into [`Verdict`]s; every verdict carries the
//! contract's id, version and the sha256 of the file's bytes ([`ContractRef`]).

mod eval;
mod metric;
mod parse;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use eval::{Evaluation, Outcome, Subject, Verdict, reduce, wilson_lower};
pub use metric::{Comparison, Metric, Reduction, Severity};

/// A parsed contract: identity plus gates.
#[derive(Debug, Clone)]
pub struct Contract {
    /// Stable name, e.g. `seed-parity` (for a provable-contracts file: `parity_gates.id`, or
    /// the file stem).
    pub id: String,
    /// The contract's own version; a new version starts a new series.
    pub version: String,
    pub description: String,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
    /// The file it was read from (or the name given to [`Contract::parse`]).
    pub source: PathBuf,
    pub gates: Vec<Gate>,
}

/// What a verdict records about the contract that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContractRef {
    pub id: String,
    pub version: String,
    pub sha256: String,
}

impl fmt::Display for ContractRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{} ({})", self.id, self.version, &self.sha256[..self.sha256.len().min(12)])
    }
}

/// One machine-checkable gate: `reduce(samples of metric) <comparison> threshold`.
#[derive(Debug, Clone)]
pub struct Gate {
    /// Unique within the contract.
    pub id: String,
    pub description: Option<String>,
    pub metric: Metric,
    pub reduction: Reduction,
    pub comparison: Comparison,
    pub value: Threshold,
    pub severity: Severity,
    pub scope: Scope,
}

/// A gate's threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// The number itself (`value: 1e-4`).
    Absolute(f64),
    /// `k ×` the noise floor of the gate's metric stored with the fixture
    /// (`value: { floor_multiple: k }`).
    FloorMultiple(f64),
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Absolute(v) => write!(f, "{v}"),
            Threshold::FloorMultiple(k) => write!(f, "{k} × noise floor"),
        }
    }
}

/// Which subjects a gate applies to; an absent field matches everything.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub engine: Option<Pattern>,
    pub model: Option<Pattern>,
    pub reference: Option<Pattern>,
    pub dtype: Option<Pattern>,
    pub mode: Option<Pattern>,
}

impl Scope {
    /// True when every pattern present matches the subject's corresponding field (a pattern
    /// never matches a field the subject lacks).
    pub fn matches(&self, s: &Subject) -> bool {
        fn ok(p: &Option<Pattern>, v: Option<&str>) -> bool {
            match (p, v) {
                (None, _) => true,
                (Some(p), Some(v)) => p.matches(v),
                (Some(_), None) => false,
            }
        }
        ok(&self.engine, Some(&s.engine))
            && ok(&self.model, Some(&s.model))
            && ok(&self.reference, Some(&s.reference))
            && ok(&self.dtype, s.dtype.as_deref())
            && ok(&self.mode, s.mode.as_deref())
    }
}

/// A case-insensitive glob (`*`, `?`, `[abc]`, `{a,b}`) over a whole name; `*` also
/// matches `/` and `.`, since names are not paths. A scope may give a field several globs
/// (a YAML list): the name must match all of them, and one written `!glob` must not match
/// (`["llamacpp-*", "!*-fa"]`: llama.cpp's references, but not its flash-attention ones).
#[derive(Clone)]
pub struct Pattern {
    text: String,
    /// (negated, glob): every one must hold.
    parts: Vec<(bool, globset::GlobMatcher)>,
}

impl Pattern {
    pub fn new(text: &str) -> Result<Pattern, globset::Error> {
        Pattern::all(&[text.to_string()])
    }

    /// A name that every glob of `texts` allows (see the type's docs for `!`).
    pub fn all(texts: &[String]) -> Result<Pattern, globset::Error> {
        let parts = texts
            .iter()
            .map(|t| {
                let (negated, glob) = match t.strip_prefix('!') {
                    Some(rest) => (true, rest),
                    None => (false, t.as_str()),
                };
                let g = globset::GlobBuilder::new(glob)
                    .case_insensitive(true)
                    .literal_separator(false)
                    .backslash_escape(true)
                    .build()?;
                Ok((negated, g.compile_matcher()))
            })
            .collect::<Result<Vec<_>, globset::Error>>()?;
        Ok(Pattern { text: texts.join(" & "), parts })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.parts.iter().all(|(negated, m)| m.is_match(name) != *negated)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.text)
    }
}

/// Everything that can be wrong with a contract file; each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Yaml { path: PathBuf, source: serde_yaml_ng::Error },
    /// A misspelt metric, reduction, comparison or severity.
    #[error("{}{}: gate `{gate}`: unknown {field} `{name}` (did you mean `{suggestion}`?)",
        path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    UnknownName {
        path: PathBuf,
        /// 1-based line of the bad name, when it could be found.
        line: Option<usize>,
        gate: String,
        /// `metric`, `reduction`, `comparison` or `severity`.
        field: &'static str,
        name: String,
        /// The closest valid name.
        suggestion: &'static str,
    },
    #[error("{}: gate `{gate}`: scope.{field}: invalid pattern `{pattern}`: {source}", path.display())]
    BadPattern { path: PathBuf, gate: String, field: &'static str, pattern: String, source: Box<globset::Error> },
    #[error("{}: gate `{gate}`: {field} must be a finite number{}, got {value}",
        path.display(), if *positive { " above 0" } else { "" })]
    BadNumber { path: PathBuf, gate: String, field: &'static str, value: f64, positive: bool },
    #[error("{}: gate id `{gate}` is used twice", path.display())]
    DuplicateGate { path: PathBuf, gate: String },
    #[error("{}: {message}", path.display())]
    Shape { path: PathBuf, message: String },
}

impl ContractError {
    /// The 1-based line the error points at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ContractError::Yaml { source, .. } => source.location().map(|l| l.line()),
            ContractError::UnknownName { line, .. } => *line,
            _ => None,
        }
    }
}

impl Contract {
    /// Reads and validates a contract file (native or provable-contracts with `parity_gates:`).
    pub fn load(path: &Path) -> Result<Contract, ContractError> {
        let bytes = std::fs::read(path).map_err(|source| ContractError::Io { path: path.to_path_buf(), source })?;
        Contract::parse(&bytes, path)
    }

    /// Parses a contract from bytes; `source` names it in errors and supplies the id of a
    /// provable-contracts file without `parity_gates.id`.
    pub fn parse(bytes: &[u8], source: &Path) -> Result<Contract, ContractError> {
        parse::parse(bytes, source)
    }

    /// Every `*.yaml` / `*.yml` directly inside `dir`, sorted by file name.
    pub fn load_dir(dir: &Path) -> Result<Vec<Contract>, ContractError> {
        let io = |source| ContractError::Io { path: dir.to_path_buf(), source };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
            if yaml && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        paths.iter().map(|p| Contract::load(p)).collect()
    }

    pub fn reference(&self) -> ContractRef {
        ContractRef { id: self.id.clone(), version: self.version.clone(), sha256: self.sha256.clone() }
    }

    pub fn gate(&self, id: &str) -> Option<&Gate> {
        self.gates.iter().find(|g| g.id == id)
    }
}
