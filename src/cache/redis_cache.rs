//! Redis cache (`cache.url = redis://…`), shared by every instance. Each call is
//! bounded by a timeout and guarded by a circuit breaker, so a slow or dead Redis
//! turns into misses, never into errors or stalled requests.
//!
//! With `cache.local_ttl_ms` above zero, reads are served from a local copy when one is
//! held: Redis's server-assisted client-side caching (RESP3 `CLIENT TRACKING`, through
//! redis-rs). Redis remembers which keys this connection read and pushes an
//! invalidation on the same connection when any client changes, deletes or expires one,
//! so a copy is dropped as soon as its key changes, by whichever instance: an instance
//! sees its own writes at once (the push comes before the write's reply), another's
//! once the push arrives (the time of one message). A new connection starts with no
//! copies, so a lost connection forgets them. What no push can cover is a connection
//! that went silent without failing: a copy is kept at most `local_ttl_ms`, which
//! bounds how stale a read can be then. A round trip to Redis cost half the throughput
//! of a cached `GET /api/users/{uuid}`. Needs Redis 6 or later.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::caching::{CacheConfig, CacheMode};
use redis::{AsyncConnectionConfig, CommandCacheConfig, FromRedisValue, IntoConnectionInfo};

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
    client: redis::Client,
    /// One multiplexed connection shared by every call (commands are pipelined on it,
    /// so no call waits for a free connection); `None` until the first call and after
    /// a failure, when the next call opens a new one.
    connection: std::sync::RwLock<Option<MultiplexedConnection>>,
    /// Held while opening a connection, so that a burst of calls opens one.
    connecting: tokio::sync::Mutex<()>,
    policy: CachePolicy,
    /// How long a local copy may be served (zero: no local copies).
    local_ttl: Duration,
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
    /// Prepares a client without connecting: the connection is opened on first use,
    /// so the service starts while Redis is down. Fails only on a malformed URL. Every
    /// Redis call (opening the connection when needed and running the command) is
    /// bounded by `timeout`; the breaker uses [`BreakerPolicy::default`] until
    /// [`RedisCache::with_breaker`].
    pub fn connect(
        url: &str,
        policy: CachePolicy,
        key_prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        // The error names what is wrong without echoing the URL and its password.
        let unusable = |error: redis::RedisError| {
            anyhow!("cache.url is not a usable Redis URL: {:?}", error.kind())
        };
        let client =
            redis::Client::open(url.into_connection_info().map_err(unusable)?).map_err(unusable)?;
        Ok(Self {
            client,
            connection: std::sync::RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            policy,
            local_ttl: Duration::ZERO,
            key_prefix: key_prefix.to_owned(),
            timeout,
            breaker: Arc::new(CircuitBreaker::new("redis", BreakerPolicy::default())),
            counters: Counters::default(),
        })
    }

    /// Serves reads from local copies that Redis invalidates, each kept at most `ttl`
    /// (and never past the key's own TTL); zero turns them off (see the module's
    /// documentation).
    pub fn with_local_copies(mut self, ttl: Duration) -> anyhow::Result<Self> {
        self.local_ttl = ttl.min(self.policy.ttl);
        if !self.local_ttl.is_zero() {
            // Invalidations are pushed on the connection itself: that needs RESP3.
            let info = self.client.get_connection_info().clone();
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            self.client = redis::Client::open(info.set_redis_settings(settings))?;
        }
        Ok(self)
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

    fn current(&self) -> Option<MultiplexedConnection> {
        self.connection
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_current(&self, connection: Option<MultiplexedConnection>) {
        *self
            .connection
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = connection;
    }

    /// The shared connection, opened first when there is none.
    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let _opening = self.connecting.lock().await;
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let mut config = AsyncConnectionConfig::new();
        if !self.local_ttl.is_zero() {
            // Only the reads that ask for it (`GET`) are kept locally, at most as many
            // entries as the cache policy says.
            let entries = usize::try_from(self.policy.max_entries)
                .ok()
                .and_then(std::num::NonZeroUsize::new)
                .unwrap_or(std::num::NonZeroUsize::MIN);
            config = config.set_cache_config(
                CacheConfig::new()
                    .set_mode(CacheMode::OptIn)
                    .set_size(entries)
                    .set_default_client_ttl(self.local_ttl),
            );
        }
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        self.set_current(Some(connection.clone()));
        Ok(connection)
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
            let mut connection = self.connection().await?;
            cmd.query_async::<T>(&mut connection)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {:?}", self.timeout)));
        if outcome.is_err() {
            // A dead or silent connection is replaced by the next call, not reused.
            self.set_current(None);
        }
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

    /// The put as one atomic script: the stored form is `<version>:<value>`, and a
    /// stored version newer than `version` is kept. `None` for a zero TTL (nothing
    /// would live long enough to be read).
    fn put_command(&self, key: &str, version: u64, value: &str) -> Option<redis::Cmd> {
        let millis = u64::try_from(self.policy.ttl.as_millis()).unwrap_or(u64::MAX);
        if millis == 0 {
            return None;
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUT_IF_NOT_OLDER)
            .arg(1)
            .arg(self.stored_key(key))
            .arg(version)
            .arg(value)
            .arg(millis);
        Some(cmd)
    }
}

/// KEYS[1]: the key; ARGV: version, value, TTL in milliseconds.
const PUT_IF_NOT_OLDER: &str = r#"
local current = redis.call('GET', KEYS[1])
if current then
  local stored = tonumber(string.match(current, '^(%d+):'))
  if stored and stored > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
return 1
"#;

/// The version and the value of a stored `<version>:<value>`; `None` for anything else.
fn stored_entry(stored: &str) -> Option<(u64, &str)> {
    let (version, value) = stored.split_once(':')?;
    version.parse::<u64>().ok().map(|version| (version, value))
}

#[async_trait]
impl Cache for RedisCache {
    async fn get_entry(&self, key: &str) -> Option<(u64, String)> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.stored_key(key));
        if !self.local_ttl.is_zero() {
            cmd.set_cache_config(CommandCacheConfig::new());
        }
        // Bytes, not String: a value that is not UTF-8 is bad data, not a Redis outage,
        // so it must not count against the breaker.
        let raw: Option<Vec<u8>> = self.call("GET", key, &cmd).await.ok()?;
        let value = raw.and_then(|bytes| {
            let text = String::from_utf8(bytes)
                .inspect_err(|_| tracing::warn!(key, "ignoring a cache entry that is not UTF-8"))
                .ok()?;
            let value = stored_entry(&text).map(|(version, value)| (version, value.to_owned()));
            if value.is_none() {
                tracing::warn!(key, "ignoring a cache entry without a version");
            }
            value
        });
        bump(if value.is_some() {
            &self.counters.hits
        } else {
            &self.counters.misses
        });
        value
    }

    async fn put(&self, key: &str, version: u64, value: String) {
        if let Some(cmd) = self.put_command(key, version, &value) {
            let _: Result<i64, CallError> = self.call("EVAL", key, &cmd).await;
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
    fn a_put_runs_the_script_on_the_prefixed_key_with_the_ttl_in_milliseconds() {
        let cmd = cache(Duration::from_secs(60)).put_command("k", 7, "v");
        let args = args(&cmd.expect("a command"));
        assert_eq!(args[0], "EVAL");
        assert_eq!(args[2..], ["1", "p:k", "7", "v", "60000"]);
        assert!(cache(Duration::ZERO).put_command("k", 1, "v").is_none());
    }

    #[test]
    fn stored_values_carry_their_version() {
        assert_eq!(stored_entry("3:{\"a\":1}"), Some((3, "{\"a\":1}")));
        assert_eq!(stored_entry("3:"), Some((3, "")), "a tombstone");
        assert_eq!(stored_entry("v:{}"), None);
        assert_eq!(stored_entry("{}"), None);
    }
}
