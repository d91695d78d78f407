//! The user repository on SQLite or PostgreSQL: one SQL text per operation, run on
//! whichever pool `database.url` chose (`$N` placeholders; uuids and timestamps through
//! [`DbUuid`] and [`DbTime`]). Every change writes its event in the same transaction;
//! a create on PostgreSQL, in the same statement (see [`CREATE_USER_AND_EVENT`]).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::domain::{NewUser, UserPatch};
use super::repository::{
    ChangeUserError, CreateUserError, Created, Expected, IdempotencyKey, ListQuery, Selection,
    User, UserRepository, user_created, user_deleted, user_updated,
};
use crate::db::{Database, DbTime, DbUuid, Tx};
use crate::events::REASON_REENRICH;
use crate::{bus, outbox, with_pool, with_tx};

/// How long an idempotency key answers with its first response.
pub const IDEMPOTENCY_KEY_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

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
    version: i64,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> Self {
        Self {
            uuid: row.uuid.into(),
            name: row.name,
            email: row.email,
            created_at: row.created_at,
            updated_at: row.updated_at,
            version: u64::try_from(row.version).unwrap_or(0),
        }
    }
}

/// True when `error` violates a unique constraint of `table` (PostgreSQL names the
/// constraint; SQLite names the table's columns in its message).
fn violates(error: &sqlx::Error, constraint: &str, sqlite_columns: &str) -> bool {
    match error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            db.constraint() == Some(constraint) || db.message().contains(sqlite_columns)
        }
        _ => false,
    }
}

/// The database enforces e-mail uniqueness (`users_email_key`); the code does not
/// race it with a SELECT first.
fn email_taken(error: &sqlx::Error) -> bool {
    violates(error, "users_email_key", "users.email_key")
}

/// The error of a create whose INSERT failed with `error`.
fn create_error(error: sqlx::Error) -> CreateUserError {
    if email_taken(&error) {
        CreateUserError::EmailTaken
    } else {
        CreateUserError::Storage(error)
    }
}

fn key_taken(error: &sqlx::Error) -> bool {
    violates(error, "idempotency_keys_pkey", "idempotency_keys.scope")
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// The list query for `query`, with only the predicates it needs, so each shape gets
/// a plan of its own instead of one generic plan full of `$N IS NULL OR …`.
/// UUIDv7s sort by creation time (as text too), so the uuid is the keyset. `q` is a
/// substring of the lower-cased name or e-mail: `LIKE` with `%`, `_` and `\` escaped,
/// which PostgreSQL answers from trigram indexes.
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
    format!(
        "SELECT uuid, name, email, created_at, updated_at, version FROM users {}
          ORDER BY uuid {order} LIMIT ${next}",
        where_clause(&conditions)
    )
}

fn where_clause(conditions: &[String]) -> String {
    if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    }
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

/// The filter of a [`Selection`] (after a keyset condition on `$1` when `after`),
/// with its placeholders numbered from `next`.
fn selection_sql(selection: &Selection, after: bool) -> (Vec<String>, usize) {
    let mut conditions = Vec::new();
    let mut next = 1;
    if after {
        conditions.push(format!("uuid < ${next}"));
        next += 1;
    }
    match selection {
        Selection::All => {}
        Selection::Since(_) => {
            conditions.push(format!("updated_at >= ${next}"));
            next += 1;
        }
        Selection::Some(uuids) => {
            let list: Vec<String> = (0..uuids.len()).map(|i| format!("${}", next + i)).collect();
            // An empty list selects nothing.
            conditions.push(if list.is_empty() {
                "1 = 0".to_owned()
            } else {
                format!("uuid IN ({})", list.join(", "))
            });
            next += uuids.len();
        }
    }
    (conditions, next)
}

/// Binds the values of [`selection_sql`] to `$query`, in the same order.
macro_rules! bind_selection {
    ($query:expr, $selection:expr, $after:expr) => {{
        let mut query = $query;
        if let Some(after) = $after {
            query = query.bind(DbUuid(after));
        }
        match $selection {
            Selection::All => {}
            Selection::Since(since) => query = query.bind(DbTime(*since)),
            Selection::Some(uuids) => {
                for uuid in uuids {
                    query = query.bind(DbUuid(*uuid));
                }
            }
        }
        query
    }};
}

const SELECT_USER: &str =
    "SELECT uuid, name, email, created_at, updated_at, version FROM users WHERE uuid = $1";
const SELECT_USER_FOR_UPDATE: &str = "SELECT uuid, name, email, created_at, updated_at, version \
                                      FROM users WHERE uuid = $1 FOR UPDATE";

/// Reads the user inside `tx`, locked until the transaction ends. SQLite has no row
/// locks and needs none: its write transactions run one at a time.
async fn locked(tx: &mut Tx, uuid: Uuid) -> Result<Option<User>, sqlx::Error> {
    let sql = match tx {
        Tx::Sqlite(_) => SELECT_USER,
        Tx::Postgres(_) => SELECT_USER_FOR_UPDATE,
    };
    let row: Option<UserRow> = with_tx!(tx, |conn| sqlx::query_as(sql)
        .bind(DbUuid(uuid))
        .fetch_optional(&mut **conn)
        .await)?;
    Ok(row.map(User::from))
}

/// The current user, if a change with `expected` may apply to it.
async fn expected_user(
    tx: &mut Tx,
    uuid: Uuid,
    expected: &Expected,
) -> Result<User, ChangeUserError> {
    let user = locked(tx, uuid).await?.ok_or(ChangeUserError::NotFound)?;
    if !user.is_expected(expected) {
        return Err(ChangeUserError::VersionMismatch {
            current: user.version,
        });
    }
    Ok(user)
}

/// A new user and its `user.created` event in one statement on PostgreSQL: a
/// data-modifying `WITH` writes the user, then the outbox's own INSERT the event. The
/// statement is its own transaction, so it writes both rows or neither, in one round
/// trip where BEGIN, two INSERTs and COMMIT take four. (SQLite has no INSERT inside
/// `WITH`, and its statements do not cross a network.)
static CREATE_USER_AND_EVENT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH new_user AS (
             INSERT INTO users (uuid, name, email, email_key, name_key, created_at, updated_at)
             VALUES ($7, $8, $9, $10, $11, $12, $12))
         {}",
        outbox::INSERT
    )
});

impl SqlUserRepository {
    /// One attempt at a create; see [`UserRepository::create`].
    async fn try_create(
        &self,
        new: &NewUser,
        event_headers: BTreeMap<String, String>,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Created, CreateUserError> {
        if let (Database::Postgres(pool), None) = (&self.db, idempotency) {
            return create_in_one_statement(pool, new, event_headers).await;
        }
        let mut tx = self.db.begin().await?;
        if let Some(key) = idempotency {
            // A use of the key older than its lifetime is forgotten.
            with_tx!(&mut tx, |conn| sqlx::query(
                "DELETE FROM idempotency_keys
                  WHERE scope = $1 AND key = $2 AND expires_at_ms <= $3"
            )
            .bind(&key.scope)
            .bind(&key.key)
            .bind(now_ms())
            .execute(&mut **conn)
            .await
            .map(drop))?;
            let earlier: Option<(String, String)> = with_tx!(&mut tx, |conn| sqlx::query_as(
                "SELECT fingerprint, response FROM idempotency_keys
                  WHERE scope = $1 AND key = $2"
            )
            .bind(&key.scope)
            .bind(&key.key)
            .fetch_optional(&mut **conn)
            .await)?;
            if let Some((fingerprint, response)) = earlier {
                if fingerprint != key.fingerprint {
                    return Err(CreateUserError::KeyReused);
                }
                let user = serde_json::from_str(&response)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                return Ok(Created::Replayed(user));
            }
        }
        let row: UserRow = with_tx!(&mut tx, |conn| sqlx::query_as(
            "INSERT INTO users (uuid, name, email, email_key, name_key)
             VALUES ($1, $2, $3, $4, $5)
             RETURNING uuid, name, email, created_at, updated_at, version"
        )
        .bind(DbUuid(Uuid::now_v7()))
        .bind(new.name.as_str())
        .bind(new.email.as_str())
        .bind(new.email.key())
        .bind(new.name.as_str().to_lowercase())
        .fetch_one(&mut **conn)
        .await)
        .map_err(create_error)?;
        let user = User::from(row);
        outbox::enqueue(&mut tx, &user_created(&user, event_headers)?).await?;
        if let Some(key) = idempotency {
            let response =
                serde_json::to_string(&user).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            let lifetime = i64::try_from(IDEMPOTENCY_KEY_LIFETIME.as_millis()).unwrap_or(i64::MAX);
            with_tx!(&mut tx, |conn| sqlx::query(
                "INSERT INTO idempotency_keys
                     (scope, key, fingerprint, subject, response, expires_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)"
            )
            .bind(&key.scope)
            .bind(&key.key)
            .bind(&key.fingerprint)
            .bind(user.uuid.to_string())
            .bind(&response)
            .bind(now_ms().saturating_add(lifetime))
            .execute(&mut **conn)
            .await
            .map(drop))?;
        }
        tx.commit().await?;
        Ok(Created::New(user))
    }
}

/// See [`CREATE_USER_AND_EVENT`]. The user's uuid and timestamps are chosen here, for
/// the event that carries them.
async fn create_in_one_statement(
    pool: &PgPool,
    new: &NewUser,
    event_headers: BTreeMap<String, String>,
) -> Result<Created, CreateUserError> {
    let now = DbTime::now();
    let user = User {
        uuid: Uuid::now_v7(),
        name: new.name.as_str().to_owned(),
        email: new.email.as_str().to_owned(),
        created_at: now.0,
        updated_at: now.0,
        version: 1,
    };
    let event = user_created(&user, event_headers)?;
    outbox::bind(sqlx::query(CREATE_USER_AND_EVENT.as_str()), &event)?
        .bind(DbUuid(user.uuid))
        .bind(user.name.as_str())
        .bind(user.email.as_str())
        .bind(new.email.key())
        .bind(user.name.to_lowercase())
        .bind(now)
        .execute(pool)
        .await
        .map_err(create_error)?;
    Ok(Created::New(user))
}

#[async_trait]
impl UserRepository for SqlUserRepository {
    #[tracing::instrument(name = "users.create", skip_all, fields(otel.kind = "client", otel.name = "INSERT users", db.system.name = self.db.system_name(), db.operation.name = "INSERT", db.collection.name = "users"))]
    async fn create(
        &self,
        new: &NewUser,
        event_headers: BTreeMap<String, String>,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Created, CreateUserError> {
        match self
            .try_create(new, event_headers.clone(), idempotency)
            .await
        {
            // The same key in two concurrent requests (PostgreSQL; SQLite runs them one
            // after the other): the loser's transaction is rolled back, user and event
            // included, and a second attempt answers with what the winner created.
            Err(CreateUserError::Storage(e)) if key_taken(&e) => {
                self.try_create(new, event_headers, idempotency).await
            }
            other => other,
        }
    }

    #[tracing::instrument(name = "users.update", skip_all, fields(user = %uuid, otel.kind = "client", otel.name = "UPDATE users", db.system.name = self.db.system_name(), db.operation.name = "UPDATE", db.collection.name = "users"))]
    async fn update(
        &self,
        uuid: Uuid,
        patch: &UserPatch,
        expected: &Expected,
        event_headers: BTreeMap<String, String>,
    ) -> Result<User, ChangeUserError> {
        let mut tx = self.db.begin().await?;
        let current = expected_user(&mut tx, uuid, expected).await?;
        let name = patch
            .name
            .as_ref()
            .map_or(current.name.as_str(), |n| n.as_str());
        let email = patch.email.as_ref();
        if name == current.name && email.is_none_or(|e| e.as_str() == current.email) {
            return Ok(current);
        }
        let (email, email_key) = match email {
            Some(email) => (email.as_str().to_owned(), email.key()),
            None => (current.email.clone(), current.email.to_lowercase()),
        };
        let row: UserRow = with_tx!(&mut tx, |conn| sqlx::query_as(
            "UPDATE users
                SET name = $2, email = $3, email_key = $4, name_key = $5,
                    version = version + 1, updated_at = $6
              WHERE uuid = $1
          RETURNING uuid, name, email, created_at, updated_at, version"
        )
        .bind(DbUuid(uuid))
        .bind(name)
        .bind(&email)
        .bind(&email_key)
        .bind(name.to_lowercase())
        .bind(DbTime::now())
        .fetch_one(&mut **conn)
        .await)
        .map_err(|e| {
            if email_taken(&e) {
                ChangeUserError::EmailTaken
            } else {
                ChangeUserError::Storage(e)
            }
        })?;
        let user = User::from(row);
        outbox::enqueue(&mut tx, &user_updated(&user, event_headers)?).await?;
        tx.commit().await?;
        Ok(user)
    }

    #[tracing::instrument(name = "users.delete", skip_all, fields(user = %uuid, otel.kind = "client", otel.name = "DELETE users", db.system.name = self.db.system_name(), db.operation.name = "DELETE", db.collection.name = "users"))]
    async fn delete(
        &self,
        uuid: Uuid,
        expected: &Expected,
        event_headers: BTreeMap<String, String>,
    ) -> Result<u64, ChangeUserError> {
        let mut tx = self.db.begin().await?;
        let current = expected_user(&mut tx, uuid, expected).await?;
        let subject = uuid.to_string();
        with_tx!(&mut tx, |conn| {
            sqlx::query("DELETE FROM users WHERE uuid = $1")
                .bind(DbUuid(uuid))
                .execute(&mut **conn)
                .await?;
            // The responses kept for idempotency keys hold the name and e-mail.
            sqlx::query("DELETE FROM idempotency_keys WHERE subject = $1")
                .bind(&subject)
                .execute(&mut **conn)
                .await
                .map(drop)
        })?;
        outbox::erase_subject(&mut tx, &subject).await?;
        let version = current.version + 1;
        outbox::enqueue(&mut tx, &user_deleted(uuid, version, event_headers)?).await?;
        tx.commit().await?;
        Ok(version)
    }

    #[tracing::instrument(name = "users.get", skip(self), fields(otel.kind = "client", otel.name = "SELECT users", db.system.name = self.db.system_name(), db.operation.name = "SELECT", db.collection.name = "users"))]
    async fn get(&self, uuid: Uuid) -> Result<Option<User>, sqlx::Error> {
        let row: Option<UserRow> = with_pool!(&self.db, |pool| sqlx::query_as(SELECT_USER)
            .bind(DbUuid(uuid))
            .fetch_optional(pool)
            .await)?;
        Ok(row.map(User::from))
    }

    #[tracing::instrument(name = "users.list", skip(self, query), fields(limit = query.limit, otel.kind = "client", otel.name = "SELECT users", db.system.name = self.db.system_name(), db.operation.name = "SELECT", db.collection.name = "users"))]
    async fn list(&self, query: &ListQuery) -> Result<Vec<User>, sqlx::Error> {
        let sql = list_sql(query);
        let pattern = query.q.as_deref().map(contains_pattern);
        let rows: Vec<UserRow> = with_pool!(&self.db, |pool| {
            // Built from fixed fragments only; every value is bound. A search is planned
            // for its own term each time (an unnamed statement, never a generic plan):
            // whether the trigram indexes or the keyset order is cheaper depends on
            // how rare the term is, which a generic plan cannot know.
            let mut select =
                sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).persistent(query.q.is_none());
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

    #[tracing::instrument(name = "users.republish", skip_all, fields(otel.kind = "client", otel.name = "SELECT users", db.system.name = self.db.system_name(), db.operation.name = "SELECT", db.collection.name = "users"))]
    async fn republish_page(
        &self,
        selection: &Selection,
        after: Option<Uuid>,
        limit: u32,
        mut event_headers: BTreeMap<String, String>,
    ) -> Result<(Option<Uuid>, u64), sqlx::Error> {
        event_headers.insert(bus::headers::REASON.into(), REASON_REENRICH.into());
        let (conditions, next) = selection_sql(selection, after.is_some());
        let sql = format!(
            "SELECT uuid, name, email, created_at, updated_at, version FROM users {}
              ORDER BY uuid DESC LIMIT ${next}",
            where_clause(&conditions)
        );
        let mut tx = self.db.begin().await?;
        let rows: Vec<UserRow> = with_tx!(&mut tx, |conn| {
            let select = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()));
            bind_selection!(select, selection, after)
                .bind(i64::from(limit))
                .fetch_all(&mut **conn)
                .await
        })?;
        let mut last = None;
        let count = rows.len() as u64;
        for row in rows {
            let user = User::from(row);
            last = Some(user.uuid);
            outbox::enqueue(&mut tx, &user_updated(&user, event_headers.clone())?).await?;
        }
        tx.commit().await?;
        Ok((last.filter(|_| count == u64::from(limit)), count))
    }

    async fn count(&self, selection: &Selection) -> Result<u64, sqlx::Error> {
        let (conditions, _) = selection_sql(selection, false);
        let sql = format!("SELECT COUNT(*) FROM users {}", where_clause(&conditions));
        let n: i64 = with_pool!(&self.db, |pool| {
            let select = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.as_str()));
            bind_selection!(select, selection, None::<Uuid>)
                .fetch_one(pool)
                .await
        })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn purge_expired_idempotency_keys(&self, batch: u32) -> Result<u64, sqlx::Error> {
        self.db
            .delete_in_batches(
                "idempotency_keys",
                "scope, key",
                "expires_at_ms <= $1",
                now_ms(),
                batch,
            )
            .await
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

    #[test]
    fn selections_number_their_placeholders_after_the_keyset() {
        let (conditions, next) = selection_sql(&Selection::All, false);
        assert!(conditions.is_empty());
        assert_eq!(next, 1);
        let (conditions, next) = selection_sql(&Selection::Since(Utc::now()), true);
        assert_eq!(conditions, ["uuid < $1", "updated_at >= $2"]);
        assert_eq!(next, 3);
        let uuids = vec![Uuid::nil(), Uuid::max()];
        let (conditions, next) = selection_sql(&Selection::Some(uuids), false);
        assert_eq!(conditions, ["uuid IN ($1, $2)"]);
        assert_eq!(next, 3);
        let (conditions, _) = selection_sql(&Selection::Some(Vec::new()), false);
        assert_eq!(conditions, ["1 = 0"]);
    }
}
