//! User repository port and its SQLite adapter.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use sqlx::types::uuid::fmt::Hyphenated;
use uuid::Uuid;

use super::domain::NewUser;
use crate::bus::{Envelope, headers};
use crate::events::{USER_CREATED, USER_CREATED_VERSION, UserCreated};
use crate::outbox;

/// A stored user, exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uuid: Uuid,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One page request of the user list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub limit: u32,
    /// Return users older than this one (the last uuid of the previous page).
    pub after: Option<Uuid>,
    /// Case-insensitive substring of the name or the e-mail.
    pub q: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateUserError {
    #[error("the e-mail address is already registered")]
    EmailTaken,
    #[error(transparent)]
    Storage(#[from] sqlx::Error),
}

#[async_trait]
pub trait UserRepository: Send + Sync {
    /// Stores the user and its `user.created` event in one transaction.
    async fn create(
        &self,
        user: &NewUser,
        event_headers: BTreeMap<String, String>,
    ) -> Result<User, CreateUserError>;
    async fn get(&self, uuid: Uuid) -> Result<Option<User>, sqlx::Error>;
    /// Newest first; at most `query.limit` users.
    async fn list(&self, query: &ListQuery) -> Result<Vec<User>, sqlx::Error>;
    async fn ping(&self) -> Result<(), sqlx::Error>;
}

/// The `user.created` envelope announcing `user`.
pub(super) fn user_created(
    user: &User,
    mut event_headers: BTreeMap<String, String>,
) -> Result<Envelope, sqlx::Error> {
    let event = UserCreated {
        uuid: user.uuid,
        name: user.name.clone(),
        email: user.email.clone(),
        created_at: user.created_at,
    };
    event_headers.insert(headers::EVENT_VERSION.into(), USER_CREATED_VERSION.into());
    let payload = serde_json::to_string(&event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    Ok(Envelope::new(USER_CREATED, payload, event_headers))
}

pub struct SqliteUserRepository {
    pool: SqlitePool,
}

impl SqliteUserRepository {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

#[derive(sqlx::FromRow)]
struct UserRow {
    uuid: Hyphenated,
    name: String,
    email: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> Self {
        Self {
            uuid: row.uuid.into_uuid(),
            name: row.name,
            email: row.email,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// True when `error` is the violation of the unique constraint named `constraint`.
/// PostgreSQL reports the name; SQLite only names the column, which we name alike.
pub(super) fn violates(error: &sqlx::Error, constraint: &str, column: &str) -> bool {
    match error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            db.constraint() == Some(constraint) || db.message().contains(column)
        }
        _ => false,
    }
}

#[async_trait]
impl UserRepository for SqliteUserRepository {
    #[tracing::instrument(name = "users.create", skip_all)]
    async fn create(
        &self,
        user: &NewUser,
        event_headers: BTreeMap<String, String>,
    ) -> Result<User, CreateUserError> {
        let mut tx = self.pool.begin().await?;
        let row: UserRow = sqlx::query_as(
            "INSERT INTO users (uuid, name, email, email_key, name_key)
             VALUES (?1, ?2, ?3, ?4, ?5)
             RETURNING uuid, name, email, created_at, updated_at",
        )
        .bind(Uuid::now_v7().hyphenated())
        .bind(user.name.as_str())
        .bind(user.email.as_str())
        .bind(user.email.key())
        .bind(user.name.as_str().to_lowercase())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            if violates(&e, "users_email_key", "users.email_key") {
                CreateUserError::EmailTaken
            } else {
                CreateUserError::Storage(e)
            }
        })?;
        let user = User::from(row);
        outbox::enqueue(&mut tx, &user_created(&user, event_headers)?).await?;
        tx.commit().await?;
        Ok(user)
    }

    #[tracing::instrument(name = "users.get", skip(self))]
    async fn get(&self, uuid: Uuid) -> Result<Option<User>, sqlx::Error> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT uuid, name, email, created_at, updated_at FROM users WHERE uuid = ?1",
        )
        .bind(uuid.hyphenated())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(User::from))
    }

    #[tracing::instrument(name = "users.list", skip(self, query), fields(limit = query.limit))]
    async fn list(&self, query: &ListQuery) -> Result<Vec<User>, sqlx::Error> {
        // UUIDv7 strings sort by creation time, so the uuid is the keyset. instr() on
        // the lower-cased columns is a plain substring test: no LIKE wildcards to escape.
        let rows: Vec<UserRow> = sqlx::query_as(
            "SELECT uuid, name, email, created_at, updated_at FROM users
              WHERE (?1 IS NULL OR uuid < ?1)
                AND (?2 IS NULL OR instr(name_key, ?2) > 0 OR instr(email_key, ?2) > 0)
              ORDER BY uuid DESC
              LIMIT ?3",
        )
        .bind(query.after.map(|u| u.hyphenated()))
        .bind(query.q.as_ref().map(|q| q.to_lowercase()))
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(User::from).collect())
    }

    async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
