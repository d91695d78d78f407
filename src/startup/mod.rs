//! Wiring: picks adapters from the settings, builds the modules, runs the HTTP server
//! and the background workers (restarted when they die), and stops them all
//! gracefully: readiness goes down first, the server drains, then the workers stop.

mod adapters;
mod retention;
mod supervise;

pub use adapters::{
    delivery_policy, open_bus, open_database, open_documents, open_users, refuse_traps,
};
pub use retention::Retention;
pub use supervise::supervise;

use adapters::open_cache;
use supervise::shutdown_signal;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::{Console, Gauges, ProcessState, Readiness, Required, Routes};
use crate::bus::{EventBus, InProcessBus, RabbitBus};
use crate::config::{Settings, scheme_of};
use crate::crypto::install_crypto_provider;
use crate::db::Database;
use crate::enrichment::{self, Enrichment, ProfileStore};
use crate::metrics::{MeteredCache, MeteredHandler, Metrics};
use crate::outbox::{OutboxRelay, OutboxSignal};
use crate::resilience::BreakerPolicy;
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

    /// What this process needs to be ready: the API needs the database (a create
    /// needs nothing else: that is the outbox's job); the relay the database and the
    /// bus; the worker the bus and the profile store, and the database too when the
    /// bus is the in-process one, which lives there.
    pub fn required(self, bus_in_database: bool) -> Required {
        Required {
            database: self.api || self.relay || (self.worker && bus_in_database),
            documents: self.worker,
            bus: self.relay || self.worker,
        }
    }

    /// Every role in this one process: no other process shares its stores.
    pub fn is_whole(self) -> bool {
        self == Self::ALL
    }
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
    process: Arc<ProcessState>,
    /// How long the server keeps serving after SIGTERM, with readiness down.
    drain: Duration,
    /// Held while serving: in production, each SQLite file is this process's alone.
    _sqlite_locks: Vec<std::fs::File>,
    enrichment: Enrichment,
    relay: Arc<OutboxRelay>,
    retention: Arc<Retention>,
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
        refuse_traps(&settings, roles)?;
        let sqlite_locks = adapters::lock_sqlite_files(&settings)?;
        let bus_in_database = scheme_of(&settings.bus.url) == "memory";
        let required = roles.required(bus_in_database);
        let database = adapters::open_database_for(&settings, required.database).await?;
        let bus = open_bus(&settings, &database).await?;
        let metrics = Metrics::new().context("cannot register metrics")?;
        let cache = MeteredCache::wrap(open_cache(&settings, &metrics)?, metrics.clone());
        metrics.declare_queue(enrichment::BINDING.queue);
        let mut store = open_documents(&settings, &database).await?;
        if let Some(wrap) = overrides.wrap_profile_store {
            store = wrap(store);
        }

        // A process that serves the API (and so writes outbox rows) but runs no relay
        // wakes the relays of the others; on PostgreSQL only, as a SQLite database has
        // no relay in another process.
        let signal = match &database {
            Database::Postgres(pool) if roles.api && !roles.relay => {
                OutboxSignal::notifying(pool.clone(), shutdown.clone())
            }
            _ => OutboxSignal::default(),
        };
        let repository = Arc::new(SqlUserRepository::new(database.clone()));
        let users = Users::new(repository, signal.clone(), cache.clone());
        let enrichment = Enrichment::new(
            store,
            cache.clone(),
            BreakerPolicy {
                failure_threshold: settings.documents.breaker_failures,
                cool_down: Duration::from_millis(settings.documents.breaker_cool_down_ms),
            },
        );
        metrics.watch_breaker(enrichment.breaker());
        let relay = Arc::new(OutboxRelay::new(
            database.clone(),
            bus.event_bus(),
            signal,
            settings.outbox.batch_size,
            Duration::from_millis(settings.outbox.poll_interval_ms),
        ));

        let retention = Arc::new(Retention {
            db: database.clone(),
            bus: bus.event_bus(),
            users: users.clone(),
            metrics: metrics.clone(),
            settings: settings.retention.clone(),
        });

        let address = (settings.server.host.as_str(), settings.server.port);
        let listener = TcpListener::bind(address)
            .with_context(|| format!("cannot listen on {}:{}", address.0, address.1))?;
        let port = listener.local_addr()?.port();
        let bus_port = bus.event_bus();
        let process = Arc::new(ProcessState::default());
        let routes = Routes {
            users: users.clone(),
            enrichment: enrichment.clone(),
            bus: bus_port.clone(),
            readiness: Readiness {
                users,
                enrichment: enrichment.clone(),
                bus: bus_port,
                cache,
                required,
                process: process.clone(),
                reuse_for: Duration::from_millis(settings.server.readiness_cache_ms),
                last: Arc::default(),
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
            process,
            drain: Duration::from_secs(settings.server.drain_secs),
            _sqlite_locks: sqlite_locks,
            enrichment,
            relay,
            retention,
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

    /// The retention clean-up, for running a pass by hand.
    pub fn retention(&self) -> Arc<Retention> {
        self.retention.clone()
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

    /// Serves until SIGINT/SIGTERM or the shutdown token. Then readiness answers 503
    /// at once while the server keeps serving for `server.drain_secs` (load balancers
    /// take it out of rotation), then it stops accepting and lets in-flight requests
    /// finish (up to `server.shutdown_timeout_secs`), then the relay and the workers
    /// stop between messages. The relay and the consumer are restarted with backoff if
    /// they end or panic before that; readiness reports them down meanwhile.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let token = self.shutdown.clone();
        let handle = self.server.handle();
        let mut server = tokio::spawn(self.server);
        let workers = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if self.roles.relay {
            let relay = self.relay.clone();
            let stop = workers.clone();
            tasks.spawn(supervise(
                "relay",
                self.process.clone(),
                workers.clone(),
                move || {
                    let (relay, stop) = (relay.clone(), stop.clone());
                    async move { relay.run(stop).await }
                },
            ));
            let retention = self.retention.clone();
            let stop = workers.clone();
            tasks.spawn(supervise(
                "retention",
                self.process.clone(),
                workers.clone(),
                move || {
                    let (retention, stop) = (retention.clone(), stop.clone());
                    async move { retention.run(stop).await }
                },
            ));
        }
        if self.roles.worker {
            let bus = self.bus.event_bus();
            let handler = MeteredHandler::wrap(
                self.enrichment.handler(),
                self.metrics.clone(),
                enrichment::BINDING.queue,
            );
            let stop = workers.clone();
            tasks.spawn(supervise(
                "consumer",
                self.process.clone(),
                workers.clone(),
                move || {
                    let (bus, handler, stop) = (bus.clone(), handler.clone(), stop.clone());
                    async move { bus.consume(&enrichment::BINDING, handler, stop).await }
                },
            ));
        }

        let server_result = tokio::select! {
            () = shutdown_signal() => { tracing::info!("shutdown signal received"); None }
            () = token.cancelled() => None,
            result = &mut server => Some(result),
        };
        let server_result = match server_result {
            Some(result) => result,
            None => {
                self.process.start_draining();
                if !self.drain.is_zero() {
                    tracing::info!(
                        drain_secs = self.drain.as_secs(),
                        "draining: readiness is down, still serving"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(self.drain) => {}
                        () = shutdown_signal() => tracing::info!("second signal: drain cut short"),
                    }
                }
                handle.stop(true).await;
                server.await
            }
        };
        token.cancel();
        workers.cancel();
        while let Some(joined) = tasks.join_next().await {
            joined.context("a background task supervisor panicked")?;
        }
        self.bus.close().await;
        server_result.context("the HTTP server panicked")??;
        tracing::info!("userhub stopped");
        Ok(())
    }
}
