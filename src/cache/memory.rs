//! In-process cache (`cache.url = memory://`), bounded in size and time (moka).

use async_trait::async_trait;

use super::{Cache, CachePolicy};

pub struct MemoryCache {
    entries: moka::future::Cache<String, String>,
}

impl MemoryCache {
    pub fn new(policy: CachePolicy) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(policy.max_entries)
                .time_to_live(policy.ttl)
                .build(),
        }
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Option<String> {
        self.entries.get(key).await
    }

    async fn set(&self, key: &str, value: String) {
        self.entries.insert(key.to_owned(), value).await;
    }

    async fn ping(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn entries_expire_after_the_ttl() {
        let cache = MemoryCache::new(CachePolicy {
            ttl: Duration::from_millis(50),
            max_entries: 10,
        });
        cache.set("k", "v".into()).await;
        assert_eq!(cache.get("k").await.as_deref(), Some("v"));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cache.get("k").await.is_some() {
            assert!(std::time::Instant::now() < deadline, "entry never expired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
