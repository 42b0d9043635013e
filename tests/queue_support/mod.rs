//! Shared by tests/webhook.rs and tests/queue.rs: fresh databases (SQLite always,
//! PostgreSQL when `PARITYBENCH_TEST_PG_URL` is set; with `CI` set it is required) and a real
//! HTTP server on port 0.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use paritybench::store::{self, Store};

/// The PostgreSQL server to test against, if any; with `CI` set, one is required.
pub fn pg_url() -> Option<String> {
    match std::env::var("PARITYBENCH_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI is set but PARITYBENCH_TEST_PG_URL is not: the PostgreSQL half must run in CI")
        }
        _ => None,
    }
}

/// A fresh, migrated PostgreSQL database named `pbq_<case>` and its URL.
pub async fn fresh_pg(case: &str) -> Option<(Arc<dyn Store>, String)> {
    let base = pg_url()?;
    let admin = sqlx::PgPool::connect(&base).await.expect("connect to the test server");
    let db = format!("pbq_{case}");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&admin).await.unwrap();
    admin.close().await;
    let (head, query) = base.split_once('?').map_or((base.as_str(), None), |(h, q)| (h, Some(q)));
    let (server, _) = head.rsplit_once('/').expect("a postgres://host/db URL");
    let url = match query {
        Some(q) => format!("{server}/{db}?{q}"),
        None => format!("{server}/{db}"),
    };
    Some((store::connect(&url).await.unwrap_or_else(|e| panic!("{e}")), url))
}

/// A fresh SQLite file under `dir` and its URL.
pub async fn fresh_sqlite(dir: &Path) -> (Arc<dyn Store>, String) {
    let url = format!("sqlite://{}", dir.join("data/paritybench.sqlite").display());
    (store::connect(&url).await.unwrap_or_else(|e| panic!("{e}")), url)
}

/// Runs `router` on 127.0.0.1, port 0; the server stops when the sender is dropped.
pub async fn launch(router: axum::Router) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (addr, tx)
}

/// Runs `case` on SQLite, and on PostgreSQL when configured.
#[macro_export]
macro_rules! db_case {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let (store, url) = super::queue_support::fresh_sqlite(dir.path()).await;
                super::$case(store, url, dir.path()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let dir = tempfile::tempdir().unwrap();
                match super::queue_support::fresh_pg(stringify!($case)).await {
                    Some((store, url)) => super::$case(store, url, dir.path()).await,
                    None => eprintln!("PARITYBENCH_TEST_PG_URL is not set: PostgreSQL half skipped"),
                }
            }
        }
    };
}
