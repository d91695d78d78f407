//! Liveness (`/health`) and readiness (`/health/ready`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::bus::EventBus;
use crate::cache::Cache;
use crate::db::Database;
use crate::enrichment::Enrichment;
use crate::metrics::Metrics;
use crate::outbox::OutboxRelay;
use crate::users::Users;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Resources, not bare routes, so another method gets 405 with `Allow`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/health").get(health))
        .service(web::resource("/health/ready").get(ready))
        .service(web::resource("/metrics").get(metrics));
}

/// What `/metrics` reads at scrape time, besides the counters.
#[derive(Clone)]
pub struct Gauges {
    pub relay: Arc<OutboxRelay>,
    pub database: Database,
    pub bus: Arc<dyn EventBus>,
}

/// Prometheus metrics (text exposition format).
///
/// The gauges are read now, concurrently, each bounded by the readiness timeout: a
/// dependency that does not answer must not fail or stall the scrape, so its gauges
/// keep their last value (and `userhub_dependency_up` says it is down).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4")))]
pub async fn metrics(
    metrics: web::Data<Metrics>,
    gauges: web::Data<Gauges>,
    readiness: web::Data<Readiness>,
) -> HttpResponse {
    let (backlog, oldest, queues, report) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, gauges.relay.backlog()),
        tokio::time::timeout(CHECK_TIMEOUT, gauges.relay.oldest_unsent_age()),
        tokio::time::timeout(CHECK_TIMEOUT, gauges.bus.queue_counts()),
        readiness.check(),
    );
    if let Ok(Ok(backlog)) = backlog {
        metrics
            .outbox_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
    }
    if let Ok(Ok(oldest)) = oldest {
        metrics
            .outbox_oldest_age
            .set(oldest.map_or(0.0, |age| age.as_secs_f64()));
    }
    match queues {
        Ok(Ok(counts)) => {
            for count in counts {
                let queue = [count.queue.as_str()];
                let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                metrics
                    .queue_messages
                    .with_label_values(&queue)
                    .set(gauge(count.waiting));
                metrics
                    .dead_letters
                    .with_label_values(&queue)
                    .set(gauge(count.dead));
            }
        }
        Ok(Err(error)) => tracing::warn!(%error, "cannot count queued messages"),
        Err(_) => tracing::warn!("counting queued messages timed out"),
    }
    metrics.ready.set(i64::from(report.ready));
    for (dependency, check) in &report.checks {
        metrics
            .dependency_up
            .with_label_values(&[dependency])
            .set(i64::from(check.status == "up"));
    }
    let (size, idle) = gauges.database.pool_usage();
    let idle = i64::try_from(idle).unwrap_or(i64::MAX);
    for (state, value) in [
        ("size", i64::from(size)),
        ("idle", idle),
        ("in_use", (i64::from(size) - idle).max(0)),
    ] {
        metrics
            .db_connections
            .with_label_values(&[state])
            .set(value);
    }
    metrics
        .db_connections_max
        .set(i64::from(gauges.database.pool_max()));
    match metrics.render() {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(text),
        Err(error) => {
            tracing::error!(%error, "cannot render metrics");
            HttpResponse::InternalServerError().finish()
        }
    }
}

/// Which dependencies a process needs, from its roles: serving the API needs the
/// database (creating a user needs nothing else: that is what the outbox is for);
/// relaying needs the database and the bus; consuming needs the bus and the profile
/// store. The cache is never required: without it reads go to the stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Required {
    pub database: bool,
    pub documents: bool,
    pub bus: bool,
}

/// What the process itself reports to readiness: draining after SIGTERM, and which
/// background task is down (ended or panicked, waiting to be restarted).
#[derive(Debug, Default)]
pub struct ProcessState {
    draining: std::sync::atomic::AtomicBool,
    tasks_down: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
}

impl ProcessState {
    /// From now on readiness answers 503, so load balancers stop sending requests
    /// while the server finishes the ones it has.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records whether the background task `name` is running.
    pub fn set_task_running(&self, name: &'static str, running: bool) {
        let mut down = self
            .tasks_down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if running {
            down.remove(name);
        } else {
            down.insert(name);
        }
    }

    /// The background tasks reported down.
    pub fn tasks_down(&self) -> Vec<&'static str> {
        self.tasks_down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }
}

/// The dependencies `/health/ready` checks.
#[derive(Clone)]
pub struct Readiness {
    pub users: Users,
    pub enrichment: Enrichment,
    pub bus: Arc<dyn EventBus>,
    pub cache: Arc<dyn Cache>,
    pub required: Required,
    pub process: Arc<ProcessState>,
    /// A result is reused for this long, so a flood of probes does not reach the
    /// backends (one check at a time; the others wait for it).
    pub reuse_for: Duration,
    /// The last dependency checks and when they were made.
    pub last: Arc<tokio::sync::Mutex<Option<(Instant, Checks)>>>,
}

/// One readiness result.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every required dependency is up, no background task is down, not draining.
    pub ready: bool,
    pub draining: bool,
    pub tasks_down: Vec<&'static str>,
    pub checks: Checks,
}

/// Each dependency's check, by name.
pub type Checks = BTreeMap<&'static str, DependencyCheck>;

impl Readiness {
    /// The current report: reused when younger than `reuse_for`, else checked anew,
    /// every dependency at once. Draining and the tasks are read fresh every time.
    pub async fn check(&self) -> Report {
        let checks = {
            let mut last = self.last.lock().await;
            match &*last {
                Some((at, checks)) if at.elapsed() < self.reuse_for => checks.clone(),
                _ => {
                    let checks = self.check_dependencies().await;
                    *last = Some((Instant::now(), checks.clone()));
                    checks
                }
            }
        };
        let draining = self.process.is_draining();
        let tasks_down = self.process.tasks_down();
        let ready = !draining
            && tasks_down.is_empty()
            && checks.values().all(|c| !c.required || c.status == "up");
        Report {
            ready,
            draining,
            tasks_down,
            checks,
        }
    }

    async fn check_dependencies(&self) -> Checks {
        let required = self.required;
        let (database, documents, bus, cache) = tokio::join!(
            check("database", required.database, self.users.ping()),
            check("documents", required.documents, self.enrichment.ping()),
            check("bus", required.bus, self.bus.ping()),
            check("cache", false, self.cache.ping()),
        );
        BTreeMap::from([
            ("database", database),
            ("documents", documents),
            ("bus", bus),
            ("cache", cache),
        ])
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "ok", "service": "userhub", "version": "0.1.0", "timestamp": "2026-11-29T10:15:30Z"}))]
pub struct HealthResponse {
    pub status: &'static str,
    pub service: &'static str,
    pub version: &'static str,
    pub timestamp: DateTime<Utc>,
}

/// Liveness: the process is up and serving HTTP.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(HealthResponse {
        status: "ok",
        service: "userhub",
        version: env!("CARGO_PKG_VERSION"),
        timestamp: Utc::now(),
    })
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DependencyCheck {
    /// `up` or `down`.
    pub status: &'static str,
    /// Whether this process needs it (from its roles) to be ready.
    pub required: bool,
    pub latency_ms: f64,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "status": "ok",
    "checks": {
        "database": {"status": "up", "required": true, "latency_ms": 0.4},
        "documents": {"status": "up", "required": false, "latency_ms": 0.3},
        "bus": {"status": "up", "required": false, "latency_ms": 0.3},
        "cache": {"status": "up", "required": false, "latency_ms": 0.1}
    }
}))]
pub struct ReadinessResponse {
    /// `ok` when ready; `draining` after SIGTERM; `unavailable` when a required
    /// dependency is down or a background task is being restarted.
    pub status: &'static str,
    /// Background tasks (`relay`, `consumer`) that ended and wait to be restarted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks_down: Vec<&'static str>,
    pub checks: BTreeMap<&'static str, DependencyCheck>,
}

/// Checks one dependency within the timeout. Why it is down goes to the log, not to
/// the caller: a backend's error names hosts and users.
async fn check<F, E>(name: &'static str, required: bool, probe: F) -> DependencyCheck
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let outcome = tokio::time::timeout(CHECK_TIMEOUT, probe).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {CHECK_TIMEOUT:?}")),
    };
    if let Some(error) = &error {
        tracing::warn!(dependency = name, required, %error, "readiness check failed");
    }
    DependencyCheck {
        status: if error.is_none() { "up" } else { "down" },
        required,
        latency_ms,
    }
}

/// Readiness: the dependencies this process needs (from its roles) answer, its
/// background tasks run, and it is not draining; else 503. Every dependency is
/// reported, with whether it is required. Results are reused for about a second.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = ReadinessResponse),
        (status = 503, description = "Draining, a required dependency is down, or a background task is restarting", body = ReadinessResponse),
    ))]
pub async fn ready(deps: web::Data<Readiness>) -> HttpResponse {
    let report = deps.check().await;
    let status = if report.ready {
        "ok"
    } else if report.draining {
        "draining"
    } else {
        "unavailable"
    };
    let body = ReadinessResponse {
        status,
        tasks_down: report.tasks_down,
        checks: report.checks,
    };
    if report.ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
