//! Enrichment module: consumes `user.created`, derives the social profile and serves
//! it. Knows nothing of the users module beyond the event contract.

mod domain;
pub(crate) mod routes;
mod store;
mod worker;

use std::sync::Arc;

use uuid::Uuid;

pub use domain::{EnrichedProfile, EnrichmentStatus, handle_for, slug};
pub use routes::{EnrichedProfileResponse, configure};
pub use store::{ProfileStore, SqliteProfileStore, StoreError};
pub use worker::UserCreatedHandler;

use crate::bus::{Binding, EventHandler};
use crate::events::USER_CREATED;

/// The module's queue and what it is bound to.
pub const BINDING: Binding = Binding {
    queue: "enrichment.user-created",
    routing_key: USER_CREATED,
};

/// The module's public facade.
#[derive(Clone)]
pub struct Enrichment {
    store: Arc<dyn ProfileStore>,
}

impl Enrichment {
    pub fn new(store: Arc<dyn ProfileStore>) -> Self {
        Self { store }
    }

    /// The consumer to attach to [`BINDING`].
    pub fn handler(&self) -> Arc<dyn EventHandler> {
        Arc::new(UserCreatedHandler::new(self.store.clone()))
    }

    /// What is known of a user's enrichment; `None` while it is pending.
    pub async fn profile(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        self.store.get(uuid).await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }
}
