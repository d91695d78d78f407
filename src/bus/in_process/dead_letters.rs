//! The in-process bus's dead letters: listing, replaying one, replaying many.

use chrono::{DateTime, Utc};

use super::{InProcessBus, now_ms, parse_message_id};
use crate::bus::{BusError, DeadLetter, ReplayFilter};
use crate::db::{Database, DbTime};
use crate::with_pool;

impl InProcessBus {
    pub(super) async fn list_dead_letters(
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

    pub(super) async fn replay_dead_letter(&self, id: &str) -> Result<bool, BusError> {
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
            .bind(DbTime::now())
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

    /// Replays every dead letter `filter` selects, set-based (O(n) in the database, no
    /// message in memory). Each is marked replayed and queued again in one atomic step,
    /// so a listing or another replay running meanwhile sees it either before or after,
    /// never twice or not at all.
    pub(super) async fn replay_dead_letters(&self, filter: &ReplayFilter) -> Result<u64, BusError> {
        let pattern = filter.error_contains.as_deref().map(contains_pattern);
        let queue = filter.queue.as_deref();
        let (now, stamp) = (now_ms(), DbTime::now());
        let replayed = match &self.db {
            // One statement: the rows it marks are the rows it queues.
            Database::Postgres(pool) => sqlx::query(
                "WITH replayed AS (
                         UPDATE dead_letters SET replayed_at = $1
                          WHERE replayed_at IS NULL
                            AND ($3::text IS NULL OR queue = $3)
                            AND ($4::text IS NULL OR error LIKE $4 ESCAPE '\\')
                         RETURNING queue, message_id, routing_key, payload, headers,
                                   occurred_at, subject)
                     INSERT INTO bus_messages
                         (queue, message_id, routing_key, payload, headers, occurred_at,
                          available_at_ms, subject)
                     SELECT queue, message_id, routing_key, payload, headers, occurred_at,
                            $2, subject
                       FROM replayed
                     ON CONFLICT (queue, message_id) DO NOTHING",
            )
            .bind(stamp)
            .bind(now)
            .bind(queue)
            .bind(pattern.as_deref())
            .execute(pool)
            .await?
            .rows_affected(),
            // Two statements in one write transaction, which SQLite runs alone.
            Database::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let queued = sqlx::query(
                    "INSERT INTO bus_messages
                         (queue, message_id, routing_key, payload, headers, occurred_at,
                          available_at_ms, subject)
                     SELECT queue, message_id, routing_key, payload, headers, occurred_at,
                            $1, subject
                       FROM dead_letters
                      WHERE replayed_at IS NULL
                        AND ($2 IS NULL OR queue = $2)
                        AND ($3 IS NULL OR error LIKE $3 ESCAPE '\\')
                     ON CONFLICT (queue, message_id) DO NOTHING",
                )
                .bind(now)
                .bind(queue)
                .bind(pattern.as_deref())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                sqlx::query(
                    "UPDATE dead_letters SET replayed_at = $1
                      WHERE replayed_at IS NULL
                        AND ($2 IS NULL OR queue = $2)
                        AND ($3 IS NULL OR error LIKE $3 ESCAPE '\\')",
                )
                .bind(stamp)
                .bind(queue)
                .bind(pattern.as_deref())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                queued
            }
        };
        if replayed > 0 {
            self.wake.notify_one();
        }
        tracing::info!(replayed, ?filter, "dead letters replayed");
        Ok(replayed)
    }
}

/// `%text%` for `LIKE … ESCAPE '\'`.
fn contains_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
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
