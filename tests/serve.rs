//! `runner serve` end to end: a database filled by real `runner once` runs of the built-in
//! engine (at real commits of this repository, on the bundled qwen3-dense fixture against
//! its HF FP32 reference), the real server on port 0, and checks of what its pages, JSON
//! API and `/metrics` show — on SQLite always and on PostgreSQL when
//! `PARITYBENCH_TEST_PG_URL` is set. A browser test loads the pages in headless Chromium
//! and saves screenshots.
//!
//! The engine and `runner once` run from a release binary when one is at hand
//! (`PARITYBENCH_TEST_RUNNER_BIN`, else `target/release/runner`, else this build's debug
//! binary): the engine on a real model in a debug build takes minutes.
//! `PARITYBENCH_TEST_ENGINE_BIN` picks another binary for the engine alone. `runner once`
//! must come from this tree: it migrates the database the server reads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use paritybench::config::Config;
use paritybench::service::{self, AppState, ServeConfig, Token};

const MODEL: &str = "qwen3-dense";
const REFERENCE: &str = "hf-fp32-eager";
const TOKEN: &str = "test-token-0123456789";

/// The contract the runs are judged by: gates the built-in engine meets on f32, plus the
/// full 32 greedy steps (a run asked for fewer steps fails it).
fn contract(version: u32) -> String {
    format!(
        r#"
id: serve-smoke
version: {version}
gates:
  - id: logits-rel-l2
    metric: logits.rel_l2
    reduction: max
    comparison: "<="
    value: 1.0e-4
  - id: logits-cosine
    metric: logits.cosine
    reduction: min
    comparison: ">="
    value: 0.9999
  - id: layer-cosine
    metric: layer.cosine
    reduction: min
    comparison: ">="
    value: 0.9999
  - id: greedy
    metric: greedy_match_len
    reduction: min
    comparison: ">="
    value: 32
"#
    )
}

fn runner_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PARITYBENCH_TEST_RUNNER_BIN") {
        return PathBuf::from(p);
    }
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/runner");
    if release.is_file() { release } else { PathBuf::from(env!("CARGO_BIN_EXE_runner")) }
}

/// The engine's adapter: `PARITYBENCH_TEST_ENGINE_BIN`, else the runner binary above.
fn engine_bin() -> PathBuf {
    std::env::var("PARITYBENCH_TEST_ENGINE_BIN").map(PathBuf::from).unwrap_or_else(|_| runner_bin())
}

fn fixture_cache() -> PathBuf {
    let cache = std::env::var("PARITYBENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/paritybench"));
    let refs = cache.join("fixtures/refs/default").join(MODEL).join(REFERENCE);
    assert!(
        refs.join("manifest.json").is_file(),
        "the fixture {} is missing: run `runner fixtures build` first",
        refs.display()
    );
    cache
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A scratch world: a cache holding one real reference (linked, not copied), a clone of
/// this repository, a configuration, and the database.
struct World {
    tmp: tempfile::TempDir,
    db: String,
}

impl World {
    fn new(db: Option<String>) -> World {
        let real = fixture_cache();
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let refs = root.join("cache/fixtures/refs/default");
        let model = refs.join(MODEL);
        std::fs::create_dir_all(&model).unwrap();
        let real_model = real.join("fixtures/refs/default").join(MODEL);
        std::os::unix::fs::symlink(real_model.join(REFERENCE), model.join(REFERENCE)).unwrap();
        std::os::unix::fs::symlink(real_model.join("floors"), model.join("floors")).unwrap();
        std::fs::copy(
            real_model.join(format!("{REFERENCE}.request.json")),
            model.join(format!("{REFERENCE}.request.json")),
        )
        .unwrap();
        std::fs::copy(real.join("fixtures/refs/default/fixture.json"), refs.join("fixture.json")).unwrap();
        std::fs::create_dir_all(root.join("cache/fixtures/models")).unwrap();
        std::os::unix::fs::symlink(
            real.join("fixtures/models").join(MODEL),
            root.join("cache/fixtures/models").join(MODEL),
        )
        .unwrap();
        let repo = root.join("repo");
        let out = Command::new("git")
            .args(["clone", "-q", "--no-checkout"])
            .arg(env!("CARGO_MANIFEST_DIR"))
            .arg(&repo)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let db = db.unwrap_or_else(|| format!("sqlite://{}", root.join("data/paritybench.sqlite").display()));
        let w = World { tmp, db };
        w.configure(32, 1);
        w
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// The engine config and contract for the next runs.
    fn configure(&self, decode_steps: u32, contract_version: u32) {
        std::fs::write(self.root().join("contract.yaml"), contract(contract_version)).unwrap();
        let bin = engine_bin();
        std::fs::write(
            self.root().join("runner.toml"),
            format!(
                "contracts = [\"contract.yaml\"]\n[engines.paritybench]\nrepo = \"repo\"\nbuild = \"true\"\nrun = \"{} engine run --request {{request}} --out {{out}}\"\nincremental = false\ndecode_steps = {decode_steps}\n",
                bin.display()
            ),
        )
        .unwrap();
    }

    fn config(&self) -> Config {
        let (cache, data) = (self.root().join("cache"), self.root().join("data"));
        let env = |k: &str| match k {
            "PARITYBENCH_CACHE" => Some(cache.display().to_string()),
            "PARITYBENCH_DATA" => Some(data.display().to_string()),
            _ => None,
        };
        Config::load_with(Some(&self.root().join("runner.toml")), env).unwrap()
    }

    /// `runner once --commit REV --json`: (exit code, the outcome).
    fn once(&self, rev: &str) -> (i32, serde_json::Value) {
        let out = Command::new(runner_bin())
            .args(["once", "--json", "--commit", rev, "--db", &self.db, "--config"])
            .arg(self.root().join("runner.toml"))
            .current_dir(self.root().join("repo"))
            .env("PARITYBENCH_CACHE", self.root().join("cache"))
            .env("PARITYBENCH_DATA", self.root().join("data"))
            .env_remove("PARITYBENCH_DB")
            .env_remove("PARITYBENCH_CONFIG")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("runner once {rev}: not JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
        });
        (out.status.code().unwrap_or(-1), v)
    }

    fn sha(&self, rev: &str) -> String {
        git(&self.root().join("repo"), &["rev-parse", rev])
    }

    /// The real server on port 0, in a thread of its own; stops when the handle drops.
    fn serve(&self, cfg: ServeConfig) -> Server {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let db = self.db.clone();
        let config = self.config();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let store = paritybench::store::connect(&db).await.unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = service::router(AppState::new(store, config, cfg));
                service::launch(listener, app, async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = rx.recv().unwrap();
        Server { addr, stop: Some(stop_tx), thread: Some(thread) }
    }
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Response {
    status: u16,
    headers: String,
    body: String,
}

impl Response {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.into() };
    Response { status, headers: head.to_string(), body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn get(addr: SocketAddr, path: &str) -> Response {
    http(addr, "GET", path, &[], None)
}

/// Three real runs: two commits with the full 32 greedy steps (green) and the newest with
/// 8 (the greedy gate fails: red), so the series regresses between the last two.
fn fill(w: &World) -> [String; 3] {
    let revs = ["HEAD~2", "HEAD~1", "HEAD"];
    let (c1, o1) = w.once(revs[0]);
    assert_eq!(c1, 0, "{o1}");
    let (c2, o2) = w.once(revs[1]);
    assert_eq!(c2, 0, "{o2}");
    w.configure(8, 1);
    let (c3, o3) = w.once(revs[2]);
    assert_eq!(c3, 1, "{o3}");
    assert_eq!(o3["status"], "failed");
    revs.map(|r| w.sha(r))
}

fn check_dashboard(w: &World, shas: &[String; 3]) {
    let server = w.serve(ServeConfig { token: Some(Token::parse(TOKEN).unwrap()), ..Default::default() });
    let addr = server.addr;

    // overview: the series is red, with the regression on top naming the range and repro
    let o = get(addr, "/api/overview");
    assert_eq!(o.status, 200, "{}", o.body);
    let o = o.json();
    let series = o["series"].as_array().unwrap();
    assert_eq!(series.len(), 1, "{o}");
    let s = &series[0];
    assert_eq!(
        (s["model"].as_str(), s["reference"].as_str(), s["state"].as_str()),
        (Some(MODEL), Some(REFERENCE), Some("red"))
    );
    assert_eq!(s["commit"], shas[2].as_str());
    let series_id = s["series_id"].as_i64().unwrap();
    let reg = &o["regressions"][0];
    assert_eq!(reg["last_good_commit"], shas[1].as_str(), "{o}");
    assert_eq!(reg["first_bad_commit"], shas[2].as_str());
    assert_eq!(reg["range"], format!("{}..{}", &shas[1][..12], &shas[2][..12]));
    assert!(reg["repro"].as_str().unwrap().starts_with(&format!("runner once --commit {}", shas[2])));
    let html = get(addr, "/").body;
    assert!(
        html.contains("Open regressions") && html.contains(&shas[1][..12]) && html.contains(&shas[2][..12]),
        "{html}"
    );
    assert!(html.find("Open regressions").unwrap() < html.find("<h2>Series</h2>").unwrap());

    // trend of the default metric, then of the greedy gate: threshold and the failing point
    let t = get(addr, &format!("/api/series/{series_id}/trend?metric=greedy_match_len&statistic=min"));
    assert_eq!(t.status, 200, "{}", t.body);
    let t = t.json();
    let points = t["points"].as_array().unwrap();
    let commits: Vec<&str> = points.iter().map(|p| p["commit"].as_str().unwrap()).collect();
    assert_eq!(commits, [shas[0].as_str(), shas[1].as_str(), shas[2].as_str()], "ordered by generation");
    let values: Vec<f64> = points.iter().map(|p| p["value"].as_f64().unwrap()).collect();
    assert_eq!(values, [32.0, 32.0, 8.0]);
    let failed: Vec<bool> = points.iter().map(|p| p["failed"].as_bool().unwrap()).collect();
    assert_eq!(failed, [false, false, true]);
    assert_eq!(t["gates"][0]["threshold"], 32.0);
    let page = get(addr, &format!("/series/{series_id}?metric=greedy_match_len&statistic=min")).body;
    assert!(page.contains("<svg") && page.contains("serve-smoke/greedy &gt;= 32"), "{page}");
    assert_eq!(page.matches("class=\"pt failed\"").count(), 1, "one failing point marked");
    let default = get(addr, &format!("/series/{series_id}"));
    assert_eq!(default.status, 200);
    assert!(default.body.contains("logits.rel_l2"), "the metric switcher lists what was measured");

    // the failing run's page: verdicts, per-prompt metrics, layers, decoded continuations
    let runs = get(addr, "/api/runs").json();
    let bad_run =
        runs.as_array().unwrap().iter().find(|r| r["commit_sha"] == shas[2].as_str()).unwrap()["id"].as_i64().unwrap();
    let r = get(addr, &format!("/api/runs/{bad_run}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = r.json();
    let block = &r["blocks"][0];
    assert!(block["prompts"].as_array().unwrap().len() >= 2, "{block}");
    assert!(!block["layers"].as_array().unwrap().is_empty());
    let greedy = block["verdicts"].as_array().unwrap().iter().find(|v| v["gate_id"] == "greedy").unwrap().clone();
    assert_eq!((greedy["outcome"].as_str(), greedy["observed"].as_f64()), (Some("failed"), Some(8.0)));
    let detail = &r["detail"];
    assert!(detail.is_object(), "detail: {}", r["detail_missing"]);
    let p0 = &detail["groups"][0]["prompts"][0];
    assert_eq!(p0["reference_continuation"].as_array().unwrap().len(), 32);
    assert_eq!(p0["engine_continuation"].as_array().unwrap().len(), 8);
    assert_eq!(p0["matching_steps"], 8);
    // decoded by the tokenizer: no `<id>` placeholder (what a missing tokenizer gives)
    let pieces: Vec<&str> =
        p0["reference_continuation"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let placeholder = |s: &str| {
        s.len() > 2 && s.starts_with('<') && s.ends_with('>') && s[1..s.len() - 1].bytes().all(|b| b.is_ascii_digit())
    };
    assert!(
        !pieces.iter().any(|p| placeholder(p)) && !pieces.concat().trim().is_empty(),
        "decoded to text: {pieces:?}"
    );
    assert_eq!(r["repro"], format!("runner once --commit {} --engine paritybench --suite default", shas[2]));
    let page = get(addr, &format!("/runs/{bad_run}")).body;
    assert!(page.contains("Per-layer divergence") && page.contains("greedy agrees for 8 of 32 steps"), "{page}");
    assert!(page.contains("engine.qwen3-dense.st.prefill"), "timings: {page}");
    // the detail record is kept: the page reads it back from the store
    assert_eq!(get(addr, &format!("/api/runs/{bad_run}")).json()["detail"], *detail);

    // compare the last good run with the first bad one
    let good_run = reg["last_good_run"].as_i64().unwrap();
    let c = get(addr, &format!("/api/compare?a={good_run}&b={bad_run}")).json();
    let g = c["verdicts"].as_array().unwrap().iter().find(|v| v["gate"] == "serve-smoke/greedy").unwrap().clone();
    assert_eq!(
        (g["a"].as_str(), g["b"].as_str(), g["changed"].as_bool()),
        (Some("passed"), Some("failed"), Some(true))
    );
    assert_eq!(get(addr, &format!("/compare?a={good_run}&b={bad_run}")).status, 200);

    // /metrics
    let m = get(addr, "/metrics");
    assert!(m.headers.contains("text/plain"), "{}", m.headers);
    assert!(m.body.contains("paritybench_runs{status=\"passed\"} 2"), "{}", m.body);
    assert!(m.body.contains("paritybench_runs{status=\"failed\"} 1"), "{}", m.body);
    assert!(m.body.contains(&format!("paritybench_series_last_success_age_seconds{{series=\"{series_id}\"")));

    // writes need the token; the token never appears in a page
    let body = format!(r#"{{"commit": "{}"}}"#, shas[2]);
    assert_eq!(http(addr, "POST", "/api/runs", &[], Some(&body)).status, 401);
    assert_eq!(
        http(addr, "POST", "/api/runs", &[("Authorization", "Bearer wrong-token-000000")], Some(&body)).status,
        401
    );
    let auth = format!("Bearer {TOKEN}");
    let q = http(addr, "POST", "/api/runs", &[("Authorization", &auth)], Some(&body));
    assert_eq!(q.status, 202, "{}", q.body);
    assert!(q.json()["job_id"].as_i64().unwrap() > 0);
    assert!(get(addr, "/metrics").body.contains("paritybench_queue_depth 1"));
    let bad = http(addr, "POST", "/api/runs", &[("Authorization", &auth)], Some(r#"{"commit": "--upload-pack=x"}"#));
    assert_eq!(bad.status, 400, "{}", bad.body);
    let ack_path = format!("/api/regressions/{series_id}/{bad_run}/ack");
    assert_eq!(http(addr, "POST", &ack_path, &[], Some("{}")).status, 401);
    let ack = http(
        addr,
        "POST",
        &ack_path,
        &[("Authorization", &auth)],
        Some(r#"{"by": "alice", "note": "greedy steps cut on purpose"}"#),
    );
    assert_eq!(ack.status, 200, "{}", ack.body);
    let o = get(addr, "/api/overview").json();
    assert!(o["regressions"].as_array().unwrap().is_empty());
    assert_eq!(o["acknowledged"][0]["acknowledged_by"], "alice");
    for path in ["/", &format!("/runs/{bad_run}"), "/api/overview", "/metrics"] {
        assert!(!get(addr, path).body.contains(TOKEN), "{path} shows the token");
    }
    assert_eq!(get(addr, "/runs/999999").status, 404);
    assert_eq!(get(addr, "/series/999999").status, 404);
}

#[test]
fn dashboard_on_sqlite_from_real_runs() {
    let w = World::new(None);
    let shas = fill(&w);
    browser(&w);
    check_dashboard(&w, &shas);
}

#[test]
fn dashboard_on_postgres_from_real_runs() {
    let Ok(url) = std::env::var("PARITYBENCH_TEST_PG_URL") else {
        eprintln!("PARITYBENCH_TEST_PG_URL is not set: the PostgreSQL half is skipped");
        return;
    };
    let db = fresh_pg_database(&url);
    let w = World::new(Some(db));
    let shas = fill(&w);
    check_dashboard(&w, &shas);
    // a contract version bump starts a new series: the trend shows a segment boundary
    w.configure(32, 2);
    assert_eq!(w.once("HEAD").0, 0);
    let server = w.serve(ServeConfig::default());
    let o = get(server.addr, "/api/overview").json();
    let green = o["series"].as_array().unwrap().iter().find(|s| s["contract_key"] == "serve-smoke@2").unwrap().clone();
    assert_eq!(green["state"], "green");
    let t =
        get(server.addr, &format!("/api/series/{}/trend?metric=greedy_match_len&statistic=min", green["series_id"]))
            .json();
    assert_eq!(t["segments"].as_array().unwrap().len(), 2, "{t}");
    assert_eq!(t["segments"][1]["change"], "contract");
    assert_eq!(t["points"].as_array().unwrap().len(), 4);
    let page = get(server.addr, &format!("/series/{}?metric=greedy_match_len&statistic=min", green["series_id"])).body;
    assert!(page.contains("new contract"), "{page}");
    // writes are refused when no token is configured
    assert_eq!(http(server.addr, "POST", "/api/runs", &[], Some(r#"{"commit": "HEAD"}"#)).status, 403);
}

/// A database of its own on the test server, so runs of other tests do not mix in.
fn fresh_pg_database(url: &str) -> String {
    let name = format!("pb_serve_{}_{}", std::process::id(), chrono::Utc::now().timestamp_millis());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
    });
    match url.rfind('/') {
        Some(i) if url[i..].len() > 1 && !url[..i].ends_with('/') => {
            let (base, tail) = url.split_at(i);
            let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
            format!("{base}/{name}{query}")
        }
        _ => format!("{}/{name}", url.trim_end_matches('/')),
    }
}

/// Headless Chromium: the overview, a trend and a run page render with their content, and
/// a screenshot of each is saved (`PARITYBENCH_SCREENSHOTS`, default the test's target dir).
fn browser(w: &World) {
    let Some(chromium) = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
    else {
        panic!("headless Chromium is needed for the browser test (apt-get install chromium)");
    };
    let server = w.serve(ServeConfig::default());
    let o = get(server.addr, "/api/overview").json();
    let series_id = o["series"][0]["series_id"].as_i64().unwrap();
    let run_id = o["series"][0]["run_id"].as_i64().unwrap();
    let out_dir = std::env::var("PARITYBENCH_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let profile = w.root().join("chromium-profile");
    let pages = [
        ("overview", "/".to_string(), vec!["Latest state of every series", "Open regressions", MODEL]),
        (
            "trend",
            format!("/series/{series_id}?metric=greedy_match_len&statistic=min"),
            vec!["greedy_match_len", "serve-smoke/greedy", "1 failing"],
        ),
        (
            "run",
            format!("/runs/{run_id}"),
            vec!["Per-layer divergence", "Argmax mismatches", "greedy agrees for 8 of 32"],
        ),
    ];
    for (name, path, want) in pages {
        let url = format!("http://{}{path}", server.addr);
        let common = |c: &mut Command| {
            c.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
                .arg(format!("--user-data-dir={}", profile.display()));
        };
        let mut dump = Command::new(chromium);
        common(&mut dump);
        let out = dump.args(["--dump-dom", &url]).output().unwrap();
        let dom = String::from_utf8_lossy(&out.stdout);
        for w in want {
            assert!(dom.contains(w), "{name}: the rendered page lacks {w:?}:\n{dom}");
        }
        assert!(dom.contains("<svg") || name == "overview", "{name}: no chart");
        let shot = out_dir.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&shot);
        let mut cap = Command::new(chromium);
        common(&mut cap);
        let size = if name == "run" { "--window-size=1400,2600" } else { "--window-size=1400,900" };
        let out = cap.arg(size).arg(format!("--screenshot={}", shot.display())).arg(&url).output().unwrap();
        assert!(shot.is_file(), "{name}: no screenshot: {}", String::from_utf8_lossy(&out.stderr));
        let png = std::fs::read(&shot).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "{name}: {} bytes", png.len());
        eprintln!("screenshot: {}", shot.display());
    }
}
