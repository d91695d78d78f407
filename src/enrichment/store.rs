//! Profile store port and its SQLite adapter.
//!
//! Every write is conditional on the user's version, so events applied out of order
//! (retries, redeliveries, replays) leave the newest state: a profile is written only
//! over an older version of the user, over a failed attempt at the same version, or over
//! the same version derived from another event (a re-enrichment); never over a
//! tombstone. A tombstone (status `deleted`) holds no personal data and keeps a late,
//! stale event from bringing an erased user back.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::SqlitePool;
use sqlx::types::uuid::fmt::Hyphenated;
use uuid::Uuid;

use super::domain::{EnrichedProfile, EnrichmentStatus, Write};
use super::group::{GroupCommit, Pending};
use crate::db::DbTime;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("profile store failed: {0}")]
    Backend(String),
    /// The store is known to be down (its circuit breaker is open).
    #[error("profile store unavailable: {0}")]
    Unavailable(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Backend(error.to_string())
    }
}

#[async_trait]
pub trait ProfileStore: Send + Sync {
    /// Stores a completed profile, unless the store holds a newer version of the user,
    /// this event's profile already, or a tombstone.
    async fn upsert(&self, profile: &EnrichedProfile) -> Result<Write, StoreError>;
    /// Records that enrichment of this version was given up on, unless a completed
    /// profile of it (or a newer version, or a tombstone) is stored.
    async fn mark_failed(&self, profile: &EnrichedProfile) -> Result<Write, StoreError>;
    /// Replaces what is stored of the user with a tombstone at `version` (the
    /// deletion's), unless a newer version is stored.
    async fn erase(
        &self,
        uuid: Uuid,
        version: u64,
        source_event_id: Uuid,
    ) -> Result<Write, StoreError>;
    /// The user's profile; `None` while pending and once erased.
    async fn get(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError>;
    /// Creates what the store needs (indexes), idempotently; writes do it too before
    /// their first use. For `userhub migrate`.
    async fn prepare(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Status of a tombstone in the stores.
pub(super) const DELETED: &str = "deleted";

pub(super) fn status_of(text: &str) -> Result<Option<EnrichmentStatus>, StoreError> {
    match text {
        "completed" => Ok(Some(EnrichmentStatus::Completed)),
        "failed" => Ok(Some(EnrichmentStatus::Failed)),
        DELETED => Ok(None),
        other => Err(StoreError::Backend(format!("unknown status {other:?}"))),
    }
}

fn version_of(version: i64) -> u64 {
    u64::try_from(version).unwrap_or(0)
}

fn version_param(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

fn written(rows: u64) -> Write {
    if rows == 0 {
        Write::Stale
    } else {
        Write::Applied
    }
}

pub struct SqliteProfileStore {
    pool: SqlitePool,
    /// Profile upserts are written in groups: see [`GroupCommit`].
    group: GroupCommit<EnrichedProfile>,
}

impl SqliteProfileStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            group: GroupCommit::default(),
        }
    }
}

const UPSERT: &str = "INSERT INTO enriched_profiles
         (uuid, name, email, linkedin, github, status, error, source_event_id, version,
          enriched_at, updated_at)
     VALUES (?1, ?2, ?3, ?4, ?5, 'completed', NULL, ?6, ?7, ?8, ?8)
     ON CONFLICT (uuid) DO UPDATE SET
         name = excluded.name, email = excluded.email,
         linkedin = excluded.linkedin, github = excluded.github,
         status = 'completed', error = NULL,
         source_event_id = excluded.source_event_id, version = excluded.version,
         enriched_at = excluded.enriched_at, updated_at = excluded.updated_at
     WHERE enriched_profiles.status <> 'deleted'
       AND (enriched_profiles.version < excluded.version
            OR (enriched_profiles.version = excluded.version
                AND NOT (enriched_profiles.status = 'completed'
                         AND enriched_profiles.source_event_id
                             = excluded.source_event_id)))";

async fn upsert_on<'c, E>(executor: E, p: &EnrichedProfile) -> Result<Write, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let result = sqlx::query(UPSERT)
        .bind(p.uuid.hyphenated())
        .bind(&p.name)
        .bind(&p.email)
        .bind(&p.linkedin)
        .bind(&p.github)
        .bind(p.source_event_id.hyphenated())
        .bind(version_param(p.version))
        .bind(DbTime(p.enriched_at.unwrap_or(p.updated_at)))
        .execute(executor)
        .await?;
    Ok(written(result.rows_affected()))
}

impl SqliteProfileStore {
    /// Writes `group` in one transaction and answers each waiting upsert. If that
    /// fails, each is written on its own, so one bad profile fails alone.
    async fn write_group(&self, group: Vec<Pending<EnrichedProfile>>) {
        let together = async {
            let mut tx = self.pool.begin().await?;
            let mut writes = Vec::with_capacity(group.len());
            for pending in &group {
                writes.push(upsert_on(&mut *tx, &pending.item).await?);
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(writes)
        };
        match together.await {
            Ok(writes) => {
                for (pending, write) in group.into_iter().zip(writes) {
                    pending.answer(Ok(write));
                }
            }
            Err(error) if group.len() == 1 => {
                if let Some(pending) = group.into_iter().next() {
                    pending.answer(Err(error.into()));
                }
            }
            Err(error) => {
                tracing::warn!(%error, profiles = group.len(), "group write failed; writing each profile on its own");
                for pending in group {
                    let write = upsert_on(&self.pool, &pending.item).await;
                    pending.answer(write.map_err(StoreError::from));
                }
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct ProfileRow {
    uuid: Hyphenated,
    name: Option<String>,
    email: Option<String>,
    linkedin: Option<String>,
    github: Option<String>,
    status: String,
    error: Option<String>,
    source_event_id: Hyphenated,
    version: i64,
    enriched_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

impl ProfileRow {
    /// `None` for a tombstone.
    fn into_profile(self) -> Result<Option<EnrichedProfile>, StoreError> {
        let Some(status) = status_of(&self.status)? else {
            return Ok(None);
        };
        Ok(Some(EnrichedProfile {
            uuid: self.uuid.into_uuid(),
            name: self.name.unwrap_or_default(),
            email: self.email.unwrap_or_default(),
            linkedin: self.linkedin,
            github: self.github,
            status,
            error: self.error,
            source_event_id: self.source_event_id.into_uuid(),
            version: version_of(self.version),
            enriched_at: self.enriched_at,
            updated_at: self.updated_at,
        }))
    }
}

#[async_trait]
impl ProfileStore for SqliteProfileStore {
    #[tracing::instrument(name = "profiles.upsert", skip_all, fields(otel.kind = "client", otel.name = "INSERT enriched_profiles", db.system.name = "sqlite", db.operation.name = "INSERT", db.collection.name = "enriched_profiles"))]
    async fn upsert(&self, p: &EnrichedProfile) -> Result<Write, StoreError> {
        self.group
            .submit(p.clone(), |group| self.write_group(group))
            .await
    }

    #[tracing::instrument(name = "profiles.mark_failed", skip_all, fields(otel.kind = "client", otel.name = "INSERT enriched_profiles", db.system.name = "sqlite", db.operation.name = "INSERT", db.collection.name = "enriched_profiles"))]
    async fn mark_failed(&self, p: &EnrichedProfile) -> Result<Write, StoreError> {
        let result = sqlx::query(
            "INSERT INTO enriched_profiles
                 (uuid, name, email, status, error, source_event_id, version)
             VALUES (?1, ?2, ?3, 'failed', ?4, ?5, ?6)
             ON CONFLICT (uuid) DO UPDATE SET
                 status = 'failed', error = excluded.error,
                 source_event_id = excluded.source_event_id, version = excluded.version,
                 updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE enriched_profiles.status <> 'deleted'
               AND (enriched_profiles.version < excluded.version
                    OR (enriched_profiles.version = excluded.version
                        AND enriched_profiles.status <> 'completed'))",
        )
        .bind(p.uuid.hyphenated())
        .bind(&p.name)
        .bind(&p.email)
        .bind(&p.error)
        .bind(p.source_event_id.hyphenated())
        .bind(version_param(p.version))
        .execute(&self.pool)
        .await?;
        Ok(written(result.rows_affected()))
    }

    #[tracing::instrument(name = "profiles.erase", skip_all, fields(otel.kind = "client", otel.name = "INSERT enriched_profiles", db.system.name = "sqlite", db.operation.name = "INSERT", db.collection.name = "enriched_profiles"))]
    async fn erase(
        &self,
        uuid: Uuid,
        version: u64,
        source_event_id: Uuid,
    ) -> Result<Write, StoreError> {
        let result = sqlx::query(
            "INSERT INTO enriched_profiles (uuid, status, source_event_id, version)
             VALUES (?1, 'deleted', ?2, ?3)
             ON CONFLICT (uuid) DO UPDATE SET
                 name = NULL, email = NULL, linkedin = NULL, github = NULL, error = NULL,
                 enriched_at = NULL, status = 'deleted',
                 source_event_id = excluded.source_event_id, version = excluded.version,
                 updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE enriched_profiles.version < excluded.version
                OR (enriched_profiles.version = excluded.version
                    AND enriched_profiles.status <> 'deleted')",
        )
        .bind(uuid.hyphenated())
        .bind(source_event_id.hyphenated())
        .bind(version_param(version))
        .execute(&self.pool)
        .await?;
        Ok(written(result.rows_affected()))
    }

    #[tracing::instrument(name = "profiles.get", skip_all, fields(otel.kind = "client", otel.name = "SELECT enriched_profiles", db.system.name = "sqlite", db.operation.name = "SELECT", db.collection.name = "enriched_profiles"))]
    async fn get(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        let row: Option<ProfileRow> = sqlx::query_as(
            "SELECT uuid, name, email, linkedin, github, status, error, source_event_id,
                    version, enriched_at, updated_at
               FROM enriched_profiles WHERE uuid = ?1",
        )
        .bind(uuid.hyphenated())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(ProfileRow::into_profile).transpose()?.flatten())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
