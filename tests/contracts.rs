//! Contract files: parsing (shipped files, typos, provable-contracts files) and evaluation
//! (every reduction and comparison, floor-relative thresholds, NaN).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use paritybench::contracts::{
    Comparison, Contract, ContractError, Metric, Outcome, Reduction, Severity, Subject, Threshold, reduce, wilson_lower,
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shipped(name: &str) -> Contract {
    Contract::load(&repo().join("contracts").join(name)).unwrap_or_else(|e| panic!("{e}"))
}

fn parse(text: &str) -> Result<Contract, ContractError> {
    Contract::parse(text.as_bytes(), Path::new("test-contract.yaml"))
}

/// A native contract with one gate whose body is `gate` (indented under `- id: g`).
fn one_gate(gate: &str) -> String {
    let body: String = gate.lines().map(|l| format!("    {l}\n")).collect();
    format!("id: t\nversion: 1\ngates:\n  - id: g\n{body}")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

// ---------------------------------------------------------------------------- parsing

#[test]
fn every_shipped_contract_parses() {
    let mut files = Vec::new();
    yaml_files(&repo().join("contracts"), &mut files);
    assert!(files.len() >= 3, "{files:?}");
    for f in &files {
        let c = Contract::load(f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.gates.is_empty(), "{}", f.display());
        let bytes = std::fs::read(f).unwrap();
        assert_eq!(c.sha256, paritybench::protocol::sha256_hex(&bytes));
        assert_eq!(c.sha256.len(), 64);
    }
    // load_dir reads the top level only (examples are not applied by default).
    let top = Contract::load_dir(&repo().join("contracts")).unwrap();
    let ids: Vec<&str> = top.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["builtin-strict", "seed-parity"]);
}

#[test]
fn seed_contract_encodes_the_seeds_gates() {
    let c = shipped("seed-parity.yaml");
    assert_eq!((c.id.as_str(), c.version.as_str()), ("seed-parity", "3"));
    let cos = c.gate("logits-cosine-vs-hf-fp16").unwrap();
    assert_eq!(cos.metric, Metric::LogitsCosine);
    assert_eq!(cos.reduction, Reduction::Min);
    assert_eq!(cos.comparison, Comparison::Gt);
    assert_eq!(cos.value, Threshold::Absolute(0.99));
    assert_eq!(cos.severity, Severity::Error);
    let top1 = c.gate("argmax-vs-llamacpp-top1").unwrap();
    assert_eq!(
        (top1.metric, top1.reduction, top1.comparison),
        (Metric::Top1MarginAware, Reduction::All, Comparison::Eq)
    );
    let gguf = c.gate("gguf-logits-cosine-vs-hf-fp32").unwrap();
    assert_eq!((gguf.metric, gguf.value), (Metric::LogitsCosine, Threshold::Absolute(0.99)));
    let quant = c.gate("gguf-quantized-logits-vs-hf-fp32").unwrap();
    assert_eq!((quant.metric, quant.value), (Metric::LogitsRelL2, Threshold::FloorMultiple(2.0)));
    assert_eq!(top1.value, Threshold::Absolute(1.0));
    let count = c.gate("layer-count-parity").unwrap();
    assert_eq!(count.metric, Metric::LayerCountParity);

    // Scopes: the cosine gate applies to HF FP16 references only.
    assert!(cos.scope.matches(&subject_of("hf-f16")));
    assert!(cos.scope.matches(&subject_of("HF-FP16-sdpa")));
    assert!(!cos.scope.matches(&subject_of("hf-f32")));
    assert!(top1.scope.matches(&subject_of("llamacpp-q8_0")));
    assert!(top1.scope.matches(&subject_of("llamacpp-f16-incremental")));
    assert!(
        !top1.scope.matches(&subject_of("llamacpp-q8_0-fa")),
        "llama.cpp's flash-attention path is a floor, not the seeds' llama.cpp"
    );
    assert!(!top1.scope.matches(&subject_of("hf-f16")));
    // GGUF files: the absolute cosine for unquantized files, llama.cpp's distance for quantized ones
    let file = |dtype: &str| Subject { dtype: Some(dtype.into()), ..subject_of("hf-fp32-eager") };
    assert!(gguf.scope.matches(&file("f16")) && gguf.scope.matches(&file("BF16")));
    assert!(!gguf.scope.matches(&file("q4_k_m")));
    assert!(quant.scope.matches(&file("q4_k_m")) && quant.scope.matches(&file("q8_0")));
    assert!(!quant.scope.matches(&file("f16")));
    assert!(
        !quant.scope.matches(&Subject { dtype: Some("q8_0".into()), ..subject_of("hf-fp32-sdpa") }),
        "no floor vs SDPA"
    );
}

#[test]
fn a_scope_field_may_list_globs_and_exclude_with_a_bang() {
    let c = contract_with(
        "  - {id: lc, metric: top1, reduction: mean, comparison: \">=\", value: 0.5, scope: {reference: [\"llamacpp-*\", \"!*-fa\", \"!*-incremental\"]}}\n",
    );
    let g = c.gate("lc").unwrap();
    assert!(g.scope.matches(&subject_of("llamacpp-q8_0")));
    assert!(g.scope.matches(&subject_of("LLAMACPP-Q4_K_M")));
    assert!(!g.scope.matches(&subject_of("llamacpp-q8_0-fa")));
    assert!(!g.scope.matches(&subject_of("llamacpp-f16-incremental")));
    assert!(!g.scope.matches(&subject_of("hf-fp32-eager")));
    // a bad glob in a list is named with the gate and the field
    let e = parse(&format!(
        "id: t\nversion: 1\ngates:\n{}",
        "  - {id: bad, metric: top1, reduction: mean, comparison: \">=\", value: 0.5, scope: {reference: [\"ok-*\", \"[oops\"]}}\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad") && e.contains("reference") && e.contains("[oops"), "{e}");
}

#[test]
fn builtin_strict_contract_has_the_strict_gates() {
    let c = shipped("builtin-strict.yaml");
    let g = c.gate("f32-logits-rel-l2").unwrap();
    assert_eq!((g.metric, g.reduction, g.comparison), (Metric::LogitsRelL2, Reduction::Max, Comparison::Le));
    assert_eq!(g.value, Threshold::Absolute(1e-4));
    assert_eq!(c.gate("f32-layer-rel-l2").unwrap().value, Threshold::Absolute(1e-4));
    assert_eq!(c.gate("f32-top1-margin-aware").unwrap().metric, Metric::Top1MarginAware);
    assert_eq!(c.gate("f16-logits-rel-l2").unwrap().value, Threshold::Absolute(5e-3));
    let floor = c.gate("f32-layer-rel-l2-vs-noise-floor").unwrap();
    assert_eq!(floor.value, Threshold::FloorMultiple(100.0));
    assert_eq!(floor.severity, Severity::Warning);
    let q = c.gate("quant-top1-vs-llamacpp").unwrap();
    assert_eq!(q.reduction, Reduction::WilsonLower);
    let quant = Subject {
        engine: "paritybench".into(),
        model: "qwen3-dense".into(),
        reference: "llamacpp-q4_k".into(),
        dtype: Some("Q4_K".into()),
        ..Default::default()
    };
    assert!(q.scope.matches(&quant));
    assert!(!c.gate("f32-logits-rel-l2").unwrap().scope.matches(&quant));
}

#[test]
fn a_misspelt_metric_names_the_file_line_and_closest_name() {
    let text = "id: t\nversion: 1\ngates:\n  - id: cos\n    metric: logits.cosin\n    reduction: min\n    comparison: \">\"\n    value: 0.99\n";
    let err = parse(text).unwrap_err();
    match &err {
        ContractError::UnknownName { path, line, gate, field, name, suggestion } => {
            assert_eq!(*field, "metric");
            assert_eq!(path, Path::new("test-contract.yaml"));
            assert_eq!(*line, Some(5));
            assert_eq!(gate, "cos");
            assert_eq!(name, "logits.cosin");
            assert_eq!(*suggestion, "logits.cosine");
        }
        other => panic!("wrong error: {other}"),
    }
    assert_eq!(
        err.to_string(),
        "test-contract.yaml:5: gate `cos`: unknown metric `logits.cosin` (did you mean `logits.cosine`?)"
    );

    // The same from a real file names that file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.yaml");
    std::fs::write(&path, text.replace("logits.cosin", "\"layer_rel_l2\"")).unwrap();
    let msg = Contract::load(&path).unwrap_err().to_string();
    assert!(msg.starts_with(&format!("{}:5:", path.display())), "{msg}");
    assert!(msg.contains("`layer_rel_l2`") && msg.contains("did you mean `layer.rel_l2`"), "{msg}");
}

#[test]
fn other_typos_are_caught_with_their_line() {
    // Reductions, comparisons and severities are checked like metrics.
    let err = parse(&one_gate("metric: kld\nreduction: p90\ncomparison: \"<=\"\nvalue: 1")).unwrap_err();
    assert_eq!(err.to_string(), "test-contract.yaml:6: gate `g`: unknown reduction `p90` (did you mean `p99`?)");
    let err = parse(&one_gate("metric: kld\nreduction: max\ncomparison: \"=<\"\nvalue: 1")).unwrap_err();
    assert_eq!(err.to_string(), "test-contract.yaml:7: gate `g`: unknown comparison `=<` (did you mean `<=`?)");
    let err =
        parse(&one_gate("metric: kld\nreduction: max\ncomparison: \"<=\"\nvalue: 1\nseverity: warn")).unwrap_err();
    assert!(err.to_string().contains("unknown severity `warn` (did you mean `warning`?)"), "{err}");

    // A misspelt key in a native contract is an error, not silently ignored.
    let err =
        parse(&one_gate("metric: kld\nreduction: max\ncomparison: \"<=\"\nvalue: 1\nseverty: warning")).unwrap_err();
    assert!(err.to_string().contains("unknown field `severty`"), "{err}");
    assert_eq!(err.line(), Some(9));

    let err =
        parse(&one_gate("metric: kld\nreduction: max\ncomparison: \"<=\"\nvalue: { floor_multiple: 0 }")).unwrap_err();
    assert!(matches!(err, ContractError::BadNumber { field: "value.floor_multiple", .. }), "{err}");

    let err = parse(&one_gate("metric: kld\nreduction: max\ncomparison: \"<=\"\nvalue: { floor_multiplier: 3 }"))
        .unwrap_err();
    assert!(err.to_string().contains("floor_multiplier"), "{err}");

    let err =
        parse(&one_gate("metric: kld\nreduction: max\ncomparison: \"<=\"\nvalue: 1\nscope: { model: \"qwen[\" }"))
            .unwrap_err();
    assert!(matches!(err, ContractError::BadPattern { field: "model", .. }), "{err}");

    let dup = "id: t\nversion: 1\ngates:\n  - {id: a, metric: kld, reduction: max, comparison: \"<=\", value: 1}\n  - {id: a, metric: kld, reduction: max, comparison: \"<=\", value: 2}\n";
    assert!(matches!(parse(dup).unwrap_err(), ContractError::DuplicateGate { .. }));

    assert!(matches!(parse("id: t\nversion: 1\ngates: []\n").unwrap_err(), ContractError::Shape { .. }));
    assert!(matches!(parse("metadata: {version: 1}\n").unwrap_err(), ContractError::Shape { .. }));
    assert!(matches!(parse("gates: [").unwrap_err(), ContractError::Yaml { .. }));
}

#[test]
fn values_in_every_spelling() {
    for (value, expected) in [
        ("1e-4", Threshold::Absolute(1e-4)),
        ("1.0e-4", Threshold::Absolute(1e-4)),
        ("\"5e-3\"", Threshold::Absolute(5e-3)),
        ("3", Threshold::Absolute(3.0)),
        ("{ floor_multiple: 2.5 }", Threshold::FloorMultiple(2.5)),
    ] {
        let c = parse(&one_gate(&format!("metric: kld\nreduction: max\ncomparison: le\nvalue: {value}"))).unwrap();
        assert_eq!(c.gates[0].value, expected, "{value}");
        assert_eq!(c.gates[0].comparison, Comparison::Le);
    }
    let c = parse("id: t\nversion: \"2.0.1\"\ngates:\n  - {id: a, metric: top1, reduction: mean, comparison: \">=\", value: 0.9}\n").unwrap();
    assert_eq!(c.version, "2.0.1");
}

#[test]
fn parity_gates_inside_a_provable_contracts_file() {
    let c = shipped("examples/apr-provable-contract.yaml");
    assert_eq!(c.id, "apr-qwen3-parity");
    assert_eq!(c.version, "2.1.0", "falls back to metadata.version");
    assert_eq!(c.description, "CPU/GPU and reference parity of a Qwen3 forward pass");
    assert_eq!(c.gates.len(), 4);
    assert_eq!(c.gate("layer-rel-l2-vs-floor").unwrap().value, Threshold::FloorMultiple(10.0));

    // Any other keys, of any shape, are ignored; the id falls back to the file stem.
    let text = "\
metadata:
  version: 1.0.0
  references: [a, b]
equations: { identity: { formula: f(x) = x } }
proof_obligations: [{type: invariant, property: p}]
falsification_tests: [{id: F-1, prediction: x, test: y, if_fails: z}]
kani_harnesses: [{id: K-1, bound: 8}]
qa_gate: {id: Q, checks: [validation]}
layer_steps: [{name: attn_norm, tolerance_abs: 0.0001}]
parity_gate: {metric: cosine, threshold: 0.99}
parity_gates:
  gates:
    - {id: cos, metric: logits.cosine, reduction: min, comparison: \">\", value: 0.99}
";
    let c = Contract::parse(text.as_bytes(), Path::new("contracts/layer-parity-v1.yaml")).unwrap();
    assert_eq!((c.id.as_str(), c.version.as_str()), ("layer-parity-v1", "1.0.0"));

    // Inside the block itself, typos are still errors.
    let bad = text.replace("metric: logits.cosine", "metric: logits.cosine_sim");
    let err = Contract::parse(bad.as_bytes(), Path::new("x.yaml")).unwrap_err();
    assert!(matches!(&err, ContractError::UnknownName { line: Some(13), suggestion: "logits.cosine", .. }), "{err}");

    // No version anywhere: a clear error.
    let err = Contract::parse(b"parity_gates:\n  gates: []\n", Path::new("x.yaml")).unwrap_err();
    assert!(err.to_string().contains("no `version`"), "{err}");
}

// ------------------------------------------------------------------------- evaluation

/// A subject that only names its reference (for scope checks).
fn subject_of(reference: &str) -> Subject {
    Subject { engine: "apr".into(), model: "m".into(), reference: reference.into(), ..Default::default() }
}

fn contract_with(gates: &str) -> Contract {
    parse(&format!("id: t\nversion: 7\ngates:\n{gates}")).unwrap_or_else(|e| panic!("{e}"))
}

fn gate_line(metric: &str, reduction: &str, cmp: &str, value: &str) -> String {
    format!("  - {{id: g, metric: {metric}, reduction: {reduction}, comparison: \"{cmp}\", value: {value}}}\n")
}

fn subject(metric: Metric, samples: &[f64]) -> Subject {
    Subject {
        engine: "paritybench".into(),
        model: "qwen3-dense".into(),
        reference: "hf-f32".into(),
        dtype: Some("f32".into()),
        mode: Some("prefill".into()),
        prompt: None,
        samples: BTreeMap::from([(metric, samples.to_vec())]),
        noise_floors: BTreeMap::new(),
    }
}

/// The one verdict of a one-gate contract on one subject.
fn judge(metric: &str, reduction: &str, cmp: &str, value: &str, samples: &[f64]) -> paritybench::contracts::Verdict {
    let c = contract_with(&gate_line(metric, reduction, cmp, value));
    let m = Metric::parse(metric).unwrap();
    let e = c.evaluate(&[subject(m, samples)]);
    assert_eq!(e.verdicts.len(), 1);
    e.verdicts.into_iter().next().unwrap()
}

#[test]
fn each_reduction() {
    let xs = [3.0, 1.0, 2.0, 4.0];
    assert_eq!(reduce(Reduction::Min, &xs), Ok(1.0));
    assert_eq!(reduce(Reduction::Max, &xs), Ok(4.0));
    assert_eq!(reduce(Reduction::Mean, &xs), Ok(2.5));
    assert_eq!(reduce(Reduction::Median, &xs), Ok(2.5));
    assert_eq!(reduce(Reduction::Median, &[5.0, 1.0, 3.0]), Ok(3.0));
    assert_eq!(reduce(Reduction::Count, &xs), Ok(4.0));
    assert_eq!(reduce(Reduction::Count, &[]), Ok(0.0));
    // numpy.percentile(range(1, 101), 99) == 99.01 (linear interpolation).
    let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
    let p99 = reduce(Reduction::P99, &hundred).unwrap();
    assert!((p99 - 99.01).abs() < 1e-12, "{p99}");
    assert_eq!(reduce(Reduction::P99, &[7.0]), Ok(7.0));
    // Wilson 95 % lower bound of 9/10 is 0.5958 (statsmodels proportion_confint, method="wilson").
    let mut nine = vec![1.0; 9];
    nine.push(0.0);
    let w = reduce(Reduction::WilsonLower, &nine).unwrap();
    assert!((w - 0.595_849_973_204_761_6).abs() < 1e-12, "{w}");
    assert!((wilson_lower(256, 256, 1.959963984540054) - 0.985_216_143_574_128_6).abs() < 1e-12);
    assert!(reduce(Reduction::WilsonLower, &[1.0, 0.5]).is_err());
    assert!(reduce(Reduction::Mean, &[]).is_err());
    // A NaN sample poisons every reduction but count.
    for r in
        [Reduction::Min, Reduction::Max, Reduction::Mean, Reduction::Median, Reduction::P99, Reduction::WilsonLower]
    {
        assert!(reduce(r, &[1.0, f64::NAN, 0.0]).unwrap().is_nan(), "{r}");
    }
}

#[test]
fn reductions_in_verdicts() {
    let v = judge("logits.cosine", "min", ">", "0.99", &[0.999, 0.995, 0.9999]);
    assert_eq!((v.outcome, v.observed, v.n_samples), (Outcome::Passed, Some(0.995), 3));
    let v = judge("logits.cosine", "min", ">", "0.99", &[0.999, 0.98, 0.9999]);
    assert_eq!((v.outcome, v.observed), (Outcome::Failed, Some(0.98)));
    let v = judge("logits.rel_l2", "max", "<=", "1e-4", &[1e-5, 1e-4]);
    assert_eq!(v.outcome, Outcome::Passed);
    let v = judge("kld", "mean", "<", "0.5", &[0.25, 0.75]);
    assert_eq!((v.outcome, v.observed), (Outcome::Failed, Some(0.5)));
    let v = judge("kld", "median", "<", "0.5", &[0.1, 0.2, 9.0]);
    assert_eq!((v.outcome, v.observed), (Outcome::Passed, Some(0.2)));
    let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
    let v = judge("kld", "p99", "<=", "99", &hundred);
    assert_eq!(v.outcome, Outcome::Failed);
    let v = judge("top1", "wilson_lower", ">=", "0.95", &[1.0; 256]);
    assert_eq!(v.outcome, Outcome::Passed);
    let v = judge("top1", "wilson_lower", ">=", "0.95", &[1.0; 20]);
    assert_eq!(v.outcome, Outcome::Failed, "20/20 is not enough evidence for 95 %");
    let v = judge("top1", "wilson_lower", ">=", "0.5", &[1.0, 2.0]);
    assert_eq!(v.outcome, Outcome::Failed);
    assert!(v.detail.unwrap().contains("0/1 samples"));
    let v = judge("logits.cosine", "count", ">=", "256", &[1.0; 255]);
    assert_eq!((v.outcome, v.observed), (Outcome::Failed, Some(255.0)));
    let v = judge("logits.cosine", "count", "==", "0", &[]);
    assert_eq!(v.outcome, Outcome::Passed);
}

#[test]
fn all_requires_every_sample_and_reports_the_worst() {
    let v = judge("top1", "all", "==", "1", &[1.0, 1.0, 1.0]);
    assert_eq!((v.outcome, v.observed), (Outcome::Passed, Some(1.0)));
    let v = judge("top1", "all", "==", "1", &[1.0, 0.0, 1.0, 0.0]);
    assert_eq!((v.outcome, v.observed), (Outcome::Failed, Some(0.0)));
    assert_eq!(v.detail.as_deref(), Some("2 of 4 samples violate"));
    let v = judge("logits.rel_l2", "all", "<", "0.1", &[0.01, 0.2, 0.05]);
    assert_eq!((v.outcome, v.observed), (Outcome::Failed, Some(0.2)));
    let v = judge("logits.cosine", "all", ">=", "0.9", &[0.95, 0.9]);
    assert_eq!((v.outcome, v.observed), (Outcome::Passed, Some(0.9)));
}

#[test]
fn each_comparison_at_its_boundary() {
    let cases = [
        (">", 1.0, 1.0, false),
        (">", 1.5, 1.0, true),
        (">=", 1.0, 1.0, true),
        (">=", 0.5, 1.0, false),
        ("<", 1.0, 1.0, false),
        ("<", 0.5, 1.0, true),
        ("<=", 1.0, 1.0, true),
        ("<=", 1.5, 1.0, false),
        ("==", 1.0, 1.0, true),
        ("==", 0.999_999, 1.0, false),
    ];
    for (cmp, observed, value, pass) in cases {
        let v = judge("kld", "max", cmp, &value.to_string(), &[observed]);
        assert_eq!(v.passed(), pass, "{observed} {cmp} {value}");
        assert_eq!(v.comparison.as_str(), cmp);
        assert_eq!(v.threshold, value);
    }
}

#[test]
fn nan_always_fails() {
    for (reduction, cmp) in
        [("min", ">"), ("max", "<="), ("mean", "<"), ("median", ">="), ("p99", "<="), ("all", "<="), ("all", "==")]
    {
        let v = judge("logits.rel_l2", reduction, cmp, "1e9", &[1e-6, f64::NAN, 1e-6]);
        assert_eq!(v.outcome, Outcome::Failed, "{reduction} {cmp}");
        assert!(v.observed.unwrap().is_nan(), "{reduction} {cmp}");
        assert!(v.detail.unwrap().contains("1 of 3 samples are NaN"));
    }
    // The trap: f64::min ignores NaN; the gate must not.
    let v = judge("logits.cosine", "min", ">", "0.5", &[f64::NAN, 1.0]);
    assert!(!v.passed());
    // Infinities compare as numbers.
    let v = judge("logits.max_abs", "max", "<=", "10", &[1.0, f64::INFINITY]);
    assert_eq!((v.outcome, v.observed), (Outcome::Failed, Some(f64::INFINITY)));
}

#[test]
fn floor_relative_thresholds() {
    let c = contract_with(&gate_line("layer.rel_l2", "max", "<=", "{floor_multiple: 10}"));
    let mut s = subject(Metric::LayerRelL2, &[2e-6, 9e-6]);
    s.noise_floors.insert(Metric::LayerRelL2, 1e-6);
    let v = &c.evaluate(std::slice::from_ref(&s)).verdicts[0];
    assert_eq!((v.outcome, v.floor), (Outcome::Passed, Some(1e-6)));
    assert!((v.threshold - 1e-5).abs() < 1e-20);

    s.samples.insert(Metric::LayerRelL2, vec![2e-6, 1.1e-5]);
    assert_eq!(c.evaluate(std::slice::from_ref(&s)).verdicts[0].outcome, Outcome::Failed);

    // A floor for another metric does not count: the gate is missing data, not passed.
    s.noise_floors.clear();
    s.noise_floors.insert(Metric::LogitsRelL2, 1.0);
    let e = c.evaluate(std::slice::from_ref(&s));
    let v = &e.verdicts[0];
    assert_eq!((v.outcome, v.observed), (Outcome::Missing, None));
    assert!(v.threshold.is_nan());
    assert!(v.detail.as_deref().unwrap().contains("no noise floor for layer.rel_l2"));
    assert!(!e.passed());

    s.noise_floors.insert(Metric::LayerRelL2, f64::NAN);
    assert_eq!(c.evaluate(std::slice::from_ref(&s)).verdicts[0].outcome, Outcome::Missing);
}

#[test]
fn scope_missing_data_and_severity() {
    let gates = "  - {id: f32-only, metric: logits.rel_l2, reduction: max, comparison: \"<=\", value: 1e-4, scope: {reference: \"hf-f32*\", dtype: F32}}
  - {id: warn, metric: kld, reduction: max, comparison: \"<=\", value: 0, severity: warning}
  - {id: needs-top1, metric: top1, reduction: mean, comparison: \">=\", value: 0.5}
  - {id: incremental, metric: kld, reduction: max, comparison: \"<=\", value: 1, scope: {mode: incremental}}
";
    let c = contract_with(gates);
    let mut s = subject(Metric::LogitsRelL2, &[5e-5]);
    s.samples.insert(Metric::Kld, vec![0.1]);
    let e = c.evaluate(std::slice::from_ref(&s));
    let by_id: BTreeMap<&str, &paritybench::contracts::Verdict> =
        e.verdicts.iter().map(|v| (v.gate_id.as_str(), v)).collect();
    assert_eq!(by_id["f32-only"].outcome, Outcome::Passed, "dtype globs are case-insensitive");
    assert_eq!(by_id["warn"].outcome, Outcome::Failed);
    assert_eq!(by_id["needs-top1"].outcome, Outcome::Missing);
    assert_eq!(e.unmatched_gates, ["incremental"]);
    assert!(!e.passed(), "a missing metric under an error gate fails the run");
    assert!(!by_id["warn"].blocks());
    assert!(by_id["needs-top1"].blocks());
    let v = by_id["f32-only"];
    assert_eq!((v.contract.id.as_str(), v.contract.version.as_str()), ("t", "7"));
    assert_eq!(v.contract.sha256, c.sha256);
    assert_eq!((v.model.as_str(), v.reference.as_str(), v.mode.as_deref()), ("qwen3-dense", "hf-f32", Some("prefill")));

    // Without the error gate that lacks data, a failed warning does not fail the run.
    let mut s2 = s.clone();
    s2.samples.insert(Metric::Top1, vec![1.0, 0.0]);
    assert!(c.evaluate(&[s2]).passed());

    // A subject without a dtype never matches a dtype pattern.
    let mut s3 = s.clone();
    s3.dtype = None;
    assert!(c.evaluate(&[s3]).verdicts.iter().all(|v| v.gate_id != "f32-only"));
}

#[test]
fn the_seed_contract_judges_a_run() {
    let c = shipped("seed-parity.yaml");
    let hf = Subject {
        engine: "apr".into(),
        model: "qwen3-dense".into(),
        reference: "hf-f16".into(),
        dtype: Some("f16".into()),
        samples: BTreeMap::from([
            (Metric::LogitsCosine, vec![0.9995, 0.9991, 0.9999]),
            (Metric::LayerCountParity, vec![1.0; 36]),
        ]),
        ..Default::default()
    };
    let llama = Subject {
        reference: "llamacpp-f16".into(),
        samples: BTreeMap::from([(Metric::Top1MarginAware, vec![1.0, 1.0, 1.0])]),
        ..hf.clone()
    };
    // The F16 GGUF file against the model's HF FP32 reference.
    let gguf = Subject { reference: "hf-fp32-eager".into(), ..hf.clone() };
    // A Q4_K_M file against HF FP32: twice llama.cpp's distance on the same file at most.
    let quant = Subject {
        dtype: Some("q4_k_m".into()),
        samples: BTreeMap::from([
            (Metric::LogitsRelL2, vec![0.1, 0.18, 0.05]),
            (Metric::LayerCountParity, vec![1.0; 36]),
        ]),
        noise_floors: BTreeMap::from([(Metric::LogitsRelL2, 0.1)]),
        ..gguf.clone()
    };
    let e = c.evaluate(&[hf.clone(), llama.clone(), gguf.clone(), quant.clone()]);
    assert_eq!(e.verdicts.len(), 7, "{:#?}", e.verdicts);
    let mut far = quant.clone();
    far.samples.insert(Metric::LogitsRelL2, vec![0.1, 0.21]);
    let failed: Vec<String> =
        c.evaluate(&[far]).verdicts.iter().filter(|v| !v.passed()).map(|v| v.gate_id.clone()).collect();
    assert_eq!(failed, ["gguf-quantized-logits-vs-hf-fp32"]);
    assert!(e.unmatched_gates.is_empty());
    assert!(e.passed());

    // One position below 0.99 fails the run, even though the mean is fine.
    let mut bad = hf.clone();
    bad.samples.insert(Metric::LogitsCosine, vec![0.9999, 0.989, 0.9999]);
    let e = c.evaluate(&[bad, llama, gguf]);
    assert!(!e.passed());
    let failed: Vec<&str> = e.verdicts.iter().filter(|v| !v.passed()).map(|v| v.gate_id.as_str()).collect();
    assert_eq!(failed, ["logits-cosine-vs-hf-fp16"]);
}
