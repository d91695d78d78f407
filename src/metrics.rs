//! Prometheus metrics: RED per route, consumer outcomes, cache hits and misses, outbox
//! backlog and connection pools. One registry per application instance.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::bus::{Envelope, EventHandler, HandlerError};
use crate::cache::Cache;

pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    deliveries: IntCounterVec,
    delivery_duration: HistogramVec,
    cache_lookups: IntCounterVec,
    /// Set at scrape time.
    pub outbox_backlog: IntGauge,
    /// Set at scrape time: `state` is `size` or `idle`.
    pub db_connections: IntGaugeVec,
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
                    "Event deliveries by queue and outcome (ok, transient, permanent, dead_lettered)",
                ),
                &["queue", "outcome"],
            )?,
            delivery_duration: HistogramVec::new(
                HistogramOpts::new("delivery_duration_seconds", "Event handler latency"),
                &["queue"],
            )?,
            cache_lookups: IntCounterVec::new(
                Opts::new("cache_lookups_total", "Cache lookups by result (hit, miss)"),
                &["result"],
            )?,
            outbox_backlog: IntGauge::new("outbox_backlog", "Outbox rows not yet relayed")?,
            db_connections: IntGaugeVec::new(
                Opts::new("db_connections", "Database pool connections by state"),
                &["state"],
            )?,
            registry,
        };
        metrics
            .registry
            .register(Box::new(metrics.http_requests.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.http_duration.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.deliveries.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.delivery_duration.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.cache_lookups.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.outbox_backlog.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.db_connections.clone()))?;
        Ok(Arc::new(metrics))
    }

    pub fn observe_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.http_requests
            .with_label_values(&[method, route, &status.to_string()])
            .inc();
        self.http_duration
            .with_label_values(&[method, route])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
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
        let result = self.inner.handle(envelope).await;
        let outcome = match &result {
            Ok(()) => "ok",
            Err(HandlerError::Transient(_)) => "transient",
            Err(HandlerError::Permanent(_)) => "permanent",
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
}

/// Counts cache hits and misses, whatever the adapter.
pub struct MeteredCache {
    inner: Arc<dyn Cache>,
    metrics: Arc<Metrics>,
}

impl MeteredCache {
    pub fn wrap(inner: Arc<dyn Cache>, metrics: Arc<Metrics>) -> Arc<dyn Cache> {
        Arc::new(Self { inner, metrics })
    }
}

#[async_trait]
impl Cache for MeteredCache {
    async fn get(&self, key: &str) -> Option<String> {
        let value = self.inner.get(key).await;
        let result = if value.is_some() { "hit" } else { "miss" };
        self.metrics
            .cache_lookups
            .with_label_values(&[result])
            .inc();
        value
    }

    async fn put(&self, key: &str, version: u64, value: String) {
        self.inner.put(key, version, value).await;
    }

    async fn ping(&self) -> Result<(), String> {
        self.inner.ping().await
    }
}
