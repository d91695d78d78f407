//! The adapters, chosen by the scheme of each configured URL: `database.url`,
//! `documents.url`, `cache.url`, `bus.url`; and the configurations refused in
//! production.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::ExposeSecret;

use super::{Bus, Roles};
use crate::bus::{DeliveryPolicy, InProcessBus, RabbitBus};
use crate::cache::{Cache, CachePolicy, MemoryCache, RedisCache};
use crate::config::{Settings, scheme_of};
use crate::db::{self, Database};
use crate::enrichment::{self, MongoProfileStore, ProfileStore, SqliteProfileStore};
use crate::metrics::Metrics;
use crate::outbox::OutboxSignal;
use crate::resilience::Backoff;
use crate::users::{SqlUserRepository, Users};

/// Refuses, in production, what would run but lose or corrupt data or let anyone in:
/// authentication off (checked where it is built), and stores that only work inside
/// one process — SQLite, the in-process bus, an in-memory cache — when the roles are
/// split across processes. One process doing everything on SQLite (the single
/// container) is fine; a second process on the same SQLite file is refused when it
/// starts (see `db::connect_sqlite`).
pub fn refuse_traps(settings: &Settings, roles: Roles) -> anyhow::Result<()> {
    if !settings.is_production() || roles.is_whole() {
        return Ok(());
    }
    for (setting, url, single) in [
        ("database.url", &settings.database.url, "sqlite"),
        ("documents.url", &settings.documents.url, "sqlite"),
        ("bus.url", &settings.bus.url, "memory"),
    ] {
        anyhow::ensure!(
            scheme_of(url) != single,
            "{setting} is {single}://, which only one process can use, but --roles splits \
             the service across processes (refused when APP_ENV=production): use \
             postgres:// and mongodb:// stores and an amqp:// bus, or run every role in one \
             process"
        );
    }
    Ok(())
}

/// The users module on `database.url`, for one-shot commands (`userhub reenrich`), and
/// that database: its events wait in the outbox for a running relay, which the command
/// wakes with [`crate::outbox::notify_relays`] when it is done.
pub async fn open_users(settings: &Settings) -> anyhow::Result<(Users, Database)> {
    let database = open_database(settings).await?;
    // Republishing reads no cache; a small private one keeps the facade whole.
    let cache = Arc::new(MemoryCache::new(CachePolicy {
        ttl: Duration::from_secs(settings.cache.ttl_secs),
        max_entries: 1,
    }));
    let users = Users::new(
        Arc::new(SqlUserRepository::new(database.clone())),
        OutboxSignal::default(),
        cache,
    );
    Ok((users, database))
}

/// In production, locks each SQLite file this process serves (see `db::lock_sqlite`),
/// so a second process on the same file is refused at start.
pub(super) fn lock_sqlite_files(settings: &Settings) -> anyhow::Result<Vec<std::fs::File>> {
    if !settings.is_production() {
        return Ok(Vec::new());
    }
    let mut files: Vec<&str> = [&settings.database.url, &settings.documents.url]
        .into_iter()
        .filter(|url| scheme_of(url) == "sqlite")
        .map(|url| url.expose_secret())
        .collect();
    files.dedup();
    files.into_iter().map(db::lock_sqlite).collect()
}

/// Opens `database.url` for a process that needs it now (connecting and migrating at
/// once) or may never need it (a worker on a broker: connections are opened on first
/// use, so a database that is down does not stop it from starting).
pub(super) async fn open_database_for(
    settings: &Settings,
    needed: bool,
) -> anyhow::Result<Database> {
    if needed {
        return open_database(settings).await;
    }
    Database::connect_lazy(settings.database.url.expose_secret(), &settings.database)
        .context("cannot configure database.url")
}

/// Opens `database.url` and applies migrations when configured to.
pub async fn open_database(settings: &Settings) -> anyhow::Result<Database> {
    require_scheme(
        "database.url",
        &scheme_of(&settings.database.url),
        &["sqlite", "postgres", "postgresql"],
    )?;
    let database = Database::connect(settings.database.url.expose_secret(), &settings.database)
        .await
        .context("cannot open database.url")?;
    if settings.database.migrate_on_start {
        database
            .migrate()
            .await
            .context("cannot migrate database.url")?;
    }
    Ok(database)
}

/// The retry policy of every consumer, from `worker.*`.
/// `worker.concurrency`, where 0 (the default) picks one per bus. The in-process bus:
/// 256, since its consumer claims that many at once and the SQLite profile store commits
/// the profiles that arrive together in one transaction (at 16 the consumer fell behind
/// a flat-out POST load). RabbitMQ: 64, since it is also the prefetch: at 16 the worker
/// fell behind a flat-out POST load on PostgreSQL; a much larger one lets one worker
/// replica hoard messages that others could take, and (256, in the fault suite) made
/// handlers queue for a slow document store until they timed out.
fn worker_concurrency(settings: &Settings) -> usize {
    match (
        settings.worker.concurrency,
        scheme_of(&settings.bus.url).as_str(),
    ) {
        (0, "memory") => 256,
        (0, _) => 64,
        (chosen, _) => chosen,
    }
}

pub fn delivery_policy(settings: &Settings) -> DeliveryPolicy {
    let worker = &settings.worker;
    DeliveryPolicy {
        max_attempts: worker.max_attempts.max(1),
        backoff: Backoff::new(
            Duration::from_millis(worker.backoff_base_ms),
            Duration::from_millis(worker.backoff_max_ms),
        ),
        handler_timeout: worker.handler_timeout(),
        poll_interval: Duration::from_millis(worker.poll_interval_ms),
        concurrency: worker_concurrency(settings),
        delivery_limit: worker.delivery_limit.max(1),
        dead_letter_ttl: Duration::from_secs(settings.retention.dead_letter_days * 24 * 60 * 60),
    }
}

/// Opens `bus.url`: `memory://` is the in-process bus, a durable queue in
/// `database.url`; `amqp://` is RabbitMQ (connected in the background, so a broker that
/// is down delays delivery instead of stopping the start).
pub async fn open_bus(settings: &Settings, database: &Database) -> anyhow::Result<Bus> {
    let policy = delivery_policy(settings);
    let bindings = vec![enrichment::BINDING];
    match scheme_of(&settings.bus.url).as_str() {
        "amqp" | "amqps" => {
            let bus = RabbitBus::connect(
                settings.bus.url.expose_secret(),
                &settings.bus.prefix,
                bindings,
                policy,
            )
            .await
            .context("cannot configure bus.url")?;
            Ok(Bus::RabbitMq(Arc::new(bus)))
        }
        scheme => {
            require_scheme("bus.url", scheme, &["memory", "amqp"])?;
            Ok(Bus::InProcess(Arc::new(InProcessBus::new(
                database.clone(),
                bindings,
                policy,
            ))))
        }
    }
}

/// Opens `cache.url`: `memory://` (moka) or `redis://` (never required: a Redis that is
/// down degrades to the stores). A Redis cache's breaker is watched by `metrics`.
pub(super) fn open_cache(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Arc<dyn Cache>> {
    let cache = &settings.cache;
    let policy = CachePolicy {
        ttl: Duration::from_secs(cache.ttl_secs),
        max_entries: cache.max_entries,
    };
    match scheme_of(&cache.url).as_str() {
        "redis" | "rediss" => {
            let redis = RedisCache::connect(
                cache.url.expose_secret(),
                policy,
                &cache.key_prefix,
                Duration::from_millis(cache.timeout_ms),
            )
            .context("cannot configure cache.url")?
            .with_local_copies(Duration::from_millis(cache.local_ttl_ms))
            .context("cannot configure cache.local_ttl_ms")?;
            metrics.watch_breaker(redis.breaker());
            Ok(Arc::new(redis))
        }
        scheme => {
            require_scheme("cache.url", scheme, &["memory", "redis"])?;
            Ok(Arc::new(MemoryCache::new(policy)))
        }
    }
}

/// Opens `documents.url`: `mongodb://` or `sqlite://` (sharing the database pool when
/// both name the same SQLite file).
pub async fn open_documents(
    settings: &Settings,
    database: &Database,
) -> anyhow::Result<Arc<dyn ProfileStore>> {
    let url = settings.documents.url.expose_secret();
    let scheme = scheme_of(&settings.documents.url);
    if scheme == "mongodb" || scheme == "mongodb+srv" {
        let store = MongoProfileStore::connect(url)
            .await
            .context("cannot open documents.url")?;
        return Ok(Arc::new(store));
    }
    require_scheme("documents.url", &scheme, &["sqlite", "mongodb"])?;
    let pool = match database {
        Database::Sqlite(pool) if url == settings.database.url.expose_secret() => pool.clone(),
        _ => {
            let pool = db::connect_sqlite(url, &settings.database)
                .await
                .context("cannot open documents.url")?;
            if settings.database.migrate_on_start {
                Database::Sqlite(pool.clone())
                    .migrate()
                    .await
                    .context("cannot migrate documents.url")?;
            }
            pool
        }
    };
    Ok(Arc::new(SqliteProfileStore::new(pool)))
}

fn require_scheme(setting: &str, scheme: &str, supported: &[&str]) -> anyhow::Result<()> {
    if supported.contains(&scheme) {
        return Ok(());
    }
    bail!(
        "{setting}: scheme {scheme:?} is not supported by this build (supported: {})",
        supported.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_concurrency_zero_is_chosen_per_bus_and_any_other_value_kept() {
        let mut settings = Settings::load_for("test").unwrap();
        let with = |settings: &mut Settings, bus: &str, chosen: usize| {
            settings.bus.url = bus.to_owned().into();
            settings.worker.concurrency = chosen;
            worker_concurrency(settings)
        };
        assert_eq!(with(&mut settings, "memory://", 0), 256);
        assert_eq!(
            with(&mut settings, "amqp://guest:guest@127.0.0.1:5672/%2f", 0),
            64
        );
        assert_eq!(with(&mut settings, "memory://", 3), 3);
        assert_eq!(with(&mut settings, "amqp://127.0.0.1", 40), 40);
    }
}
