//! Prometheus metrics: RED per route, consumer outcomes and lag, create-to-enriched
//! latency, cache hits and misses, outbox backlog and age, dead letters, connection
//! pools, circuit breakers, readiness, build and process. One registry per application
//! instance (names prefixed `userhub_`), plus one unprefixed registry for the standard
//! `process_*` metrics.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::bus::{Envelope, EventHandler, HandlerError};
use crate::cache::Cache;
use crate::events::USER_CREATED;
use crate::resilience::{BreakerState, CircuitBreaker};

/// Buckets for waits that run from milliseconds (a busy but healthy queue) to an hour
/// (a backlog after an outage).
const WAIT_BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

pub struct Metrics {
    registry: Registry,
    /// `process_*`, unprefixed as every Prometheus client names them (Linux only).
    process: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    deliveries: IntCounterVec,
    delivery_duration: HistogramVec,
    delivery_lag: HistogramVec,
    enriched_latency: Histogram,
    cache_lookups: IntCounterVec,
    breaker_state: IntGaugeVec,
    breakers: Mutex<Vec<Arc<CircuitBreaker>>>,
    /// Set at scrape time.
    pub outbox_backlog: IntGauge,
    /// Set at scrape time: 0 when every row is sent.
    pub outbox_oldest_age: Gauge,
    /// Set at scrape time, per queue.
    pub dead_letters: IntGaugeVec,
    /// Set at scrape time, per queue.
    pub queue_messages: IntGaugeVec,
    /// Rows deleted by the retention clean-up, per kind.
    retention_deleted: IntCounterVec,
    /// Set at scrape time: `state` is `size`, `idle` or `in_use`.
    pub db_connections: IntGaugeVec,
    /// Set at scrape time.
    pub db_connections_max: IntGauge,
    /// Set at scrape time: 1 when every required dependency answers.
    pub ready: IntGauge,
    /// Set at scrape time, per dependency of `/health/ready`.
    pub dependency_up: IntGaugeVec,
}

/// 0 closed, 1 half-open, 2 open: the higher, the worse.
fn breaker_value(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

impl Metrics {
    pub fn new() -> prometheus::Result<Arc<Self>> {
        let registry = Registry::new_custom(Some("userhub".into()), None)?;
        let metrics = Self {
            http_requests: IntCounterVec::new(
                Opts::new("http_requests_total", "HTTP requests by route and status"),
                &["method", "route", "status"],
            )?,
            http_duration: HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "HTTP request latency"),
                &["method", "route"],
            )?,
            deliveries: IntCounterVec::new(
                Opts::new(
                    "deliveries_total",
                    "Event deliveries by queue and outcome (ok, transient, permanent, unavailable, dead_lettered)",
                ),
                &["queue", "outcome"],
            )?,
            delivery_duration: HistogramVec::new(
                HistogramOpts::new("delivery_duration_seconds", "Event handler latency"),
                &["queue"],
            )?,
            delivery_lag: HistogramVec::new(
                HistogramOpts::new(
                    "delivery_lag_seconds",
                    "Age of an event when its handler starts (now - occurred_at): consumer lag",
                )
                .buckets(WAIT_BUCKETS.to_vec()),
                &["queue"],
            )?,
            enriched_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "user_enriched_latency_seconds",
                    "From a user's created_at to its enriched profile being stored",
                )
                .buckets(WAIT_BUCKETS.to_vec()),
            )?,
            cache_lookups: IntCounterVec::new(
                Opts::new("cache_lookups_total", "Cache lookups by result (hit, miss)"),
                &["result"],
            )?,
            breaker_state: IntGaugeVec::new(
                Opts::new(
                    "circuit_breaker_state",
                    "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open",
                ),
                &["dependency"],
            )?,
            breakers: Mutex::new(Vec::new()),
            outbox_backlog: IntGauge::new("outbox_backlog", "Outbox rows not yet relayed")?,
            outbox_oldest_age: Gauge::new(
                "outbox_oldest_unsent_age_seconds",
                "Age of the oldest outbox row not yet relayed (0 when none waits)",
            )?,
            dead_letters: IntGaugeVec::new(
                Opts::new(
                    "dead_letters",
                    "Dead letters not yet replayed, per queue they failed on",
                ),
                &["queue"],
            )?,
            retention_deleted: IntCounterVec::new(
                Opts::new(
                    "retention_deleted_total",
                    "Rows deleted by the retention clean-up: outbox, dead_letters, idempotency_keys",
                ),
                &["what"],
            )?,
            queue_messages: IntGaugeVec::new(
                Opts::new(
                    "queue_messages",
                    "Messages waiting in a queue (due, retrying or in hand), dead letters apart",
                ),
                &["queue"],
            )?,
            db_connections: IntGaugeVec::new(
                Opts::new(
                    "db_connections",
                    "Database pool connections by state (size = idle + in_use)",
                ),
                &["state"],
            )?,
            db_connections_max: IntGauge::new(
                "db_connections_max",
                "Most connections the database pool opens",
            )?,
            ready: IntGauge::new(
                "ready",
                "1 when every required dependency answers (as GET /health/ready), else 0",
            )?,
            dependency_up: IntGaugeVec::new(
                Opts::new(
                    "dependency_up",
                    "1 when the dependency answers its readiness check, else 0",
                ),
                &["dependency"],
            )?,
            registry,
            process: Registry::new(),
        };
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; the labels say which build runs"),
            &["version", "revision"],
        )?;
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("USERHUB_REVISION").unwrap_or("unknown"),
            ])
            .set(1);
        for what in ["outbox", "dead_letters", "idempotency_keys"] {
            metrics.retention_deleted.with_label_values(&[what]);
        }
        let collectors: [Box<dyn prometheus::core::Collector>; 18] = [
            Box::new(metrics.http_requests.clone()),
            Box::new(metrics.http_duration.clone()),
            Box::new(metrics.deliveries.clone()),
            Box::new(metrics.delivery_duration.clone()),
            Box::new(metrics.delivery_lag.clone()),
            Box::new(metrics.enriched_latency.clone()),
            Box::new(metrics.cache_lookups.clone()),
            Box::new(metrics.breaker_state.clone()),
            Box::new(metrics.outbox_backlog.clone()),
            Box::new(metrics.outbox_oldest_age.clone()),
            Box::new(metrics.dead_letters.clone()),
            Box::new(metrics.queue_messages.clone()),
            Box::new(metrics.retention_deleted.clone()),
            Box::new(metrics.db_connections.clone()),
            Box::new(metrics.db_connections_max.clone()),
            Box::new(metrics.ready.clone()),
            Box::new(metrics.dependency_up.clone()),
            Box::new(build_info),
        ];
        for collector in collectors {
            metrics.registry.register(collector)?;
        }
        #[cfg(target_os = "linux")]
        metrics.process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Arc::new(metrics))
    }

    /// Exposes `breaker`'s state as `userhub_circuit_breaker_state{dependency=NAME}`,
    /// read at every scrape. Every breaker the application builds registers here.
    pub fn watch_breaker(&self, breaker: Arc<CircuitBreaker>) {
        self.breaker_state
            .with_label_values(&[breaker.name()])
            .set(breaker_value(breaker.state()));
        self.breakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(breaker);
    }

    /// Declares the delivery series of `queue` at zero, so dashboards and alerts see
    /// them before the first message (a series that does not exist reads as no data).
    pub fn declare_queue(&self, queue: &str) {
        for outcome in [
            "ok",
            "transient",
            "unavailable",
            "permanent",
            "dead_lettered",
        ] {
            self.deliveries.with_label_values(&[queue, outcome]);
        }
        self.dead_letters.with_label_values(&[queue]);
        self.queue_messages.with_label_values(&[queue]);
    }

    pub fn count_retention_deleted(&self, what: &str, rows: u64) {
        self.retention_deleted
            .with_label_values(&[what])
            .inc_by(rows);
    }

    /// `method` is whatever the client sent: any but the standard ones count as
    /// `other`, so a client cannot grow the series without bound.
    pub fn observe_request(&self, method: &str, route: &str, status: &str, seconds: f64) {
        const STANDARD: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
        ];
        let method = if STANDARD.contains(&method) {
            method
        } else {
            "other"
        };
        self.http_requests
            .with_label_values(&[method, route, status])
            .inc();
        self.http_duration
            .with_label_values(&[method, route])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        for breaker in self
            .breakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            self.breaker_state
                .with_label_values(&[breaker.name()])
                .set(breaker_value(breaker.state()));
        }
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&families, &mut buffer)?;
        String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// Counts what a consumer's handler does with each delivery.
pub struct MeteredHandler {
    inner: Arc<dyn EventHandler>,
    metrics: Arc<Metrics>,
    queue: &'static str,
}

impl MeteredHandler {
    pub fn wrap(
        inner: Arc<dyn EventHandler>,
        metrics: Arc<Metrics>,
        queue: &'static str,
    ) -> Arc<dyn EventHandler> {
        Arc::new(Self {
            inner,
            metrics,
            queue,
        })
    }
}

#[async_trait]
impl EventHandler for MeteredHandler {
    async fn handle(&self, envelope: &Envelope) -> Result<(), HandlerError> {
        let started = Instant::now();
        self.metrics
            .delivery_lag
            .with_label_values(&[self.queue])
            .observe(seconds_since(envelope.occurred_at));
        let result = self.inner.handle(envelope).await;
        if result.is_ok()
            && envelope.routing_key == USER_CREATED
            && let Some(created_at) = created_at(&envelope.payload)
        {
            // The handler returns once the profile is stored.
            self.metrics
                .enriched_latency
                .observe(seconds_since(created_at));
        }
        let outcome = match &result {
            Ok(()) => "ok",
            Err(HandlerError::Transient(_)) => "transient",
            Err(HandlerError::Permanent(_)) => "permanent",
            Err(HandlerError::Unavailable(_)) => "unavailable",
        };
        self.metrics
            .delivery_duration
            .with_label_values(&[self.queue])
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .deliveries
            .with_label_values(&[self.queue, outcome])
            .inc();
        result
    }

    async fn on_dead_letter(&self, envelope: &Envelope, error: &str) {
        self.metrics
            .deliveries
            .with_label_values(&[self.queue, "dead_lettered"])
            .inc();
        self.inner.on_dead_letter(envelope, error).await;
    }

    async fn pause(&self) -> Option<std::time::Duration> {
        self.inner.pause().await
    }
}

/// Seconds from `at` until now; 0 when `at` is ahead (clocks of other hosts).
fn seconds_since(at: DateTime<Utc>) -> f64 {
    (Utc::now() - at)
        .to_std()
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// The `created_at` of an event payload, if it has one.
fn created_at(payload: &str) -> Option<DateTime<Utc>> {
    #[derive(serde::Deserialize)]
    struct CreatedAt {
        created_at: DateTime<Utc>,
    }
    serde_json::from_str::<CreatedAt>(payload)
        .ok()
        .map(|p| p.created_at)
}

/// Counts cache hits and misses, whatever the adapter.
pub struct MeteredCache {
    inner: Arc<dyn Cache>,
    /// The two series of `cache_lookups_total`, looked up once: a lookup by label
    /// (hashing it under a lock) on every read showed in the profile of a cached `GET`.
    hits: IntCounter,
    misses: IntCounter,
}

impl MeteredCache {
    pub fn wrap(inner: Arc<dyn Cache>, metrics: Arc<Metrics>) -> Arc<dyn Cache> {
        Arc::new(Self {
            inner,
            hits: metrics.cache_lookups.with_label_values(&["hit"]),
            misses: metrics.cache_lookups.with_label_values(&["miss"]),
        })
    }
}

#[async_trait]
impl Cache for MeteredCache {
    async fn get_entry(&self, key: &str) -> Option<(u64, String)> {
        let entry = self.inner.get_entry(key).await;
        if entry.is_some() {
            self.hits.inc();
        } else {
            self.misses.inc();
        }
        entry
    }

    async fn put(&self, key: &str, version: u64, value: String) {
        self.inner.put(key, version, value).await;
    }

    async fn ping(&self) -> Result<(), String> {
        self.inner.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_a_client_invents_share_one_series() {
        let metrics = Metrics::new().unwrap();
        for method in ["GET", "BREW", "WHEN", "PROPFIND"] {
            metrics.observe_request(method, "/users", "405", 0.001);
        }
        let text = metrics.render().unwrap();
        let series = |method: &str| {
            text.lines()
                .filter(|l| l.starts_with("userhub_http_requests_total{"))
                .filter(|l| l.contains(&format!("method=\"{method}\"")))
                .count()
        };
        assert_eq!(series("GET"), 1);
        assert_eq!(series("other"), 1);
        assert!(
            text.contains("method=\"other\",route=\"/users\",status=\"405\"} 3"),
            "{text}"
        );
        assert_eq!(series("BREW"), 0);
    }
}
