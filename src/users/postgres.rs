//! PostgreSQL adapter of the user repository.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::domain::NewUser;
use super::repository::{CreateUserError, ListQuery, User, UserRepository, user_created, violates};
use crate::outbox;

pub struct PgUserRepository {
    pool: PgPool,
}

impl PgUserRepository {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[derive(sqlx::FromRow)]
struct UserRow {
    uuid: Uuid,
    name: String,
    email: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> Self {
        Self {
            uuid: row.uuid,
            name: row.name,
            email: row.email,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

#[async_trait]
impl UserRepository for PgUserRepository {
    #[tracing::instrument(name = "users.create", skip_all)]
    async fn create(
        &self,
        user: &NewUser,
        event_headers: BTreeMap<String, String>,
    ) -> Result<User, CreateUserError> {
        let mut tx = self.pool.begin().await?;
        let row: UserRow = sqlx::query_as(
            "INSERT INTO users (uuid, name, email, email_key, name_key)
             VALUES ($1, $2, $3, $4, $5)
             RETURNING uuid, name, email, created_at, updated_at",
        )
        .bind(Uuid::now_v7())
        .bind(user.name.as_str())
        .bind(user.email.as_str())
        .bind(user.email.key())
        .bind(user.name.as_str().to_lowercase())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            if violates(&e, "users_email_key", "users_email_key") {
                CreateUserError::EmailTaken
            } else {
                CreateUserError::Storage(e)
            }
        })?;
        let user = User::from(row);
        outbox::enqueue_postgres(&mut tx, &user_created(&user, event_headers)?).await?;
        tx.commit().await?;
        Ok(user)
    }

    #[tracing::instrument(name = "users.get", skip(self))]
    async fn get(&self, uuid: Uuid) -> Result<Option<User>, sqlx::Error> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT uuid, name, email, created_at, updated_at FROM users WHERE uuid = $1",
        )
        .bind(uuid)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(User::from))
    }

    #[tracing::instrument(name = "users.list", skip(self, query), fields(limit = query.limit))]
    async fn list(&self, query: &ListQuery) -> Result<Vec<User>, sqlx::Error> {
        let rows: Vec<UserRow> = sqlx::query_as(
            "SELECT uuid, name, email, created_at, updated_at FROM users
              WHERE ($1::uuid IS NULL OR uuid < $1)
                AND ($2::text IS NULL OR strpos(name_key, $2) > 0 OR strpos(email_key, $2) > 0)
              ORDER BY uuid DESC
              LIMIT $3",
        )
        .bind(query.after)
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
