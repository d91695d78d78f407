//! Transactional outbox: events are written with the change they announce, in the same
//! transaction, and a relay hands them to the bus afterwards.
//!
//! A 201 therefore means the user AND its event are durable; a bus outage only delays
//! delivery. The relay marks a row sent only after the bus has accepted it, so delivery
//! is at-least-once and consumers de-duplicate by event id.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::uuid::fmt::Hyphenated;
use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::{Envelope, EventBus};
use crate::resilience::Backoff;

/// Wakes the relay right after a commit that wrote outbox rows, so delivery does not
/// wait for the next poll.
#[derive(Debug, Clone, Default)]
pub struct OutboxSignal(Arc<Notify>);

impl OutboxSignal {
    pub fn notify(&self) {
        self.0.notify_one();
    }
}

/// Adds `envelope` to the outbox inside the caller's transaction.
pub async fn enqueue(conn: &mut SqliteConnection, envelope: &Envelope) -> sqlx::Result<()> {
    let headers =
        serde_json::to_string(&envelope.headers).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query(
        "INSERT INTO outbox (event_id, routing_key, payload, headers, occurred_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(envelope.id.hyphenated())
    .bind(&envelope.routing_key)
    .bind(&envelope.payload)
    .bind(headers)
    .bind(envelope.occurred_at)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    event_id: Hyphenated,
    routing_key: String,
    payload: String,
    headers: String,
    occurred_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox storage failed: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("publishing event {event_id} failed: {source}")]
    Publish {
        event_id: uuid::Uuid,
        source: crate::bus::BusError,
    },
}

/// Moves outbox rows to the bus, oldest first.
pub struct OutboxRelay {
    pool: SqlitePool,
    bus: Arc<dyn EventBus>,
    signal: OutboxSignal,
    batch_size: u32,
    poll_interval: Duration,
    backoff: Backoff,
}

impl OutboxRelay {
    pub fn new(
        pool: SqlitePool,
        bus: Arc<dyn EventBus>,
        signal: OutboxSignal,
        batch_size: u32,
        poll_interval: Duration,
    ) -> Self {
        Self {
            pool,
            bus,
            signal,
            batch_size: batch_size.max(1),
            poll_interval,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
        }
    }

    /// Publishes up to one batch of unsent rows, in order, and returns how many were
    /// sent. Stops at the first failure so order is kept; that row is retried next time.
    pub async fn relay_batch(&self) -> Result<usize, RelayError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, event_id, routing_key, payload, headers, occurred_at
               FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT ?1",
        )
        .bind(i64::from(self.batch_size))
        .fetch_all(&self.pool)
        .await?;
        let mut sent = 0;
        for row in rows {
            let envelope = Envelope {
                id: row.event_id.into_uuid(),
                routing_key: row.routing_key,
                payload: row.payload,
                // A row we wrote ourselves; unreadable headers only lose correlation.
                headers: serde_json::from_str(&row.headers).unwrap_or_default(),
                occurred_at: row.occurred_at,
            };
            self.bus
                .publish(&envelope)
                .await
                .map_err(|source| RelayError::Publish {
                    event_id: envelope.id,
                    source,
                })?;
            sqlx::query(
                "UPDATE outbox SET sent_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                                   updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                  WHERE id = ?1",
            )
            .bind(row.id)
            .execute(&self.pool)
            .await?;
            tracing::debug!(event_id = %envelope.id, routing_key = %envelope.routing_key, "event relayed");
            sent += 1;
        }
        Ok(sent)
    }

    /// Relays until the outbox is empty; for tests and `userhub` one-shot use.
    pub async fn drain(&self) -> Result<usize, RelayError> {
        let mut total = 0;
        loop {
            let sent = self.relay_batch().await?;
            total += sent;
            if sent < self.batch_size as usize {
                return Ok(total);
            }
        }
    }

    /// Rows not yet handed to the bus.
    pub async fn backlog(&self) -> Result<u64, sqlx::Error> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Relays until `shutdown` is cancelled, between batches.
    pub async fn run(&self, shutdown: CancellationToken) {
        tracing::info!("outbox relay started");
        let mut consecutive_errors = 0;
        while !shutdown.is_cancelled() {
            let wait = match self.relay_batch().await {
                Ok(sent) if sent == self.batch_size as usize => {
                    consecutive_errors = 0;
                    continue;
                }
                Ok(_) => {
                    consecutive_errors = 0;
                    self.poll_interval
                }
                Err(error) => {
                    consecutive_errors += 1;
                    let wait = self.backoff.delay(consecutive_errors);
                    tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "outbox relay failed; events stay queued");
                    wait
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                // After a failure, new writes must not cut the backoff short.
                () = self.signal.0.notified(), if consecutive_errors == 0 => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!("outbox relay stopped");
    }
}
