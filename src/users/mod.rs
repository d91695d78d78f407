//! Users module: registers, changes, erases and looks up users, and announces each
//! change with an event (`user.created`, `user.updated`, `user.deleted`) written
//! through the outbox in the change's own transaction. Knows nothing of enrichment.

pub(crate) mod changes;
mod domain;
mod idempotency;
mod repository;
pub(crate) mod routes;
mod sql;

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

pub use domain::{Email, NewUser, UserName, UserPatch, mask_email};
pub use repository::{
    ChangeUserError, CreateUserError, Created, Expected, IdempotencyKey, ListQuery, Selection,
    User, UserRepository,
};
pub use routes::{CreateUserRequest, UserResponse, configure};
pub use sql::{IDEMPOTENCY_KEY_LIFETIME, SqlUserRepository};

use crate::bus::headers;
use crate::cache::{self, Cache, Cached};
use crate::outbox::OutboxSignal;
use crate::telemetry;

/// The module's public facade: what routes, the combined view, the CLI and tests use.
#[derive(Clone)]
pub struct Users {
    repository: Arc<dyn UserRepository>,
    outbox: OutboxSignal,
    cache: Arc<dyn Cache>,
}

/// Headers of the events a request causes. The events join the request's trace:
/// `traceparent` travels with the outbox row.
fn event_headers(request_id: &str) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::from([(headers::REQUEST_ID.to_owned(), request_id.to_owned())]);
    telemetry::inject_context(&mut headers);
    headers
}

fn cache_key(uuid: Uuid) -> String {
    cache::key("user", uuid)
}

/// A user as the cache holds it: its representation ([`UserResponse`], what
/// `GET /api/users/{uuid}` answers) and its version, which the cache keeps beside it.
/// A cached read is answered as is: parsing the user and writing it again was a tenth
/// of the CPU of a cached `GET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserJson {
    pub version: u64,
    pub json: String,
}

impl UserJson {
    fn of(user: &User) -> Self {
        Self {
            version: user.version,
            // A struct of strings, a uuid and timestamps always serializes.
            json: serde_json::to_string(&UserResponse::from(user.clone()))
                .unwrap_or_else(|error| unreachable!("a user serializes: {error}")),
        }
    }
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

    /// Stores the user and its event atomically, then wakes the outbox relay. With an
    /// idempotency key already used for the same request, answers with the user that
    /// request created, and stores nothing.
    #[tracing::instrument(skip_all, fields(email = ?user.email))]
    pub async fn register(
        &self,
        user: NewUser,
        request_id: &str,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Created, CreateUserError> {
        let created = self
            .repository
            .create(&user, event_headers(request_id), idempotency)
            .await?;
        match &created {
            Created::New(user) => {
                self.outbox.notify();
                tracing::info!(user = %user.uuid, "user registered");
            }
            Created::Replayed(user) => {
                tracing::info!(user = %user.uuid, "idempotent create replayed");
            }
        }
        Ok(created)
    }

    /// Changes a user and writes the new version through the cache.
    #[tracing::instrument(skip_all, fields(user = %uuid))]
    pub async fn update(
        &self,
        uuid: Uuid,
        patch: &UserPatch,
        expected: &Expected,
        request_id: &str,
    ) -> Result<User, ChangeUserError> {
        let user = self
            .repository
            .update(uuid, patch, expected, event_headers(request_id))
            .await?;
        self.cache_user(&user).await;
        self.outbox.notify();
        tracing::info!(version = user.version, "user updated");
        Ok(user)
    }

    /// Deletes a user and every trace of it this module holds (see
    /// [`UserRepository::delete`]); the cache keeps a tombstone, so a late read-through
    /// fill cannot bring the user back.
    #[tracing::instrument(skip_all, fields(user = %uuid))]
    pub async fn delete(
        &self,
        uuid: Uuid,
        expected: &Expected,
        request_id: &str,
    ) -> Result<(), ChangeUserError> {
        let version = self
            .repository
            .delete(uuid, expected, event_headers(request_id))
            .await?;
        cache::put_gone(self.cache.as_ref(), &cache_key(uuid), version).await;
        self.outbox.notify();
        tracing::info!(version, "user deleted");
        Ok(())
    }

    /// Read-through. A change writes its new version into the cache, and the cache
    /// keeps the newest version it was given, so a fill racing a change cannot leave
    /// the old user behind.
    pub async fn find(&self, uuid: Uuid) -> Result<Option<User>, sqlx::Error> {
        match self.cached(uuid).await {
            Cached::Hit(found) => match serde_json::from_str::<UserResponse>(&found.json) {
                Ok(user) => return Ok(Some(user.at_version(found.version))),
                Err(error) => tracing::warn!(%uuid, %error, "ignoring unreadable cache entry"),
            },
            Cached::Gone => return Ok(None),
            Cached::Miss => {}
        }
        let user = self.repository.get(uuid).await?;
        if let Some(user) = &user {
            self.cache_user(user).await;
        }
        Ok(user)
    }

    /// Like [`Users::find`], as the JSON representation `GET /api/users/{uuid}`
    /// answers: a cache hit is answered as cached, neither parsed nor written again.
    pub async fn find_json(&self, uuid: Uuid) -> Result<Option<UserJson>, sqlx::Error> {
        match self.cached(uuid).await {
            Cached::Hit(found) => return Ok(Some(found)),
            Cached::Gone => return Ok(None),
            Cached::Miss => {}
        }
        let Some(user) = self.repository.get(uuid).await? else {
            return Ok(None);
        };
        Ok(Some(self.cache_user(&user).await))
    }

    async fn cached(&self, uuid: Uuid) -> Cached<UserJson> {
        match self.cache.get_entry(&cache_key(uuid)).await {
            None => Cached::Miss,
            Some((_, json)) if json.is_empty() => Cached::Gone,
            Some((version, json)) => Cached::Hit(UserJson { version, json }),
        }
    }

    /// Writes `user` through the cache, in the form [`Users::find_json`] answers.
    async fn cache_user(&self, user: &User) -> UserJson {
        let json = UserJson::of(user);
        self.cache
            .put(&cache_key(user.uuid), json.version, json.json.clone())
            .await;
        json
    }

    pub async fn list(&self, query: &ListQuery) -> Result<Vec<User>, sqlx::Error> {
        self.repository.list(query).await
    }

    /// Republishes the users of `selection` as `user.updated` (reason `reenrich`), in
    /// pages of `page_size`, so consumers rebuild what they derive from users. Calls
    /// `progress` with the running total after each page; returns the total.
    pub async fn republish(
        &self,
        selection: &Selection,
        page_size: u32,
        request_id: &str,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, sqlx::Error> {
        let mut after = None;
        let mut total = 0;
        loop {
            let (last, count) = self
                .repository
                .republish_page(
                    selection,
                    after,
                    page_size.max(1),
                    event_headers(request_id),
                )
                .await?;
            total += count;
            if count > 0 {
                self.outbox.notify();
            }
            progress(total);
            match last {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        tracing::info!(total, "users republished");
        Ok(total)
    }

    /// How many users `selection` holds.
    pub async fn count(&self, selection: &Selection) -> Result<u64, sqlx::Error> {
        self.repository.count(selection).await
    }

    /// Forgets the idempotency keys past their lifetime; returns how many.
    pub async fn purge_expired_idempotency_keys(&self, batch: u32) -> Result<u64, sqlx::Error> {
        self.repository.purge_expired_idempotency_keys(batch).await
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.repository.ping().await
    }
}
