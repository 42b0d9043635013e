//! Reading contract YAML: the native form and a `parity_gates:` block inside a paiml
//! provable-contracts file.
//!
//! Native form (unknown keys are errors, so a misspelt key is caught):
//!
//! ```yaml
//! id: seed-parity
//! version: 1
//! description: ...
//! gates:
//!   - id: logits-cosine
//!     metric: logits.cosine
//!     reduction: min
//!     comparison: ">"
//!     value: 0.99                     # or { floor_multiple: 10 }
//!     severity: error                 # default
//!     scope: { reference: "hf-fp16*" }   # or a list that must all allow it:
//!                                         # { reference: ["llamacpp-*", "!*-fa"] }
//! ```
//!
//! Provable-contracts form: any file with a top-level `parity_gates:` mapping
//! (`{id?, version?, description?, gates: [...]}`); every other top-level key (`metadata`,
//! `equations`, `proof_obligations`, `falsification_tests`, `kani_harnesses`, `qa_gate`, …)
//! is ignored except `metadata.version` and `metadata.description`, which stand in for the
//! block's own when it has none. The id defaults to the file stem.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_yaml_ng::Value;

use super::{Comparison, Contract, ContractError, Gate, Metric, Pattern, Reduction, Scope, Severity, Threshold};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContract {
    id: String,
    version: Version,
    #[serde(default)]
    description: Option<String>,
    gates: Vec<RawGate>,
}

/// The provable-contracts file: only `parity_gates` is read, every other key is ignored.
#[derive(Deserialize)]
struct RawProvable {
    parity_gates: RawParityGates,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParityGates {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    version: Option<Version>,
    #[serde(default)]
    description: Option<String>,
    gates: Vec<RawGate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    id: String,
    #[serde(default)]
    description: Option<String>,
    // Names are kept as text so that an unknown one gives [`ContractError::UnknownName`]
    // with its own line and the closest valid name.
    metric: String,
    reduction: String,
    comparison: String,
    value: RawThreshold,
    #[serde(default)]
    severity: Option<String>,
    #[serde(default)]
    scope: RawScope,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScope {
    engine: Option<Globs>,
    model: Option<Globs>,
    reference: Option<Globs>,
    dtype: Option<Globs>,
    mode: Option<Globs>,
}

/// One glob, or a list of them that must all allow the name (`!glob`: must not match).
#[derive(Deserialize)]
#[serde(untagged)]
enum Globs {
    One(String),
    All(Vec<String>),
}

impl Globs {
    fn into_vec(self) -> Vec<String> {
        match self {
            Globs::One(g) => vec![g],
            Globs::All(v) => v,
        }
    }
}

/// A version written as a number (`1`, `1.2`) or a string (`"1.0.0"`).
struct Version(String);

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Version, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Version;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a version (a number or a string)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Version, E> {
                Ok(Version(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Version, E> {
                Ok(Version(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Version, E> {
                Ok(Version(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Version, E> {
                Ok(Version(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `value: 0.99`, `value: "1e-4"` or `value: { floor_multiple: 10 }`.
struct RawThreshold(Threshold);

impl<'de> Deserialize<'de> for RawThreshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawThreshold, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawThreshold;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or { floor_multiple: <number> }")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawThreshold, E> {
                Ok(RawThreshold(Threshold::Absolute(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawThreshold, E> {
                Ok(RawThreshold(Threshold::Absolute(v as f64)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawThreshold, E> {
                Ok(RawThreshold(Threshold::Absolute(v as f64)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawThreshold, E> {
                v.trim()
                    .parse::<f64>()
                    .map(|x| RawThreshold(Threshold::Absolute(x)))
                    .map_err(|_| E::custom(format!("`{v}` is not a number")))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawThreshold, A::Error> {
                let mut k: Option<f64> = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "floor_multiple" if k.is_none() => k = Some(map.next_value()?),
                        "floor_multiple" => return Err(de::Error::duplicate_field("floor_multiple")),
                        other => return Err(de::Error::unknown_field(other, &["floor_multiple"])),
                    }
                }
                k.map(|k| RawThreshold(Threshold::FloorMultiple(k)))
                    .ok_or_else(|| de::Error::missing_field("floor_multiple"))
            }
        }
        d.deserialize_any(V)
    }
}

pub(super) fn parse(bytes: &[u8], source: &Path) -> Result<Contract, ContractError> {
    let path = source.to_path_buf();
    let yaml_err = |e| ContractError::Yaml { path: path.clone(), source: e };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ContractError::Shape { path: path.clone(), message: format!("not UTF-8 text: {e}") })?;
    let sha256 = crate::protocol::sha256_hex(bytes);
    let doc: Value = serde_yaml_ng::from_str(text).map_err(yaml_err)?;
    let top = doc.as_mapping().ok_or_else(|| ContractError::Shape {
        path: path.clone(),
        message: "expected a mapping at the top level".into(),
    })?;

    let (id, version, description, raw_gates) = if top.contains_key("parity_gates") {
        let raw: RawProvable = serde_yaml_ng::from_str(text).map_err(yaml_err)?;
        let meta = top.get("metadata");
        let meta_str = |key: &str| meta.and_then(|m| m.get(key)).and_then(scalar_text);
        let stem = source.file_stem().and_then(|s| s.to_str()).map(str::to_string);
        let block = raw.parity_gates;
        let id = block.id.or(stem).ok_or_else(|| ContractError::Shape {
            path: path.clone(),
            message: "parity_gates has no `id` and the file name gives none".into(),
        })?;
        let version =
            block.version.map(|v| v.0).or_else(|| meta_str("version")).ok_or_else(|| ContractError::Shape {
                path: path.clone(),
                message: "parity_gates has no `version` and there is no metadata.version".into(),
            })?;
        let description = block.description.or_else(|| meta_str("description"));
        (id, version, description, block.gates)
    } else if top.contains_key("gates") {
        let raw: RawContract = serde_yaml_ng::from_str(text).map_err(yaml_err)?;
        (raw.id, raw.version.0, raw.description, raw.gates)
    } else {
        return Err(ContractError::Shape {
            path,
            message: "neither a contract (top-level `gates:`) nor a provable-contracts file with a \
                      `parity_gates:` block"
                .into(),
        });
    };

    if raw_gates.is_empty() {
        return Err(ContractError::Shape { path, message: "the contract has no gates".into() });
    }
    let mut seen = BTreeSet::new();
    let mut gates = Vec::with_capacity(raw_gates.len());
    for raw in raw_gates {
        if !seen.insert(raw.id.clone()) {
            return Err(ContractError::DuplicateGate { path, gate: raw.id });
        }
        gates.push(gate(raw, text, source)?);
    }
    Ok(Contract { id, version, description: description.unwrap_or_default(), sha256, source: path, gates })
}

/// Validates one gate: metric name, numbers, scope patterns.
fn gate(raw: RawGate, text: &str, source: &Path) -> Result<Gate, ContractError> {
    let path = source.to_path_buf();
    let unknown = |field: &'static str, name: &str, suggestion: &'static str| ContractError::UnknownName {
        path: path.clone(),
        line: line_of(text, field, name),
        gate: raw.id.clone(),
        field,
        name: name.to_string(),
        suggestion,
    };
    let metric =
        Metric::parse(&raw.metric).ok_or_else(|| unknown("metric", &raw.metric, Metric::closest(&raw.metric)))?;
    let reduction = Reduction::parse(&raw.reduction)
        .ok_or_else(|| unknown("reduction", &raw.reduction, Reduction::closest(&raw.reduction)))?;
    let comparison = Comparison::parse(&raw.comparison)
        .ok_or_else(|| unknown("comparison", &raw.comparison, Comparison::closest(&raw.comparison)))?;
    let severity = match raw.severity.as_deref() {
        None => Severity::Error,
        Some(s) => Severity::parse(s).ok_or_else(|| unknown("severity", s, Severity::closest(s)))?,
    };
    let bad = |field, value, positive| ContractError::BadNumber {
        path: path.clone(),
        gate: raw.id.clone(),
        field,
        value,
        positive,
    };
    let value = raw.value.0;
    match value {
        Threshold::Absolute(v) if !v.is_finite() => return Err(bad("value", v, false)),
        Threshold::FloorMultiple(k) if !(k.is_finite() && k > 0.0) => {
            return Err(bad("value.floor_multiple", k, true));
        }
        _ => {}
    }
    let pattern = |field: &'static str, p: Option<Globs>| -> Result<Option<Pattern>, ContractError> {
        p.map(|p| {
            let globs = p.into_vec();
            Pattern::all(&globs).map_err(|source| ContractError::BadPattern {
                path: path.clone(),
                gate: raw.id.clone(),
                field,
                pattern: globs.join(", "),
                source: Box::new(source),
            })
        })
        .transpose()
    };
    let s = raw.scope;
    let scope = Scope {
        engine: pattern("engine", s.engine)?,
        model: pattern("model", s.model)?,
        reference: pattern("reference", s.reference)?,
        dtype: pattern("dtype", s.dtype)?,
        mode: pattern("mode", s.mode)?,
    };
    Ok(Gate { id: raw.id, description: raw.description, metric, reduction, comparison, value, severity, scope })
}

/// The 1-based line of the first `key: value` in the text, in block (`key: value`) or flow
/// (`{…, key: value, …}`) style, the value quoted or not.
fn line_of(text: &str, key: &str, value: &str) -> Option<usize> {
    let needle = format!("{key}:");
    text.lines()
        .position(|line| {
            line.match_indices(&needle).any(|(at, _)| {
                let before = line[..at].chars().next_back();
                let starts_key = matches!(before, None | Some(' ' | '{' | ',' | '-' | '\t'));
                starts_key && scalar_at(&line[at + needle.len()..]) == value
            })
        })
        .map(|i| i + 1)
}

/// The scalar at the start of `rest` (after `key:`): quoted, or up to `,`, `}` or a comment.
fn scalar_at(rest: &str) -> &str {
    let rest = rest.trim_start();
    for q in ['"', '\''] {
        if let Some(inner) = rest.strip_prefix(q) {
            return inner.split(q).next().unwrap_or("");
        }
    }
    let end = rest.find([',', '}', '#']).unwrap_or(rest.len());
    rest[..end].trim_end()
}

/// A scalar's text (string or number), for metadata fields of any shape.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_line_of_a_value() {
        let text = "gates:\n  - id: a\n    metric: kld\n  - metric: \"logits.cosin\"  # typo\n  - {id: b, metric: top_1, reduction: p90}\n";
        assert_eq!(line_of(text, "metric", "kld"), Some(3));
        assert_eq!(line_of(text, "metric", "logits.cosin"), Some(4));
        assert_eq!(line_of(text, "metric", "top_1"), Some(5));
        assert_eq!(line_of(text, "reduction", "p90"), Some(5));
        assert_eq!(line_of(text, "metric", "nope"), None);
    }
}
