//! The SQLite backend: the embedded default, one file in a data directory.
//!
//! WAL mode (readers never block the writer), foreign keys on, a busy timeout so that
//! concurrent writers wait instead of failing, and every write in a `BEGIN IMMEDIATE`
//! transaction: it takes the write lock up front, so a transaction that reads before it
//! writes (finishing a run, claiming a job) cannot fail half-way on a lock upgrade.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::common::{impl_store, migrator};
use super::{Backend, StoreError, query_err};

/// The embedded migrations, `(version, description, sql)`; one entry per file in
/// `migrations/sqlite/` (a unit test checks).
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, "queue", include_str!("../../migrations/sqlite/0002_queue.sql")),
    (3, "dashboard", include_str!("../../migrations/sqlite/0003_dashboard.sql")),
    (4, "run_owner", include_str!("../../migrations/sqlite/0004_run_owner.sql")),
];

/// Where a SQLite database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqliteTarget {
    File(PathBuf),
    /// A private in-memory database (one connection; gone when the store is dropped).
    Memory,
}

/// `sqlite::memory:`, `sqlite://PATH`, `sqlite:PATH` or a plain path; `None` for any other
/// URL scheme.
pub(crate) fn target_of(url: &str) -> Option<SqliteTarget> {
    if matches!(url, "sqlite::memory:" | ":memory:" | "sqlite://:memory:") {
        return Some(SqliteTarget::Memory);
    }
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .or_else(|| (!url.contains("://")).then_some(url))?;
    (!path.is_empty()).then(|| SqliteTarget::File(PathBuf::from(path)))
}

/// A [`Store`](super::Store) on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    url: String,
}

impl SqliteStore {
    /// Opens (creating the file and its directory if needed) and migrates.
    pub async fn connect(target: SqliteTarget) -> Result<SqliteStore, StoreError> {
        let (options, max_connections, url) = match &target {
            SqliteTarget::Memory => {
                let o = SqliteConnectOptions::from_str("sqlite::memory:")
                    .map_err(|source| StoreError::Connect { url: "sqlite::memory:".into(), source })?;
                (o, 1, "sqlite::memory:".to_string())
            }
            SqliteTarget::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|source| StoreError::DataDir { path: dir.to_path_buf(), source })?;
                }
                let o = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal);
                (o, 8, format!("sqlite://{}", path.display()))
            }
        };
        let options = options.foreign_keys(true).busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            // An in-memory database lives as long as its one connection.
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect { url: url.clone(), source })?;
        migrator(MIGRATIONS).run(&pool).await.map_err(|source| StoreError::Migrate { url: url.clone(), source })?;
        Ok(SqliteStore { pool, url })
    }

    /// The database this store writes to, e.g. `sqlite:///var/lib/paritybench/pb.db`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// SQLite writes one transaction at a time: rows need no lock of their own.
    const ROW_LOCK: &'static str = "";

    /// SQLite has one writer at a time; there is no row lock to add to a job claim.
    const CLAIM_LOCK: &'static str = "";

    /// A write transaction holding the write lock from its first statement.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(query_err("beginning a write transaction"))
    }
}

impl_store!(SqliteStore, Sqlite, Backend::Sqlite);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        assert_eq!(target_of("sqlite::memory:"), Some(SqliteTarget::Memory));
        assert_eq!(target_of("sqlite:///tmp/a.db"), Some(SqliteTarget::File("/tmp/a.db".into())));
        assert_eq!(target_of("sqlite://rel/a.db"), Some(SqliteTarget::File("rel/a.db".into())));
        assert_eq!(target_of("sqlite:a.db"), Some(SqliteTarget::File("a.db".into())));
        assert_eq!(target_of("/data/pb.db"), Some(SqliteTarget::File("/data/pb.db".into())));
        assert_eq!(target_of("postgres://h/db"), None);
        assert_eq!(target_of("mysql://h/db"), None);
        assert_eq!(target_of(""), None);
    }
}
