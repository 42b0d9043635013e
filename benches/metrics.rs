//! Criterion benchmarks of the metric kernels at the size of a real dump: 2048 scored
//! positions × 151,936 vocabulary (Qwen), engine and reference logits stored as f32 and as
//! f16, read through memory maps exactly as `runner compare` reads dumps.
//!
//! The data are written once as safetensors files (`logits` `[P, V]`) to
//! `$PARITYBENCH_BENCH_DIR` (default `/tmp/paritybench-bench`) and reused; the numpy
//! counterpart (`benches/metrics_numpy.py`) reads the same files. Every kernel runs over all
//! rows with rayon, as `compare` does, and reports the bytes of input it reads per second,
//! beside a `memcpy` of one f32 side (bytes copied per second; the machine moves twice that).
//!
//!     cargo bench --bench metrics                       # all of it (~4 min, ~3.7 GB in /tmp)
//!     PARITYBENCH_BENCH_ROWS=256 cargo bench --bench metrics -- f16   # a quick subset

use std::fs::File;
use std::hint::black_box;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use rayon::prelude::*;

use paritybench::metrics::logits::{self, RankedIds};
use paritybench::metrics::{Row, StoredRows, logit_rows};
use paritybench::protocol::{Dtype, ShardTensors, TensorView};

/// Qwen's vocabulary (rows of the lm_head).
const VOCAB: usize = 151_936;

fn rows() -> usize {
    std::env::var("PARITYBENCH_BENCH_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(2048)
}

fn data_dir() -> PathBuf {
    std::env::var_os("PARITYBENCH_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| "/tmp/paritybench-bench".into())
}

/// splitmix64: a counter-based generator, so any element can be made independently.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Four uniforms in [0, 1) from one hash (16 bits each).
fn uniforms(h: u64) -> [f32; 4] {
    [0, 16, 32, 48].map(|s| ((h >> s) & 0xFFFF) as f32 / 65_536.0)
}

/// Reference (`b`) and engine (`a`) logits of row `r`: roughly normal logits (σ ≈ 1.7) with
/// a few peaked tokens, and the engine off by a small relative error.
fn make_row(r: usize, a: &mut [f32], b: &mut [f32]) {
    for (j, (x, y)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
        let h = mix((r * VOCAB + j) as u64);
        let [u0, u1, u2, u3] = uniforms(h);
        let mut v = 3.0 * (u0 + u1 + u2 - 1.5);
        if mix(h).is_multiple_of(4096) {
            v += 12.0; // a peak: the tokens a model actually predicts
        }
        *y = v;
        *x = v + 0.05 * (u3 - 0.5);
    }
}

/// Writes a safetensors file holding one tensor `logits` `[rows, VOCAB]`, row by row.
fn write_shard(path: &Path, rows: usize, f16_out: bool, side_a: bool) -> std::io::Result<()> {
    let (dtype, size) = if f16_out { ("F16", 2) } else { ("F32", 4) };
    let n = rows * VOCAB * size;
    let mut header = format!(r#"{{"logits":{{"dtype":"{dtype}","shape":[{rows},{VOCAB}],"data_offsets":[0,{n}]}}}}"#);
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let tmp = path.with_extension("partial");
    let mut w = BufWriter::with_capacity(1 << 22, File::create(&tmp)?);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    const BATCH: usize = 64;
    for start in (0..rows).step_by(BATCH) {
        let end = (start + BATCH).min(rows);
        let batch: Vec<Vec<u8>> = (start..end)
            .into_par_iter()
            .map(|r| {
                let (mut a, mut b) = (vec![0.0f32; VOCAB], vec![0.0f32; VOCAB]);
                make_row(r, &mut a, &mut b);
                let v = if side_a { a } else { b };
                if f16_out {
                    v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()
                } else {
                    v.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
            })
            .collect();
        for b in batch {
            w.write_all(&b)?;
        }
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(tmp, path)
}

/// The shard of one side and dtype, made if absent or of the wrong size.
fn shard(side_a: bool, f16_out: bool) -> ShardTensors {
    let rows = rows();
    let dir = data_dir();
    std::fs::create_dir_all(&dir).expect("bench data directory");
    let name =
        format!("logits-{}-{}-{rows}.safetensors", if side_a { "a" } else { "b" }, if f16_out { "f16" } else { "f32" });
    let path = dir.join(name);
    let want = rows * VOCAB * if f16_out { 2 } else { 4 };
    let ok = std::fs::metadata(&path).map(|m| m.len() as usize > want).unwrap_or(false);
    if !ok {
        eprintln!("writing {} ...", path.display());
        write_shard(&path, rows, f16_out, side_a).expect("write bench data");
    }
    ShardTensors::open(&path).expect("open bench data")
}

/// Bytes of input a kernel reads when it reads both sides once.
fn both_sides(a: &TensorView<'_>, b: &TensorView<'_>) -> u64 {
    (a.bytes().len() + b.bytes().len()) as u64
}

/// Runs `$f` on every row pair in parallel, rows read in their stored type and collected in
/// order (as `compare` does).
macro_rules! per_row {
    ($a:expr, $b:expr, |$i:ident, $x:ident, $y:ident| $body:expr) => {{
        let (sa, sb) = (StoredRows::new($a), StoredRows::new($b));
        (0..$a.rows())
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |(ba, bb), $i| match (sa.row($i, ba), sb.row($i, bb)) {
                    (Row::F32($x), Row::F32($y)) => $body,
                    (Row::F16($x), Row::F16($y)) => $body,
                    _ => unreachable!("the bench data are f32/f32 or f16/f16"),
                },
            )
            .collect::<Vec<_>>()
    }};
}

fn bench_memcpy(c: &mut Criterion, src: &[u8]) {
    let mut g = c.benchmark_group("memcpy");
    g.throughput(Throughput::Bytes(src.len() as u64));
    let mut dst = vec![0u8; src.len()];
    g.bench_function("1-thread", |bn| bn.iter(|| dst.copy_from_slice(black_box(src))));
    g.bench_function("rayon", |bn| {
        bn.iter(|| {
            dst.par_chunks_mut(1 << 20).zip(black_box(src).par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    g.finish();
}

fn bench_kernels(c: &mut Criterion, dtype: &str, a: &TensorView<'_>, b: &TensorView<'_>) {
    let mut g = c.benchmark_group(format!("metrics-{dtype}"));
    g.throughput(Throughput::Bytes(both_sides(a, b)));
    g.bench_function("cosine+rel_l2+nmse+max_abs", |bn| {
        bn.iter(|| {
            per_row!(a, b, |_i, x, y| {
                let d = logits::row_diff(x, y);
                (d.ab / (d.aa.sqrt() * d.bb.sqrt()), (d.dd / d.bb).sqrt(), d.max_abs)
            })
        })
    });
    g.bench_function("top_k", |bn| {
        bn.iter(|| {
            per_row!(a, b, |_i, x, y| {
                let (ta, tb) = (logits::top_k(x), logits::top_k(y));
                logits::topk_agreement(&RankedIds::from_topk(&ta), &RankedIds::from_topk(&tb), 1e-3)
            })
        })
    });
    g.bench_function("scan (diff + both top-k, one pass)", |bn| {
        bn.iter(|| per_row!(a, b, |_i, x, y| logits::row_scan(x, y)))
    });
    // the maxima KLD needs come from the diff pass in `compare`; here they are given
    let maxima = per_row!(a, b, |_i, x, y| {
        let d = logits::row_diff(x, y);
        (d.max_a, d.max_b)
    });
    g.bench_function("kld", |bn| bn.iter(|| per_row!(a, b, |i, x, y| logits::row_kld(x, y, maxima[i].0, maxima[i].1))));
    g.bench_function("full (compare)", |bn| {
        bn.iter(|| {
            let rows = logit_rows(a, b);
            let agree: Vec<_> = rows
                .iter()
                .map(|r| logits::topk_agreement(&RankedIds::from_topk(&r.top_a), &RankedIds::from_topk(&r.top_b), 1e-3))
                .collect();
            (rows, agree)
        })
    });
    g.bench_function("full, separate passes (diff, KLD, top-k, top-k)", |bn| {
        bn.iter(|| {
            per_row!(a, b, |_i, x, y| {
                let d = logits::row_diff(x, y);
                let kld = logits::row_kld(x, y, d.max_a, d.max_b);
                let (ta, tb) = (logits::top_k(x), logits::top_k(y));
                (d, kld, logits::topk_agreement(&RankedIds::from_topk(&ta), &RankedIds::from_topk(&tb), 1e-3))
            })
        })
    });
    if a.dtype != Dtype::F32 {
        // the path before rows were read in their stored type: each row widened into a Vec
        g.bench_function("full (rows widened to Vec<f32>)", |bn| {
            bn.iter(|| {
                (0..a.rows())
                    .into_par_iter()
                    .map_init(
                        || (Vec::new(), Vec::new()),
                        |(ba, bb), i| logits::row_metrics(a.row_f32(i, ba), b.row_f32(i, bb)),
                    )
                    .collect::<Vec<_>>()
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let (a32, b32) = (shard(true, false), shard(false, false));
    let (a16, b16) = (shard(true, true), shard(false, true));
    let (va32, vb32) = (a32.logits().expect("logits"), b32.logits().expect("logits"));
    let (va16, vb16) = (a16.logits().expect("logits"), b16.logits().expect("logits"));
    bench_memcpy(c, va32.bytes());
    bench_kernels(c, "f32", &va32, &vb32);
    bench_kernels(c, "f16", &va16, &vb16);
}

fn config() -> Criterion {
    Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(10))
}

criterion_group! { name = metric_benches; config = config(); targets = benches }
criterion_main!(metric_benches);
