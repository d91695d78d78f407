//! The consumer of user events: derives and stores the profile on `user.created` and
//! `user.updated`, erases it on `user.deleted`. Idempotent and order-proof: every write
//! is conditional on the user's version (see `store.rs`), so a redelivered, retried or
//! late event changes nothing.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::domain::{EnrichedProfile, Write};
use super::guarded::GuardedStore;
use super::store::{ProfileStore, StoreError};
use crate::bus::{Envelope, EventHandler, HandlerError, headers};
use crate::cache::{self, Cache};
use crate::events::{
    EVENT_VERSION, USER_CREATED, USER_DELETED, USER_UPDATED, UserCreated, UserDeleted, UserUpdated,
};

pub struct UserEventsHandler {
    store: Arc<GuardedStore>,
    cache: Arc<dyn Cache>,
}

impl UserEventsHandler {
    pub(super) fn new(store: Arc<GuardedStore>, cache: Arc<dyn Cache>) -> Self {
        Self { store, cache }
    }
}

/// What an event asks of the enrichment module.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UserEvent {
    /// Derive the profile of this version of the user.
    Derive {
        uuid: Uuid,
        name: String,
        email: String,
        version: u64,
    },
    /// Erase the user, at the deletion's version.
    Erase { uuid: Uuid, version: u64 },
}

fn payload<T: serde::de::DeserializeOwned>(envelope: &Envelope) -> Result<T, HandlerError> {
    serde_json::from_str(&envelope.payload).map_err(|e| {
        HandlerError::Permanent(format!("malformed {} payload: {e}", envelope.routing_key))
    })
}

/// Reads a user event. Anything else is permanent: retrying cannot fix it.
fn parse(envelope: &Envelope) -> Result<UserEvent, HandlerError> {
    match envelope.header(headers::EVENT_VERSION) {
        None | Some(EVENT_VERSION) => {}
        Some(other) => {
            return Err(HandlerError::Permanent(format!(
                "unsupported {} version {other:?}",
                envelope.routing_key
            )));
        }
    }
    match envelope.routing_key.as_str() {
        USER_CREATED => {
            let event: UserCreated = payload(envelope)?;
            Ok(UserEvent::Derive {
                uuid: event.uuid,
                name: event.name,
                email: event.email,
                version: event.version,
            })
        }
        USER_UPDATED => {
            let event: UserUpdated = payload(envelope)?;
            Ok(UserEvent::Derive {
                uuid: event.uuid,
                name: event.name,
                email: event.email,
                version: event.version,
            })
        }
        USER_DELETED => {
            let event: UserDeleted = payload(envelope)?;
            Ok(UserEvent::Erase {
                uuid: event.uuid,
                version: event.version,
            })
        }
        other => Err(HandlerError::Permanent(format!(
            "unexpected routing key {other:?}"
        ))),
    }
}

/// A store that is known to be down is no fault of the message: it waits, keeping
/// its attempts. Any other store failure is worth a retry.
fn store_failed(error: StoreError) -> HandlerError {
    match error {
        StoreError::Unavailable(why) => HandlerError::Unavailable(why),
        StoreError::Backend(why) => HandlerError::Transient(why),
    }
}

#[async_trait]
impl EventHandler for UserEventsHandler {
    async fn pause(&self) -> Option<std::time::Duration> {
        self.store.pause().await
    }

    async fn handle(&self, envelope: &Envelope) -> Result<(), HandlerError> {
        match parse(envelope)? {
            UserEvent::Derive {
                uuid,
                name,
                email,
                version,
            } => {
                let profile = EnrichedProfile::derive(uuid, &name, &email, envelope.id, version);
                match self.store.upsert(&profile).await.map_err(store_failed)? {
                    Write::Applied => {
                        // After the store, so the cache never holds what the store lacks.
                        let key = super::cache_key(uuid);
                        cache::put_json(self.cache.as_ref(), &key, version, &profile).await;
                        tracing::info!(
                            user = %uuid,
                            version,
                            github = profile.github.as_deref().unwrap_or_default(),
                            "profile enriched"
                        );
                    }
                    Write::Stale => {
                        tracing::info!(user = %uuid, version, "stale or repeated event ignored");
                    }
                }
            }
            UserEvent::Erase { uuid, version } => {
                match self
                    .store
                    .erase(uuid, version, envelope.id)
                    .await
                    .map_err(store_failed)?
                {
                    Write::Applied => {
                        cache::put_gone(self.cache.as_ref(), &super::cache_key(uuid), version)
                            .await;
                        tracing::info!(user = %uuid, version, "profile erased");
                    }
                    Write::Stale => {
                        tracing::info!(user = %uuid, version, "repeated deletion ignored");
                    }
                }
            }
        }
        Ok(())
    }

    async fn on_dead_letter(&self, envelope: &Envelope, error: &str) {
        match parse(envelope) {
            Ok(UserEvent::Derive {
                uuid,
                name,
                email,
                version,
            }) => {
                let failed =
                    EnrichedProfile::failed(uuid, &name, &email, envelope.id, version, error);
                if let Err(store_error) = self.store.mark_failed(&failed).await {
                    // The profile then reads as pending; the dead letter is still kept.
                    tracing::warn!(user = %uuid, error = %store_error, "could not record the failed enrichment");
                }
            }
            Ok(UserEvent::Erase { uuid, .. }) => {
                tracing::error!(
                    user = %uuid,
                    "the erasure of a deleted user was given up on: the profile store may \
                     still hold its data; replay the dead letter"
                );
            }
            // Not about a user we can name; the dead letter says it all.
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn envelope(routing_key: &str, payload: serde_json::Value) -> Envelope {
        Envelope::new(routing_key, payload.to_string(), BTreeMap::new())
    }

    #[test]
    fn each_event_says_what_to_do() {
        let uuid = Uuid::now_v7();
        let created = envelope(
            USER_CREATED,
            serde_json::json!({"uuid": uuid, "name": "Ada", "email": "a@x.io",
                               "created_at": "2026-11-30T08:00:00Z"}),
        );
        assert_eq!(
            parse(&created).unwrap(),
            UserEvent::Derive {
                uuid,
                name: "Ada".into(),
                email: "a@x.io".into(),
                version: 1
            },
            "an event from before versions is version 1"
        );
        let deleted = envelope(
            USER_DELETED,
            serde_json::json!({"uuid": uuid, "deleted_at": "2026-11-30T08:00:00Z", "version": 3}),
        );
        assert_eq!(
            parse(&deleted).unwrap(),
            UserEvent::Erase { uuid, version: 3 }
        );
    }

    #[test]
    fn unknown_keys_versions_and_payloads_are_permanent() {
        let odd = envelope("user.renamed", serde_json::json!({}));
        assert!(matches!(parse(&odd), Err(HandlerError::Permanent(_))));
        let broken = envelope(USER_UPDATED, serde_json::json!({"uuid": 1}));
        assert!(matches!(parse(&broken), Err(HandlerError::Permanent(_))));
        let mut future = envelope(USER_DELETED, serde_json::json!({}));
        future
            .headers
            .insert(headers::EVENT_VERSION.into(), "2".into());
        assert!(matches!(parse(&future), Err(HandlerError::Permanent(_))));
    }
}
