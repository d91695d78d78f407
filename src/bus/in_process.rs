//! In-process bus (`bus.url = memory://`): a durable queue in the SQLite database.
//!
//! It mirrors the broker adapter's semantics so that switching `bus.url` changes where
//! messages wait, not how they behave: per-queue bindings, at-least-once delivery,
//! attempts counted per message, exponential backoff between retries (no head-of-line
//! blocking: a retrying message waits while later ones pass), dead letters with the error
//! and attempt count. Because the queue lives in the database, a message waiting for a
//! retry survives a crash or a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::db::Database;
use crate::with_pool;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    Binding, BusError, DeadLetter, DeliveryPolicy, Envelope, EventBus, EventHandler, HandlerError,
    Outcome, QueueCounts, headers,
};

/// `messaging.system` of the in-process bus (not one of OpenTelemetry's well-known
/// values: there is no broker).
const MESSAGING_SYSTEM: &str = "userhub_in_process";

pub struct InProcessBus {
    db: Database,
    bindings: Vec<Binding>,
    policy: DeliveryPolicy,
    wake: Arc<Notify>,
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    message_id: String,
    routing_key: String,
    payload: String,
    headers: String,
    occurred_at: DateTime<Utc>,
    attempts: i64,
}

impl ClaimedRow {
    fn into_envelope(self) -> Result<(Envelope, u32), BusError> {
        let headers: BTreeMap<String, String> =
            serde_json::from_str(&self.headers).unwrap_or_else(|error| {
                tracing::warn!(%error, "message headers are not a JSON object; delivering without them");
                BTreeMap::new()
            });
        let envelope = Envelope {
            id: parse_message_id(&self.message_id)?,
            routing_key: self.routing_key,
            payload: self.payload,
            headers,
            occurred_at: self.occurred_at,
        };
        Ok((envelope, u32::try_from(self.attempts).unwrap_or(u32::MAX)))
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl InProcessBus {
    pub fn new(db: Database, bindings: Vec<Binding>, policy: DeliveryPolicy) -> Self {
        Self {
            db,
            bindings,
            policy,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Claims the next due message of `binding`'s queue, hands it to `handler` and
    /// records the outcome. `None` when nothing is due. This is one step of
    /// [`EventBus::consume`]; tests call it directly to drive delivery step by step.
    pub async fn process_next(
        &self,
        binding: &Binding,
        handler: &dyn EventHandler,
    ) -> Result<Option<Outcome>, BusError> {
        let now = now_ms();
        // The claim doubles as a lease: if this process dies mid-delivery, the message
        // becomes due again once the handler timeout (plus a margin) has passed.
        let lease_until = now + millis(self.policy.handler_timeout) + 5_000;
        let claimed: Option<ClaimedRow> = with_pool!(&self.db, |pool| sqlx::query_as(
            "UPDATE bus_messages
                SET attempts = attempts + 1, available_at_ms = $1
              WHERE queue = $2 AND available_at_ms <= $3 AND message_id = (
                    SELECT message_id FROM bus_messages
                     WHERE queue = $2 AND available_at_ms <= $3
                     ORDER BY available_at_ms, message_id LIMIT 1)
          RETURNING message_id, routing_key, payload, headers, occurred_at, attempts",
        )
        .bind(lease_until)
        .bind(binding.queue)
        .bind(now)
        .fetch_optional(pool)
        .await)?;
        let Some(row) = claimed else {
            return Ok(None);
        };
        let (envelope, attempt) = row.into_envelope()?;
        let span = tracing::info_span!(
            "message",
            queue = binding.queue,
            message_id = %envelope.id,
            routing_key = %envelope.routing_key,
            request_id = envelope.header(headers::REQUEST_ID).unwrap_or("-"),
            attempt,
            otel.kind = "consumer",
            otel.name = %format!("process {}", binding.queue),
            messaging.system = MESSAGING_SYSTEM,
            messaging.operation.type = "process",
            messaging.destination.name = binding.queue,
            messaging.message.id = %envelope.id,
        );
        // The handling joins the trace of the request that emitted the event.
        crate::telemetry::set_parent_from(&span, &envelope.headers);
        self.deliver(binding, handler, envelope, attempt)
            .instrument(span)
            .await
            .map(Some)
    }

    async fn deliver(
        &self,
        binding: &Binding,
        handler: &dyn EventHandler,
        envelope: Envelope,
        attempt: u32,
    ) -> Result<Outcome, BusError> {
        let result = tokio::time::timeout(self.policy.handler_timeout, handler.handle(&envelope))
            .await
            .unwrap_or_else(|_| {
                Err(HandlerError::Transient(format!(
                    "handler timed out after {:?}",
                    self.policy.handler_timeout
                )))
            });
        let error = match result {
            Ok(()) => {
                self.acknowledge(binding, &envelope).await?;
                tracing::debug!("message acknowledged");
                return Ok(Outcome::Acked);
            }
            Err(HandlerError::Permanent(error)) => {
                tracing::warn!(%error, "message cannot be processed; dead-lettering it");
                error
            }
            Err(HandlerError::Transient(error)) if attempt < self.policy.max_attempts => {
                let delay = self.policy.backoff.delay(attempt);
                with_pool!(&self.db, |pool| sqlx::query(
                    "UPDATE bus_messages
                        SET available_at_ms = $1, last_error = $2
                      WHERE queue = $3 AND message_id = $4",
                )
                .bind(now_ms() + millis(delay))
                .bind(&error)
                .bind(binding.queue)
                .bind(envelope.id.to_string())
                .execute(pool)
                .await
                .map(drop))?;
                tracing::warn!(%error, retry_in_ms = millis(delay), "delivery failed; will retry");
                return Ok(Outcome::Retried { attempt, delay });
            }
            Err(HandlerError::Transient(error)) => {
                tracing::error!(%error, "delivery failed on the last attempt; dead-lettering it");
                error
            }
        };
        self.dead_letter(binding, &envelope, attempt, &error)
            .await?;
        handler.on_dead_letter(&envelope, &error).await;
        Ok(Outcome::DeadLettered { attempt })
    }

    /// Removes a handled message. An erasing one (see [`headers::ERASES_SUBJECT`])
    /// takes the queue's other messages and dead letters of its subject with it.
    async fn acknowledge(&self, binding: &Binding, envelope: &Envelope) -> Result<(), BusError> {
        let id = envelope.id.to_string();
        let erased = envelope.subject().filter(|_| envelope.erases_subject());
        with_pool!(&self.db, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM bus_messages WHERE queue = $1 AND message_id = $2")
                .bind(binding.queue)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            if let Some(subject) = erased {
                let queued =
                    sqlx::query("DELETE FROM bus_messages WHERE queue = $1 AND subject = $2")
                        .bind(binding.queue)
                        .bind(subject)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                let dead =
                    sqlx::query("DELETE FROM dead_letters WHERE queue = $1 AND subject = $2")
                        .bind(binding.queue)
                        .bind(subject)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                tracing::info!(
                    queued,
                    dead,
                    "subject erased from the queue and its dead letters"
                );
            }
            tx.commit().await
        })?;
        Ok(())
    }

    async fn dead_letter(
        &self,
        binding: &Binding,
        envelope: &Envelope,
        attempt: u32,
        error: &str,
    ) -> Result<(), BusError> {
        let headers = serde_json::to_string(&envelope.headers)
            .map_err(|e| BusError::Corrupt(e.to_string()))?;
        with_pool!(&self.db, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO dead_letters
                 (queue, message_id, routing_key, payload, headers, occurred_at, attempts, error,
                  subject)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(binding.queue)
            .bind(envelope.id.to_string())
            .bind(&envelope.routing_key)
            .bind(&envelope.payload)
            .bind(headers)
            .bind(envelope.occurred_at)
            .bind(i64::from(attempt))
            .bind(error)
            .bind(envelope.subject())
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM bus_messages WHERE queue = $1 AND message_id = $2")
                .bind(binding.queue)
                .bind(envelope.id.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        })?;
        Ok(())
    }

    /// Messages of `queue` not yet acknowledged or dead-lettered.
    pub async fn pending(&self, queue: &str) -> Result<u64, BusError> {
        let n: i64 = with_pool!(&self.db, |pool| sqlx::query_scalar(
            "SELECT COUNT(*) FROM bus_messages WHERE queue = $1"
        )
        .bind(queue)
        .fetch_one(pool)
        .await)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// How long until the earliest message of `queue` is due (zero if one is due now).
    async fn next_due_in(&self, queue: &str) -> Result<Option<Duration>, BusError> {
        let next: Option<i64> = with_pool!(&self.db, |pool| sqlx::query_scalar(
            "SELECT MIN(available_at_ms) FROM bus_messages WHERE queue = $1"
        )
        .bind(queue)
        .fetch_one(pool)
        .await)?;
        Ok(next.map(|at| Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0))))
    }
}

#[async_trait]
impl EventBus for InProcessBus {
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        let headers = serde_json::to_string(&envelope.headers)
            .map_err(|e| BusError::Corrupt(e.to_string()))?;
        with_pool!(&self.db, |pool| {
            let mut tx = pool.begin().await?;
            for binding in self
                .bindings
                .iter()
                .filter(|b| b.takes(&envelope.routing_key))
            {
                // Re-publishing the same event (the relay crashed before marking it sent)
                // must not queue it twice.
                sqlx::query(
                    "INSERT INTO bus_messages
                         (queue, message_id, routing_key, payload, headers, occurred_at,
                          available_at_ms, subject)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (queue, message_id) DO NOTHING",
                )
                .bind(binding.queue)
                .bind(envelope.id.to_string())
                .bind(&envelope.routing_key)
                .bind(&envelope.payload)
                .bind(&headers)
                .bind(envelope.occurred_at)
                .bind(now_ms())
                .bind(envelope.subject())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        })?;
        self.wake.notify_one();
        Ok(())
    }

    async fn consume(
        &self,
        binding: &Binding,
        handler: Arc<dyn EventHandler>,
        shutdown: CancellationToken,
    ) {
        tracing::info!(queue = binding.queue, "consumer started");
        let mut consecutive_errors = 0;
        while !shutdown.is_cancelled() {
            let wait = match self.process_next(binding, handler.as_ref()).await {
                Ok(Some(_)) => {
                    consecutive_errors = 0;
                    continue;
                }
                Ok(None) => {
                    consecutive_errors = 0;
                    match self.next_due_in(binding.queue).await {
                        Ok(Some(due)) => due.min(self.policy.poll_interval),
                        Ok(None) => self.policy.poll_interval,
                        Err(error) => {
                            tracing::warn!(%error, "could not read the next due time");
                            self.policy.poll_interval
                        }
                    }
                }
                Err(error) => {
                    consecutive_errors += 1;
                    let wait = self.policy.backoff.delay(consecutive_errors);
                    tracing::error!(%error, retry_in_ms = millis(wait), "consumer could not read its queue");
                    wait
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!(queue = binding.queue, "consumer stopped");
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(self.db.ping().await?)
    }

    fn messaging_system(&self) -> &'static str {
        MESSAGING_SYSTEM
    }

    async fn queue_counts(&self) -> Result<Vec<QueueCounts>, BusError> {
        let rows: Vec<(String, i64, i64)> = with_pool!(&self.db, |pool| sqlx::query_as(
            "SELECT queue, CAST(SUM(waiting) AS BIGINT), CAST(SUM(dead) AS BIGINT) FROM (
                 SELECT queue, COUNT(*) AS waiting, 0 AS dead FROM bus_messages GROUP BY queue
                 UNION ALL
                 SELECT queue, 0, COUNT(*) FROM dead_letters WHERE replayed_at IS NULL
                  GROUP BY queue
             ) AS counts GROUP BY queue"
        )
        .fetch_all(pool)
        .await)?;
        let mut counts: BTreeMap<String, QueueCounts> = self
            .bindings
            .iter()
            .map(|b| {
                let zero = QueueCounts {
                    queue: b.queue.to_owned(),
                    waiting: 0,
                    dead: 0,
                };
                (b.queue.to_owned(), zero)
            })
            .collect();
        for (queue, waiting, dead) in rows {
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            counts.insert(
                queue.clone(),
                QueueCounts {
                    queue,
                    waiting: count(waiting),
                    dead: count(dead),
                },
            );
        }
        Ok(counts.into_values().collect())
    }

    async fn dead_letters(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<DeadLetter>, BusError> {
        // Like a broker's listing, which cannot find an id it never issued: a page
        // after such an id is empty.
        let after: i64 = match after.map(str::parse) {
            None => 0,
            Some(Ok(id)) => id,
            Some(Err(_)) => return Ok(Vec::new()),
        };
        let rows: Vec<DeadLetterRow> = with_pool!(&self.db, |pool| sqlx::query_as(
            "SELECT id, queue, message_id, routing_key, payload, headers, attempts, error,
                    created_at
               FROM dead_letters
              WHERE replayed_at IS NULL AND id > $1
              ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(DeadLetter::try_from).collect()
    }

    async fn replay(&self, id: &str) -> Result<bool, BusError> {
        let Ok(id) = id.parse::<i64>() else {
            return Ok(false);
        };
        let replayed = with_pool!(&self.db, |pool| {
            let mut tx = pool.begin().await?;
            // Marking first makes a concurrent second replay of the same letter a no-op.
            let replayed = sqlx::query(
                "UPDATE dead_letters SET replayed_at = $2 WHERE id = $1 AND replayed_at IS NULL",
            )
            .bind(id)
            .bind(Utc::now())
            .execute(&mut *tx)
            .await?;
            if replayed.rows_affected() == 0 {
                false
            } else {
                sqlx::query(
                    "INSERT INTO bus_messages
                         (queue, message_id, routing_key, payload, headers, occurred_at,
                          available_at_ms, subject)
                     SELECT queue, message_id, routing_key, payload, headers, occurred_at, $2,
                            subject
                       FROM dead_letters WHERE id = $1
                     ON CONFLICT (queue, message_id) DO NOTHING",
                )
                .bind(id)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                true
            }
        });
        if replayed {
            self.wake.notify_one();
            tracing::info!(dead_letter = id, "dead letter replayed");
        }
        Ok(replayed)
    }
}

#[derive(sqlx::FromRow)]
struct DeadLetterRow {
    id: i64,
    queue: String,
    message_id: String,
    routing_key: String,
    payload: String,
    headers: String,
    attempts: i64,
    error: String,
    created_at: DateTime<Utc>,
}

fn parse_message_id(raw: &str) -> Result<uuid::Uuid, BusError> {
    uuid::Uuid::parse_str(raw)
        .map_err(|_| BusError::Corrupt(format!("message id {raw:?} is not a uuid")))
}

impl TryFrom<DeadLetterRow> for DeadLetter {
    type Error = BusError;

    fn try_from(row: DeadLetterRow) -> Result<Self, BusError> {
        Ok(Self {
            id: row.id.to_string(),
            queue: row.queue,
            message_id: parse_message_id(&row.message_id)?,
            routing_key: row.routing_key,
            payload: row.payload,
            headers: serde_json::from_str(&row.headers).unwrap_or_default(),
            attempts: u32::try_from(row.attempts).unwrap_or(0),
            error: row.error,
            dead_at: row.created_at,
        })
    }
}
