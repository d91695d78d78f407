//! Delivering the in-process bus's messages: claims under a lease with a fencing token,
//! handling (several at once), and settling each outcome only under its own token.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use tracing::Instrument;

use super::{InProcessBus, MESSAGING_SYSTEM, millis, now_ms, parse_message_id};
use crate::bus::{Binding, BusError, Envelope, EventHandler, HandlerError, Outcome, headers};
use crate::db::Database;
use crate::with_pool;

/// The claim of up to `$4` due messages. The lease pushes `available_at_ms` forward, so
/// a message whose worker died comes back once it runs out; `lease` is the fencing
/// token that settling must present.
const CLAIM_SQLITE: &str = "UPDATE bus_messages
    SET attempts = attempts + 1, available_at_ms = $1, lease = lease + 1
  WHERE queue = $2 AND available_at_ms <= $3 AND message_id IN (
        SELECT message_id FROM bus_messages
         WHERE queue = $2 AND available_at_ms <= $3
         ORDER BY available_at_ms, message_id LIMIT $4)
RETURNING message_id, routing_key, payload, headers, occurred_at, attempts, lease";

/// The same on PostgreSQL, where consumers in other processes claim at the same time:
/// `SKIP LOCKED` hands each one other rows instead of making them wait for, then miss,
/// the rows a first one took. The rows are picked once, in a materialized CTE: as an
/// `IN (subquery)`, the planner may run the subquery again per row and claim more than
/// `$4` (which the caller would never hear of).
const CLAIM_POSTGRES: &str = "WITH picked AS MATERIALIZED (
        SELECT message_id FROM bus_messages
         WHERE queue = $2 AND available_at_ms <= $3
         ORDER BY available_at_ms, message_id LIMIT $4
         FOR UPDATE SKIP LOCKED)
UPDATE bus_messages AS m
    SET attempts = m.attempts + 1, available_at_ms = $1, lease = m.lease + 1
   FROM picked
  WHERE m.queue = $2 AND m.message_id = picked.message_id
RETURNING m.message_id, m.routing_key, m.payload, m.headers, m.occurred_at, m.attempts,
          m.lease";

/// Removes a message from its queue (acknowledged, or moved to the dead letters), only
/// while the given lease still holds it: a worker whose lease ran out settles nothing.
const DELETE_UNDER_LEASE: &str =
    "DELETE FROM bus_messages WHERE queue = $1 AND message_id = $2 AND lease = $3";

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    message_id: String,
    routing_key: String,
    payload: String,
    headers: String,
    occurred_at: DateTime<Utc>,
    attempts: i64,
    lease: i64,
}

/// A message this consumer holds until its lease runs out.
pub(super) struct Claimed {
    pub(super) envelope: Envelope,
    /// This delivery, counting from 1.
    pub(super) attempt: u32,
    /// The fencing token of this claim.
    pub(super) lease: i64,
}

impl TryFrom<ClaimedRow> for Claimed {
    type Error = BusError;

    fn try_from(row: ClaimedRow) -> Result<Self, BusError> {
        let headers: BTreeMap<String, String> =
            serde_json::from_str(&row.headers).unwrap_or_else(|error| {
                tracing::warn!(%error, "message headers are not a JSON object; delivering without them");
                BTreeMap::new()
            });
        Ok(Self {
            envelope: Envelope {
                id: parse_message_id(&row.message_id)?,
                routing_key: row.routing_key,
                payload: row.payload,
                headers,
                occurred_at: row.occurred_at,
            },
            attempt: u32::try_from(row.attempts).unwrap_or(u32::MAX),
            lease: row.lease,
        })
    }
}

impl InProcessBus {
    /// Claims up to `max` due messages of `binding`'s queue.
    pub(super) async fn claim(
        &self,
        binding: &Binding,
        max: usize,
    ) -> Result<Vec<Claimed>, BusError> {
        let now = now_ms();
        let lease_until = now + millis(self.policy.handler_timeout) + 5_000;
        let sql = match &self.db {
            Database::Sqlite(_) => CLAIM_SQLITE,
            Database::Postgres(_) => CLAIM_POSTGRES,
        };
        let rows: Vec<ClaimedRow> = with_pool!(&self.db, |pool| sqlx::query_as(sql)
            .bind(lease_until)
            .bind(binding.queue)
            .bind(now)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(Claimed::try_from).collect()
    }

    /// Hands each claimed message to `handler`, all at once, and settles every outcome:
    /// the successes in one transaction, the rest one by one.
    pub(super) async fn deliver_all(
        &self,
        binding: &Binding,
        handler: &dyn EventHandler,
        claimed: Vec<Claimed>,
    ) -> Result<Vec<Outcome>, BusError> {
        let handled = join_all(claimed.into_iter().map(|claimed| {
            let span = delivery_span(binding, &claimed);
            async move {
                let result = self.handle(handler, &claimed.envelope).await;
                (claimed, result, tracing::Span::current())
            }
            .instrument(span)
        }))
        .await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for (claimed, result, span) in handled {
            match result {
                Ok(()) => done.push(claimed),
                Err(error) => failed.push((claimed, error, span)),
            }
        }
        let mut outcomes = self.acknowledge(binding, &done).await?;
        for (claimed, error, span) in failed {
            let outcome = self
                .settle_failure(binding, handler, &claimed, error)
                .instrument(span)
                .await?;
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn handle(
        &self,
        handler: &dyn EventHandler,
        envelope: &Envelope,
    ) -> Result<(), HandlerError> {
        tokio::time::timeout(self.policy.handler_timeout, handler.handle(envelope))
            .await
            .unwrap_or_else(|_| {
                Err(HandlerError::Transient(format!(
                    "handler timed out after {:?}",
                    self.policy.handler_timeout
                )))
            })
    }

    /// Removes handled messages, in one transaction, each only under its own lease. An
    /// erasing one (see [`headers::ERASES_SUBJECT`]) takes the queue's other messages
    /// and dead letters of its subject with it.
    async fn acknowledge(
        &self,
        binding: &Binding,
        done: &[Claimed],
    ) -> Result<Vec<Outcome>, BusError> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let outcomes = with_pool!(&self.db, |pool| {
            let mut tx = pool.begin().await?;
            let mut outcomes = Vec::with_capacity(done.len());
            for claimed in done {
                let envelope = &claimed.envelope;
                let deleted = sqlx::query(DELETE_UNDER_LEASE)
                    .bind(binding.queue)
                    .bind(envelope.id.to_string())
                    .bind(claimed.lease)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if deleted == 0 {
                    tracing::warn!(message_id = %envelope.id, "lease lost before the acknowledgement; the message's new holder settles it");
                    outcomes.push(Outcome::LeaseLost);
                    continue;
                }
                outcomes.push(Outcome::Acked);
                if let Some(subject) = envelope.subject().filter(|_| envelope.erases_subject()) {
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
            }
            tx.commit().await?;
            outcomes
        });
        Ok(outcomes)
    }

    /// Records a failed delivery under its lease: put back (a dependency is down),
    /// retried after a backoff, or dead-lettered.
    async fn settle_failure(
        &self,
        binding: &Binding,
        handler: &dyn EventHandler,
        claimed: &Claimed,
        error: HandlerError,
    ) -> Result<Outcome, BusError> {
        let (envelope, attempt) = (&claimed.envelope, claimed.attempt);
        let id = envelope.id.to_string();
        let error = match error {
            HandlerError::Unavailable(error) => {
                // Not the message's fault: the claim's attempt is given back.
                let updated = with_pool!(&self.db, |pool| sqlx::query(
                    "UPDATE bus_messages
                        SET attempts = attempts - 1, available_at_ms = $1
                      WHERE queue = $2 AND message_id = $3 AND lease = $4",
                )
                .bind(now_ms())
                .bind(binding.queue)
                .bind(&id)
                .bind(claimed.lease)
                .execute(pool)
                .await
                .map(|done| done.rows_affected()))?;
                tracing::info!(%error, "a dependency is down; message put back");
                return Ok(if updated == 0 {
                    Outcome::LeaseLost
                } else {
                    Outcome::Requeued
                });
            }
            HandlerError::Permanent(error) => {
                tracing::warn!(%error, "message cannot be processed; dead-lettering it");
                error
            }
            HandlerError::Transient(error) if attempt < self.policy.max_attempts => {
                let delay = self.policy.backoff.delay(attempt);
                let updated = with_pool!(&self.db, |pool| sqlx::query(
                    "UPDATE bus_messages
                        SET available_at_ms = $1, last_error = $2
                      WHERE queue = $3 AND message_id = $4 AND lease = $5",
                )
                .bind(now_ms() + millis(delay))
                .bind(&error)
                .bind(binding.queue)
                .bind(&id)
                .bind(claimed.lease)
                .execute(pool)
                .await
                .map(|done| done.rows_affected()))?;
                if updated == 0 {
                    tracing::warn!(%error, "delivery failed after its lease ran out; the message's new holder settles it");
                    return Ok(Outcome::LeaseLost);
                }
                tracing::warn!(%error, retry_in_ms = millis(delay), "delivery failed; will retry");
                return Ok(Outcome::Retried { attempt, delay });
            }
            HandlerError::Transient(error) => {
                tracing::error!(%error, "delivery failed on the last attempt; dead-lettering it");
                error
            }
        };
        if !self.dead_letter(binding, claimed, &error).await? {
            tracing::warn!(%error, "lease lost before dead-lettering; the message's new holder settles it");
            return Ok(Outcome::LeaseLost);
        }
        handler.on_dead_letter(envelope, &error).await;
        Ok(Outcome::DeadLettered { attempt })
    }

    /// Moves the message to the dead letters, if this claim still holds it.
    async fn dead_letter(
        &self,
        binding: &Binding,
        claimed: &Claimed,
        error: &str,
    ) -> Result<bool, BusError> {
        let envelope = &claimed.envelope;
        let headers = serde_json::to_string(&envelope.headers)
            .map_err(|e| BusError::Corrupt(e.to_string()))?;
        let moved = with_pool!(&self.db, |pool| {
            let mut tx = pool.begin().await?;
            let deleted = sqlx::query(DELETE_UNDER_LEASE)
                .bind(binding.queue)
                .bind(envelope.id.to_string())
                .bind(claimed.lease)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if deleted == 0 {
                false
            } else {
                sqlx::query(
                    "INSERT INTO dead_letters
                         (queue, message_id, routing_key, payload, headers, occurred_at,
                          attempts, error, subject)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(binding.queue)
                .bind(envelope.id.to_string())
                .bind(&envelope.routing_key)
                .bind(&envelope.payload)
                .bind(headers)
                .bind(envelope.occurred_at)
                .bind(i64::from(claimed.attempt))
                .bind(error)
                .bind(envelope.subject())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                true
            }
        });
        Ok(moved)
    }
}

/// One span per delivery, joining the trace of the request that emitted the event.
fn delivery_span(binding: &Binding, claimed: &Claimed) -> tracing::Span {
    let envelope = &claimed.envelope;
    let span = tracing::info_span!(
        "message",
        queue = binding.queue,
        message_id = %envelope.id,
        routing_key = %envelope.routing_key,
        request_id = envelope.header(headers::REQUEST_ID).unwrap_or("-"),
        attempt = claimed.attempt,
        otel.kind = "consumer",
        otel.name = %format!("process {}", binding.queue),
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "process",
        messaging.destination.name = binding.queue,
        messaging.message.id = %envelope.id,
    );
    crate::telemetry::set_parent_from(&span, &envelope.headers);
    span
}
