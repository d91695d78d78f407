//! The user repository on SQLite or PostgreSQL: one SQL text per operation, run on
//! whichever pool `database.url` chose (`$N` placeholders; uuids through [`DbUuid`];
//! the user row and its event in one transaction).

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::domain::NewUser;
use super::repository::{CreateUserError, ListQuery, User, UserRepository, user_created};
use crate::db::{Database, DbUuid};
use crate::{outbox, with_pool, with_tx};

pub struct SqlUserRepository {
    db: Database,
}

impl SqlUserRepository {
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

#[derive(sqlx::FromRow)]
struct UserRow {
    uuid: DbUuid,
    name: String,
    email: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> Self {
        Self {
            uuid: row.uuid.into(),
            name: row.name,
            email: row.email,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// True when `error` is the violation of the unique constraint `users_email_key`.
/// PostgreSQL reports the constraint's name; SQLite only names the column, which the
/// schema names alike.
fn email_taken(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            db.constraint() == Some("users_email_key") || db.message().contains("users.email_key")
        }
        _ => false,
    }
}

/// The list query for `query`, with only the predicates it needs, so each shape gets
/// a plan of its own instead of one generic plan full of `$N IS NULL OR …`.
/// UUIDv7s sort by creation time (as text too), so the uuid is the keyset. `q` is a
/// substring of the lower-cased name or e-mail: `LIKE` with `%`, `_` and `\` escaped.
fn list_sql(query: &ListQuery) -> String {
    let mut conditions = Vec::new();
    let mut next = 1;
    if query.after.is_some() {
        conditions.push(format!("uuid < ${next}"));
        next += 1;
    }
    // Paging backwards: the users just newer than `before`, nearest first; the caller
    // puts them back newest first.
    let order = if query.before.is_some() {
        conditions.push(format!("uuid > ${next}"));
        next += 1;
        "ASC"
    } else {
        "DESC"
    };
    if query.q.is_some() {
        conditions.push(format!(
            "(name_key LIKE ${next} ESCAPE '\\' OR email_key LIKE ${next} ESCAPE '\\')"
        ));
        next += 1;
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    format!(
        "SELECT uuid, name, email, created_at, updated_at FROM users {filter}
          ORDER BY uuid {order} LIMIT ${next}"
    )
}

/// `%q%` for `LIKE … ESCAPE '\'`, lower-cased like the `*_key` columns.
fn contains_pattern(q: &str) -> String {
    let mut pattern = String::with_capacity(q.len() + 2);
    pattern.push('%');
    for c in q.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[async_trait]
impl UserRepository for SqlUserRepository {
    #[tracing::instrument(name = "users.create", skip_all)]
    async fn create(
        &self,
        user: &NewUser,
        event_headers: BTreeMap<String, String>,
    ) -> Result<User, CreateUserError> {
        let mut tx = self.db.begin().await?;
        let row: UserRow = with_tx!(&mut tx, |conn| sqlx::query_as(
            "INSERT INTO users (uuid, name, email, email_key, name_key)
             VALUES ($1, $2, $3, $4, $5)
             RETURNING uuid, name, email, created_at, updated_at"
        )
        .bind(DbUuid(Uuid::now_v7()))
        .bind(user.name.as_str())
        .bind(user.email.as_str())
        .bind(user.email.key())
        .bind(user.name.as_str().to_lowercase())
        .fetch_one(&mut **conn)
        .await)
        .map_err(|e| {
            if email_taken(&e) {
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
        let row: Option<UserRow> = with_pool!(&self.db, |pool| sqlx::query_as(
            "SELECT uuid, name, email, created_at, updated_at FROM users WHERE uuid = $1"
        )
        .bind(DbUuid(uuid))
        .fetch_optional(pool)
        .await)?;
        Ok(row.map(User::from))
    }

    #[tracing::instrument(name = "users.list", skip(self, query), fields(limit = query.limit))]
    async fn list(&self, query: &ListQuery) -> Result<Vec<User>, sqlx::Error> {
        let sql = list_sql(query);
        let pattern = query.q.as_deref().map(contains_pattern);
        let rows: Vec<UserRow> = with_pool!(&self.db, |pool| {
            // Built from fixed fragments only; every value is bound.
            let mut select = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()));
            if let Some(after) = query.after {
                select = select.bind(DbUuid(after));
            }
            if let Some(before) = query.before {
                select = select.bind(DbUuid(before));
            }
            if let Some(pattern) = &pattern {
                select = select.bind(pattern);
            }
            select.bind(i64::from(query.limit)).fetch_all(pool).await
        })?;
        let mut users: Vec<User> = rows.into_iter().map(User::from).collect();
        if query.before.is_some() {
            users.reverse();
        }
        Ok(users)
    }

    async fn ping(&self) -> Result<(), sqlx::Error> {
        self.db.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_query_has_only_the_predicates_it_needs() {
        let page = |after: bool, q: bool| ListQuery {
            limit: 10,
            after: after.then(Uuid::now_v7),
            before: None,
            q: q.then(|| "x".to_owned()),
        };
        let sql = list_sql(&page(false, false));
        assert!(!sql.contains("WHERE") && sql.ends_with("LIMIT $1"), "{sql}");
        let sql = list_sql(&page(true, true));
        assert!(
            sql.contains("uuid < $1") && sql.contains("LIKE $2"),
            "{sql}"
        );
        assert!(sql.ends_with("LIMIT $3"), "{sql}");
        let backwards = list_sql(&ListQuery {
            before: Some(Uuid::now_v7()),
            ..page(false, true)
        });
        assert!(
            backwards.contains("uuid > $1") && backwards.contains("ORDER BY uuid ASC LIMIT $3"),
            "{backwards}"
        );
        let sql = list_sql(&page(false, true));
        assert!(
            sql.contains("LIKE $1") && sql.ends_with("LIMIT $2"),
            "{sql}"
        );
    }

    #[test]
    fn like_wildcards_in_q_are_literal() {
        assert_eq!(contains_pattern("50%_Off\\"), "%50\\%\\_off\\\\%");
        assert_eq!(contains_pattern("JOÃO"), "%joão%");
    }
}
