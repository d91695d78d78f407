//! In-process cache (`cache.url = memory://`), bounded in size and time (moka). It is
//! per process: with several processes serving the API, use `redis://`.

use async_trait::async_trait;
use moka::ops::compute::Op;

use super::{Cache, CachePolicy};

pub struct MemoryCache {
    /// The version and the value of each key, hashed with foldhash (seeded per process)
    /// rather than SipHash.
    entries: moka::future::Cache<String, (u64, String), foldhash::quality::RandomState>,
}

impl MemoryCache {
    pub fn new(policy: CachePolicy) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(policy.max_entries)
                .time_to_live(policy.ttl)
                .build_with_hasher(Default::default()),
        }
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get_entry(&self, key: &str) -> Option<(u64, String)> {
        self.entries.get(key).await
    }

    async fn put(&self, key: &str, version: u64, value: String) {
        // Atomic per key: compare and write under the entry's lock.
        self.entries
            .entry(key.to_owned())
            .and_compute_with(|current| {
                let newer_kept = current.is_some_and(|entry| entry.value().0 > version);
                std::future::ready(if newer_kept {
                    Op::Nop
                } else {
                    Op::Put((version, value))
                })
            })
            .await;
    }

    async fn ping(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cache(ttl: Duration) -> MemoryCache {
        MemoryCache::new(CachePolicy {
            ttl,
            max_entries: 10,
        })
    }

    #[tokio::test]
    async fn entries_expire_after_the_ttl() {
        let cache = cache(Duration::from_millis(50));
        cache.put("k", 1, "v".into()).await;
        assert_eq!(cache.get("k").await.as_deref(), Some("v"));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cache.get("k").await.is_some() {
            assert!(std::time::Instant::now() < deadline, "entry never expired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn an_older_version_never_replaces_a_newer_one() {
        let cache = cache(Duration::from_secs(60));
        cache.put("k", 2, "two".into()).await;
        cache.put("k", 1, "one".into()).await;
        assert_eq!(cache.get("k").await.as_deref(), Some("two"));
        cache.put("k", 2, "two again".into()).await;
        assert_eq!(cache.get("k").await.as_deref(), Some("two again"));
        cache.put("k", 3, String::new()).await;
        cache.put("k", 2, "two".into()).await;
        assert_eq!(
            cache.get("k").await.as_deref(),
            Some(""),
            "the tombstone stays"
        );
    }
}
