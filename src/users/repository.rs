//! The user repository port: what the users module needs from storage.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::domain::NewUser;
use crate::bus::{Envelope, headers};
use crate::events::{USER_CREATED, USER_CREATED_VERSION, UserCreated};

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
    /// Return the users just newer than this one (the first uuid of the next page):
    /// the page before it, still listed newest first. Not combined with `after`.
    pub before: Option<Uuid>,
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
    /// Newest first; at most `query.limit` users (with `before`: the `limit` users
    /// closest to it, still newest first).
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
