//! `runner compare` end to end: real dumps written with `DumpWriter` into temporary
//! directories, the real binary run on them, its exit code, text and JSON checked.

use std::path::{Path, PathBuf};
use std::process::Command;

use half::f16;
use paritybench::metrics::{self, LayerValues, Options, PromptState, Report, names};
use paritybench::protocol::{
    CapturePoint, CaptureRecord, Dump, DumpWriter, EngineInfo, Manifest, Mode, ModelInfo, PromptShard, Tensor,
    TokenizerInfo,
};

/// Qwen's vocabulary: the size the kernels must handle.
const V_QWEN: usize = 151_936;

fn manifest(engine: &str, ids: &[&str]) -> Manifest {
    Manifest {
        schema: paritybench::protocol::SCHEMA_VERSION,
        complete: false,
        engine: EngineInfo {
            name: engine.into(),
            version: "0".into(),
            backend: "cpu".into(),
            device: "cpu".into(),
            ..Default::default()
        },
        model: ModelInfo {
            path: "m".into(),
            format: "safetensors".into(),
            quant: "f32".into(),
            compute_dtype: "f32".into(),
            ..Default::default()
        },
        tokenizer: TokenizerInfo::default(),
        mode: Mode::Prefill,
        request_sha256: "0".into(),
        prompt_ids: ids.iter().map(|s| s.to_string()).collect(),
        prompts: vec![],
        captures: CaptureRecord::default(),
        load_ms: None,
        peak_rss_bytes: None,
        peak_gpu_bytes: None,
        command: vec![],
        created_utc: "2026-01-01T00:00:00Z".into(),
        error: None,
        extra: Default::default(),
    }
}

/// Deterministic pseudo-random values in about [-8, 8] (xorshift).
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 16.0 - 8.0) as f32
        })
        .collect()
}

const H: usize = 64;

/// Prompt `i`: 6 tokens, positions [1, 2, 3, 5], logits `[4, v]`, three captures, 3 greedy
/// tokens. Identical for identical arguments.
fn prompt(i: u32, v: usize) -> PromptShard {
    let positions = vec![1, 2, 3, 5];
    let p = positions.len();
    let mut s = PromptShard {
        index: i,
        id: format!("p{i}"),
        token_ids: (0..6).map(|t| 100 + 7 * i as i32 + t).collect(),
        positions,
        logits: Some(Tensor::f32(vec![p, v], noise(1000 + u64::from(i), p * v))),
        generated: vec![11, 12, 13 + i as i32],
        ..Default::default()
    };
    s.capture(CapturePoint::AttnOut, 0, Tensor::f32(vec![p, H], noise(2000 + u64::from(i), p * H)));
    let lo: Vec<f16> = noise(3000 + u64::from(i), p * H).into_iter().map(f16::from_f32).collect();
    s.capture(CapturePoint::LayerOut, 1, Tensor::F16 { shape: vec![p, H], data: lo });
    s.capture(CapturePoint::MoeTopkIds, 1, Tensor::i32(vec![p, 2], vec![3, 1, 0, 2, 5, 4, 7, 6]));
    s
}

/// Writes a dump of `prompts`, requesting `ids`; complete when every requested id is written.
fn write_dump(dir: &Path, engine: &str, ids: &[&str], prompts: Vec<PromptShard>) -> PathBuf {
    let mut w = DumpWriter::create(dir, manifest(engine, ids)).unwrap();
    let done = prompts.len() == ids.len();
    for p in prompts {
        w.write_prompt(p).unwrap();
    }
    if done {
        w.finish().unwrap();
    } else {
        w.fail("engine process killed by signal 9".into()).unwrap();
    }
    dir.to_path_buf()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn runner(args: &[&str], threads: Option<usize>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.args(args);
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn compare(a: &Path, b: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["compare", a.to_str().unwrap(), b.to_str().unwrap()];
    args.extend_from_slice(extra);
    runner(&args, None)
}

fn report_of(r: &Run) -> Report {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not a report: {e}\n{}\n{}", r.stdout, r.stderr))
}

#[test]
fn self_compare_gives_zeros() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0", "p1"];
    let a = write_dump(&t.path().join("a"), "engine", &ids, vec![prompt(0, V_QWEN), prompt(1, V_QWEN)]);
    let b = write_dump(&t.path().join("b"), "ref", &ids, vec![prompt(0, V_QWEN), prompt(1, V_QWEN)]);

    let r = compare(&a, &b, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report_of(&r);
    let s = &rep.overall.summary;
    assert_eq!(s.n_positions, 8);
    assert_eq!(s.rel_l2_max, Some(0.0));
    assert_eq!(s.cosine_min, Some(1.0));
    assert_eq!(s.nmse_mean, Some(0.0));
    assert_eq!(s.max_abs, Some(0.0));
    let k = s.kld.unwrap();
    assert_eq!((k.mean, k.median, k.p99, k.max), (0.0, 0.0, 0.0, 0.0));
    let top1 = s.top1.unwrap();
    assert_eq!((top1.hits, top1.n, top1.rate), (8, 8, 1.0));
    assert_eq!(s.top1_margin_aware.unwrap().rate, 1.0);
    assert_eq!((s.top5_overlap_mean, s.top10_overlap_mean), (Some(1.0), Some(1.0)));
    assert_eq!(s.nonfinite, 0);
    let g = rep.overall.greedy.unwrap();
    assert_eq!((g.prompts, g.full_matches, g.min_match_len), (2, 2, 3));
    assert!(rep.missing.is_empty() && rep.nonfinite.is_empty());
    assert!(rep.overall.first_divergent.is_none());
    for p in &rep.prompts {
        assert!(p.deviating_positions.is_empty());
        assert!(p.first_divergent.is_none());
        assert_eq!(p.layers.len(), 3);
        for l in &p.layers {
            match &l.values {
                LayerValues::Float(f) => {
                    assert_eq!((f.rel_l2, f.cosine, f.worst_cosine), (0.0, 1.0, 1.0), "{}", l.tensor)
                }
                LayerValues::ExpertIds(e) => assert_eq!((e.set_agreement, e.ordered_agreement), (1.0, 1.0)),
            }
        }
    }
    // forward order: attn_out.0, then layer 1's moe_topk_ids before layer_out
    let order: Vec<&str> = rep.prompts[0].layers.iter().map(|l| l.tensor.as_str()).collect();
    assert_eq!(order, ["hidden.attn_out.0", "hidden.moe_topk_ids.1", "hidden.layer_out.1"]);

    // the named samples
    let samples = rep.samples();
    assert_eq!(samples.get(names::REL_L2).unwrap(), &[0.0; 8]);
    assert_eq!(samples.get(names::KLD).unwrap(), &[0.0; 8]);
    assert_eq!(samples.get(names::TOP1).unwrap(), &[1.0; 8]);
    assert_eq!(samples.get(names::GREEDY_MATCH_LEN).unwrap(), &[3.0, 3.0]);
    assert_eq!(samples.get(names::NONFINITE).unwrap(), &[0.0, 0.0]);
    assert_eq!(samples.layer(names::LAYER_REL_L2, CapturePoint::AttnOut, 0).unwrap(), &[0.0, 0.0]);
    assert_eq!(samples.layer(names::LAYER_COSINE, CapturePoint::LayerOut, 1).unwrap(), &[1.0, 1.0]);

    // the JSON report reads back as itself
    assert_eq!(serde_json::to_string_pretty(&rep).unwrap(), r.stdout.trim_end());

    let text = compare(&a, &b, &[]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.contains("deviating positions: none"), "{}", text.stdout);
    assert!(text.stdout.contains("8/8 100.0%"), "{}", text.stdout);
    assert!(text.stdout.contains("absolute: rel-L2 > 1e-3"), "{}", text.stdout);
}

#[test]
fn one_perturbed_row_is_exactly_that_position() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0", "p1"];
    let mut bad = prompt(1, V_QWEN);
    let Some(Tensor::F32 { data, .. }) = &mut bad.logits else { unreachable!() };
    // row 2 is absolute position 3: nudge a stripe of logits
    for x in &mut data[2 * V_QWEN..2 * V_QWEN + 5000] {
        *x += 0.5;
    }
    let a = write_dump(&t.path().join("a"), "engine", &ids, vec![prompt(0, V_QWEN), bad]);
    let b = write_dump(&t.path().join("b"), "ref", &ids, vec![prompt(0, V_QWEN), prompt(1, V_QWEN)]);

    let r = compare(&a, &b, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report_of(&r);
    assert!(rep.prompts[0].deviating_positions.is_empty());
    assert_eq!(rep.prompts[1].deviating_positions, vec![3]);
    let l = rep.prompts[1].logits.as_ref().unwrap();
    for (i, (&rel, &kld)) in l.rel_l2.iter().zip(&l.kld).enumerate() {
        if i == 2 {
            // ‖Δ‖ = 0.5·√5000, ‖b‖ ≈ √(V·64/3) for uniform values in [-8, 8]
            assert!(rel > 0.01 && rel < 0.05, "{rel}");
            assert!(kld > 0.0);
        } else {
            assert_eq!((rel, kld), (0.0, 0.0), "row {i}");
        }
    }
    assert_eq!(rep.prompts[1].first_divergent.as_ref().unwrap().tensor, "logits");
    assert_eq!(rep.overall.first_divergent.as_ref().unwrap().tensor, "logits");

    let text = compare(&a, &b, &[]);
    assert_eq!(text.code, 0);
    assert!(text.stdout.contains("p1: 1 position(s): 3\n"), "{}", text.stdout);
    assert!(text.stdout.contains("position 3: rel-L2"), "{}", text.stdout);
}

#[test]
fn nan_is_a_clear_failure() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0"];
    let mut bad = prompt(0, 1000);
    let Some(Tensor::F32 { data, .. }) = &mut bad.logits else { unreachable!() };
    data[3 * 1000 + 17] = f32::NAN; // row 3: absolute position 5
    let a = write_dump(&t.path().join("a"), "engine", &ids, vec![bad]);
    let b = write_dump(&t.path().join("b"), "ref", &ids, vec![prompt(0, 1000)]);

    let r = compare(&a, &b, &[]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("prompt \"p0\": logits of the engine holds 1 non-finite value(s) at position(s) 5"),
        "{}",
        r.stderr
    );
    let j = compare(&a, &b, &["--json"]);
    assert_eq!(j.code, 1);
    let rep = report_of(&j);
    assert_eq!(rep.overall.summary.nonfinite, 1);
    let l = rep.prompts[0].logits.as_ref().unwrap();
    assert!(l.kld[3].is_nan() && l.rel_l2[3].is_nan());
    assert_eq!(l.kld[..3], [0.0; 3]);
    assert!(rep.overall.summary.kld.unwrap().mean.is_nan());
    assert!(j.stdout.contains("\"NaN\""));
    assert_eq!(rep.samples().get(names::NONFINITE).unwrap(), &[1.0]);
}

#[test]
fn nan_in_a_capture_names_the_tensor() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0"];
    let mut bad = prompt(0, 100);
    let Some(Tensor::F32 { data, .. }) = bad.hidden.get_mut("hidden.attn_out.0") else { unreachable!() };
    data[H + 1] = f32::INFINITY; // row 1: position 2
    let a = write_dump(&t.path().join("a"), "engine", &ids, vec![prompt(0, 100)]);
    let b = write_dump(&t.path().join("b"), "ref", &ids, vec![bad]);
    let r = compare(&a, &b, &[]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("hidden.attn_out.0 of the reference holds 1 non-finite value(s) at position(s) 2"),
        "{}",
        r.stderr
    );
}

#[test]
fn different_positions_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0", "p1"];
    let mut moved = prompt(1, 100);
    moved.positions = vec![1, 2, 4, 5];
    let a = write_dump(&t.path().join("a"), "engine", &ids, vec![prompt(0, 100), moved]);
    let b = write_dump(&t.path().join("b"), "ref", &ids, vec![prompt(0, 100), prompt(1, 100)]);
    let r = compare(&a, &b, &[]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(r.stdout.is_empty(), "a refusal prints no numbers: {}", r.stdout);
    assert!(
        r.stderr.contains("prompt \"p1\": scored positions differ at index 2: engine has position 4, reference has 3"),
        "{}",
        r.stderr
    );
}

#[test]
fn different_token_ids_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0"];
    let mut other = prompt(0, 100);
    other.token_ids[4] = 9999;
    let a = write_dump(&t.path().join("a"), "engine", &ids, vec![other]);
    let b = write_dump(&t.path().join("b"), "ref", &ids, vec![prompt(0, 100)]);
    let r = compare(&a, &b, &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("prompt \"p0\": token_ids differ at index 4: engine has 9999, reference has 104"),
        "{}",
        r.stderr
    );
}

#[test]
fn capture_shapes_that_differ_are_refused_and_one_sided_captures_reported() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0"];
    let mut wide = prompt(0, 100);
    wide.capture(CapturePoint::AttnOut, 0, Tensor::f32(vec![4, H + 1], vec![0.0; 4 * (H + 1)]));
    let a = write_dump(&t.path().join("a"), "engine", &ids, vec![wide]);
    let b = write_dump(&t.path().join("b"), "ref", &ids, vec![prompt(0, 100)]);
    let r = compare(&a, &b, &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("tensor `hidden.attn_out.0` has shape [4, 65] in the engine's dump and [4, 64]"),
        "{}",
        r.stderr
    );

    // a capture one side lacks is reported absent there, with the manifest's reason
    let mut fewer = prompt(0, 100);
    fewer.hidden.remove("hidden.moe_topk_ids.1");
    let dir = t.path().join("c");
    let mut m = manifest("engine", &ids);
    m.captures.absent.insert("moe_topk_ids".into(), "not exposed by this engine".into());
    let mut w = DumpWriter::create(&dir, m).unwrap();
    w.write_prompt(fewer).unwrap();
    w.finish().unwrap();
    let r = compare(&dir, &b, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report_of(&r);
    let absent = &rep.prompts[0].absent;
    assert_eq!(absent.len(), 1);
    assert_eq!(absent[0].tensor, "hidden.moe_topk_ids.1");
    assert_eq!(absent[0].absent_in, metrics::Side::Engine);
    assert_eq!(absent[0].why.as_deref(), Some("not exposed by this engine"));
    assert_eq!(rep.prompts[0].layers.len(), 2);
}

#[test]
fn engine_died_after_two_prompts() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0", "p1", "p2", "p3", "p4"];
    let a = write_dump(&t.path().join("a"), "engine", &ids, (0..2).map(|i| prompt(i, 500)).collect());
    let b = write_dump(&t.path().join("b"), "ref", &ids, (0..5).map(|i| prompt(i, 500)).collect());
    let r = compare(&a, &b, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report_of(&r);
    let compared: Vec<&str> = rep.prompts.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(compared, ["p0", "p1"]);
    let missing: Vec<(&str, PromptState, PromptState)> =
        rep.missing.iter().map(|m| (m.id.as_str(), m.engine, m.reference)).collect();
    assert_eq!(
        missing,
        [
            ("p2", PromptState::NotFinished, PromptState::Finished),
            ("p3", PromptState::NotFinished, PromptState::Finished),
            ("p4", PromptState::NotFinished, PromptState::Finished)
        ]
    );
    assert!(!rep.engine.complete);
    assert_eq!(rep.engine.error.as_deref(), Some("engine process killed by signal 9"));
    assert_eq!((rep.overall.prompts_compared, rep.overall.prompts_missing), (2, 3));
    assert_eq!(rep.overall.summary.n_positions, 8);

    let text = compare(&a, &b, &[]);
    assert_eq!(text.code, 0);
    assert!(
        text.stdout.contains("INCOMPLETE: 2 of 5 prompts finished; error: engine process killed by signal 9"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("missing prompts (3), not compared:"), "{}", text.stdout);
    assert!(text.stdout.contains("p4: engine did not finish it, reference finished"), "{}", text.stdout);

    // nothing in common: a refusal
    let c = write_dump(&t.path().join("c"), "engine", &ids, vec![]);
    let r = compare(&c, &b, &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no prompt is finished in both dumps"), "{}", r.stderr);
}

/// A top-k-only reference (as from llama-server): `top_ids` `[P, 10]` and `top_probs`.
#[test]
fn top_k_only_reference() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0"];
    let v = 2000;
    let mut engine = prompt(0, v);
    let Some(Tensor::F32 { data, .. }) = &mut engine.logits else { unreachable!() };
    // row 1: a clear winner (a margin of more than 1 logit)
    let row1 = &mut data[v..2 * v];
    let best = (0..v).max_by(|&i, &j| row1[i].total_cmp(&row1[j]).then(j.cmp(&i))).unwrap();
    row1[best] += 1.0;
    // the reference's top-10 by probability, from the same logits, except that it names
    // the engine's second token first: at row 1 with the probabilities kept (a clear
    // disagreement), at row 3 as a near tie (margin 1e-5 < the 1e-3 tie threshold)
    let mut top_ids = Vec::new();
    let mut top_probs = Vec::new();
    for (row_i, row) in data.chunks(v).enumerate() {
        let mut idx: Vec<usize> = (0..v).collect();
        idx.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        let mut ids: Vec<usize> = idx[..10].to_vec();
        let mut probs: Vec<f64> = ids.iter().map(|&i| (row[i] as f64 - m).exp() / z).collect();
        if row_i == 1 || row_i == 3 {
            ids.swap(0, 1);
        }
        if row_i == 3 {
            probs[1] = probs[0] * (-1e-5f64).exp();
        }
        top_ids.extend(ids.iter().map(|&i| i as i32));
        top_probs.extend(probs.iter().map(|&p| p as f32));
    }
    let mut reference = prompt(0, v);
    reference.logits = None;
    reference.hidden.insert("top_ids".into(), Tensor::i32(vec![4, 10], top_ids));
    reference.hidden.insert("top_probs".into(), Tensor::f32(vec![4, 10], top_probs));
    let a = write_dump(&t.path().join("a"), "engine", &ids, vec![engine]);
    let b = write_dump(&t.path().join("b"), "llama-server", &ids, vec![reference]);

    let r = compare(&a, &b, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report_of(&r);
    let p = &rep.prompts[0];
    assert!(p.logits.is_none(), "full-logit metrics must be absent");
    let s = &rep.overall.summary;
    assert_eq!((s.cosine_min, s.rel_l2_max, s.kld), (None, None, None));
    let top1 = s.top1.unwrap();
    assert_eq!((top1.hits, top1.n), (2, 4));
    assert_eq!(s.top10_overlap_mean, Some(1.0));
    assert_eq!(s.top5_overlap_mean, Some(1.0));
    let t1 = p.topk.as_ref().unwrap();
    assert_eq!(t1.top1, [true, false, true, false]);
    let margins = t1.reference_margin.as_ref().unwrap();
    assert!(margins[1] > 1.0, "{margins:?}");
    assert!((margins[3] - 1e-5).abs() < 1e-6, "{margins:?}");
    // a clear disagreement fails the margin-aware rule; the near tie passes it (the
    // engine's token is the reference's second)
    assert_eq!(t1.top1_margin_aware.as_deref(), Some(&[true, false, true, true][..]));
    assert_eq!(s.top1_margin_aware.unwrap().hits, 3);
    assert_eq!(p.deviating_positions, vec![2, 5]);
    let samples = rep.samples();
    assert!(samples.get(names::REL_L2).is_none() && samples.get(names::KLD).is_none());
    assert_eq!(samples.get(names::TOP1).unwrap(), &[1.0, 0.0, 1.0, 0.0]);
    assert_eq!(samples.get(names::TOP1_MARGIN_AWARE).unwrap(), &[1.0, 0.0, 1.0, 1.0]);
    // layers are still compared
    assert_eq!(p.layers.len(), 3);

    let text = compare(&a, &b, &[]);
    assert!(text.stdout.contains("full-logit metrics: absent"), "{}", text.stdout);
}

/// Dumps that differ everywhere, so every sum is non-trivial.
fn noisy_pair(t: &Path) -> (PathBuf, PathBuf) {
    let ids = ["p0", "p1", "p2"];
    let engine: Vec<PromptShard> = (0..3)
        .map(|i| {
            let mut p = prompt(i, 20_000);
            let Some(Tensor::F32 { data, .. }) = &mut p.logits else { unreachable!() };
            for (x, e) in data.iter_mut().zip(noise(77 + u64::from(i), 4 * 20_000)) {
                *x += 0.01 * e;
            }
            let Some(Tensor::F32 { data, .. }) = p.hidden.get_mut("hidden.attn_out.0") else { unreachable!() };
            for (x, e) in data.iter_mut().zip(noise(99, 4 * H)) {
                *x += 1e-4 * e;
            }
            p
        })
        .collect();
    let a = write_dump(&t.join("a"), "engine", &ids, engine);
    let b = write_dump(&t.join("b"), "ref", &ids, (0..3).map(|i| prompt(i, 20_000)).collect());
    (a, b)
}

#[test]
fn bit_identical_with_one_and_two_threads() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = noisy_pair(t.path());
    let args = ["compare", a.to_str().unwrap(), b.to_str().unwrap(), "--json"];
    let one = runner(&args, Some(1));
    let two = runner(&args, Some(2));
    assert_eq!(one.code, 0, "{}", one.stderr);
    assert_eq!(one.stdout, two.stdout);
    let rep = report_of(&one);
    assert!(rep.overall.summary.kld.unwrap().mean > 0.0);

    // the library with explicit pools
    let (da, db) = (Dump::open(&a).unwrap(), Dump::open(&b).unwrap());
    let run_in = |n: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        pool.install(|| metrics::compare(&da, &db, &Options::default()).unwrap())
    };
    let (r1, r2) = (run_in(1), run_in(2));
    assert_eq!(serde_json::to_string(&r1).unwrap(), serde_json::to_string(&r2).unwrap());
    assert_eq!(r1, rep);
}

#[test]
fn noise_floors_decide_the_first_divergent_layer() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = noisy_pair(t.path());
    // attn_out.0 has rel-L2 ≈ 1e-4 (noise of the same spread, scaled), the logits ≈ 1e-2
    let r = compare(&a, &b, &["--json"]);
    let rep = report_of(&r);
    let d = rep.overall.first_divergent.as_ref().unwrap();
    assert_eq!((d.tensor.as_str(), d.rule.as_str(), d.threshold), ("logits", "absolute", 1e-3));
    let r = compare(&a, &b, &["--json", "--layer-threshold", "5e-5"]);
    let rep = report_of(&r);
    assert_eq!(rep.overall.first_divergent.as_ref().unwrap().tensor, "hidden.attn_out.0");
    assert_eq!(rep.prompts[2].first_divergent.as_ref().unwrap().tensor, "hidden.attn_out.0");

    // floors measured between "two references": attn_out.0 at 5e-5 → threshold 5e-4: not
    // divergent; the logits (floor 0, raised to the 1e-6 minimum → threshold 1e-5) are
    let floors = t.path().join("floors.json");
    std::fs::write(
        &floors,
        r#"{"description": "test: eager vs sdpa", "references": ["x", "y"], "logits": 0.0,
            "captures": {"attn_out": {"0": 5e-5}, "layer_out": {"1": 0.0}}}"#,
    )
    .unwrap();
    let r = compare(&a, &b, &["--json", "--floors", floors.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report_of(&r);
    let d = rep.overall.first_divergent.as_ref().unwrap();
    assert_eq!((d.tensor.as_str(), d.rule.as_str()), ("logits", "noise_floor"));
    assert!((d.threshold - 1e-5).abs() < 1e-20, "{}", d.threshold);
    let text = compare(&a, &b, &["--floors", floors.to_str().unwrap()]);
    assert!(text.stdout.contains("floors from test: eager vs sdpa"), "{}", text.stdout);

    let r = compare(&a, &b, &["--floors", t.path().join("nope.json").to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("nope.json"), "{}", r.stderr);
}

#[test]
fn floors_saved_by_one_comparison_set_the_ties_of_the_next() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = noisy_pair(t.path());
    let floors = t.path().join("saved.json");
    let r = compare(&a, &b, &["--json", "--save-floors", floors.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report_of(&r);
    let saved = paritybench::metrics::NoiseFloors::load(&floors).unwrap();
    assert_eq!(saved.logits, rep.overall.summary.rel_l2_max.unwrap(), "the floor is the largest logits rel-L2");
    assert!(saved.captures.values().flat_map(|l| l.values()).any(|&x| x > 0.0));
    assert_eq!(rep.settings.tie_threshold, 1e-3);

    // the tie threshold from those floors: 3·√2·floor·rms(reference logits), as runner once
    let r = compare(&a, &b, &["--json", "--floors", floors.to_str().unwrap(), "--tie-from-floors"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let derived = report_of(&r).settings.tie_threshold;
    let rms = paritybench::once::logits_rms(&Dump::open(&b).unwrap()).unwrap();
    assert_eq!(derived, paritybench::once::tie_threshold(saved.logits, rms));
    assert!(derived > 1e-3, "{derived}");
    // it needs floors, and a fixed threshold beside it is refused
    assert_eq!(compare(&a, &b, &["--tie-from-floors"]).code, 2);
    let r = compare(&a, &b, &["--floors", floors.to_str().unwrap(), "--tie-from-floors", "--tie-threshold", "0.1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn unreadable_dumps_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let b = write_dump(&t.path().join("b"), "ref", &["p0"], vec![prompt(0, 10)]);
    let r = compare(&t.path().join("nothing"), &b, &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not a dump directory"), "{}", r.stderr);
}

#[test]
fn a_negative_top_id_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let mut reference = prompt(0, 50);
    reference.logits = None;
    reference.hidden.insert("top_ids".into(), Tensor::i32(vec![4, 2], vec![1, 2, 3, 4, 5, -1, 7, 8]));
    let a = write_dump(&t.path().join("a"), "engine", &["p0"], vec![prompt(0, 50)]);
    let b = write_dump(&t.path().join("b"), "llama-server", &["p0"], vec![reference]);
    let r = compare(&a, &b, &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("`top_ids`") && r.stderr.contains("entry [2][1] = -1 is not a token id"), "{}", r.stderr);
}

#[test]
fn layer_count_and_tokenizer_parity_are_samples() {
    let t = tempfile::tempdir().unwrap();
    let ids = ["p0", "p1", "p2"];
    // p0: tokenized right, same layers; p1: tokenized wrong, one layer_out more than the
    // reference; p2: not tokenized (no text), same layers.
    let mut e0 = prompt(0, 100);
    e0.tokenizer_match = Some(true);
    let mut e1 = prompt(1, 100);
    e1.tokenizer_match = Some(false);
    e1.capture(CapturePoint::LayerOut, 2, Tensor::f32(vec![4, H], noise(9, 4 * H)));
    let a = write_dump(&t.path().join("a"), "engine", &ids, vec![e0, e1, prompt(2, 100)]);
    let b = write_dump(&t.path().join("b"), "ref", &ids, vec![prompt(0, 100), prompt(1, 100), prompt(2, 100)]);
    let r = compare(&a, &b, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = report_of(&r);
    let s = rep.samples();
    assert_eq!(s.get(names::LAYER_COUNT_PARITY).unwrap(), &[1.0, 0.0, 1.0]);
    assert_eq!(s.get(names::TOKENIZER_PARITY).unwrap(), &[1.0, 0.0], "p2 was not tokenized: no sample");
    let c = rep.prompts[1].count_parity.as_ref().unwrap();
    assert!(!c.parity);
    assert_eq!(c.mismatched, ["layer_out: engine [1, 2], reference [1]"]);
    let text = compare(&a, &b, &[]).stdout;
    assert!(text.contains("layer count parity: 2/3 prompts; tokenizer parity: 1/2 prompts (1 not judged)"), "{text}");
    assert!(text.contains("p1: LAYER COUNTS DIFFER") && text.contains("p1: TOKENIZER MISMATCH"), "{text}");

    // different layer counts in the manifests break parity even where the captures agree
    let dir = t.path().join("c");
    let mut m = manifest("engine", &["p0"]);
    m.model.n_layers = Some(5);
    let mut w = DumpWriter::create(&dir, m).unwrap();
    w.write_prompt(prompt(0, 100)).unwrap();
    w.finish().unwrap();
    let refd = t.path().join("d");
    let mut m = manifest("ref", &["p0"]);
    m.model.n_layers = Some(4);
    let mut w = DumpWriter::create(&refd, m).unwrap();
    w.write_prompt(prompt(0, 100)).unwrap();
    w.finish().unwrap();
    let rep = report_of(&compare(&dir, &refd, &["--json"]));
    let c = rep.prompts[0].count_parity.as_ref().unwrap();
    assert_eq!((c.parity, c.engine_layers, c.reference_layers), (false, Some(5), Some(4)));

    // no capture in common: nothing to judge, no sample (a gate on it is `missing`, not passed)
    let mut bare = prompt(0, 100);
    bare.hidden.clear();
    let e = write_dump(&t.path().join("e"), "engine", &["p0"], vec![bare]);
    let f = write_dump(&t.path().join("f"), "ref", &["p0"], vec![prompt(0, 100)]);
    let rep = report_of(&compare(&e, &f, &["--json"]));
    assert!(rep.prompts[0].count_parity.is_none());
    assert!(rep.samples().get(names::LAYER_COUNT_PARITY).is_none());
}
