//! The user repository port: what the users module needs from storage, and the events
//! it writes with each change.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::domain::{NewUser, UserPatch};
use crate::bus::{Envelope, headers};
use crate::events::{
    EVENT_VERSION, USER_CREATED, USER_DELETED, USER_UPDATED, UserCreated, UserDeleted, UserUpdated,
};

/// A stored user, exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uuid: Uuid,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// 1 at creation, one more with every change.
    pub version: u64,
}

/// One page request of the user list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub limit: u32,
    /// Return users older than this one (the last uuid of the previous page).
    pub after: Option<Uuid>,
    /// Return the users just newer than this one (the first uuid of the next page):
    /// the page before it, still listed newest first. Not combined with `after`.
    pub before: Option<Uuid>,
    /// Case-insensitive substring of the name or the e-mail.
    pub q: Option<String>,
}

/// Which versions of a user a change may apply to (from `If-Match`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Whatever version is current (`If-Match: *`, or no `If-Match`).
    Any,
    /// One of these.
    OneOf(Vec<u64>),
}

impl Expected {
    fn allows(&self, version: u64) -> bool {
        match self {
            Self::Any => true,
            Self::OneOf(versions) => versions.contains(&version),
        }
    }
}

/// An `Idempotency-Key` on a create: the first response to (`scope`, `key`) is kept
/// for a day, for the request with this `fingerprint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// Whose key it is (the token's subject): two callers' keys never meet.
    pub scope: String,
    pub key: String,
    /// A digest of the request the key was first used with.
    pub fingerprint: String,
}

/// What a create did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New(User),
    /// The key was used before with the same request: this is the user it created,
    /// as it was then.
    Replayed(User),
}

impl Created {
    /// The user, whether created now or before.
    pub fn into_user(self) -> User {
        match self {
            Self::New(user) | Self::Replayed(user) => user,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CreateUserError {
    #[error("the e-mail address is already registered")]
    EmailTaken,
    #[error("the idempotency key was used with another request")]
    KeyReused,
    #[error(transparent)]
    Storage(#[from] sqlx::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeUserError {
    #[error("no such user")]
    NotFound,
    #[error("the user is at version {current}, not an expected one")]
    VersionMismatch { current: u64 },
    #[error("the e-mail address is already registered")]
    EmailTaken,
    #[error(transparent)]
    Storage(#[from] sqlx::Error),
}

/// Users selected for republishing (`userhub reenrich`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    /// Created or changed at or after this instant.
    Since(DateTime<Utc>),
    Some(Vec<Uuid>),
}

#[async_trait]
pub trait UserRepository: Send + Sync {
    /// Stores the user and its `user.created` event in one transaction; with a key,
    /// also the key, or answers with what the key created before.
    async fn create(
        &self,
        user: &NewUser,
        event_headers: BTreeMap<String, String>,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Created, CreateUserError>;
    /// Applies `patch` and writes `user.updated` in one transaction. A patch that
    /// changes nothing changes nothing: same version, no event.
    async fn update(
        &self,
        uuid: Uuid,
        patch: &UserPatch,
        expected: &Expected,
        event_headers: BTreeMap<String, String>,
    ) -> Result<User, ChangeUserError>;
    /// Deletes the user and writes `user.deleted` in one transaction, which also erases
    /// the personal data of the user's earlier events and idempotency keys. Returns
    /// the deletion's version.
    async fn delete(
        &self,
        uuid: Uuid,
        expected: &Expected,
        event_headers: BTreeMap<String, String>,
    ) -> Result<u64, ChangeUserError>;
    async fn get(&self, uuid: Uuid) -> Result<Option<User>, sqlx::Error>;
    /// Newest first; at most `query.limit` users (with `before`: the `limit` users
    /// closest to it, still newest first).
    async fn list(&self, query: &ListQuery) -> Result<Vec<User>, sqlx::Error>;
    /// Writes a `user.updated` (reason `reenrich`) for up to `limit` users of
    /// `selection` older than `after` (newest first), in one transaction. Returns the
    /// last uuid handled, `None` when the selection is exhausted, and how many.
    async fn republish_page(
        &self,
        selection: &Selection,
        after: Option<Uuid>,
        limit: u32,
        event_headers: BTreeMap<String, String>,
    ) -> Result<(Option<Uuid>, u64), sqlx::Error>;
    /// How many users `selection` holds (for progress reports).
    async fn count(&self, selection: &Selection) -> Result<u64, sqlx::Error>;
    /// Deletes the idempotency keys past their lifetime (each holds the response of
    /// the create it guarded, personal data), `batch` per statement; returns how many.
    async fn purge_expired_idempotency_keys(&self, batch: u32) -> Result<u64, sqlx::Error>;
    async fn ping(&self) -> Result<(), sqlx::Error>;
}

impl User {
    /// Whether `expected` lets a change apply to this version.
    pub fn is_expected(&self, expected: &Expected) -> bool {
        expected.allows(self.version)
    }
}

fn envelope<T: Serialize>(
    routing_key: &str,
    subject: Uuid,
    event: &T,
    mut event_headers: BTreeMap<String, String>,
) -> Result<Envelope, sqlx::Error> {
    event_headers.insert(headers::EVENT_VERSION.into(), EVENT_VERSION.into());
    event_headers.insert(headers::SUBJECT.into(), subject.to_string());
    let payload = serde_json::to_string(event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    Ok(Envelope::new(routing_key, payload, event_headers))
}

/// The `user.created` envelope announcing `user`.
pub(super) fn user_created(
    user: &User,
    event_headers: BTreeMap<String, String>,
) -> Result<Envelope, sqlx::Error> {
    let event = UserCreated {
        uuid: user.uuid,
        name: user.name.clone(),
        email: user.email.clone(),
        created_at: user.created_at,
        version: user.version,
    };
    envelope(USER_CREATED, user.uuid, &event, event_headers)
}

/// The `user.updated` envelope carrying `user` as it now is.
pub(super) fn user_updated(
    user: &User,
    event_headers: BTreeMap<String, String>,
) -> Result<Envelope, sqlx::Error> {
    let event = UserUpdated {
        uuid: user.uuid,
        name: user.name.clone(),
        email: user.email.clone(),
        created_at: user.created_at,
        updated_at: user.updated_at,
        version: user.version,
    };
    envelope(USER_UPDATED, user.uuid, &event, event_headers)
}

/// The `user.deleted` envelope: the end of `uuid`, at `version`. It erases the
/// subject from the bus as it goes (see `headers::ERASES_SUBJECT`).
pub(super) fn user_deleted(
    uuid: Uuid,
    version: u64,
    mut event_headers: BTreeMap<String, String>,
) -> Result<Envelope, sqlx::Error> {
    let event = UserDeleted {
        uuid,
        deleted_at: chrono::SubsecRound::trunc_subsecs(Utc::now(), 3),
        version,
    };
    event_headers.insert(headers::ERASES_SUBJECT.into(), "true".into());
    envelope(USER_DELETED, uuid, &event, event_headers)
}
