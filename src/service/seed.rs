//! A database shaped like a year of use, for measuring the dashboard (`runner dev-seed`).
//!
//! `series` series (engines × 5 models × 4 devices, one reference each) × `commits`
//! commits, one run per series and commit: summary rows (pooled and per-prompt
//! measurements, per-layer parity, verdicts) plus one detail record per run. About 4 % of
//! the series regress near the end, and 1 % of points fail at random, so the overview has
//! regressions and the trends have failing points.
//!
//! Rows go in as multi-row INSERT statements of literal values (every value is generated
//! here: numbers and fixed identifiers, no user text), many runs per transaction: the
//! Store's one-run-per-transaction path would take hours for 100,000 runs.

use std::fmt::Write as _;

use sqlx::{PgPool, SqlitePool};

use crate::store::{self, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("seeding {url}: {source}")]
    Sql { url: String, source: sqlx::Error },
    #[error("the database {url} already holds {runs} runs: seed an empty database")]
    NotEmpty { url: String, runs: i64 },
    #[error("--series {series} must be a positive multiple of 20 (engines × 5 models × 4 devices)")]
    BadShape { series: usize },
}

const MODELS: &[&str] = &["qwen3-dense", "qwen3-moe", "qwen2", "qwen3-0.6b", "qwen3-moe-mixed"];
const DEVICES: &[&str] = &[
    "cpu|AMD EPYC 9654",
    "cuda|NVIDIA H100 80GB HBM3|driver=550.54.15|cuda=12.4",
    "cuda|NVIDIA A100-SXM4-80GB|driver=550.54.15|cuda=12.4",
    "cuda|NVIDIA L4|driver=550.54.15|cuda=12.4",
];
const CAPTURES: &[&str] = &["attn_out", "ffn_out", "layer_out"];
const LAYERS: usize = 8;
const PROMPTS: usize = 4;
/// Runs per transaction.
const BATCH: usize = 250;

enum Db {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

impl Db {
    async fn exec(&self, sql: &str, url: &str) -> Result<(), SeedError> {
        let r = match self {
            Db::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            Db::Pg(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
        };
        r.map_err(|source| SeedError::Sql { url: url.to_string(), source })
    }

    async fn count_runs(&self, url: &str) -> Result<i64, SeedError> {
        let q = "SELECT COUNT(*) FROM runs";
        let r = match self {
            Db::Sqlite(p) => sqlx::query_scalar::<_, i64>(q).fetch_one(p).await,
            Db::Pg(p) => sqlx::query_scalar::<_, i64>(q).fetch_one(p).await,
        };
        r.map_err(|source| SeedError::Sql { url: url.to_string(), source })
    }
}

/// A deterministic xorshift stream in [0, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What was written.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Seeded {
    pub series: usize,
    pub commits: usize,
    pub runs: usize,
    pub rows: usize,
}

/// Fills an empty database at `url` (migrated first).
pub async fn seed(url: &str, series: usize, commits: usize) -> Result<Seeded, SeedError> {
    if series == 0 || series % 20 != 0 {
        return Err(SeedError::BadShape { series });
    }
    drop(store::connect(url).await?); // creates and migrates
    let pg = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let sql_err = |source| SeedError::Sql { url: store::redact(url), source };
    let db = if pg {
        Db::Pg(PgPool::connect(url).await.map_err(sql_err)?)
    } else {
        let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
        Db::Sqlite(SqlitePool::connect_with(opts).await.map_err(sql_err)?)
    };
    let shown = store::redact(url);
    let runs = db.count_runs(&shown).await?;
    if runs > 0 {
        return Err(SeedError::NotEmpty { url: shown, runs });
    }
    let over = if pg { " OVERRIDING SYSTEM VALUE" } else { "" };
    let engines = series / (MODELS.len() * DEVICES.len());
    let t0: i64 = 1_735_689_600_000; // 2025-01-01
    let day = 86_400_000 / 2;

    // engines, commits, series
    let mut sql = String::from("BEGIN;\n");
    let _ = write!(sql, "INSERT INTO engines (id, name, repo_url, created_ms){over} VALUES ");
    sql.push_str(&(1..=engines).map(|e| format!("({e}, 'engine-{e:02}', NULL, {t0})")).collect::<Vec<_>>().join(","));
    sql.push_str(";\n");
    for e in 1..=engines {
        let _ = write!(sql, "INSERT INTO commits (id, engine_id, sha, generation, committed_ms, title){over} VALUES ");
        let rows: Vec<String> = (1..=commits)
            .map(|c| {
                let id = (e - 1) * commits + c;
                format!(
                    "({id}, {e}, '{:040x}', {c}, {}, 'commit {c}')",
                    id as u128 * 0x9E37_79B9_7F4A_7C15,
                    t0 + c as i64 * day
                )
            })
            .collect();
        sql.push_str(&rows.join(","));
        sql.push_str(";\n");
    }
    let _ = write!(
        sql,
        "INSERT INTO series (id, engine_id, model, model_sha256, reference, device_key, fixture_id, contract_key, created_ms){over} VALUES "
    );
    let mut srows = Vec::new();
    for s in 0..series {
        let (e, m, d) = series_shape(s);
        srows.push(format!(
            "({}, {}, '{}', '{:064x}', 'hf-fp32-eager', '{}', 'fixture-2025-01', 'builtin-strict@1', {t0})",
            s + 1,
            e + 1,
            MODELS[m],
            (m as u128 + 1) * 0x1234_5678_9ABC_DEF1,
            DEVICES[d]
        ));
    }
    sql.push_str(&srows.join(","));
    sql.push_str(";\nCOMMIT;\n");
    db.exec(&sql, &shown).await?;

    // runs, in batches; commit-major so that generations grow like a real history
    let mut rng = Rng(0x5eed_5eed_5eed_5eed);
    let total = series * commits;
    let mut rows = 0usize;
    let mut run_id = 0usize;
    let mut batch = Vec::with_capacity(BATCH);
    for c in 1..=commits {
        for s in 0..series {
            run_id += 1;
            batch.push((run_id, s, c));
            if batch.len() == BATCH || run_id == total {
                let (text, n) = batch_sql(&batch, commits, &mut rng, over, t0, day);
                rows += n;
                db.exec(&text, &shown).await?;
                batch.clear();
            }
        }
    }
    if pg {
        let mut fix = String::new();
        for t in ["engines", "commits", "series", "runs"] {
            let _ = writeln!(fix, "SELECT setval(pg_get_serial_sequence('{t}', 'id'), (SELECT MAX(id) FROM {t}));");
        }
        fix.push_str("ANALYZE;\n");
        db.exec(&fix, &shown).await?;
    } else {
        db.exec("ANALYZE;", &shown).await?;
    }
    Ok(Seeded { series, commits, runs: total, rows })
}

/// (engine, model, device) of series index `s`.
fn series_shape(s: usize) -> (usize, usize, usize) {
    let per_engine = MODELS.len() * DEVICES.len();
    (s / per_engine, (s % per_engine) / DEVICES.len(), s % DEVICES.len())
}

/// The SQL of one batch of runs and how many rows it writes.
fn batch_sql(
    batch: &[(usize, usize, usize)],
    commits: usize,
    rng: &mut Rng,
    over: &str,
    t0: i64,
    day: i64,
) -> (String, usize) {
    let mut runs = Vec::new();
    let mut rs = Vec::new();
    let mut ms = Vec::new();
    let mut ls = Vec::new();
    let mut vs = Vec::new();
    let mut ds = Vec::new();
    for &(id, s, c) in batch {
        let (e, m, d) = series_shape(s);
        let series_id = s + 1;
        let commit_id = e * commits + c;
        // 4 % of the series regress 20 commits before the end; 1 % of points fail at random
        let regressed = s % 25 == 7 && c + 20 > commits;
        let fail = regressed || rng.next() < 0.01;
        let rel = if fail { 3e-3 * (1.0 + rng.next()) } else { 2e-5 * (1.0 + rng.next()) };
        let cos = 1.0 - rel * rel / 2.0;
        let kld = rel * rel * 0.5;
        let tps = 40.0 + 10.0 * d as f64 + rng.next() * 2.0;
        let model = MODELS[m];
        let dev = DEVICES[d];
        let (kind, name) = dev.split_once('|').unwrap_or((dev, ""));
        let name = name.split('|').next().unwrap_or(name);
        let status = if fail { "failed" } else { "passed" };
        let t = t0 + c as i64 * day + 600_000;
        runs.push(format!(
            "({id}, {}, {commit_id}, '{status}', 'nightly', 'default', '{kind}', '{name}', NULL, NULL, '{dev}', 'gpu-box-{d}', '[\"fixture-2025-01\"]', '[{{\"id\":\"builtin-strict\",\"version\":\"1\",\"sha256\":\"00\"}}]', '{{\"build\":1200.0,\"engine\":41000.0,\"total\":45000.0}}', NULL, NULL, NULL, {}, {}, {t})",
            e + 1,
            t - 60_000,
            t - 50_000
        ));
        rs.push(format!("({id}, {series_id}, {c})"));
        let pooled: [(&str, &str, f64); 12] = [
            ("logits.rel_l2", "max", rel),
            ("logits.rel_l2", "mean", rel * 0.6),
            ("logits.cosine", "min", cos),
            ("logits.cosine", "mean", 1.0 - (1.0 - cos) * 0.5),
            ("kld", "mean", kld * 0.3),
            ("kld", "p99", kld * 0.9),
            ("kld", "max", kld),
            ("top1", "mean", if fail { 0.97 } else { 1.0 }),
            ("top1", "wilson_lower", if fail { 0.94 } else { 0.977 }),
            ("decode_tok_s", "median", tps),
            ("decode_tok_s", "min", tps * 0.97),
            ("decode_tok_s", "max", tps * 1.02),
        ];
        for (metric, stat, v) in pooled {
            ms.push(format!("({id}, {series_id}, '{model}', 'hf-fp32-eager', NULL, '{metric}', '{stat}', {v:e})"));
        }
        for p in 0..PROMPTS {
            for (metric, stat, v) in
                [("logits.rel_l2", "max", rel * 0.9), ("logits.cosine", "min", cos), ("kld", "p99", kld)]
            {
                ms.push(format!(
                    "({id}, {series_id}, '{model}', 'hf-fp32-eager', 'p{p}', '{metric}', '{stat}', {v:e})"
                ));
            }
        }
        for layer in 0..LAYERS {
            for cap in CAPTURES {
                let grow = 1.0 + layer as f64 * 0.3;
                let r = if fail && layer >= 5 { rel * grow } else { 2e-5 * grow };
                let cs = 1.0 - r * r / 2.0;
                ls.push(format!(
                    "({id}, {series_id}, '{model}', 'hf-fp32-eager', NULL, '{cap}', {layer}, {r:e}, {cs:e})"
                ));
            }
        }
        for (gate, metric, red, cmp, thr, obs) in [
            ("f32-logits-rel-l2", "logits.rel_l2", "max", "<=", 1e-4, rel),
            ("f32-kld", "kld", "max", "<=", 1e-6, kld),
            ("f32-layer-rel-l2", "layer.rel_l2", "max", "<=", 1e-4, if fail { rel * 3.1 } else { 5e-5 }),
            ("f32-greedy", "greedy_match_len", "min", ">=", 32.0, if fail { 12.0 } else { 32.0 }),
        ] {
            let ok = if cmp == "<=" { obs <= thr } else { obs >= thr };
            let outcome = if ok { "passed" } else { "failed" };
            vs.push(format!(
                "({id}, {series_id}, 'builtin-strict', '1', '00', '{gate}', '{metric}', '{red}', '{cmp}', {thr:e}, NULL, {obs:e}, 159, '{outcome}', {}, 'error', '{model}', 'hf-fp32-eager', NULL, 'f32', 'prefill', NULL)",
                if ok { "TRUE" } else { "FALSE" }
            ));
        }
        let detail = format!(
            r#"{{"groups":[{{"model":"{model}","mode":"prefill","reference":"hf-fp32-eager","note":null,"prompts":[{{"prompt":"p0","n_positions":40,"n_mismatches":{},"mismatches":[],"reference_continuation":["The"," cat"," sat"," on"," the"," mat","."],"engine_continuation":["The"," cat"," sat"," on"," the"," mat","."],"matching_steps":7}}]}}],"logs":[{{"name":"build.stderr","text":"   Compiling paritybench v0.1.0\n    Finished `release` profile [optimized] target(s) in 1.2s","lines":2}}]}}"#,
            usize::from(fail)
        );
        ds.push(format!("({id}, '{detail}', {t})"));
    }
    let mut sql = String::from("BEGIN;\n");
    let _ = write!(
        sql,
        "INSERT INTO runs (id, engine_id, commit_id, status, triggered_by, suite, device_kind, device_name, device_driver, device_cuda, device_key, host, fixture_ids, contracts, timings, log_path, error, job_id, created_ms, started_ms, finished_ms){over} VALUES {};\n",
        runs.join(",")
    );
    let _ = writeln!(sql, "INSERT INTO run_series (run_id, series_id, generation) VALUES {};", rs.join(","));
    let _ = writeln!(
        sql,
        "INSERT INTO measurements (run_id, series_id, model, reference, prompt, metric, statistic, value) VALUES {};",
        ms.join(",")
    );
    let _ = writeln!(
        sql,
        "INSERT INTO layer_parity (run_id, series_id, model, reference, prompt, capture, layer, rel_l2, cosine) VALUES {};",
        ls.join(",")
    );
    let _ = writeln!(
        sql,
        "INSERT INTO verdicts (run_id, series_id, contract_id, contract_version, contract_sha256, gate_id, metric, reduction, comparison, threshold, floor, observed, n_samples, outcome, passed, severity, model, reference, prompt, dtype, mode, detail) VALUES {};",
        vs.join(",")
    );
    let _ = writeln!(sql, "INSERT INTO run_details (run_id, detail, created_ms) VALUES {};", ds.join(","));
    sql.push_str("COMMIT;\n");
    let n = runs.len() + rs.len() + ms.len() + ls.len() + vs.len() + ds.len();
    (sql, n)
}
