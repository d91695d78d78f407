//! The Redis cache adapter: against the real Redis (`USERHUB_TEST_REDIS_URL`) it stores
//! prefixed keys with a TTL; against a dead or silent one it degrades to misses within
//! its timeout, then its circuit breaker stops it from trying.

use std::future::Future;
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, FromRedisValue, aio::MultiplexedConnection};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use userhub::cache::{self, Cache, CachePolicy, CacheStats, Cached, RedisCache};
use userhub::resilience::{BreakerPolicy, BreakerState};

use crate::helpers::DEADLINE;
use crate::services;

const POLICY: CachePolicy = CachePolicy {
    ttl: Duration::from_secs(60),
    max_entries: 1_000,
};

/// Timeout of each cache call in these tests.
const TIMEOUT: Duration = Duration::from_millis(300);

/// The most a degraded call may take: its timeout plus generous scheduling slack.
const CALL_BOUND: Duration = Duration::from_millis(1_300);

/// A breaker that stays open for the whole test unless a test wants a cool-down.
fn breaker(failure_threshold: u32, cool_down: Duration) -> BreakerPolicy {
    BreakerPolicy {
        failure_threshold,
        cool_down,
    }
}

fn unique_prefix() -> String {
    format!("{}:", services::unique_name("userhub_test_cache"))
}

fn cache_at(url: &str, prefix: &str) -> RedisCache {
    RedisCache::connect(url, POLICY, prefix, TIMEOUT).expect("a valid Redis URL")
}

/// Fails the test if `future` takes longer than the test deadline.
async fn within_deadline<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .expect("redis answered in time")
}

/// A direct connection to the test Redis, to look behind the adapter's back.
pub(crate) async fn raw_connection(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).expect("a valid Redis URL");
    within_deadline(client.get_multiplexed_async_connection())
        .await
        .expect("raw connection to the test Redis")
}

async fn raw<T: FromRedisValue>(connection: &mut MultiplexedConnection, cmd: &redis::Cmd) -> T {
    within_deadline(cmd.query_async(connection))
        .await
        .expect("raw redis command")
}

/// The values of every key under `prefix`, as stored.
pub(crate) async fn values_prefixed(
    connection: &mut MultiplexedConnection,
    prefix: &str,
) -> Vec<String> {
    let mut cursor: u64 = 0;
    let mut values = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = raw(
            connection,
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(100),
        )
        .await;
        for key in keys {
            let value: Option<String> = raw(connection, redis::cmd("GET").arg(&key)).await;
            values.extend(value);
        }
        if next == 0 {
            return values;
        }
        cursor = next;
    }
}

/// Deletes every key under `prefix` (SCAN MATCH prefix* + DEL); returns how many.
pub(crate) async fn delete_prefixed(connection: &mut MultiplexedConnection, prefix: &str) -> usize {
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = raw(
            connection,
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(100),
        )
        .await;
        if !keys.is_empty() {
            deleted += raw::<usize>(connection, redis::cmd("DEL").arg(&keys)).await;
        }
        if next == 0 {
            return deleted;
        }
        cursor = next;
    }
}

/// Runs `test` with `N` fresh key prefixes, then deletes every key under them, even
/// when the test failed. Returns how many keys each prefix held at the end.
async fn with_prefixes<const N: usize, Fut>(
    url: &str,
    test: impl FnOnce([String; N]) -> Fut,
) -> [usize; N]
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let prefixes: [String; N] = std::array::from_fn(|_| unique_prefix());
    let outcome = tokio::spawn(test(prefixes.clone())).await;
    let mut redis = raw_connection(url).await;
    let mut deleted = [0; N];
    for (count, prefix) in deleted.iter_mut().zip(&prefixes) {
        *count = delete_prefixed(&mut redis, prefix).await;
    }
    if let Err(error) = outcome {
        match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("test task: {error}"),
        }
    }
    deleted
}

/// A port on which nothing listens: connections are refused at once.
async fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local address").port();
    drop(listener);
    format!("redis://127.0.0.1:{port}")
}

/// Runs `call` and returns its result with how long it took.
async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let value = call.await;
    (value, started.elapsed())
}

#[tokio::test]
async fn set_then_get_round_trips_under_the_prefix_with_a_ttl() {
    let Some(url) = services::service_url(services::REDIS) else {
        return;
    };
    let raw_url = url.clone();
    let keys = with_prefixes(&url, |[prefix]| async move {
        let cache = cache_at(&raw_url, &prefix);
        // Unique, so that the bare-key check below cannot meet another run's leftover.
        let key = cache::key("user", uuid::Uuid::now_v7());

        cache.put(&key, 1, r#"{"name":"Ada"}"#.into()).await;
        assert_eq!(cache.get(&key).await.as_deref(), Some(r#"{"name":"Ada"}"#));

        let mut redis = raw_connection(&raw_url).await;
        let stored_key = format!("{prefix}{key}");
        let stored: Option<String> = raw(&mut redis, redis::cmd("GET").arg(&stored_key)).await;
        assert_eq!(
            stored.as_deref(),
            Some(r#"1:{"name":"Ada"}"#),
            "stored under the prefix, with its version"
        );
        let bare: Option<String> = raw(&mut redis, redis::cmd("GET").arg(&key)).await;
        assert_eq!(bare, None, "nothing stored under the bare key");
        let ttl_ms: i64 = raw(&mut redis, redis::cmd("PTTL").arg(&stored_key)).await;
        let ttl_limit = i64::try_from(POLICY.ttl.as_millis()).expect("small ttl");
        assert!(
            ttl_ms > 0 && ttl_ms <= ttl_limit,
            "PTTL {ttl_ms} ms, policy {:?}",
            POLICY.ttl
        );

        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 1,
                misses: 0,
                errors: 0,
                short_circuited: 0
            }
        );
    })
    .await;
    assert_eq!(keys, [1], "exactly one key written, under the prefix");
}

/// Reads are served from a local copy that Redis invalidates: an instance sees its own
/// write at once, and another instance's once Redis's invalidation reaches it, also
/// when the key changes behind both their backs.
#[tokio::test]
async fn a_local_copy_never_outlives_a_change_made_by_any_instance() {
    let Some(url) = services::service_url(services::REDIS) else {
        return;
    };
    let raw_url = url.clone();
    with_prefixes(&url, |[prefix]| async move {
        let local = |url: &str| {
            cache_at(url, &prefix)
                .with_local_copies(Duration::from_secs(60))
                .expect("RESP3")
        };
        let (a, b) = (local(&raw_url), local(&raw_url));
        let key = cache::key("user", uuid::Uuid::now_v7());
        a.put(&key, 1, "one".into()).await;
        // Both read it, so both hold a copy now.
        for _ in 0..3 {
            assert_eq!(a.get(&key).await.as_deref(), Some("one"));
            assert_eq!(b.get(&key).await.as_deref(), Some("one"));
        }

        b.put(&key, 2, "two".into()).await;
        assert_eq!(
            b.get(&key).await.as_deref(),
            Some("two"),
            "its own write, at once"
        );
        eventually(|| a.get(&key), Some("two".to_owned())).await;

        // Changed by a client that is no instance at all.
        let mut redis = raw_connection(&raw_url).await;
        let _: () = raw(
            &mut redis,
            redis::cmd("SET")
                .arg(format!("{prefix}{key}"))
                .arg("3:three"),
        )
        .await;
        eventually(|| a.get(&key), Some("three".to_owned())).await;
        eventually(|| b.get(&key), Some("three".to_owned())).await;

        // Deleted behind their backs: a miss, not the last copy.
        let _: () = raw(&mut redis, redis::cmd("DEL").arg(format!("{prefix}{key}"))).await;
        eventually(|| a.get(&key), None).await;
        eventually(|| b.get(&key), None).await;
    })
    .await;
}

/// A connection that goes silent delivers no invalidation: a local copy is then served
/// at most its local TTL, and the reads after it time out like any other.
#[tokio::test]
async fn a_local_copy_outlives_a_silent_connection_by_at_most_its_ttl() {
    let Some(redis_url) = services::service_url(services::REDIS) else {
        return;
    };
    let url = redis_url.clone();
    let keys = with_prefixes(&redis_url, |[prefix]| async move {
        let proxy = LinkProxy::start(&url, Link::Up).await;
        let local_ttl = Duration::from_millis(300);
        let cache = cache_at(&proxy.url, &prefix)
            .with_breaker(breaker(2, Duration::from_secs(3600)))
            .with_local_copies(local_ttl)
            .expect("RESP3");
        cache.put("k", 1, "v".into()).await;
        assert_eq!(cache.get("k").await.as_deref(), Some("v"));

        proxy.set(Link::Frozen);
        let frozen = Instant::now();
        while cache.get("k").await.is_some() {
            assert!(
                frozen.elapsed() <= local_ttl + CALL_BOUND,
                "a copy served {:?} after the connection went silent",
                frozen.elapsed()
            );
        }
        assert!(
            frozen.elapsed() <= local_ttl + CALL_BOUND,
            "the copy stopped only after {:?}",
            frozen.elapsed()
        );
        assert!(
            cache.stats().errors >= 1,
            "the read after the copy timed out"
        );
    })
    .await;
    assert_eq!(keys, [1]);
}

/// Polls `read` until it gives `expected`, failing the test at the deadline.
async fn eventually<F, Fut>(read: F, expected: Option<String>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        let value = read().await;
        if value == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {value:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn json_values_round_trip_through_the_cache_helpers() {
    let Some(url) = services::service_url(services::REDIS) else {
        return;
    };
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Profile {
        github: String,
        stars: u32,
    }
    let cache_url = url.clone();
    let keys = with_prefixes(&url, |[prefix]| async move {
        let cache = cache_at(&cache_url, &prefix);
        let key = cache::key("profile", uuid::Uuid::now_v7());
        let profile = Profile {
            github: "github.com/joaosilva".into(),
            stars: 7,
        };
        cache::put_json(&cache, &key, 2, &profile).await;
        let read: Cached<Profile> = cache::get_json(&cache, &key).await;
        assert_eq!(read, Cached::Hit(profile));

        // An older version (a late read-through fill) never replaces a newer one.
        let stale = Profile {
            github: "github.com/old".into(),
            stars: 1,
        };
        cache::put_json(&cache, &key, 1, &stale).await;
        assert!(
            matches!(cache::get_json::<Profile>(&cache, &key).await, Cached::Hit(p) if p.stars == 7)
        );

        // A tombstone at a newer version wins, and an older fill cannot bring it back.
        cache::put_gone(&cache, &key, 3).await;
        cache::put_json(&cache, &key, 2, &stale).await;
        assert_eq!(cache::get_json::<Profile>(&cache, &key).await, Cached::Gone);
    })
    .await;
    assert_eq!(keys, [1]);
}

#[tokio::test]
async fn a_missing_key_is_a_miss() {
    let Some(url) = services::service_url(services::REDIS) else {
        return;
    };
    let cache_url = url.clone();
    let keys = with_prefixes(&url, |[prefix]| async move {
        let cache = cache_at(&cache_url, &prefix);
        assert_eq!(
            cache.get(&cache::key("user", uuid::Uuid::now_v7())).await,
            None
        );
        let stats = cache.stats();
        assert_eq!(
            (stats.hits, stats.misses, stats.errors),
            (0, 1, 0),
            "{stats:?}"
        );
        assert_eq!(cache.breaker_state(), BreakerState::Closed);
    })
    .await;
    assert_eq!(keys, [0]);
}

#[tokio::test]
async fn two_prefixes_do_not_see_each_others_keys() {
    let Some(url) = services::service_url(services::REDIS) else {
        return;
    };
    let cache_url = url.clone();
    let keys = with_prefixes(&url, |[prefix_a, prefix_b]| async move {
        let a = cache_at(&cache_url, &prefix_a);
        let b = cache_at(&cache_url, &prefix_b);

        a.put("shared", 1, "from a".into()).await;
        b.put("shared", 1, "from b".into()).await;
        a.put("only-a", 1, "a's secret".into()).await;

        assert_eq!(a.get("shared").await.as_deref(), Some("from a"));
        assert_eq!(b.get("shared").await.as_deref(), Some("from b"));
        assert_eq!(b.get("only-a").await, None);
    })
    .await;
    assert_eq!(keys, [2, 1]);
}

#[tokio::test]
async fn ping_succeeds_against_a_live_redis() {
    let Some(url) = services::service_url(services::REDIS) else {
        return;
    };
    let cache = cache_at(&url, &unique_prefix());
    assert_eq!(cache.ping().await, Ok(()));
    assert_eq!(cache.stats().errors, 0);
}

#[tokio::test]
async fn a_dead_redis_degrades_quickly_then_the_breaker_short_circuits() {
    let url = refused_url().await;
    // Creating the adapter must not need Redis: the service starts while it is down.
    let cache =
        cache_at(&url, &unique_prefix()).with_breaker(breaker(3, Duration::from_secs(3600)));

    let (value, took) = timed(cache.get("k")).await;
    assert_eq!(value, None);
    assert!(took < CALL_BOUND, "get took {took:?}");
    let ((), took) = timed(cache.put("k", 1, "v".into())).await;
    assert!(took < CALL_BOUND, "set took {took:?}");
    let (pinged, took) = timed(cache.ping()).await;
    assert!(pinged.is_err(), "ping reports the dead Redis");
    assert!(took < CALL_BOUND, "ping took {took:?}");

    // Three failures in a row: the breaker is open and Redis is no longer tried.
    assert_eq!(cache.breaker_state(), BreakerState::Open);
    assert_eq!(cache.get("k").await, None);
    cache.put("k", 1, "v".into()).await;
    let refused = cache.ping().await.expect_err("ping while open");
    assert!(refused.contains("circuit breaker open"), "{refused}");
    assert_eq!(
        cache.stats(),
        CacheStats {
            hits: 0,
            misses: 0,
            errors: 3,
            short_circuited: 3
        }
    );
}

#[tokio::test]
async fn a_silent_redis_is_cut_off_by_the_timeout_and_then_not_waited_for() {
    // Accepts connections (the kernel's backlog does) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "redis://127.0.0.1:{}",
        silent.local_addr().expect("address").port()
    );
    let cache =
        cache_at(&url, &unique_prefix()).with_breaker(breaker(2, Duration::from_secs(3600)));

    for _ in 0..2 {
        let (value, took) = timed(cache.get("k")).await;
        assert_eq!(value, None);
        assert!(
            took >= TIMEOUT,
            "gave up after {took:?}, before the timeout"
        );
        assert!(took < CALL_BOUND, "get took {took:?}");
    }
    assert_eq!(cache.breaker_state(), BreakerState::Open);

    // An attempt would hang for the whole timeout; a short-circuit returns at once.
    let (value, took) = timed(cache.get("k")).await;
    assert_eq!(value, None);
    assert!(took < TIMEOUT, "short-circuited get took {took:?}");
    let ((), took) = timed(cache.put("k", 1, "v".into())).await;
    assert!(took < TIMEOUT, "short-circuited set took {took:?}");
    let stats = cache.stats();
    assert_eq!((stats.errors, stats.short_circuited), (2, 2), "{stats:?}");
}

#[tokio::test]
async fn after_the_cool_down_one_trial_call_reaches_redis_again() {
    let url = refused_url().await;
    let cache =
        cache_at(&url, &unique_prefix()).with_breaker(breaker(1, Duration::from_millis(50)));

    assert_eq!(cache.get("k").await, None);
    assert_eq!(cache.breaker_state(), BreakerState::Open);
    assert_eq!(cache.get("k").await, None);
    assert_eq!(
        cache.stats().short_circuited,
        1,
        "refused during the cool-down"
    );

    // Once the cool-down is over, one call is let through, fails, and reopens it.
    let started = Instant::now();
    while cache.stats().errors < 2 {
        assert!(
            started.elapsed() < DEADLINE,
            "no trial call after {DEADLINE:?}"
        );
        cache.get("k").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(cache.breaker_state(), BreakerState::Open);
    let before = cache.stats();
    assert_eq!(cache.get("k").await, None);
    let after = cache.stats();
    assert_eq!(
        after.errors, before.errors,
        "the failed trial restarted the cool-down"
    );
    assert_eq!(after.short_circuited, before.short_circuited + 1);
}

/// What the test proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Hangs up every new connection at once, like a Redis that is restarting.
    Down,
    /// Relays bytes both ways.
    Up,
    /// Keeps connections open but holds every byte, like a paused Redis or a
    /// network partition that drops packets without a reset.
    Frozen,
}

/// A TCP proxy in front of the test Redis whose link the test switches.
struct LinkProxy {
    url: String,
    link: tokio::sync::watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    async fn start(redis_url: &str, link: Link) -> Self {
        let mut url = reqwest::Url::parse(redis_url).expect("a Redis URL");
        let upstream = format!(
            "{}:{}",
            url.host_str().expect("a Redis host"),
            url.port().unwrap_or(6379)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(port)).expect("port");
        let (sender, modes) = tokio::sync::watch::channel(link);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *modes.borrow() == Link::Down {
                    continue; // dropping the socket hangs up
                }
                let (upstream, modes) = (upstream.clone(), modes.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        relay(client_read, server_write, modes.clone()),
                        relay(server_read, client_write, modes),
                    );
                });
            }
        });
        Self {
            url: url.to_string(),
            link: sender,
            task,
        }
    }

    fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

/// Copies bytes from `from` to `to`, holding them while the link is not up.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: tokio::sync::watch::Receiver<Link>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if link.wait_for(|link| *link == Link::Up).await.is_err()
            || to.write_all(&buffer[..read]).await.is_err()
        {
            return;
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn the_cache_recovers_when_redis_comes_back() {
    let Some(redis_url) = services::service_url(services::REDIS) else {
        return;
    };
    let url = redis_url.clone();
    let keys = with_prefixes(&redis_url, |[prefix]| async move {
        let proxy = LinkProxy::start(&url, Link::Down).await;
        let cache =
            cache_at(&proxy.url, &prefix).with_breaker(breaker(2, Duration::from_millis(50)));
        let mut redis = raw_connection(&url).await;
        let _: () = raw(
            &mut redis,
            // Stored as the cache stores it: `<version>:<value>`.
            redis::cmd("SET")
                .arg(format!("{prefix}k"))
                .arg("1:v")
                .arg("EX")
                .arg(60),
        )
        .await;

        // Redis "down": the service keeps answering, the breaker opens.
        assert_eq!(cache.get("k").await, None);
        assert!(cache.ping().await.is_err());
        assert_eq!(cache.breaker_state(), BreakerState::Open);

        // Redis back: after the cool-down a trial succeeds and the breaker closes.
        proxy.set(Link::Up);
        let started = Instant::now();
        while cache.get("k").await.is_none() {
            assert!(
                started.elapsed() < DEADLINE,
                "cache not back after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(cache.breaker_state(), BreakerState::Closed);
        assert_eq!(cache.ping().await, Ok(()));
        assert!(cache.stats().hits >= 1);
    })
    .await;
    assert_eq!(keys, [1]);
}

#[tokio::test]
async fn a_redis_that_stops_answering_on_an_open_connection_is_cut_off_by_the_timeout() {
    let Some(redis_url) = services::service_url(services::REDIS) else {
        return;
    };
    let url = redis_url.clone();
    let keys = with_prefixes(&redis_url, |[prefix]| async move {
        let proxy = LinkProxy::start(&url, Link::Up).await;
        let cache =
            cache_at(&proxy.url, &prefix).with_breaker(breaker(2, Duration::from_secs(3600)));
        cache.put("k", 1, "v".into()).await;
        assert_eq!(
            cache.get("k").await.as_deref(),
            Some("v"),
            "a pooled, working connection"
        );

        // Only the adapter's own timeout bounds a command on a connection that went
        // silent: deadpool's timeouts cover taking, creating and recycling connections.
        proxy.set(Link::Frozen);
        for _ in 0..2 {
            let (value, took) = timed(cache.get("k")).await;
            assert_eq!(value, None);
            assert!(
                took >= TIMEOUT,
                "gave up after {took:?}, before the timeout"
            );
            assert!(
                took < TIMEOUT * 2,
                "get took {took:?}, well past its {TIMEOUT:?} timeout"
            );
        }
        assert_eq!(cache.breaker_state(), BreakerState::Open);
        let (_, took) = timed(cache.get("k")).await;
        assert!(took < TIMEOUT, "short-circuited get took {took:?}");
        let stats = cache.stats();
        assert_eq!(
            (stats.hits, stats.errors, stats.short_circuited),
            (1, 2, 1),
            "{stats:?}"
        );
    })
    .await;
    assert_eq!(keys, [1]);
}
