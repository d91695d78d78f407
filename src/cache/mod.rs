//! Read-through cache port. A cache failure degrades to the source of truth, never to
//! an error: callers get a miss and carry on.

mod memory;
mod redis_cache;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use memory::MemoryCache;
pub use redis_cache::{CacheStats, RedisCache};

/// Bump when the shape of a cached value changes, so old entries are simply missed.
pub const KEY_VERSION: &str = "v1";

#[async_trait]
pub trait Cache: Send + Sync {
    /// `None` on a miss and on any failure of the cache itself.
    async fn get(&self, key: &str) -> Option<String>;
    /// Best effort: a failure is logged by the adapter and otherwise ignored.
    async fn set(&self, key: &str, value: String);
    async fn ping(&self) -> Result<(), String>;
}

/// The key of `id` in `namespace`, e.g. `userhub:v1:user:0193…`.
pub fn key(namespace: &str, id: impl std::fmt::Display) -> String {
    format!("userhub:{KEY_VERSION}:{namespace}:{id}")
}

/// Reads a JSON value; an entry that no longer deserializes counts as a miss.
pub async fn get_json<T: DeserializeOwned>(cache: &dyn Cache, key: &str) -> Option<T> {
    let raw = cache.get(key).await?;
    serde_json::from_str(&raw)
        .inspect_err(|error| tracing::warn!(key, %error, "ignoring unreadable cache entry"))
        .ok()
}

pub async fn set_json<T: Serialize>(cache: &dyn Cache, key: &str, value: &T) {
    match serde_json::to_string(value) {
        Ok(raw) => cache.set(key, raw).await,
        Err(error) => tracing::warn!(key, %error, "value not cached"),
    }
}

/// Cache settings shared by the adapters.
#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    pub ttl: Duration,
    pub max_entries: u64,
}
