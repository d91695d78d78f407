//! The `user.created` consumer: derives and stores the profile, idempotently.

use std::sync::Arc;

use async_trait::async_trait;

use super::domain::EnrichedProfile;
use super::store::ProfileStore;
use crate::bus::{Envelope, EventHandler, HandlerError, headers};
use crate::cache::{self, Cache};
use crate::events::{USER_CREATED, USER_CREATED_VERSION, UserCreated};

pub struct UserCreatedHandler {
    store: Arc<dyn ProfileStore>,
    cache: Arc<dyn Cache>,
}

impl UserCreatedHandler {
    pub fn new(store: Arc<dyn ProfileStore>, cache: Arc<dyn Cache>) -> Self {
        Self { store, cache }
    }
}

/// Reads a `user.created` envelope. Anything else is permanent: retrying cannot fix it.
fn parse(envelope: &Envelope) -> Result<UserCreated, HandlerError> {
    if envelope.routing_key != USER_CREATED {
        return Err(HandlerError::Permanent(format!(
            "unexpected routing key {:?}",
            envelope.routing_key
        )));
    }
    match envelope.header(headers::EVENT_VERSION) {
        None | Some(USER_CREATED_VERSION) => {}
        Some(other) => {
            return Err(HandlerError::Permanent(format!(
                "unsupported user.created version {other:?}"
            )));
        }
    }
    serde_json::from_str(&envelope.payload)
        .map_err(|e| HandlerError::Permanent(format!("malformed user.created payload: {e}")))
}

#[async_trait]
impl EventHandler for UserCreatedHandler {
    async fn handle(&self, envelope: &Envelope) -> Result<(), HandlerError> {
        let event = parse(envelope)?;
        let profile = EnrichedProfile::derive(event.uuid, &event.name, &event.email, envelope.id);
        // Upsert by user uuid: a redelivered event rewrites the same profile.
        let stored = self
            .store
            .upsert(&profile)
            .await
            .map_err(|e| HandlerError::Transient(e.to_string()))?;
        // After the store, and what the store kept, so the cache never disagrees with it.
        cache::set_json(self.cache.as_ref(), &super::cache_key(event.uuid), &stored).await;
        tracing::info!(
            user = %event.uuid,
            github = profile.github.as_deref().unwrap_or_default(),
            "profile enriched"
        );
        Ok(())
    }

    async fn on_dead_letter(&self, envelope: &Envelope, error: &str) {
        let Ok(event) = parse(envelope) else {
            return; // Not about a user we can name; the dead letter says it all.
        };
        let failed =
            EnrichedProfile::failed(event.uuid, &event.name, &event.email, envelope.id, error);
        if let Err(store_error) = self.store.mark_failed(&failed).await {
            // The profile then reads as pending; the dead letter is still recorded.
            tracing::warn!(user = %event.uuid, error = %store_error, "could not record the failed enrichment");
        }
    }
}
