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
    let (backlog, oldest, queues, (required_up, checks)) = tokio::join!(
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
    metrics.ready.set(i64::from(required_up));
    for (dependency, check) in &checks {
        metrics
            .dependency_up
            .with_label_values(&[dependency])
            .set(i64::from(check.error.is_none()));
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

/// The dependencies `/health/ready` checks.
#[derive(Clone)]
pub struct Readiness {
    pub users: Users,
    pub enrichment: Enrichment,
    pub bus: Arc<dyn EventBus>,
    /// Reported, but not required: without it reads go to the stores.
    pub cache: Arc<dyn Cache>,
}

impl Readiness {
    /// Checks every dependency at once: whether the required ones are all up, and
    /// each one's check.
    pub async fn check(&self) -> (bool, BTreeMap<&'static str, DependencyCheck>) {
        let (database, documents, bus, cache) = tokio::join!(
            check(self.users.ping()),
            check(self.enrichment.ping()),
            check(self.bus.ping()),
            check(self.cache.ping()),
        );
        let required_up = [&database, &documents, &bus]
            .iter()
            .all(|c| c.error.is_none());
        let checks = BTreeMap::from([
            ("database", database),
            ("documents", documents),
            ("bus", bus),
            ("cache", cache),
        ]);
        (required_up, checks)
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

#[derive(Debug, Serialize, ToSchema)]
pub struct DependencyCheck {
    /// `up` or `down`.
    pub status: &'static str,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "status": "ok",
    "checks": {
        "database": {"status": "up", "latency_ms": 0.4},
        "documents": {"status": "up", "latency_ms": 0.3},
        "bus": {"status": "up", "latency_ms": 0.3},
        "cache": {"status": "up", "latency_ms": 0.1}
    }
}))]
pub struct ReadinessResponse {
    /// `ok` when every required dependency is up, else `unavailable`.
    pub status: &'static str,
    pub checks: BTreeMap<&'static str, DependencyCheck>,
}

async fn check<F, E>(probe: F) -> DependencyCheck
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
        tracing::warn!(%error, "readiness check failed");
    }
    DependencyCheck {
        status: if error.is_none() { "up" } else { "down" },
        latency_ms,
        error,
    }
}

/// Readiness: every required dependency answers (`database`, `documents`, `bus`); 503
/// when one does not. `cache` is reported but not required.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = ReadinessResponse),
        (status = 503, description = "A dependency is down", body = ReadinessResponse),
    ))]
pub async fn ready(deps: web::Data<Readiness>) -> HttpResponse {
    let (required_up, checks) = deps.check().await;
    let body = ReadinessResponse {
        status: if required_up { "ok" } else { "unavailable" },
        checks,
    };
    if required_up {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
