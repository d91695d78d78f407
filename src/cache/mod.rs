//! Read-through cache port. A cache failure degrades to the source of truth, never to
//! an error: callers get a miss and carry on.

mod memory;
mod redis_cache;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;
use uuid::fmt::Hyphenated;

pub use memory::MemoryCache;
pub use redis_cache::{CacheStats, RedisCache};

/// Bump when the shape of a cached value changes, so old entries are simply missed.
pub const KEY_VERSION: &str = "v3";

/// Every entry is a version of something (a user's, a profile's `version`), and a
/// cache keeps the newest it was given: a read-through fill that read the database
/// just before a change cannot overwrite the value that change wrote through. A
/// deleted thing is a tombstone, an empty value at its last version, which keeps a
/// late fill from bringing it back until the entry expires.
#[async_trait]
pub trait Cache: Send + Sync {
    /// The version and the value under `key` (empty for a tombstone); `None` on a miss
    /// and on any failure of the cache itself.
    async fn get_entry(&self, key: &str) -> Option<(u64, String)>;
    /// The value under `key`, as [`Cache::get_entry`].
    async fn get(&self, key: &str) -> Option<String> {
        self.get_entry(key).await.map(|(_, value)| value)
    }
    /// Stores `value` as version `version` of `key`, unless the cache holds a newer
    /// version. Best effort: a failure is logged by the adapter and otherwise ignored.
    async fn put(&self, key: &str, version: u64, value: String);
    async fn ping(&self) -> Result<(), String>;
}

/// The key of `id` in `namespace`, e.g. `userhub:v3:user:0193…`. Built by hand: with
/// `format!`, `Uuid`'s `Display` took 4% of a cached GET's instructions.
pub fn key(namespace: &str, id: Uuid) -> String {
    const PREFIX: &str = "userhub:";
    let mut key = String::with_capacity(
        PREFIX.len() + KEY_VERSION.len() + namespace.len() + 2 + Hyphenated::LENGTH,
    );
    key.push_str(PREFIX);
    key.push_str(KEY_VERSION);
    key.push(':');
    key.push_str(namespace);
    key.push(':');
    key.push_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
    key
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached<T> {
    /// Ask the source of truth.
    Miss,
    /// Known to be deleted.
    Gone,
    Hit(T),
}

/// Reads a JSON value; an entry that no longer deserializes counts as a miss.
pub async fn get_json<T: DeserializeOwned>(cache: &dyn Cache, key: &str) -> Cached<T> {
    match cache.get(key).await {
        None => Cached::Miss,
        Some(raw) if raw.is_empty() => Cached::Gone,
        Some(raw) => serde_json::from_str(&raw)
            .inspect_err(|error| tracing::warn!(key, %error, "ignoring unreadable cache entry"))
            .map_or(Cached::Miss, Cached::Hit),
    }
}

/// Stores version `version` of a JSON value (see [`Cache::put`]).
pub async fn put_json<T: Serialize>(cache: &dyn Cache, key: &str, version: u64, value: &T) {
    match serde_json::to_string(value) {
        Ok(raw) => cache.put(key, version, raw).await,
        Err(error) => tracing::warn!(key, %error, "value not cached"),
    }
}

/// Records that what `key` names was deleted at version `version`.
pub async fn put_gone(cache: &dyn Cache, key: &str, version: u64) {
    cache.put(key, version, String::new()).await;
}

/// Cache settings shared by the adapters.
#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    pub ttl: Duration,
    pub max_entries: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_the_version_the_namespace_and_the_hyphenated_uuid() {
        let id = Uuid::parse_str("0193A0A0-0000-7000-8000-00000000002A").unwrap();
        let key = key("user", id);
        assert_eq!(key, "userhub:v3:user:0193a0a0-0000-7000-8000-00000000002a");
        assert_eq!(key, format!("userhub:{KEY_VERSION}:user:{id}"));
        assert_eq!(key.len(), key.capacity());
    }
}
