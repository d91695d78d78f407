//! Users module: registers and looks up users, and announces each new user with a
//! `user.created` event through the outbox. Knows nothing of enrichment.

mod domain;
mod repository;
pub(crate) mod routes;
mod sql;

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

pub use domain::{Email, NewUser, UserName, mask_email};
pub use repository::{CreateUserError, ListQuery, User, UserRepository};
pub use routes::{CreateUserRequest, UserResponse, configure};
pub use sql::SqlUserRepository;

use crate::bus::headers;
use crate::cache::{self, Cache};
use crate::outbox::OutboxSignal;
use crate::telemetry;

/// The module's public facade: what routes, the combined view and tests use.
#[derive(Clone)]
pub struct Users {
    repository: Arc<dyn UserRepository>,
    outbox: OutboxSignal,
    cache: Arc<dyn Cache>,
}

impl Users {
    pub fn new(
        repository: Arc<dyn UserRepository>,
        outbox: OutboxSignal,
        cache: Arc<dyn Cache>,
    ) -> Self {
        Self {
            repository,
            outbox,
            cache,
        }
    }

    /// Stores the user and its event atomically, then wakes the outbox relay.
    #[tracing::instrument(skip(self, user, request_id), fields(email = ?user.email))]
    pub async fn register(&self, user: NewUser, request_id: &str) -> Result<User, CreateUserError> {
        let mut event_headers =
            BTreeMap::from([(headers::REQUEST_ID.to_owned(), request_id.to_owned())]);
        // The event joins this request's trace: traceparent travels with the outbox row.
        telemetry::inject_context(&mut event_headers);
        let user = self.repository.create(&user, event_headers).await?;
        self.outbox.notify();
        tracing::info!(user = %user.uuid, "user registered");
        Ok(user)
    }

    /// Read-through: users never change once created, so a cached user is never stale.
    pub async fn find(&self, uuid: Uuid) -> Result<Option<User>, sqlx::Error> {
        let key = cache::key("user", uuid);
        if let Some(user) = cache::get_json(self.cache.as_ref(), &key).await {
            return Ok(Some(user));
        }
        let user = self.repository.get(uuid).await?;
        if let Some(user) = &user {
            cache::set_json(self.cache.as_ref(), &key, user).await;
        }
        Ok(user)
    }

    pub async fn list(&self, query: &ListQuery) -> Result<Vec<User>, sqlx::Error> {
        self.repository.list(query).await
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.repository.ping().await
    }
}
