//! Relational connection pools, migrations, and what lets one SQL text serve both
//! dialects: [`with_pool!`] and [`with_tx!`] to run it on whichever backend is
//! configured, and [`DbUuid`] and [`DbTime`] for the column types they store
//! differently.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::migrate::MigrateError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgTypeInfo, PgValueRef};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous, SqliteTypeInfo,
    SqliteValueRef,
};
use sqlx::types::uuid::fmt::Hyphenated;
use sqlx::{Connection, Decode, Encode, PgPool, Postgres, Sqlite, SqlitePool, Transaction, Type};
use uuid::Uuid;

use crate::config::DatabaseSettings;

/// A relational database: the embedded one or the production one.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Database {
    /// Opens the database named by `url` (`sqlite://…` or `postgres://…`).
    pub async fn connect(url: &str, settings: &DatabaseSettings) -> anyhow::Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(connect_postgres(url, settings).await?))
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(connect_sqlite(url, settings).await?))
        } else {
            anyhow::bail!("unsupported database URL scheme (expected sqlite:// or postgres://)")
        }
    }

    /// Prepares the pool of `url` without connecting: connections are opened on first
    /// use, so a database that is down does not stop a process that may not need it.
    pub fn connect_lazy(url: &str, settings: &DatabaseSettings) -> anyhow::Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = postgres_options(url, settings)?;
            Ok(Self::Postgres(
                postgres_pool(settings).connect_lazy_with(options),
            ))
        } else if url.starts_with("sqlite:") {
            let options = sqlite_options(url)?;
            Ok(Self::Sqlite(
                sqlite_pool(settings).connect_lazy_with(options),
            ))
        } else {
            anyhow::bail!("unsupported database URL scheme (expected sqlite:// or postgres://)")
        }
    }

    /// Applies the embedded migrations for this database's dialect.
    pub async fn migrate(&self) -> Result<(), MigrateError> {
        match self {
            Self::Sqlite(pool) => sqlx::migrate!("migrations/sqlite").run(pool).await,
            Self::Postgres(pool) => sqlx::migrate!("migrations/postgres").run(pool).await,
        }
    }

    /// `db.system.name` of OpenTelemetry's database conventions.
    pub fn system_name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgresql",
        }
    }

    /// Open connections in the pool, and how many of them are idle.
    pub fn pool_usage(&self) -> (u32, usize) {
        match self {
            Self::Sqlite(pool) => (pool.size(), pool.num_idle()),
            Self::Postgres(pool) => (pool.size(), pool.num_idle()),
        }
    }

    /// The most connections the pool opens (`database.max_connections`).
    pub fn pool_max(&self) -> u32 {
        match self {
            Self::Sqlite(pool) => pool.options().get_max_connections(),
            Self::Postgres(pool) => pool.options().get_max_connections(),
        }
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        crate::with_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop))
    }

    /// Deletes the rows of `table` that `condition` selects (with `$1` bound to
    /// `bound`), `batch` per statement so no statement holds its locks for long, until
    /// none is left. `key` is the table's key (`id`, or `scope, key`): each statement
    /// deletes the first `batch` matches in key order. Returns how many were deleted.
    pub async fn delete_in_batches<T>(
        &self,
        table: &'static str,
        key: &'static str,
        condition: &'static str,
        bound: T,
        batch: u32,
    ) -> Result<u64, sqlx::Error>
    where
        T: for<'q> Encode<'q, Sqlite>
            + Type<Sqlite>
            + for<'q> Encode<'q, Postgres>
            + Type<Postgres>
            + Copy
            + Send
            + 'static,
    {
        let sql = format!(
            "DELETE FROM {table} WHERE ({key}) IN
                 (SELECT {key} FROM {table} WHERE {condition} ORDER BY {key} LIMIT $2)"
        );
        let batch = batch.max(1);
        let mut total = 0;
        loop {
            let deleted =
                crate::with_pool!(self, |pool| sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                    .bind(bound)
                    .bind(i64::from(batch))
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected()))?;
            total += deleted;
            if deleted < u64::from(batch) {
                return Ok(total);
            }
        }
    }

    /// Starts a write transaction on whichever pool this is; run statements in it with
    /// [`with_tx!`]. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`), so a
    /// transaction that reads before it writes never fails to upgrade its lock.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            Self::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }
}

/// A transaction of either dialect.
#[derive(Debug)]
pub enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(tx) => tx.commit().await,
            Self::Postgres(tx) => tx.commit().await,
        }
    }
}

/// A timestamp as each dialect stores it: in SQLite the text the schema's defaults
/// write (`2026-11-30T08:00:00.123Z`, so stored values compare as text in time order),
/// `timestamptz` in PostgreSQL. Milliseconds, like every timestamp the database writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DbTime(pub DateTime<Utc>);

impl DbTime {
    pub fn now() -> Self {
        Self(Utc::now().trunc_subsecs(3))
    }
}

impl Type<Sqlite> for DbTime {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <DateTime<Utc> as Type<Sqlite>>::compatible(ty)
    }
}

impl Encode<'_, Sqlite> for DbTime {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as sqlx::Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        let text = self.0.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        <String as Encode<Sqlite>>::encode(text, buf)
    }
}

impl Decode<'_, Sqlite> for DbTime {
    fn decode(value: SqliteValueRef<'_>) -> Result<Self, BoxDynError> {
        <DateTime<Utc> as Decode<Sqlite>>::decode(value).map(Self)
    }
}

impl Type<Postgres> for DbTime {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for DbTime {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as sqlx::Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl Decode<'_, Postgres> for DbTime {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        <DateTime<Utc> as Decode<Postgres>>::decode(value).map(Self)
    }
}

/// A uuid as each dialect stores it: hyphenated text in SQLite (which has no uuid
/// type; text keeps it readable and ordered like the uuid), the native `uuid` in
/// PostgreSQL. Bind it and read it into it, and one SQL text serves both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DbUuid(pub Uuid);

impl From<DbUuid> for Uuid {
    fn from(value: DbUuid) -> Self {
        value.0
    }
}

impl Type<Sqlite> for DbUuid {
    fn type_info() -> SqliteTypeInfo {
        <Hyphenated as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <Hyphenated as Type<Sqlite>>::compatible(ty)
    }
}

impl Encode<'_, Sqlite> for DbUuid {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as sqlx::Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        <Hyphenated as Encode<Sqlite>>::encode_by_ref(&self.0.hyphenated(), buf)
    }
}

impl Decode<'_, Sqlite> for DbUuid {
    fn decode(value: SqliteValueRef<'_>) -> Result<Self, BoxDynError> {
        <Hyphenated as Decode<Sqlite>>::decode(value).map(|uuid| Self(uuid.into_uuid()))
    }
}

impl Type<Postgres> for DbUuid {
    fn type_info() -> PgTypeInfo {
        <Uuid as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <Uuid as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for DbUuid {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as sqlx::Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        <Uuid as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl Decode<'_, Postgres> for DbUuid {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        <Uuid as Decode<Postgres>>::decode(value).map(Self)
    }
}

/// Opens a PostgreSQL pool. Every statement is bounded by `statement_timeout_ms`, so a
/// stuck query cannot hold a request or a worker forever.
pub async fn connect_postgres(url: &str, settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    Ok(postgres_pool(settings)
        .connect_with(postgres_options(url, settings)?)
        .await?)
}

fn postgres_options(url: &str, settings: &DatabaseSettings) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)?.options([(
        "statement_timeout",
        settings.statement_timeout_ms.to_string(),
    )]))
}

/// A pooled PostgreSQL connection used this recently is not pinged again before its
/// next use (HikariCP's `aliveBypassWindowMs` is 500 ms too).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_millis(500);

/// sqlx pings a connection when it goes back to the pool and, by default, again when
/// it is taken out: three round trips for a create's one statement. The second ping
/// is kept only for connections idle for [`PING_WHEN_IDLE_FOR`] or more, which are the
/// ones a restart, a failover or an idle-connection reaper may have cut meanwhile (a
/// failed ping discards the connection and takes another). A connection cut within
/// that window fails its next statement instead: that request answers 503 and nothing
/// is written.
fn postgres_pool(settings: &DatabaseSettings) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout())
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_WHEN_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// Opens a SQLite pool, creating the file and its folder if needed. `synchronous =
/// FULL`: a commit is on disk (the WAL synced) before it returns, so a 201 survives a
/// power cut, as the README promises. The pool holds one connection (see
/// [`sqlite_pool`]).
pub async fn connect_sqlite(url: &str, settings: &DatabaseSettings) -> anyhow::Result<SqlitePool> {
    let options = sqlite_options(url)?;
    let folder = options.get_filename().parent();
    if let Some(folder) = folder.filter(|f| !f.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)?;
    }
    Ok(sqlite_pool(settings).connect_with(options).await?)
}

fn sqlite_options(url: &str) -> anyhow::Result<SqliteConnectOptions> {
    Ok(SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true))
}

/// One connection, whatever `database.max_connections` says. SQLite has a single
/// writer; with several connections, the ones that find it busy sleep in SQLite's busy
/// handler (1, 2, 5, … up to 100 ms a retry) and whoever retries at the right moment
/// wins. Under a `POST` load that made the p99 774 ms and starved the bus's own writes
/// (claims, acknowledgements, profiles), so enrichment fell minutes behind. One
/// connection queues every statement in arrival order in the pool instead, never
/// sleeps, and costs reads little: they take microseconds, and WAL's concurrent readers
/// would only help reads longer than the writes they wait for. (The busy timeout stays
/// for other programs opening the file, e.g. a backup.)
fn sqlite_pool(settings: &DatabaseSettings) -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(settings.acquire_timeout())
}

/// Holds the SQLite database `url` for this process alone: an exclusive lock on a
/// file beside it, kept while the returned file is open. Another process serving the
/// same file (a second replica on one volume) is refused instead of sharing a
/// database that only one process can use safely.
pub fn lock_sqlite(url: &str) -> anyhow::Result<std::fs::File> {
    let options = SqliteConnectOptions::from_str(url)?;
    let mut path = options.get_filename().as_os_str().to_owned();
    path.push(".userhub-lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another userhub process serves the SQLite database {} (lock {}): SQLite is for \
             one process; use postgres:// for several",
            options.get_filename().display(),
            std::path::Path::new(&path).display()
        ),
        Err(std::fs::TryLockError::Error(error)) => Err(error.into()),
    }
}

/// Runs `$body` with `$pool` bound to whichever pool `$db` holds, for SQL written once
/// for both dialects (`$N` placeholders, which sqlx also binds by number on SQLite, and
/// portable column types such as [`DbUuid`]). The body is compiled once per backend.
#[macro_export]
macro_rules! with_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::db::Database::Sqlite($pool) => $body,
            $crate::db::Database::Postgres($pool) => $body,
        }
    };
}

/// Like [`with_pool!`], inside a [`Tx`]: `$conn` is the transaction's connection
/// (`&mut **$conn` executes on it).
#[macro_export]
macro_rules! with_tx {
    ($tx:expr, |$conn:ident| $body:expr) => {
        match $tx {
            $crate::db::Tx::Sqlite($conn) => $body,
            $crate::db::Tx::Postgres($conn) => $body,
        }
    };
}
