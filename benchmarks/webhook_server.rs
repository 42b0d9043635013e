//! The GitHub webhook alone, on a real port, for load tests (`benchmarks/webhook.sh`):
//! `cargo run --release --example webhook_server -- DB_URL [ADDR]`. The secret comes from
//! `PARITYBENCH_GITHUB_SECRET`; merges of `paiml/aprender` queue runs of the built-in engine.

use std::collections::BTreeMap;

use paritybench::config::{GithubConfig, Secret};
use paritybench::queue::webhook::{WebhookState, router};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let db = args.next().ok_or_else(|| anyhow::anyhow!("usage: webhook_server DB_URL [ADDR]"))?;
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".to_string());
    let secret = std::env::var("PARITYBENCH_GITHUB_SECRET")?;
    let store = paritybench::store::connect(&db).await?;
    let github = GithubConfig {
        secret: Some(Secret::new(secret)),
        repos: BTreeMap::from([("paiml/aprender".to_string(), vec!["paritybench".to_string()])]),
        ..GithubConfig::default()
    };
    let state = WebhookState { store, github, suite: "default".into(), max_attempts: 3 };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state)).await?;
    Ok(())
}
