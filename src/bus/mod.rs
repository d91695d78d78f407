//! Event bus port: envelopes, publishers, consumers and dead letters.

mod in_process;
mod rabbitmq;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use in_process::InProcessBus;
pub use rabbitmq::RabbitBus;

/// Header names carried by every envelope.
pub mod headers {
    /// Version of the payload schema for the routing key.
    pub const EVENT_VERSION: &str = "event_version";
    /// Request id of the HTTP request that caused the event, for log correlation.
    pub const REQUEST_ID: &str = "request_id";
    /// What the event is about (a user's uuid): erasure finds a subject's messages by it.
    pub const SUBJECT: &str = "subject";
    /// `true` on an event that ends its subject's life (`user.deleted`): once a queue's
    /// consumer has handled it, the bus drops that queue's dead letters of the subject
    /// (and, where the transport allows, its older queued messages), so no personal
    /// data outlives the subject there.
    pub const ERASES_SUBJECT: &str = "erases_subject";
    /// Why an event was published, when it is not the obvious (e.g. `reenrich`).
    pub const REASON: &str = "reason";
    /// W3C trace context of the span that emitted the event, so the relay's publish and
    /// the consumer's handling join the trace of the request that caused it.
    pub const TRACEPARENT: &str = crate::telemetry::TRACEPARENT;
    /// W3C vendor trace state, present when the trace carries one.
    pub const TRACESTATE: &str = crate::telemetry::TRACESTATE;
}

/// One message on the bus: an opaque JSON payload plus routing and tracing metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per event (UUIDv7); consumers de-duplicate on it.
    pub id: Uuid,
    pub routing_key: String,
    /// JSON text. Kept as text so a malformed message can still be carried to the
    /// dead letters and shown to an operator.
    pub payload: String,
    pub headers: BTreeMap<String, String>,
    pub occurred_at: DateTime<Utc>,
}

impl Envelope {
    pub fn new(routing_key: &str, payload: String, headers: BTreeMap<String, String>) -> Self {
        Self {
            id: Uuid::now_v7(),
            routing_key: routing_key.to_owned(),
            payload,
            headers,
            occurred_at: Utc::now().trunc_subsecs(3),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The `subject` header: what the event is about.
    pub fn subject(&self) -> Option<&str> {
        self.header(headers::SUBJECT)
    }

    /// True for an event that ends its subject's life (see [`headers::ERASES_SUBJECT`]).
    pub fn erases_subject(&self) -> bool {
        self.header(headers::ERASES_SUBJECT) == Some("true")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus storage failed: {0}")]
    Storage(#[from] sqlx::Error),
    /// The broker cannot be reached or refused the operation; try again later.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus message is corrupt: {0}")]
    Corrupt(String),
}

/// How deliveries are retried.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// Deliveries of one message before it is dead-lettered (the first included).
    pub max_attempts: u32,
    pub backoff: crate::resilience::Backoff,
    /// A handler running longer than this has failed transiently.
    pub handler_timeout: std::time::Duration,
    /// Longest an idle consumer sleeps before looking for due messages again.
    pub poll_interval: std::time::Duration,
    /// Messages one consumer handles at once (at least 1).
    pub concurrency: usize,
    /// Deliveries of one message the broker allows (its own redeliveries included,
    /// e.g. after a consumer crashed holding it) before it dead-letters it itself.
    pub delivery_limit: u32,
    /// How long a dead letter is kept before it is dropped.
    pub dead_letter_ttl: std::time::Duration,
}

/// Which dead letters a bulk replay takes: all of them, or those of one queue, or
/// those whose error contains a text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayFilter {
    /// Only the dead letters of this queue (e.g. `enrichment.users`).
    #[serde(default)]
    pub queue: Option<String>,
    /// Only those whose error contains this text (case-sensitive).
    #[serde(default)]
    pub error_contains: Option<String>,
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    /// Failed transiently; delivered again after `delay`.
    Retried {
        attempt: u32,
        delay: std::time::Duration,
    },
    DeadLettered {
        attempt: u32,
    },
    /// Put back without counting an attempt: the handler's dependency is down (see
    /// [`HandlerError::Unavailable`]).
    Requeued,
    /// Nothing recorded: this delivery's lease ran out and another consumer holds the
    /// message now (in-process bus).
    LeaseLost,
}

/// A message given up on, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// What to pass to replay: a row id for the in-process bus, the message id on a
    /// broker.
    pub id: String,
    pub queue: String,
    pub message_id: Uuid,
    pub routing_key: String,
    /// The original payload, as published (possibly not even JSON).
    pub payload: String,
    pub headers: BTreeMap<String, String>,
    /// Deliveries made before giving up.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    pub dead_at: DateTime<Utc>,
}

/// Why a handler did not process a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying later (a store down, a timeout).
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (unparseable payload, unknown version): dead-letter now.
    #[error("{0}")]
    Permanent(String),
    /// A dependency is known to be down (its circuit breaker is open): not the
    /// message's fault. It goes back to the queue without counting an attempt, and the
    /// consumer pauses (see [`EventHandler::pause`]).
    #[error("{0}")]
    Unavailable(String),
}

/// A consumer of one queue.
#[async_trait]
pub trait EventHandler: Send + Sync {
    async fn handle(&self, envelope: &Envelope) -> Result<(), HandlerError>;

    /// Called once when a message is given up on, so the module can record the
    /// failure where its readers will see it. Best effort: it must not fail.
    async fn on_dead_letter(&self, _envelope: &Envelope, _error: &str) {}

    /// Whether the handler can take work now. `Some(wait)`: a dependency is down, so
    /// the consumer takes no message (on a broker it stops consuming, and what it
    /// held goes back) and asks again after `wait`. Asking may itself probe the
    /// dependency (a circuit breaker's trial). Default: always ready.
    async fn pause(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The bus as the rest of the application sees it. `memory://` is [`InProcessBus`].
#[async_trait]
pub trait EventBus: Send + Sync {
    /// Returns once the bus has durably accepted the envelope (for a broker: after the
    /// publisher confirm). Only then may the outbox mark it sent.
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError>;

    /// Publishes a batch, each envelope under its own span, and returns how many of
    /// the first ones the bus durably accepted, with the error that stopped the rest:
    /// only those first ones may be marked sent. By default all are published at once
    /// (with a broker, the confirms of the batch are awaited together instead of one
    /// round trip each); a later one may be accepted after an earlier one failed, and
    /// is then published again with it: at least once, as ever. The in-process bus
    /// takes the whole batch in one transaction.
    async fn publish_all(&self, batch: &[(Envelope, tracing::Span)]) -> (usize, Option<BusError>) {
        use tracing::Instrument;
        let results = futures_util::future::join_all(
            batch
                .iter()
                .map(|(envelope, span)| self.publish(envelope).instrument(span.clone())),
        )
        .await;
        let mut accepted = 0;
        for result in results {
            match result {
                Ok(()) => accepted += 1,
                Err(error) => return (accepted, Some(error)),
            }
        }
        (accepted, None)
    }

    /// Delivers messages of `binding` to `handler` until `shutdown` is cancelled,
    /// stopping between messages.
    async fn consume(
        &self,
        binding: &Binding,
        handler: std::sync::Arc<dyn EventHandler>,
        shutdown: tokio_util::sync::CancellationToken,
    );

    /// Cheap reachability check for `/health/ready`.
    async fn ping(&self) -> Result<(), BusError>;

    /// `messaging.system` of the spans that publish and consume through this bus.
    fn messaging_system(&self) -> &'static str {
        "userhub"
    }

    /// Messages waiting and dead letters not yet replayed, per bound queue (zeros
    /// included), for metrics. Must stay cheap: it runs at every scrape.
    async fn queue_counts(&self) -> Result<Vec<QueueCounts>, BusError> {
        Ok(Vec::new())
    }

    /// Dead letters not yet replayed, oldest first, at most `limit`, starting after the
    /// dead letter `after` (a previous page's last `id`).
    async fn dead_letters(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<DeadLetter>, BusError>;

    /// Puts the dead letter `id` back on its queue with a fresh attempt count.
    /// `Ok(false)` when there is no such dead letter (or it was replayed already).
    async fn replay(&self, id: &str) -> Result<bool, BusError>;

    /// Puts every dead letter `filter` selects back on its queue, in one pass (O(n)).
    /// Returns how many.
    async fn replay_all(&self, filter: &ReplayFilter) -> Result<u64, BusError>;

    /// Deletes the dead letters (replayed or not) that died before `died_before`,
    /// `batch` per statement; returns how many. Default: none, for a broker whose
    /// dead-letter queues expire their messages themselves.
    async fn purge_dead_letters(
        &self,
        _died_before: chrono::DateTime<chrono::Utc>,
        _batch: u32,
    ) -> Result<u64, BusError> {
        Ok(0)
    }
}

/// How many messages one queue holds, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCounts {
    pub queue: String,
    /// Not yet handled: due now, waiting for a retry, or being handled.
    pub waiting: u64,
    /// Dead letters not yet replayed.
    pub dead: u64,
}

/// A queue and the routing keys bound to it. One queue takes every event of a subject,
/// so they wait in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub queue: &'static str,
    pub routing_keys: &'static [&'static str],
}

impl Binding {
    pub fn takes(&self, routing_key: &str) -> bool {
        self.routing_keys.contains(&routing_key)
    }
}
