//! Profile store port and its SQLite adapter.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::SqlitePool;
use sqlx::types::uuid::fmt::Hyphenated;
use uuid::Uuid;

use super::domain::{EnrichedProfile, EnrichmentStatus};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("profile store failed: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Backend(error.to_string())
    }
}

#[async_trait]
pub trait ProfileStore: Send + Sync {
    /// Stores a completed profile, replacing what was there (idempotent per user), and
    /// returns it as stored (a redelivery keeps the first `enriched_at`).
    async fn upsert(&self, profile: &EnrichedProfile) -> Result<EnrichedProfile, StoreError>;
    /// Records that enrichment was given up on, unless the user is already enriched.
    async fn mark_failed(&self, profile: &EnrichedProfile) -> Result<(), StoreError>;
    async fn get(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
}

pub struct SqliteProfileStore {
    pool: SqlitePool,
}

impl SqliteProfileStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

#[derive(sqlx::FromRow)]
struct ProfileRow {
    uuid: Hyphenated,
    name: String,
    email: String,
    linkedin: Option<String>,
    github: Option<String>,
    status: String,
    error: Option<String>,
    source_event_id: Hyphenated,
    enriched_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<ProfileRow> for EnrichedProfile {
    type Error = StoreError;

    fn try_from(row: ProfileRow) -> Result<Self, StoreError> {
        let status = match row.status.as_str() {
            "completed" => EnrichmentStatus::Completed,
            "failed" => EnrichmentStatus::Failed,
            other => return Err(StoreError::Backend(format!("unknown status {other:?}"))),
        };
        Ok(Self {
            uuid: row.uuid.into_uuid(),
            name: row.name,
            email: row.email,
            linkedin: row.linkedin,
            github: row.github,
            status,
            error: row.error,
            source_event_id: row.source_event_id.into_uuid(),
            enriched_at: row.enriched_at,
            updated_at: row.updated_at,
        })
    }
}

#[async_trait]
impl ProfileStore for SqliteProfileStore {
    #[tracing::instrument(name = "profiles.upsert", skip_all, fields(otel.kind = "client", otel.name = "INSERT enriched_profiles", db.system.name = "sqlite", db.operation.name = "INSERT", db.collection.name = "enriched_profiles"))]
    async fn upsert(&self, p: &EnrichedProfile) -> Result<EnrichedProfile, StoreError> {
        // A redelivered event re-derives the same profile; the first enrichment time
        // is kept so redelivery is invisible to readers.
        let row: ProfileRow = sqlx::query_as(
            "INSERT INTO enriched_profiles
                 (uuid, name, email, linkedin, github, status, error, source_event_id, enriched_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'completed', NULL, ?6, ?7)
             ON CONFLICT (uuid) DO UPDATE SET
                 name = excluded.name, email = excluded.email,
                 linkedin = excluded.linkedin, github = excluded.github,
                 status = 'completed', error = NULL,
                 source_event_id = excluded.source_event_id,
                 enriched_at = CASE WHEN enriched_profiles.status = 'completed'
                                    THEN enriched_profiles.enriched_at
                                    ELSE excluded.enriched_at END,
                 updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             RETURNING uuid, name, email, linkedin, github, status, error, source_event_id,
                       enriched_at, updated_at",
        )
        .bind(p.uuid.hyphenated())
        .bind(&p.name)
        .bind(&p.email)
        .bind(&p.linkedin)
        .bind(&p.github)
        .bind(p.source_event_id.hyphenated())
        .bind(p.enriched_at)
        .fetch_one(&self.pool)
        .await?;
        EnrichedProfile::try_from(row)
    }

    #[tracing::instrument(name = "profiles.mark_failed", skip_all, fields(otel.kind = "client", otel.name = "INSERT enriched_profiles", db.system.name = "sqlite", db.operation.name = "INSERT", db.collection.name = "enriched_profiles"))]
    async fn mark_failed(&self, p: &EnrichedProfile) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO enriched_profiles
                 (uuid, name, email, status, error, source_event_id)
             VALUES (?1, ?2, ?3, 'failed', ?4, ?5)
             ON CONFLICT (uuid) DO UPDATE SET
                 status = 'failed', error = excluded.error,
                 source_event_id = excluded.source_event_id,
                 updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE enriched_profiles.status <> 'completed'",
        )
        .bind(p.uuid.hyphenated())
        .bind(&p.name)
        .bind(&p.email)
        .bind(&p.error)
        .bind(p.source_event_id.hyphenated())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    #[tracing::instrument(name = "profiles.get", skip_all, fields(otel.kind = "client", otel.name = "SELECT enriched_profiles", db.system.name = "sqlite", db.operation.name = "SELECT", db.collection.name = "enriched_profiles"))]
    async fn get(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        let row: Option<ProfileRow> = sqlx::query_as(
            "SELECT uuid, name, email, linkedin, github, status, error, source_event_id,
                    enriched_at, updated_at
               FROM enriched_profiles WHERE uuid = ?1",
        )
        .bind(uuid.hyphenated())
        .fetch_optional(&self.pool)
        .await?;
        row.map(EnrichedProfile::try_from).transpose()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
