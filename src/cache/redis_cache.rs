//! Redis cache (`cache.url = redis://…`), shared by every instance. Each call is
//! bounded by a timeout and guarded by a circuit breaker, so a slow or dead Redis
//! turns into misses, never into errors or stalled requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use deadpool_redis::redis::{self, FromRedisValue};
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};

use super::{Cache, CachePolicy};
use crate::resilience::{BreakerPolicy, BreakerState, CircuitBreaker};

/// Counters since start, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// `get` calls that found a value.
    pub hits: u64,
    /// `get` calls that reached Redis and found nothing usable.
    pub misses: u64,
    /// Calls of any kind that failed or timed out.
    pub errors: u64,
    /// Calls of any kind refused by the open circuit breaker, without touching Redis.
    pub short_circuited: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    short_circuited: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why a Redis call produced no answer.
enum CallError {
    /// The breaker is open: Redis was not contacted.
    ShortCircuited,
    /// Redis failed or timed out (already logged and counted).
    Failed(String),
}

pub struct RedisCache {
    pool: Pool,
    policy: CachePolicy,
    key_prefix: String,
    timeout: Duration,
    breaker: Arc<CircuitBreaker>,
    counters: Counters,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("RedisCache")
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("breaker", &self.breaker)
            .field("stats", &self.stats())
            .finish()
    }
}

impl RedisCache {
    /// Prepares a pool without connecting: connections are opened on first use, so the
    /// service starts while Redis is down. Fails only on a malformed URL. Every Redis
    /// call (taking a connection and running the command) is bounded by `timeout`; the
    /// breaker uses [`BreakerPolicy::default`] until [`RedisCache::with_breaker`].
    pub fn connect(
        url: &str,
        policy: CachePolicy,
        key_prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut config = deadpool_redis::Config::from_url(url);
        config.pool = Some(PoolConfig {
            // The outer timeout bounds the whole call; these stop deadpool itself from
            // waiting longer on a slot, a new connection or a recycle check.
            timeouts: Timeouts {
                wait: Some(timeout),
                create: Some(timeout),
                recycle: Some(timeout),
            },
            ..PoolConfig::default()
        });
        // The error names what is wrong without echoing the URL and its password.
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|error| anyhow!("cache.url is not a usable Redis URL: {error}"))?;
        Ok(Self {
            pool,
            policy,
            key_prefix: key_prefix.to_owned(),
            timeout,
            breaker: Arc::new(CircuitBreaker::new("redis", BreakerPolicy::default())),
            counters: Counters::default(),
        })
    }

    /// Replaces the breaker's policy (and resets it to closed).
    pub fn with_breaker(mut self, policy: BreakerPolicy) -> Self {
        self.breaker = Arc::new(CircuitBreaker::new("redis", policy));
        self
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            short_circuited: c.short_circuited.load(Ordering::Relaxed),
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The breaker itself, for metrics to watch.
    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.breaker.clone()
    }

    fn stored_key(&self, key: &str) -> String {
        format!("{}{key}", self.key_prefix)
    }

    /// Runs one command through the breaker, within the timeout. Failures are logged
    /// (with the key, never the value) and counted here.
    #[tracing::instrument(name = "redis", skip_all, fields(otel.kind = "client", otel.name = op, db.system.name = "redis", db.operation.name = op, otel.status_code = tracing::field::Empty))]
    async fn call<T: FromRedisValue>(
        &self,
        op: &'static str,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, CallError> {
        let Some(permit) = self.breaker.try_acquire() else {
            bump(&self.counters.short_circuited);
            return Err(CallError::ShortCircuited);
        };
        let outcome = tokio::time::timeout(self.timeout, async {
            let mut connection = self.pool.get().await.map_err(|e| e.to_string())?;
            cmd.query_async::<T>(&mut connection)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {:?}", self.timeout)));
        match outcome {
            Ok(value) => {
                permit.success();
                Ok(value)
            }
            Err(error) => {
                tracing::Span::current().record("otel.status_code", "error");
                let trial = permit.is_trial();
                permit.failure();
                bump(&self.counters.errors);
                tracing::warn!(
                    op,
                    key,
                    %error,
                    trial,
                    breaker = %self.breaker.state(),
                    "redis cache call failed"
                );
                Err(CallError::Failed(error))
            }
        }
    }

    /// `SET … EX <secs>` for whole seconds; `PX <ms>` when the TTL has a fraction, so
    /// an entry never outlives the policy.
    fn set_command(&self, key: &str, value: String) -> Option<redis::Cmd> {
        let ttl = self.policy.ttl;
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.stored_key(key)).arg(value);
        if ttl.subsec_nanos() == 0 && ttl.as_secs() > 0 {
            cmd.arg("EX").arg(ttl.as_secs());
        } else {
            let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            if millis == 0 {
                return None;
            }
            cmd.arg("PX").arg(millis);
        }
        Some(cmd)
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Option<String> {
        let cmd = redis::cmd("GET").arg(self.stored_key(key)).to_owned();
        // Bytes, not String: a value that is not UTF-8 is bad data, not a Redis outage,
        // so it must not count against the breaker.
        let raw: Option<Vec<u8>> = self.call("GET", key, &cmd).await.ok()?;
        let value = raw.and_then(|bytes| {
            String::from_utf8(bytes)
                .inspect_err(|_| tracing::warn!(key, "ignoring a cache entry that is not UTF-8"))
                .ok()
        });
        bump(if value.is_some() {
            &self.counters.hits
        } else {
            &self.counters.misses
        });
        value
    }

    async fn set(&self, key: &str, value: String) {
        // A zero TTL means nothing would live long enough to be read.
        if let Some(cmd) = self.set_command(key, value) {
            let _: Result<(), CallError> = self.call("SET", key, &cmd).await;
        }
    }

    async fn ping(&self) -> Result<(), String> {
        match self.call::<String>("PING", "", &redis::cmd("PING")).await {
            Ok(_) => Ok(()),
            Err(CallError::Failed(error)) => Err(error),
            Err(CallError::ShortCircuited) => Err(format!(
                "circuit breaker open after repeated failures; next trial within {:?}",
                self.breaker.policy().cool_down
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(ttl: Duration) -> RedisCache {
        let policy = CachePolicy {
            ttl,
            max_entries: 10,
        };
        RedisCache::connect(
            "redis://127.0.0.1:1",
            policy,
            "p:",
            Duration::from_millis(50),
        )
        .expect("a well-formed URL")
    }

    fn args(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<not a plain argument>".into(),
            })
            .collect()
    }

    #[test]
    fn connect_does_not_need_redis_but_rejects_a_malformed_url() {
        let policy = CachePolicy {
            ttl: Duration::from_secs(1),
            max_entries: 1,
        };
        let _ = cache(Duration::from_secs(1));
        let error = RedisCache::connect(
            "http://user:secret@example.com",
            policy,
            "",
            Duration::from_secs(1),
        )
        .expect_err("not a Redis URL");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn whole_second_ttls_use_ex_and_others_px() {
        let cmd = cache(Duration::from_secs(60)).set_command("k", "v".into());
        assert_eq!(
            args(&cmd.expect("a command")),
            ["SET", "p:k", "v", "EX", "60"]
        );
        let cmd = cache(Duration::from_millis(1500)).set_command("k", "v".into());
        assert_eq!(
            args(&cmd.expect("a command")),
            ["SET", "p:k", "v", "PX", "1500"]
        );
        assert!(cache(Duration::ZERO).set_command("k", "v".into()).is_none());
    }
}
