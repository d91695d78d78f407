//! The event contract between modules. The only types `users` and `enrichment` share.
//!
//! Payloads are versioned: a breaking change adds `UserCreatedV2` beside this one and a
//! new `event_version` header value; consumers keep accepting the old one until it is
//! drained.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Routing key of [`UserCreated`] on the bus.
pub const USER_CREATED: &str = "user.created";
/// Value of the `event_version` header for [`UserCreated`].
pub const USER_CREATED_VERSION: &str = "1";

/// Emitted once per user, in the same transaction that stores the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCreated {
    pub uuid: Uuid,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
}
