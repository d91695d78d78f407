//! In-process bus (`bus.url = memory://`): a durable queue in the SQLite database.
//!
//! It mirrors the broker adapter's semantics so that switching `bus.url` changes where
//! messages wait, not how they behave: per-queue bindings, at-least-once delivery,
//! attempts counted per message, exponential backoff between retries (no head-of-line
//! blocking: a retrying message waits while later ones pass), dead letters with the error
//! and attempt count. Because the queue lives in the database, a message waiting for a
//! retry survives a crash or a restart.

mod dead_letters;
mod delivery;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    Binding, BusError, DeadLetter, DeliveryPolicy, Envelope, EventBus, EventHandler, Outcome,
    QueueCounts, ReplayFilter,
};
use crate::db::Database;
use crate::with_pool;

/// The shortest wait of a paused consumer before it asks its handler again.
const PAUSE_RECHECK: Duration = Duration::from_millis(100);

/// `messaging.system` of the in-process bus (not one of OpenTelemetry's well-known
/// values: there is no broker).
const MESSAGING_SYSTEM: &str = "userhub_in_process";

pub struct InProcessBus {
    db: Database,
    bindings: Vec<Binding>,
    policy: DeliveryPolicy,
    wake: Arc<Notify>,
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
        let claimed = self.claim(binding, 1).await?;
        if claimed.is_empty() {
            return Ok(None);
        }
        let outcomes = self.deliver_all(binding, handler, claimed).await?;
        Ok(outcomes.into_iter().next())
    }

    /// Claims up to `worker.concurrency` due messages and delivers them at once.
    /// Returns how many were claimed.
    async fn process_batch(
        &self,
        binding: &Binding,
        handler: &dyn EventHandler,
    ) -> Result<usize, BusError> {
        let claimed = self.claim(binding, self.policy.concurrency).await?;
        let count = claimed.len();
        if count > 0 {
            self.deliver_all(binding, handler, claimed).await?;
        }
        Ok(count)
    }

    /// Queues `envelopes` on every bound queue whose binding takes them, in one
    /// transaction, and wakes the consumers.
    async fn enqueue(&self, envelopes: &[&Envelope]) -> Result<(), BusError> {
        let now = now_ms();
        with_pool!(&self.db, |pool| {
            let mut tx = pool.begin().await?;
            for envelope in envelopes {
                let headers = serde_json::to_string(&envelope.headers)
                    .map_err(|e| BusError::Corrupt(e.to_string()))?;
                for binding in self
                    .bindings
                    .iter()
                    .filter(|b| b.takes(&envelope.routing_key))
                {
                    // Re-publishing the same event (the relay crashed before marking it
                    // sent) must not queue it twice.
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
                    .bind(now)
                    .bind(envelope.subject())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
            Ok::<(), BusError>(())
        })?;
        self.wake.notify_one();
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
        self.enqueue(&[envelope]).await
    }

    /// The whole batch in one transaction: all of it is accepted, or none.
    async fn publish_all(&self, batch: &[(Envelope, tracing::Span)]) -> (usize, Option<BusError>) {
        let envelopes: Vec<&Envelope> = batch.iter().map(|(envelope, _)| envelope).collect();
        match self.enqueue(&envelopes).await {
            Ok(()) => (batch.len(), None),
            Err(error) => (0, Some(error)),
        }
    }

    async fn consume(
        &self,
        binding: &Binding,
        handler: Arc<dyn EventHandler>,
        shutdown: CancellationToken,
    ) {
        tracing::info!(
            queue = binding.queue,
            concurrency = self.policy.concurrency,
            "consumer started"
        );
        let mut consecutive_errors = 0;
        let mut paused = false;
        while !shutdown.is_cancelled() {
            // A dependency known to be down: take nothing, and ask again later.
            if let Some(wait) = handler.pause().await {
                if !paused {
                    tracing::warn!(
                        queue = binding.queue,
                        "consumer paused: a dependency of the handler is down"
                    );
                    paused = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait.max(PAUSE_RECHECK)) => continue,
                }
            }
            if std::mem::take(&mut paused) {
                tracing::info!(queue = binding.queue, "consumer resumed");
            }
            let wait = match self.process_batch(binding, handler.as_ref()).await {
                Ok(claimed) if claimed > 0 => {
                    consecutive_errors = 0;
                    continue;
                }
                Ok(_) => {
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
        self.list_dead_letters(limit, after).await
    }

    async fn replay(&self, id: &str) -> Result<bool, BusError> {
        self.replay_dead_letter(id).await
    }

    async fn replay_all(&self, filter: &ReplayFilter) -> Result<u64, BusError> {
        self.replay_dead_letters(filter).await
    }

    async fn purge_dead_letters(
        &self,
        died_before: chrono::DateTime<Utc>,
        batch: u32,
    ) -> Result<u64, BusError> {
        Ok(self
            .db
            .delete_in_batches(
                "dead_letters",
                "id",
                "created_at < $1",
                crate::db::DbTime(died_before),
                batch,
            )
            .await?)
    }
}

fn parse_message_id(raw: &str) -> Result<uuid::Uuid, BusError> {
    uuid::Uuid::parse_str(raw)
        .map_err(|_| BusError::Corrupt(format!("message id {raw:?} is not a uuid")))
}
