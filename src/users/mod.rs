//! Users module: registers and looks up users, and announces each new user with a
//! `user.created` event through the outbox. Knows nothing of enrichment.

mod domain;
mod repository;
pub(crate) mod routes;

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

pub use domain::{Email, NewUser, UserName, mask_email};
pub use repository::{CreateUserError, ListQuery, SqliteUserRepository, User, UserRepository};
pub use routes::{CreateUserRequest, UserResponse, configure};

use crate::bus::headers;
use crate::outbox::OutboxSignal;

/// The module's public facade: what routes, the combined view and tests use.
#[derive(Clone)]
pub struct Users {
    repository: Arc<dyn UserRepository>,
    outbox: OutboxSignal,
}

impl Users {
    pub fn new(repository: Arc<dyn UserRepository>, outbox: OutboxSignal) -> Self {
        Self { repository, outbox }
    }

    /// Stores the user and its event atomically, then wakes the outbox relay.
    #[tracing::instrument(skip(self, user, request_id), fields(email = ?user.email))]
    pub async fn register(&self, user: NewUser, request_id: &str) -> Result<User, CreateUserError> {
        let event_headers =
            BTreeMap::from([(headers::REQUEST_ID.to_owned(), request_id.to_owned())]);
        let user = self.repository.create(&user, event_headers).await?;
        self.outbox.notify();
        tracing::info!(user = %user.uuid, "user registered");
        Ok(user)
    }

    pub async fn find(&self, uuid: Uuid) -> Result<Option<User>, sqlx::Error> {
        self.repository.get(uuid).await
    }

    pub async fn list(&self, query: &ListQuery) -> Result<Vec<User>, sqlx::Error> {
        self.repository.list(query).await
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.repository.ping().await
    }
}
