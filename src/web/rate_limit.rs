//! Per-client rate limiting: separate read and write budgets (GCRA, from governor),
//! keyed by the authenticated subject or the client IP, tracking a bounded number of
//! clients.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix_web::HttpMessage;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use anyhow::{Context, bail};
use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use ipnet::IpNet;

use super::identity::Principal;
use super::problem::Problem;
use crate::config::RateLimitSettings;

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// A budget sweeps out idle clients after this many checks...
const SWEEP_EVERY: u64 = 1024;
/// ...and, while it is full, at most this often.
const FULL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// At most one "budget full" warning per this interval.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// `X-Forwarded-For` hops examined, right to left, before giving up.
const MAX_FORWARDED_HOPS: usize = 32;

/// Who a budget belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An authenticated caller: the token's subject.
    Subject(String),
    /// An anonymous caller: its IPv4 address, or its IPv6 /64 (one subscriber's prefix).
    Ip(IpAddr),
    /// The budget that clients share once `max_clients` others are being tracked.
    Overflow,
}

impl ClientKey {
    pub fn ip(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !(u128::from(u64::MAX));
                Self::Ip(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => Self::Ip(v4),
        }
    }
}

/// Which budget a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// `None` for requests that are never limited (OPTIONS).
    pub fn of(method: &Method) -> Option<Self> {
        match *method {
            Method::OPTIONS => None,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE => Some(Self::Write),
            _ => Some(Self::Read),
        }
    }
}

/// The outcome of one check, with what the `RateLimit-*` headers report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests the client may send at once (the burst).
    pub limit: u32,
    /// Requests left right now.
    pub remaining: u32,
    /// Until the whole burst is available again.
    pub reset: Duration,
    /// Until the next request would be allowed (set when refused).
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// Sets `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds, rounded
    /// up) and, when refused, `Retry-After` (seconds, rounded up).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        headers.insert(RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(RATELIMIT_RESET, HeaderValue::from(ceil_secs(self.reset)));
        if let Some(wait) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(ceil_secs(wait)));
        }
    }
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The read and write budgets of every client, and who counts as a trusted proxy.
pub struct ClientRateLimiter {
    reads: Budget,
    writes: Budget,
    trusted_proxies: Vec<IpNet>,
}

impl ClientRateLimiter {
    /// Builds the limiter from `rate_limit.*`; fails on an unparsable proxy address or a
    /// zero `max_clients`.
    pub fn from_settings(settings: &RateLimitSettings) -> anyhow::Result<Self> {
        if settings.max_clients == 0 {
            bail!("rate_limit.max_clients must be at least 1");
        }
        let trusted_proxies = settings
            .trusted_proxies
            .iter()
            .map(|raw| parse_network(raw))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            reads: Budget::new(
                settings.read_per_minute,
                settings.read_burst,
                settings.max_clients,
            ),
            writes: Budget::new(
                settings.write_per_minute,
                settings.write_burst,
                settings.max_clients,
            ),
            trusted_proxies,
        })
    }

    /// Takes one request from `key`'s budget for `access`.
    pub fn check(&self, key: &ClientKey, access: Access) -> Decision {
        self.budget(access).check(key)
    }

    /// Clients currently tracked by the budget for `access` (the shared overflow budget
    /// included): at most `max_clients` + 1, give or take requests racing each other.
    pub fn tracked_clients(&self, access: Access) -> usize {
        self.budget(access).limiter.len()
    }

    /// Forgets clients whose budget is full again (they are indistinguishable from new
    /// ones). Runs by itself every few requests; public for tests and operators.
    pub fn sweep(&self) {
        self.reads.sweep();
        self.writes.sweep();
    }

    fn budget(&self, access: Access) -> &Budget {
        match access {
            Access::Read => &self.reads,
            Access::Write => &self.writes,
        }
    }

    /// The token subject when the request is authenticated, else the client IP.
    pub fn client_key(&self, req: &ServiceRequest) -> ClientKey {
        if let Some(principal) = req.extensions().get::<Principal>() {
            return ClientKey::Subject(principal.subject.clone());
        }
        let peer = req.peer_addr().map(|addr| addr.ip());
        let ip = self
            .client_ip(peer, req.headers())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        ClientKey::ip(ip)
    }

    /// The TCP peer, unless it is a trusted proxy: then the rightmost `X-Forwarded-For`
    /// hop that is not itself a trusted proxy (hops left of it are the client's to forge).
    /// An unparsable hop ends the walk at the trusted hop to its right.
    pub fn client_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?.to_canonical();
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let values: Vec<&HeaderValue> = headers.get_all(X_FORWARDED_FOR).collect();
        let hops = values
            .iter()
            .rev()
            .flat_map(|value| match value.to_str() {
                Ok(list) => list.rsplit(',').collect::<Vec<_>>(),
                Err(_) => vec![""],
            })
            .take(MAX_FORWARDED_HOPS);
        let mut client = peer;
        for hop in hops {
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        Some(client)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

fn parse_network(raw: &str) -> anyhow::Result<IpNet> {
    let raw = raw.trim();
    raw.parse::<IpNet>()
        .or_else(|_| raw.parse::<IpAddr>().map(IpNet::from))
        .with_context(|| {
            format!("rate_limit.trusted_proxies: {raw:?} is neither an IP address nor a CIDR")
        })
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`[::1]:80`, `1.2.3.4:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|addr| addr.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

type Limiter =
    governor::RateLimiter<ClientKey, BoundedStore, DefaultClock, StateInformationMiddleware>;

/// One quota, applied per client.
struct Budget {
    limiter: Limiter,
    quota: Quota,
    max_clients: usize,
    /// Set by the store when it sent a new client to the overflow budget.
    full: Arc<AtomicBool>,
    checks: AtomicU64,
    created: Instant,
    last_sweep_ms: AtomicU64,
    last_warning_ms: AtomicU64,
}

impl Budget {
    fn new(per_minute: NonZeroU32, burst: NonZeroU32, max_clients: usize) -> Self {
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        let full = Arc::new(AtomicBool::new(false));
        let store = BoundedStore {
            map: DashMapStateStore::default(),
            max_clients,
            full: full.clone(),
        };
        Self {
            limiter: Limiter::new(quota, store, DefaultClock::default()),
            quota,
            max_clients,
            full,
            checks: AtomicU64::new(0),
            created: Instant::now(),
            last_sweep_ms: AtomicU64::new(0),
            last_warning_ms: AtomicU64::new(0),
        }
    }

    fn check(&self, key: &ClientKey) -> Decision {
        let limit = self.quota.burst_size().get();
        let per_request = self.quota.replenish_interval();
        let decision = match self.limiter.check_key(key) {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit,
                    remaining,
                    // An upper bound: the used part of the burst refills one per interval.
                    reset: per_request * (limit - remaining),
                    retry_after: None,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Decision {
                    allowed: false,
                    limit,
                    remaining: 0,
                    reset: wait + per_request * (limit - 1),
                    retry_after: Some(wait),
                }
            }
        };
        self.housekeeping();
        decision
    }

    /// Sweeps every `SWEEP_EVERY` checks, and (at most once a second) while full.
    fn housekeeping(&self) {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed) + 1;
        let now_ms = self.elapsed_ms();
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        let due = checks.is_multiple_of(SWEEP_EVERY)
            || (self.full.load(Ordering::Relaxed)
                && now_ms.saturating_sub(last) >= FULL_SWEEP_INTERVAL.as_millis() as u64);
        // One sweeper at a time; the others go on with their request.
        if due
            && self
                .last_sweep_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.sweep();
        }
    }

    fn sweep(&self) {
        self.limiter.retain_recent();
        let tracked = self.limiter.len();
        let still_full = tracked >= self.max_clients;
        self.full.store(still_full, Ordering::Relaxed);
        if still_full {
            let now_ms = self.elapsed_ms();
            let last = self.last_warning_ms.load(Ordering::Relaxed);
            if (last == 0
                || now_ms.saturating_sub(last) >= FULL_WARNING_INTERVAL.as_millis() as u64)
                && self
                    .last_warning_ms
                    .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    tracked,
                    "rate limiter is tracking rate_limit.max_clients active clients; \
                     new clients share one budget until idle ones are evicted"
                );
            }
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// governor's concurrent map, with a cap: once `max_clients` keys are tracked, a new
/// client is counted against the shared [`ClientKey::Overflow`] budget instead of
/// getting an entry of its own, so memory stays bounded whoever sends requests.
struct BoundedStore {
    map: DashMapStateStore<ClientKey>,
    max_clients: usize,
    full: Arc<AtomicBool>,
}

impl StateStore for BoundedStore {
    type Key = ClientKey;

    fn measure_and_replace<T, F, E>(&self, key: &ClientKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if !self.map.contains_key(key) && self.map.len() >= self.max_clients {
            self.full.store(true, Ordering::Relaxed);
            return self.map.measure_and_replace(&ClientKey::Overflow, f);
        }
        self.map.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<ClientKey> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.map, drop_below);
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Whether a path is exempt from limiting: health checks, metrics scrapes and the API
/// documentation.
pub fn is_exempt(path: &str) -> bool {
    path == "/"
        || path == "/health"
        || path.starts_with("/health/")
        || path == "/metrics"
        || path == "/swagger-ui"
        || path.starts_with("/swagger-ui/")
        || path.starts_with("/api-docs/")
}

/// Middleware: draws each request from its client's read or write budget; refuses it
/// with 429 problem+json once the budget is spent. Every limited response carries the
/// `RateLimit-*` headers. `None` (rate_limit.enabled = false) lets everything through.
pub async fn limit<B: MessageBody>(
    limiter: Option<Arc<ClientRateLimiter>>,
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let access = Access::of(req.method()).filter(|_| !is_exempt(req.path()));
    let (Some(limiter), Some(access)) = (limiter, access) else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let key = limiter.client_key(&req);
    let decision = limiter.check(&key, access);
    if !decision.allowed {
        tracing::debug!(client = ?key, ?access, "rate limited");
        let wait = decision.retry_after.map_or(1, ceil_secs);
        let kind = match access {
            Access::Read => "read",
            Access::Write => "write",
        };
        let mut response = Problem::status(StatusCode::TOO_MANY_REQUESTS)
            .detail(format!(
                "This client has used up its {kind} quota; retry in {wait} s"
            ))
            .response();
        decision.write_headers(response.headers_mut());
        return Ok(req.into_response(response).map_into_right_body());
    }
    let mut response = next.call(req).await?;
    decision.write_headers(response.headers_mut());
    Ok(response.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use actix_web::test::TestRequest;

    use super::*;

    fn settings(trusted: &[&str]) -> RateLimitSettings {
        RateLimitSettings {
            enabled: true,
            read_per_minute: NonZeroU32::new(1).unwrap(),
            read_burst: NonZeroU32::new(2).unwrap(),
            write_per_minute: NonZeroU32::new(1).unwrap(),
            write_burst: NonZeroU32::new(1).unwrap(),
            max_clients: 10,
            trusted_proxies: trusted.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn limiter(trusted: &[&str]) -> ClientRateLimiter {
        ClientRateLimiter::from_settings(&settings(trusted)).unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(X_FORWARDED_FOR, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn ip(raw: &str) -> IpAddr {
        raw.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let limiter = limiter(&[]);
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(
            limiter.client_ip(Some(ip("127.0.0.1")), &headers),
            Some(ip("127.0.0.1"))
        );
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        let limiter = limiter(&["10.0.0.0/8", "127.0.0.1"]);
        let peer = Some(ip("10.1.2.3"));
        // The client wrote the leftmost entry itself; the proxies appended the rest.
        let cases = [
            (vec!["198.51.100.1, 203.0.113.9"], "203.0.113.9"),
            (vec!["198.51.100.1, 203.0.113.9, 10.0.0.7"], "203.0.113.9"),
            (
                vec!["198.51.100.1", "203.0.113.9 , 127.0.0.1"],
                "203.0.113.9",
            ),
            (vec!["[2001:db8::1]:4711"], "2001:db8::1"),
            (vec!["203.0.113.9:4711"], "203.0.113.9"),
            // Garbage ends the walk at the trusted hop to its right.
            (vec!["203.0.113.9, garbage, 10.0.0.7"], "10.0.0.7"),
            (vec!["203.0.113.9, garbage"], "10.1.2.3"),
            // Only proxies: the leftmost one is as far as we can see.
            (vec!["10.0.0.5, 10.0.0.6"], "10.0.0.5"),
            (vec![], "10.1.2.3"),
        ];
        for (values, expected) in cases {
            assert_eq!(
                limiter.client_ip(peer, &forwarded(&values)),
                Some(ip(expected)),
                "{values:?}"
            );
        }
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_proxies() {
        let limiter = limiter(&["127.0.0.1"]);
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(
            limiter.client_ip(Some(ip("::ffff:127.0.0.1")), &headers),
            Some(ip("203.0.113.9"))
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_prefix() {
        assert_eq!(
            ClientKey::ip(ip("2001:db8:1:2:aaaa::1")),
            ClientKey::ip(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            ClientKey::ip(ip("2001:db8:1:2::1")),
            ClientKey::ip(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            ClientKey::ip(ip("::ffff:192.0.2.1")),
            ClientKey::Ip(ip("192.0.2.1"))
        );
    }

    #[test]
    fn an_authenticated_request_is_keyed_by_its_subject() {
        let limiter = limiter(&[]);
        let req = TestRequest::get()
            .peer_addr("192.0.2.1:5000".parse().unwrap())
            .to_srv_request();
        assert_eq!(limiter.client_key(&req), ClientKey::Ip(ip("192.0.2.1")));
        req.extensions_mut().insert(Principal {
            subject: "alice".into(),
            roles: BTreeSet::new(),
        });
        assert_eq!(limiter.client_key(&req), ClientKey::Subject("alice".into()));
    }

    #[test]
    fn the_headers_count_down_and_a_refusal_says_when_to_retry() {
        let limiter = limiter(&[]);
        let key = ClientKey::Subject("bob".into());
        let first = limiter.check(&key, Access::Read);
        assert!(first.allowed);
        assert_eq!((first.limit, first.remaining), (2, 1));
        // One request per minute refills: one used means full again within 60 s.
        assert_eq!(ceil_secs(first.reset), 60);
        let second = limiter.check(&key, Access::Read);
        assert_eq!((second.allowed, second.remaining), (true, 0));
        let third = limiter.check(&key, Access::Read);
        assert!(!third.allowed);
        let wait = third.retry_after.unwrap();
        assert!(wait > Duration::from_secs(58) && wait <= Duration::from_secs(60));
        assert!(third.reset > Duration::from_secs(118));

        let mut headers = HeaderMap::new();
        third.write_headers(&mut headers);
        assert_eq!(headers.get(header::RETRY_AFTER).unwrap(), "60");
        assert_eq!(headers.get(RATELIMIT_LIMIT).unwrap(), "2");
        assert_eq!(headers.get(RATELIMIT_REMAINING).unwrap(), "0");
        assert_eq!(headers.get(RATELIMIT_RESET).unwrap(), "120");
    }

    #[test]
    fn bad_proxy_entries_and_zero_capacity_are_refused() {
        let error = ClientRateLimiter::from_settings(&settings(&["10.0.0.0/8", "proxy"]))
            .err()
            .unwrap();
        assert!(format!("{error:#}").contains("\"proxy\""), "{error:#}");
        let mut zero = settings(&[]);
        zero.max_clients = 0;
        assert!(ClientRateLimiter::from_settings(&zero).is_err());
    }

    #[test]
    fn options_health_and_docs_are_exempt() {
        assert_eq!(Access::of(&Method::OPTIONS), None);
        assert_eq!(Access::of(&Method::HEAD), Some(Access::Read));
        assert_eq!(Access::of(&Method::DELETE), Some(Access::Write));
        for path in [
            "/",
            "/health",
            "/health/ready",
            "/swagger-ui/",
            "/api-docs/openapi.json",
        ] {
            assert!(is_exempt(path), "{path}");
        }
        for path in [
            "/api/users",
            "/healthz",
            "/users/enriched/x",
            "/admin/dead-letters",
        ] {
            assert!(!is_exempt(path), "{path}");
        }
    }
}
