//! The event contract between modules: the only types `users` and `enrichment` share.
//!
//! Every event is about one user (its `subject` header is the user's uuid) and carries
//! the user's `version`: 1 at creation, one more with each change. A consumer applies a
//! user's events in version order and ignores one older than what it has seen, since
//! retries and redeliveries can reorder them. `user.created` and `user.updated` carry
//! the whole user, so the latest event alone is enough to rebuild a consumer's state.
//!
//! Payloads are versioned: a breaking change adds `UserCreatedV2` beside this one and a
//! new `event_version` header value; consumers keep accepting the old one until it is
//! drained. Adding an optional field is not breaking.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Routing key of [`UserCreated`].
pub const USER_CREATED: &str = "user.created";
/// Routing key of [`UserUpdated`].
pub const USER_UPDATED: &str = "user.updated";
/// Routing key of [`UserDeleted`].
pub const USER_DELETED: &str = "user.deleted";
/// Value of the `event_version` header of all three payloads.
pub const EVENT_VERSION: &str = "1";

/// The `reason` header of a `user.updated` that republishes a user unchanged, to
/// rebuild what consumers derive from it (`userhub reenrich`).
pub const REASON_REENRICH: &str = "reenrich";

fn first_version() -> u64 {
    1
}

/// A user was registered. Emitted once per user, in the transaction that stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "uuid": "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d",
    "name": "João Silva",
    "email": "joao.silva+work@example.com",
    "created_at": "2026-11-29T10:15:30.123Z",
    "version": 1
}))]
pub struct UserCreated {
    pub uuid: Uuid,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
    /// Always 1; absent from events published before versions existed.
    #[serde(default = "first_version")]
    #[schema(minimum = 1)]
    pub version: u64,
}

/// A user's name or e-mail changed (or, with the `reason` header `reenrich`, the user
/// is republished unchanged). Carries the whole user as of `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "uuid": "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d",
    "name": "João P. Silva",
    "email": "joao.silva@example.com",
    "created_at": "2026-11-29T10:15:30.123Z",
    "updated_at": "2026-11-30T08:00:00.000Z",
    "version": 2
}))]
pub struct UserUpdated {
    pub uuid: Uuid,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[schema(minimum = 1)]
    pub version: u64,
}

/// A user was deleted: consumers erase what they hold about it. Carries no personal
/// data; `version` is one more than the user's last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "uuid": "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d",
    "deleted_at": "2026-11-30T09:00:00.000Z",
    "version": 3
}))]
pub struct UserDeleted {
    pub uuid: Uuid,
    pub deleted_at: DateTime<Utc>,
    #[schema(minimum = 2)]
    pub version: u64,
}
