//! A run's detail record: what the run page shows beyond the stored numbers — the
//! positions where the engine's argmax differs from the reference's, decoded to text; the
//! two greedy continuations side by side; the tails of the run's logs.
//!
//! It is computed from the dumps on disk (`data_dir/runs/<id>/<model>/<key>-<mode>/` for
//! the engine, the suite's reference dumps under `cache_dir/fixtures/refs/`) the first time
//! the run page is opened, then kept in the Store (`run_details`), so later views and other
//! servers sharing the database read it without the files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};
use crate::once::refs;
use crate::protocol::{Dump, ProtocolError};
use crate::store::RunDetails;

/// Mismatches listed per prompt (the count is always complete).
const MAX_MISMATCHES: usize = 12;
/// Tokens of context shown before a mismatch.
const CONTEXT_TOKENS: usize = 8;
/// Lines kept of each log.
const LOG_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum DetailError {
    #[error("the run's directory {} is not on this server", dir.display())]
    NoRunDir { dir: PathBuf },
    #[error("reading {}: {source}", path.display())]
    Dump { path: PathBuf, source: ProtocolError },
    #[error("the tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("the stored detail record of run {run} cannot be read: {message}")]
    Corrupt { run: i64, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDetail {
    pub groups: Vec<DetailGroup>,
    pub logs: Vec<LogTail>,
}

/// One engine dump (model × mode) against one reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetailGroup {
    pub model: String,
    pub mode: String,
    pub reference: String,
    pub prompts: Vec<PromptDetail>,
    /// Why a part could not be compared (e.g. no reference in this mode).
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptDetail {
    pub prompt: String,
    pub n_positions: usize,
    pub n_mismatches: usize,
    pub mismatches: Vec<Mismatch>,
    pub reference_continuation: Vec<String>,
    pub engine_continuation: Vec<String>,
    /// Greedy steps on which both agree before the first difference.
    pub matching_steps: usize,
}

impl PromptDetail {
    /// `(reference token, engine token, same)` per greedy step.
    pub fn steps(&self) -> Vec<(String, String, bool)> {
        let n = self.reference_continuation.len().max(self.engine_continuation.len());
        (0..n)
            .map(|i| {
                let r = self.reference_continuation.get(i).cloned().unwrap_or_default();
                let e = self.engine_continuation.get(i).cloned().unwrap_or_default();
                let same = i < self.matching_steps;
                (r, e, same)
            })
            .collect()
    }
}

/// A scored position where the engine's most likely next token differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    pub position: i32,
    pub context: String,
    pub reference_id: u32,
    pub reference: String,
    pub engine_id: u32,
    pub engine: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogTail {
    pub name: String,
    pub text: String,
    pub lines: usize,
}

/// The stored record, or one computed now from the dumps (and stored when the run is
/// finished).
pub async fn load_or_build(state: &AppState, d: &RunDetails) -> Result<RunDetail, ApiError> {
    let id = d.run.id;
    if let Some(v) = state.store.run_detail(id).await? {
        return serde_json::from_value(v)
            .map_err(|e| ApiError::Task(DetailError::Corrupt { run: id.0, message: e.to_string() }.to_string()));
    }
    let run_dir = state.config.data_dir.join("runs").join(id.to_string());
    let cache = state.config.cache_dir.clone();
    let suite = d.run.suite.clone();
    let built = tokio::task::spawn_blocking(move || build(&run_dir, &cache, &suite))
        .await
        .map_err(|e| ApiError::Task(e.to_string()))?
        .map_err(|e| ApiError::Task(e.to_string()))?;
    // Kept once the run is over and something was compared (a record without groups may
    // only mean the references were not reachable from this server yet).
    if d.run.status.is_finished() && !built.groups.is_empty() {
        let v = serde_json::to_value(&built).map_err(|e| ApiError::Task(e.to_string()))?;
        state.store.put_run_detail(id, &v).await?;
    }
    Ok(built)
}

/// Computes the record from a run directory and the suite's references.
pub fn build(run_dir: &Path, cache: &Path, suite: &str) -> Result<RunDetail, DetailError> {
    if !run_dir.is_dir() {
        return Err(DetailError::NoRunDir { dir: run_dir.to_path_buf() });
    }
    let logs = log_tails(run_dir);
    let groups_of_suite = refs::discover(cache, suite).unwrap_or_default();
    let mut groups = Vec::new();
    for g in &groups_of_suite {
        for mode in ["prefill", "incremental"] {
            // `runner once` writes the engine's dump to `<model>/<key>-<mode>/dump/`.
            let variant = run_dir.join(&g.model).join(format!("{}-{mode}", g.key));
            let Some(dir) = [variant.join("dump"), variant].into_iter().find(|d| d.join("manifest.json").exists())
            else {
                continue;
            };
            let engine = Dump::open(&dir).map_err(|source| DetailError::Dump { path: dir.clone(), source })?;
            let reference = g
                .references
                .iter()
                .filter_map(|r| Dump::open(&r.dir).ok().map(|d| (r, d)))
                .find(|(_, d)| d.manifest.mode == engine.manifest.mode);
            let Some((r, rdump)) = reference else {
                groups.push(DetailGroup {
                    model: g.model.clone(),
                    mode: mode.to_string(),
                    reference: String::new(),
                    prompts: Vec::new(),
                    note: Some(format!("no reference of {} in {mode} mode", g.model)),
                });
                continue;
            };
            let tok = tokenizer(cache, &g.model, &r.request.model.path)?;
            let mut prompts = Vec::new();
            for rec in &engine.manifest.prompts {
                if rdump.manifest.prompt(&rec.id).is_none() {
                    continue;
                }
                prompts.push(prompt_detail(&engine, &rdump, &rec.id, tok.as_ref())?);
            }
            groups.push(DetailGroup {
                model: g.model.clone(),
                mode: mode.to_string(),
                reference: r.id.clone(),
                prompts,
                note: None,
            });
        }
    }
    Ok(RunDetail { groups, logs })
}

/// The suite's tokenizer of a model: `fixtures/models/<model>/tokenizer.json`, else the one
/// beside the reference's checkpoint.
fn tokenizer(cache: &Path, model: &str, model_path: &Path) -> Result<Option<tokenizers::Tokenizer>, DetailError> {
    let candidates = [
        cache.join("fixtures").join("models").join(model).join("tokenizer.json"),
        model_path.join("tokenizer.json"),
        model_path.with_file_name("tokenizer.json"),
    ];
    let Some(path) = candidates.into_iter().find(|p| p.is_file()) else { return Ok(None) };
    tokenizers::Tokenizer::from_file(&path)
        .map(Some)
        .map_err(|e| DetailError::Tokenizer { path: path.clone(), message: e.to_string() })
}

fn decode(tok: Option<&tokenizers::Tokenizer>, ids: &[u32]) -> String {
    match tok.and_then(|t| t.decode(ids, false).ok()) {
        Some(s) => s,
        None => ids.iter().map(|i| format!("<{i}>")).collect::<Vec<_>>().join(" "),
    }
}

/// The index of the largest finite value (the first on ties); `None` when none is finite.
fn argmax(row: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in row.iter().enumerate() {
        if x.is_finite() && best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
}

fn prompt_detail(
    engine: &Dump,
    reference: &Dump,
    id: &str,
    tok: Option<&tokenizers::Tokenizer>,
) -> Result<PromptDetail, DetailError> {
    let es = engine.shard(id).map_err(|source| DetailError::Dump { path: engine.dir.clone(), source })?;
    let rs = reference.shard(id).map_err(|source| DetailError::Dump { path: reference.dir.clone(), source })?;
    let bad = |path: &Path, source| DetailError::Dump { path: path.to_path_buf(), source };
    let tokens: Vec<u32> =
        rs.token_ids().map_err(|e| bad(&reference.dir, e))?.iter().map(|&t| t.max(0) as u32).collect();
    let positions = rs.positions().map_err(|e| bad(&reference.dir, e))?.into_owned();
    let el = es.logits().map_err(|e| bad(&engine.dir, e))?; // [P, V]
    let rl = rs.logits().map_err(|e| bad(&reference.dir, e))?; // [P, V]
    let (mut eb, mut rb) = (Vec::new(), Vec::new());
    let mut mismatches = Vec::new();
    let mut n_mismatches = 0;
    let n = el.rows().min(rl.rows()).min(positions.len());
    for (i, &pos) in positions.iter().enumerate().take(n) {
        let (e, r) = (argmax(el.row_f32(i, &mut eb)), argmax(rl.row_f32(i, &mut rb)));
        if e == r {
            continue;
        }
        n_mismatches += 1;
        if mismatches.len() < MAX_MISMATCHES {
            let end = (pos.max(0) as usize + 1).min(tokens.len());
            let start = end.saturating_sub(CONTEXT_TOKENS);
            let (eid, rid) = (e.unwrap_or(0) as u32, r.unwrap_or(0) as u32);
            mismatches.push(Mismatch {
                position: pos,
                context: decode(tok, &tokens[start..end]),
                reference_id: rid,
                reference: if r.is_some() { decode(tok, &[rid]) } else { "(no finite logit)".into() },
                engine_id: eid,
                engine: if e.is_some() { decode(tok, &[eid]) } else { "(no finite logit)".into() },
            });
        }
    }
    let generated = |s: &crate::protocol::ShardTensors, dir: &Path| -> Result<Vec<u32>, DetailError> {
        Ok(s.generated().map_err(|e| bad(dir, e))?.iter().map(|&t| t.max(0) as u32).collect())
    };
    let (eg, rg) = (generated(&es, &engine.dir)?, generated(&rs, &reference.dir)?);
    let matching_steps = eg.iter().zip(&rg).take_while(|(a, b)| a == b).count();
    let each = |ids: &[u32]| ids.iter().map(|&t| decode(tok, &[t])).collect::<Vec<_>>();
    Ok(PromptDetail {
        prompt: id.to_string(),
        n_positions: n,
        n_mismatches,
        mismatches,
        reference_continuation: each(&rg),
        engine_continuation: each(&eg),
        matching_steps,
    })
}

/// The last lines of every `*.stdout` / `*.stderr` under the run directory.
fn log_tails(run_dir: &Path) -> Vec<LogTail> {
    let mut files = Vec::new();
    let mut stack = vec![run_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "stdout" || x == "stderr") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let text = std::fs::read(&p).ok()?;
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_LINES)..].join("\n");
            let name = p.strip_prefix(run_dir).unwrap_or(&p).display().to_string();
            Some(LogTail { name, text: tail, lines: lines.len() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_skips_non_finite() {
        assert_eq!(argmax(&[0.0, f32::NAN, 2.0, 2.0, f32::INFINITY]), Some(2));
        assert_eq!(argmax(&[f32::NAN]), None);
        assert_eq!(argmax(&[]), None);
    }
}
