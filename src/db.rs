//! Relational connection pools and migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::migrate::MigrateError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::config::DatabaseSettings;

/// Opens a SQLite pool, creating the file and its folder if needed. WAL lets readers
/// run beside the single writer; the busy timeout makes writers queue instead of
/// failing with "database is locked".
pub async fn connect_sqlite(url: &str, settings: &DatabaseSettings) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    let folder = options.get_filename().parent();
    if let Some(folder) = folder.filter(|f| !f.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)?;
    }
    Ok(SqlitePoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout())
        .connect_with(options)
        .await?)
}

/// Applies the embedded SQLite migrations (`migrations/sqlite`).
pub async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), MigrateError> {
    sqlx::migrate!("migrations/sqlite").run(pool).await
}
