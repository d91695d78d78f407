//! Enrichment module: consumes the user events, derives the social profile, erases it
//! with the user, and serves it. Knows nothing of the users module beyond the event
//! contract.

mod domain;
mod group;
mod guarded;
mod mongo_store;
pub(crate) mod routes;
mod store;
mod worker;

use std::sync::Arc;

use uuid::Uuid;

pub use domain::{EnrichedProfile, EnrichmentStatus, Write, handle_for, slug};
pub use mongo_store::MongoProfileStore;
pub use routes::{EnrichedProfileResponse, configure};
pub use store::{ProfileStore, SqliteProfileStore, StoreError};
pub use worker::UserEventsHandler;

use crate::bus::{Binding, EventHandler};
use crate::cache::{self, Cache, Cached};
use crate::events::{USER_CREATED, USER_DELETED, USER_UPDATED};
use crate::resilience::{BreakerPolicy, CircuitBreaker};
use guarded::GuardedStore;

/// The module's queue: every user event, so one user's events wait in one line.
pub const BINDING: Binding = Binding {
    queue: "enrichment.users",
    routing_keys: &[USER_CREATED, USER_UPDATED, USER_DELETED],
};

/// The module's public facade.
#[derive(Clone)]
pub struct Enrichment {
    store: Arc<GuardedStore>,
    cache: Arc<dyn Cache>,
}

/// Cache key of a user's completed profile.
fn cache_key(uuid: Uuid) -> String {
    cache::key("profile", uuid)
}

impl Enrichment {
    /// `breaker` guards every call to `store`, the consumer's and the readers'.
    pub fn new(
        store: Arc<dyn ProfileStore>,
        cache: Arc<dyn Cache>,
        breaker: BreakerPolicy,
    ) -> Self {
        let breaker = Arc::new(CircuitBreaker::new("profile_store", breaker));
        Self {
            store: Arc::new(GuardedStore::new(store, breaker)),
            cache,
        }
    }

    /// The profile store's circuit breaker, for metrics to watch.
    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.store.breaker()
    }

    /// The consumer to attach to [`BINDING`].
    pub fn handler(&self) -> Arc<dyn EventHandler> {
        Arc::new(UserEventsHandler::new(
            self.store.clone(),
            self.cache.clone(),
        ))
    }

    /// What is known of a user's enrichment; `None` while it is pending and once the
    /// user is erased. Only completed profiles are cached: pending and failed ones are
    /// about to change. The worker writes each new version through, and the cache keeps
    /// the newest it was given, so a fill racing a change cannot leave the old one.
    pub async fn profile(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        let key = cache_key(uuid);
        match cache::get_json(self.cache.as_ref(), &key).await {
            Cached::Hit(profile) => return Ok(Some(profile)),
            Cached::Gone => return Ok(None),
            Cached::Miss => {}
        }
        let profile = self.store.get(uuid).await?;
        if let Some(p) = profile
            .as_ref()
            .filter(|p| p.status == EnrichmentStatus::Completed)
        {
            cache::put_json(self.cache.as_ref(), &key, p.version, p).await;
        }
        Ok(profile)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }
}
