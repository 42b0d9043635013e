//! The PostgreSQL backend: a shared deployment and a fleet of runners claiming jobs.
//!
//! Writes use ordinary transactions (MVCC); job claims lock the claimed row with
//! `FOR UPDATE SKIP LOCKED`, so concurrent workers never claim the same job and never wait
//! on each other's claims.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

use super::common::{impl_store, migrator};
use super::{Backend, StoreError, query_err, redact};

/// The embedded migrations, `(version, description, sql)`; one entry per file in
/// `migrations/postgres/` (a unit test checks).
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/postgres/0001_init.sql")),
    (2, "queue", include_str!("../../migrations/postgres/0002_queue.sql")),
    (3, "dashboard", include_str!("../../migrations/postgres/0003_dashboard.sql")),
    (4, "run_owner", include_str!("../../migrations/postgres/0004_run_owner.sql")),
];

/// A [`Store`](super::Store) on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    url: String,
}

impl PgStore {
    /// Connects to `postgres://…` and migrates.
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let shown = redact(url);
        let connect_err = |source| StoreError::Connect { url: shown.clone(), source };
        let options = PgConnectOptions::from_str(url).map_err(connect_err)?;
        // One direct connection first: the pool retries a refused connection until its
        // acquire timeout, and a mistyped --db should fail at once.
        PgConnection::connect_with(&options).await.map_err(connect_err)?.close().await.map_err(connect_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(connect_err)?;
        migrator(MIGRATIONS).run(&pool).await.map_err(|source| StoreError::Migrate { url: shown.clone(), source })?;
        Ok(PgStore { pool, url: shown })
    }

    /// The database this store writes to, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The job row a sweep or a finishing run reads is locked until the transaction ends.
    const ROW_LOCK: &'static str = " FOR UPDATE";

    /// Workers skip rows another worker is claiming instead of waiting for them.
    const CLAIM_LOCK: &'static str = " FOR UPDATE SKIP LOCKED";

    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(query_err("beginning a write transaction"))
    }
}

impl_store!(PgStore, Postgres, Backend::Postgres);
