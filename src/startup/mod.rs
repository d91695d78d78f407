//! Wiring: picks adapters from the settings, builds the modules, runs the HTTP server
//! and the background workers, and stops them all gracefully.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::ExposeSecret;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::{Console, Gauges, Readiness, Routes};
use crate::bus::{DeliveryPolicy, EventBus, InProcessBus, RabbitBus};
use crate::cache::{Cache, CachePolicy, MemoryCache, RedisCache};
use crate::config::{Settings, scheme_of};
use crate::crypto::install_crypto_provider;
use crate::db::{self, Database};
use crate::enrichment::{self, Enrichment, MongoProfileStore, ProfileStore, SqliteProfileStore};
use crate::metrics::{MeteredCache, MeteredHandler, Metrics};
use crate::outbox::{OutboxRelay, OutboxSignal};
use crate::resilience::Backoff;
use crate::users::{SqlUserRepository, Users};
use crate::web::auth::Authentication;
use crate::web::conditional::Preconditions;
use crate::web::{self, Hardening, Stack};

/// What one process does. A single process does everything; later, `api,relay` hosts
/// and `worker` hosts can share a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Serve the `/api` and `/users` routes (health and docs are always served).
    pub api: bool,
    /// Move outbox rows to the bus.
    pub relay: bool,
    /// Consume events (enrichment).
    pub worker: bool,
}

impl Roles {
    pub const ALL: Self = Self {
        api: true,
        relay: true,
        worker: true,
    };
}

/// Wraps the profile store the settings chose (tests put a breakable one in front).
pub type StoreWrapper = Box<dyn FnOnce(Arc<dyn ProfileStore>) -> Arc<dyn ProfileStore> + Send>;

/// Hooks for tests that need to break an adapter.
#[derive(Default)]
pub struct Overrides {
    pub wrap_profile_store: Option<StoreWrapper>,
}

pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    roles: Roles,
    shutdown: CancellationToken,
    enrichment: Enrichment,
    relay: Arc<OutboxRelay>,
    bus: Bus,
    metrics: Arc<Metrics>,
}

/// The chosen bus adapter. Kept concrete (not only `dyn EventBus`) so tests can drive
/// the in-process one step by step.
#[derive(Clone)]
pub enum Bus {
    InProcess(Arc<InProcessBus>),
    RabbitMq(Arc<RabbitBus>),
}

impl Bus {
    pub fn event_bus(&self) -> Arc<dyn EventBus> {
        match self {
            Self::InProcess(bus) => bus.clone(),
            Self::RabbitMq(bus) => bus.clone(),
        }
    }

    /// Releases broker connections (the in-process bus holds none of its own).
    pub async fn close(&self) {
        if let Self::RabbitMq(bus) = self {
            bus.close().await;
        }
    }
}

impl Application {
    pub async fn build(settings: Settings, roles: Roles) -> anyhow::Result<Self> {
        Self::build_with(settings, roles, Overrides::default()).await
    }

    pub async fn build_with(
        settings: Settings,
        roles: Roles,
        overrides: Overrides,
    ) -> anyhow::Result<Self> {
        install_crypto_provider();
        // Checked before anything is opened, so a bad TLS, CORS or proxy setting fails fast.
        let hardening = Hardening::from_settings(&settings)?;
        // First, so a configuration refused in production touches nothing.
        let auth = Arc::new(Authentication::from_settings(&settings).await?);
        let shutdown = CancellationToken::new();
        // Only where it is served: a worker needs no console key.
        let console = if roles.api {
            Some(Console::from_settings(&settings, shutdown.clone()).await?)
        } else {
            None
        };
        let database = open_database(&settings).await?;
        let bus = open_bus(&settings, &database).await?;
        let metrics = Metrics::new().context("cannot register metrics")?;
        let cache = MeteredCache::wrap(open_cache(&settings, &metrics)?, metrics.clone());
        metrics.declare_queue(enrichment::BINDING.queue);
        let mut store = open_documents(&settings, &database).await?;
        if let Some(wrap) = overrides.wrap_profile_store {
            store = wrap(store);
        }

        let signal = OutboxSignal::default();
        let repository = Arc::new(SqlUserRepository::new(database.clone()));
        let users = Users::new(repository, signal.clone(), cache.clone());
        let enrichment = Enrichment::new(store, cache.clone());
        let relay = Arc::new(OutboxRelay::new(
            database.clone(),
            bus.event_bus(),
            signal,
            settings.outbox.batch_size,
            Duration::from_millis(settings.outbox.poll_interval_ms),
        ));

        let address = (settings.server.host.as_str(), settings.server.port);
        let listener = TcpListener::bind(address)
            .with_context(|| format!("cannot listen on {}:{}", address.0, address.1))?;
        let port = listener.local_addr()?.port();
        let bus_port = bus.event_bus();
        let routes = Routes {
            users: users.clone(),
            enrichment: enrichment.clone(),
            bus: bus_port.clone(),
            readiness: Readiness {
                users,
                enrichment: enrichment.clone(),
                bus: bus_port,
                cache,
            },
            gauges: Gauges {
                relay: relay.clone(),
                database,
                bus: bus.event_bus(),
            },
            preconditions: Preconditions {
                require_if_match: settings.http.require_if_match,
            },
            console,
            serve_api: roles.api,
        };
        let stack = Stack {
            hardening,
            auth,
            metrics: metrics.clone(),
        };
        let server = web::serve(listener, stack, &settings.server, move |cfg| {
            routes.configure(cfg)
        })?;
        let scheme = if settings.server.tls.enabled() {
            "https"
        } else {
            "http"
        };
        tracing::info!(
            url = %format!("{scheme}://{}:{port}", settings.server.host),
            ?roles,
            "userhub listening"
        );
        Ok(Self {
            port,
            server,
            roles,
            shutdown,
            enrichment,
            relay,
            bus,
            metrics,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cancelling it stops the application as SIGTERM would.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn enrichment(&self) -> &Enrichment {
        &self.enrichment
    }

    /// The outbox relay, for driving delivery step by step.
    pub fn relay(&self) -> Arc<OutboxRelay> {
        self.relay.clone()
    }

    /// The in-process bus when `bus.url` is `memory://`, for driving delivery step by
    /// step in tests.
    pub fn in_process_bus(&self) -> Option<Arc<InProcessBus>> {
        match &self.bus {
            Bus::InProcess(bus) => Some(bus.clone()),
            Bus::RabbitMq(_) => None,
        }
    }

    /// Serves until SIGINT/SIGTERM or the shutdown token: then in-flight requests
    /// finish (up to `server.shutdown_timeout_secs`) and workers stop between messages.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let token = self.shutdown.clone();
        let handle = self.server.handle();
        let mut server = tokio::spawn(self.server);
        let mut workers = JoinSet::new();
        if self.roles.relay {
            let (relay, token) = (self.relay.clone(), token.clone());
            workers.spawn(async move { relay.run(token).await });
        }
        if self.roles.worker {
            let (bus, token) = (self.bus.event_bus(), token.clone());
            let handler = MeteredHandler::wrap(
                self.enrichment.handler(),
                self.metrics.clone(),
                enrichment::BINDING.queue,
            );
            workers.spawn(async move { bus.consume(&enrichment::BINDING, handler, token).await });
        }

        let server_result = tokio::select! {
            () = shutdown_signal() => { tracing::info!("shutdown signal received"); None }
            () = token.cancelled() => None,
            result = &mut server => Some(result),
        };
        token.cancel();
        let server_result = match server_result {
            Some(result) => result,
            None => {
                handle.stop(true).await;
                server.await
            }
        };
        while let Some(joined) = workers.join_next().await {
            joined.context("a background worker panicked")?;
        }
        self.bus.close().await;
        server_result.context("the HTTP server panicked")??;
        tracing::info!("userhub stopped");
        Ok(())
    }
}

/// The users module on `database.url`, for one-shot commands (`userhub reenrich`): its
/// events wait in the outbox for a running relay.
pub async fn open_users(settings: &Settings) -> anyhow::Result<Users> {
    let database = open_database(settings).await?;
    // Republishing reads no cache; a small private one keeps the facade whole.
    let cache = Arc::new(MemoryCache::new(CachePolicy {
        ttl: Duration::from_secs(settings.cache.ttl_secs),
        max_entries: 1,
    }));
    Ok(Users::new(
        Arc::new(SqlUserRepository::new(database)),
        OutboxSignal::default(),
        cache,
    ))
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
fn open_cache(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Arc<dyn Cache>> {
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
            .context("cannot configure cache.url")?;
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
async fn open_documents(
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

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops userhub");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
