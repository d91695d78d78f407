//! Enrichment module: consumes `user.created`, derives the social profile and serves
//! it. Knows nothing of the users module beyond the event contract.

mod domain;
mod mongo_store;
pub(crate) mod routes;
mod store;
mod worker;

use std::sync::Arc;

use uuid::Uuid;

pub use domain::{EnrichedProfile, EnrichmentStatus, handle_for, slug};
pub use mongo_store::MongoProfileStore;
pub use routes::{EnrichedProfileResponse, configure};
pub use store::{ProfileStore, SqliteProfileStore, StoreError};
pub use worker::UserCreatedHandler;

use crate::bus::{Binding, EventHandler};
use crate::cache::{self, Cache};
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
    cache: Arc<dyn Cache>,
}

/// Cache key of a user's completed profile.
fn cache_key(uuid: Uuid) -> String {
    cache::key("profile", uuid)
}

impl Enrichment {
    pub fn new(store: Arc<dyn ProfileStore>, cache: Arc<dyn Cache>) -> Self {
        Self { store, cache }
    }

    /// The consumer to attach to [`BINDING`].
    pub fn handler(&self) -> Arc<dyn EventHandler> {
        Arc::new(UserCreatedHandler::new(
            self.store.clone(),
            self.cache.clone(),
        ))
    }

    /// What is known of a user's enrichment; `None` while it is pending. Only completed
    /// profiles are cached: pending and failed ones are about to change.
    pub async fn profile(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        let key = cache_key(uuid);
        if let Some(profile) = cache::get_json(self.cache.as_ref(), &key).await {
            return Ok(Some(profile));
        }
        let profile = self.store.get(uuid).await?;
        if let Some(p) = profile
            .as_ref()
            .filter(|p| p.status == EnrichmentStatus::Completed)
        {
            cache::set_json(self.cache.as_ref(), &key, p).await;
        }
        Ok(profile)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }
}
