//! Transactional outbox: events are written with the change they announce, in the same
//! transaction, and a relay hands them to the bus afterwards.
//!
//! A 201 therefore means the user AND its event are durable; a bus outage only delays
//! delivery. The relay marks a row sent only after the bus has accepted it, so delivery
//! is at-least-once and consumers de-duplicate by event id.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use sqlx::postgres::PgListener;
use sqlx::query::Query;
use sqlx::{Encode, Type};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::{Envelope, EventBus, headers};
use crate::db::{Database, DbTime, DbUuid, Tx};
use crate::resilience::Backoff;
use crate::with_tx;

/// PostgreSQL channel on which relays in other processes are woken (see
/// [`OutboxSignal::notifying`]).
pub const NOTIFY_CHANNEL: &str = "userhub_outbox";

/// Wakes the relays right after a commit that wrote outbox rows, so delivery does not
/// wait for the next poll: the relay of this process, and with
/// [`OutboxSignal::notifying`] the relays of other processes too.
#[derive(Debug, Clone, Default)]
pub struct OutboxSignal {
    local: Arc<Notify>,
    /// Wakes the task that sends the `NOTIFY` for other processes, if there is one.
    remote: Option<Arc<Notify>>,
}

impl OutboxSignal {
    /// A signal that also wakes the relays of other processes (those `LISTEN`ing on
    /// [`NOTIFY_CHANNEL`]), for a process that writes outbox rows but runs no relay.
    ///
    /// The `NOTIFY` is sent after the commit, by a task of its own, rather than by the
    /// committing transaction: PostgreSQL serialises the commits of every transaction
    /// that notifies, under one lock held through the commit's WAL flush, which took
    /// the create statement from 12,114 to 4,935 tps (pgbench, 16 clients). Commits
    /// that come while a `NOTIFY` is on its way share the next one, so there is at most
    /// one in flight per process. A lost one (the database unreachable just then) only
    /// leaves the rows to the relays' next poll. Ends with `shutdown`.
    pub fn notifying(pool: sqlx::PgPool, shutdown: CancellationToken) -> Self {
        let remote = Arc::new(Notify::new());
        let wake = remote.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    // A wake-up that comes during the send is stored, as one permit.
                    () = wake.notified() => {}
                }
                // A failure is logged there.
                let _ = notify_relays(&pool).await;
            }
        });
        Self {
            local: Arc::default(),
            remote: Some(remote),
        }
    }

    pub fn notify(&self) {
        self.local.notify_one();
        if let Some(remote) = &self.remote {
            remote.notify_one();
        }
    }
}

/// Wakes the relays `LISTEN`ing on [`NOTIFY_CHANNEL`], in a transaction of its own. It
/// writes nothing else, so PostgreSQL does not wait for its commit to reach the disk.
/// A failure is logged: the relays will find the rows at their next poll.
pub async fn notify_relays(pool: &sqlx::PgPool) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(pool)
        .await
        .map(drop)
        .inspect_err(
            |error| tracing::warn!(%error, "cannot NOTIFY the outbox relays; they will poll"),
        )
}

/// The statement that adds an event to the outbox, `$1` to `$6` bound by [`bind`]. A
/// change on PostgreSQL can write its event in the same statement: `WITH change AS
/// (INSERT … $7 …)` followed by this (see the users repository's create).
pub const INSERT: &str =
    "INSERT INTO outbox (event_id, routing_key, payload, headers, occurred_at, subject)
     VALUES ($1, $2, $3, $4, $5, $6)";

/// Binds `envelope` to `$1` to `$6` of [`INSERT`].
pub fn bind<'q, DB>(
    query: Query<'q, DB, <DB as sqlx::Database>::Arguments>,
    envelope: &Envelope,
) -> sqlx::Result<Query<'q, DB, <DB as sqlx::Database>::Arguments>>
where
    DB: sqlx::Database,
    for<'t> DbUuid: Encode<'t, DB> + Type<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> DateTime<Utc>: Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
{
    let headers =
        serde_json::to_string(&envelope.headers).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    Ok(query
        .bind(DbUuid(envelope.id))
        .bind(envelope.routing_key.as_str())
        .bind(envelope.payload.as_str())
        .bind(headers.as_str())
        .bind(envelope.occurred_at)
        .bind(envelope.subject()))
}

/// Adds `envelope` to the outbox inside the caller's transaction. Wake the relays with
/// [`OutboxSignal::notify`] once it has committed.
pub async fn enqueue(tx: &mut Tx, envelope: &Envelope) -> sqlx::Result<()> {
    with_tx!(tx, |conn| bind(sqlx::query(INSERT), envelope)?
        .execute(&mut **conn)
        .await
        .map(drop))
}

/// Inside the caller's transaction, erases `subject` from the outbox: its unsent
/// events are dropped (what they announce no longer exists), and the payloads of the
/// sent ones still retained are replaced by `{"uuid": subject, "erased": true}`, so no
/// personal data stays behind. Their ids and routing keys remain, for the record.
pub async fn erase_subject(tx: &mut Tx, subject: &str) -> sqlx::Result<()> {
    let erased = serde_json::json!({ "uuid": subject, "erased": true }).to_string();
    with_tx!(tx, |conn| {
        sqlx::query("DELETE FROM outbox WHERE subject = $1 AND sent_at IS NULL")
            .bind(subject)
            .execute(&mut **conn)
            .await?;
        sqlx::query("UPDATE outbox SET payload = $2 WHERE subject = $1")
            .bind(subject)
            .bind(&erased)
            .execute(&mut **conn)
            .await
            .map(drop)
    })
}

/// Deletes the rows sent before `sent_before` (what they announced is delivered; they
/// only hold personal data now), `batch` per statement. Rows never sent are kept
/// whatever their age. Returns how many.
pub async fn purge_sent(
    db: &Database,
    sent_before: DateTime<Utc>,
    batch: u32,
) -> sqlx::Result<u64> {
    db.delete_in_batches(
        "outbox",
        "id",
        "sent_at IS NOT NULL AND sent_at < $1",
        DbTime(sent_before),
        batch,
    )
    .await
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    event_id: DbUuid,
    routing_key: String,
    payload: String,
    headers: String,
    occurred_at: DateTime<Utc>,
}

impl OutboxRow {
    fn into_envelope(self) -> Envelope {
        Envelope {
            id: self.event_id.into(),
            routing_key: self.routing_key,
            payload: self.payload,
            // A row we wrote ourselves; unreadable headers only lose correlation.
            headers: serde_json::from_str(&self.headers).unwrap_or_default(),
            occurred_at: self.occurred_at,
        }
    }
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
    db: Database,
    bus: Arc<dyn EventBus>,
    signal: OutboxSignal,
    batch_size: u32,
    poll_interval: Duration,
    backoff: Backoff,
}

impl OutboxRelay {
    pub fn new(
        db: Database,
        bus: Arc<dyn EventBus>,
        signal: OutboxSignal,
        batch_size: u32,
        poll_interval: Duration,
    ) -> Self {
        Self {
            db,
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
        match &self.db {
            Database::Sqlite(pool) => self.relay_batch_sqlite(pool).await,
            Database::Postgres(pool) => self.relay_batch_postgres(pool).await,
        }
    }

    /// Prepares one row for publishing: a span in the trace stored with it (the request
    /// that wrote the event), so the publish shows up in that request's trace, and the
    /// envelope carrying that span's context, so the consumer's span is its child, as
    /// OpenTelemetry's messaging conventions have it.
    fn prepare(&self, row: OutboxRow) -> (Envelope, tracing::Span) {
        let mut envelope = row.into_envelope();
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            otel.name = %format!("send {}", envelope.routing_key),
            otel.status_code = tracing::field::Empty,
            messaging.system = self.bus.messaging_system(),
            messaging.operation.type = "send",
            messaging.destination.name = %envelope.routing_key,
            messaging.message.id = %envelope.id,
            request_id = envelope.header(headers::REQUEST_ID).unwrap_or("-"),
        );
        crate::telemetry::set_parent_from(&span, &envelope.headers);
        crate::telemetry::inject_span_context(&span, &mut envelope.headers);
        (envelope, span)
    }

    /// Publishes `rows` in one batch (see [`EventBus::publish_all`]) and returns the ids
    /// of the first rows the bus accepted, with the error that stopped the rest.
    async fn publish(&self, rows: Vec<OutboxRow>) -> (Vec<i64>, Option<RelayError>) {
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        let batch: Vec<_> = rows.into_iter().map(|row| self.prepare(row)).collect();
        let (accepted, error) = self.bus.publish_all(&batch).await;
        for (envelope, span) in &batch[..accepted] {
            span.in_scope(|| tracing::debug!(event_id = %envelope.id, routing_key = %envelope.routing_key, "event relayed"));
        }
        let failure = error.map(|source| {
            let (envelope, span) = &batch[accepted];
            span.record("otel.status_code", "error");
            RelayError::Publish {
                event_id: envelope.id,
                source,
            }
        });
        (ids[..accepted].to_vec(), failure)
    }

    /// SQLite has one writer at a time, so a plain read in id order is enough. What was
    /// published is marked in one statement (with the in-process bus, a batch costs two
    /// write transactions, not two per event).
    async fn relay_batch_sqlite(&self, pool: &sqlx::SqlitePool) -> Result<usize, RelayError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, event_id, routing_key, payload, headers, occurred_at
               FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT ?1",
        )
        .bind(i64::from(self.batch_size))
        .fetch_all(pool)
        .await?;
        let (sent, failure) = self.publish(rows).await;
        if !sent.is_empty() {
            sqlx::query(
                "UPDATE outbox SET sent_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                                   updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                  WHERE id IN (SELECT value FROM json_each(?1))",
            )
            .bind(serde_json::to_string(&sent).unwrap_or_default())
            .execute(pool)
            .await?;
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(sent.len()),
        }
    }

    /// Claims the batch with `FOR UPDATE SKIP LOCKED`: relays in other processes take
    /// the next rows instead of waiting or publishing these twice. Rows are marked in the
    /// same transaction, which commits what was published even when a later publish
    /// fails.
    async fn relay_batch_postgres(&self, pool: &sqlx::PgPool) -> Result<usize, RelayError> {
        let mut tx = pool.begin().await?;
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, event_id, routing_key, payload, headers, occurred_at
               FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1
                FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(self.batch_size))
        .fetch_all(&mut *tx)
        .await?;
        let (sent, failure) = self.publish(rows).await;
        if !sent.is_empty() {
            sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
                .bind(&sent)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        match failure {
            Some(error) => Err(error),
            None => Ok(sent.len()),
        }
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
        const SQL: &str = "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL";
        let n: i64 = match &self.db {
            Database::Sqlite(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await?,
            Database::Postgres(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await?,
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// How long the oldest unsent row has waited; `None` when every row is sent.
    /// Reads one row through the partial index of unsent rows.
    pub async fn oldest_unsent_age(&self) -> Result<Option<Duration>, sqlx::Error> {
        const SQL: &str =
            "SELECT occurred_at FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT 1";
        let oldest: Option<DateTime<Utc>> = match &self.db {
            Database::Sqlite(pool) => sqlx::query_scalar(SQL).fetch_optional(pool).await?,
            Database::Postgres(pool) => sqlx::query_scalar(SQL).fetch_optional(pool).await?,
        };
        Ok(oldest.map(|at| (Utc::now() - at).to_std().unwrap_or(Duration::ZERO)))
    }

    /// On PostgreSQL, a listener for commits made by other processes.
    async fn listen(&self) -> Option<PgListener> {
        let Database::Postgres(pool) = &self.db else {
            return None;
        };
        let mut listener = PgListener::connect_with(pool)
            .await
            .inspect_err(|error| tracing::warn!(%error, "no LISTEN connection; relying on polls"))
            .ok()?;
        listener
            .listen(NOTIFY_CHANNEL)
            .await
            .inspect_err(|error| tracing::warn!(%error, "LISTEN failed; relying on polls"))
            .ok()?;
        Some(listener)
    }

    /// Relays until `shutdown` is cancelled, between batches.
    pub async fn run(&self, shutdown: CancellationToken) {
        tracing::info!("outbox relay started");
        let mut listener = self.listen().await;
        // After the LISTEN connection fails, it is left alone for a backoff (then
        // `recv` reconnects it); polls cover the gap.
        let mut listener_failures = 0;
        let mut listener_rests_until = tokio::time::Instant::now();
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
            let mut listening =
                consecutive_errors == 0 && tokio::time::Instant::now() >= listener_rests_until;
            if listening && listener.is_none() && matches!(self.db, Database::Postgres(_)) {
                // No LISTEN connection yet (the database was down at start): try again.
                listener = self.listen().await;
                if listener.is_none() {
                    listener_failures += 1;
                    listener_rests_until =
                        tokio::time::Instant::now() + self.backoff.delay(listener_failures);
                    listening = false;
                }
            }
            // Whether a notification came, or the error of the listener.
            let notified = tokio::select! {
                () = shutdown.cancelled() => break,
                // After a failure, new writes must not cut the backoff short.
                () = self.signal.local.notified(), if consecutive_errors == 0 => Ok(false),
                notified = next_notification(listener.as_mut()), if listening => notified.map(|()| true),
                () = tokio::time::sleep(wait) => Ok(false),
            };
            let notified = notified.and_then(|notified| {
                let waiting = self.take_waiting_wakeups(listener.as_mut().filter(|_| listening))?;
                Ok(notified || waiting)
            });
            match notified {
                Ok(true) => listener_failures = 0,
                Ok(false) => {}
                Err(error) => {
                    listener_failures += 1;
                    let rest = self.backoff.delay(listener_failures);
                    tracing::warn!(%error, retry_in_ms = rest.as_millis() as u64, "outbox LISTEN connection lost; polling meanwhile");
                    listener_rests_until = tokio::time::Instant::now() + rest;
                }
            }
        }
        tracing::info!("outbox relay stopped");
    }

    /// Takes the wake-ups that have already arrived: the signal's permit and the
    /// notifications already received. Their commits are done, so the batch about to
    /// run reads their rows; left waiting, each would cost a batch of its own, mostly
    /// empty (under a steady load of creates, about one a commit). Returns whether a
    /// notification was taken, or the error of a listener that failed meanwhile.
    fn take_waiting_wakeups(&self, listener: Option<&mut PgListener>) -> sqlx::Result<bool> {
        // Polled once: a stored permit is taken; otherwise nothing is registered.
        let _ = self.signal.local.notified().now_or_never();
        let Some(listener) = listener else {
            return Ok(false);
        };
        let mut taken = false;
        // Ready at once only for what the connection has already received; a
        // connection found lost is reconnected by the next `recv`.
        while let Some(Some(_)) = listener.try_recv().now_or_never().transpose()? {
            taken = true;
        }
        Ok(taken)
    }
}

/// The next notification; while there is no listener, never. A lost connection is
/// reconnected by the next call (`PgListener::recv`).
async fn next_notification(listener: Option<&mut PgListener>) -> sqlx::Result<()> {
    match listener {
        Some(listener) => listener.recv().await.map(drop),
        None => std::future::pending().await,
    }
}
