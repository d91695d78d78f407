//! Rate limits, CORS, security headers, server limits and TLS, seen from a client.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::{Method, Response, StatusCode};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use userhub::config::Settings;
use userhub::startup::{Application, Roles};
use userhub::web::rate_limit::{Access, ClientKey, ClientRateLimiter};
use userhub::web::{API_CSP, SWAGGER_UI_CSP, SWAGGER_UI_LOGO_STYLE};

use crate::helpers::{DEADLINE, Spawn, TestApp, assert_problem, hs256_token, spawn, test_claims};

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("a positive quota")
}

/// An app whose read and write budgets are `(per_minute, burst)`.
async fn spawn_limited(
    read: (u32, u32),
    write: (u32, u32),
    also: impl FnOnce(&mut Settings) + Send + 'static,
) -> TestApp {
    spawn(Spawn {
        configure: Box::new(move |settings| {
            // Anonymous callers, keyed by address: what these tests are about. Keying by
            // token subject is tested in
            // authenticated_clients_are_limited_per_subject_and_bad_tokens_per_address.
            settings.auth.enabled = false;
            let limits = &mut settings.rate_limit;
            limits.enabled = true;
            (limits.read_per_minute, limits.read_burst) = (nz(read.0), nz(read.1));
            (limits.write_per_minute, limits.write_burst) = (nz(write.0), nz(write.1));
            also(settings);
        }),
        ..Spawn::default()
    })
    .await
}

fn header<'r>(response: &'r Response, name: &str) -> &'r str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("a text header")
}

fn numeric_header(response: &Response, name: &str) -> u64 {
    header(response, name).parse().expect("a number")
}

async fn get_as(app: &TestApp, path: &str, forwarded_for: Option<&str>) -> Response {
    let mut request = app.client.get(app.url(path));
    if let Some(value) = forwarded_for {
        request = request.header("x-forwarded-for", value);
    }
    request.send().await.expect("request sent")
}

#[tokio::test]
async fn a_client_over_its_quota_gets_429_with_headers_then_recovers() {
    // One read at once, refilled every 500 ms.
    let app = spawn_limited((120, 1), (1, 1), |_| {}).await;

    let allowed = app.get("/api/users").await;
    assert_eq!(allowed.status(), StatusCode::OK);
    assert_eq!(header(&allowed, "ratelimit-limit"), "1");
    assert_eq!(header(&allowed, "ratelimit-remaining"), "0");
    assert_eq!(numeric_header(&allowed, "ratelimit-reset"), 1);

    // The next read comes within 500 ms unless the machine stalls; allow a few tries.
    let mut refused = None;
    for _ in 0..20 {
        let response = app.get("/api/users").await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(response);
            break;
        }
    }
    let refused = refused.expect("a burst of reads is refused");
    assert_eq!(
        numeric_header(&refused, "retry-after"),
        1,
        "500 ms, rounded up"
    );
    assert_eq!(header(&refused, "ratelimit-limit"), "1");
    assert_eq!(header(&refused, "ratelimit-remaining"), "0");
    assert!(numeric_header(&refused, "ratelimit-reset") >= 1);
    assert!(refused.headers().contains_key("x-request-id"));
    let problem = assert_problem(refused, StatusCode::TOO_MANY_REQUESTS).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("read quota"),
        "{problem}"
    );

    // Refused requests cost nothing, so polling does not push recovery back.
    let started = Instant::now();
    loop {
        let response = app.get("/api/users").await;
        if response.status() == StatusCode::OK {
            break;
        }
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            started.elapsed() < DEADLINE,
            "still limited after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn reads_and_writes_have_separate_budgets_and_health_and_docs_are_free() {
    // Nothing refills within the test: one request per minute.
    let app = spawn_limited((1, 2), (1, 1), |_| {}).await;

    for _ in 0..2 {
        assert_eq!(app.get("/api/users").await.status(), StatusCode::OK);
    }
    assert_problem(app.get("/api/users").await, StatusCode::TOO_MANY_REQUESTS).await;

    // Reads are spent; the write budget is whole.
    let created = app.post_user("Ada Lovelace", "ada@example.com").await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(header(&created, "ratelimit-limit"), "1");
    assert_eq!(header(&created, "ratelimit-remaining"), "0");
    let refused = app.post_user("Alan Turing", "alan@example.com").await;
    let problem = assert_problem(refused, StatusCode::TOO_MANY_REQUESTS).await;
    assert!(problem["detail"].as_str().unwrap().contains("write quota"));

    for path in [
        "/health",
        "/health/ready",
        "/swagger-ui/",
        "/api-docs/openapi.json",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(
            !response.headers().contains_key("ratelimit-limit"),
            "{path}"
        );
    }
    let options = app
        .client
        .request(Method::OPTIONS, app.url("/api/users"))
        .send()
        .await
        .unwrap();
    assert_ne!(options.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_forwarded_for_from_an_untrusted_peer_is_ignored() {
    // 127.0.0.1 is not among the trusted proxies: every request is 127.0.0.1's.
    let app = spawn_limited((1, 2), (1, 1), |settings| {
        settings.rate_limit.trusted_proxies = vec!["10.0.0.0/8".into()];
    })
    .await;

    for spoofed in ["203.0.113.1", "203.0.113.2"] {
        let response = get_as(&app, "/api/users", Some(spoofed)).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    for spoofed in [Some("203.0.113.3"), Some("10.0.0.1, 203.0.113.4"), None] {
        let response = get_as(&app, "/api/users", spoofed).await;
        assert_eq!(
            response.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{spoofed:?} shares 127.0.0.1's budget"
        );
    }
}

#[tokio::test]
async fn a_forwarded_for_from_a_trusted_proxy_names_the_client() {
    let app = spawn_limited((1, 1), (1, 1), |settings| {
        settings.rate_limit.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;

    let first = get_as(&app, "/api/users", Some("203.0.113.7")).await;
    assert_eq!(first.status(), StatusCode::OK);
    let again = get_as(&app, "/api/users", Some("203.0.113.7")).await;
    assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another client behind the same proxy has its own budget...
    let other = get_as(&app, "/api/users", Some("203.0.113.8")).await;
    assert_eq!(other.status(), StatusCode::OK);
    // ...but what a client writes left of the address the proxy saw does not count.
    let forged = get_as(&app, "/api/users", Some("198.51.100.9, 203.0.113.7")).await;
    assert_eq!(forged.status(), StatusCode::TOO_MANY_REQUESTS);
    // The proxy's own requests are the proxy's.
    let direct = get_as(&app, "/api/users", None).await;
    assert_eq!(direct.status(), StatusCode::OK);
}

fn limiter(per_minute: u32, burst: u32, max_clients: usize) -> ClientRateLimiter {
    let mut settings = Settings::load_for("test")
        .expect("test settings load")
        .rate_limit;
    settings.read_per_minute = nz(per_minute);
    settings.read_burst = nz(burst);
    settings.max_clients = max_clients;
    ClientRateLimiter::from_settings(&settings).expect("limiter builds")
}

fn nth_client(n: u32) -> ClientKey {
    ClientKey::ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000_u32 + n)))
}

#[test]
fn the_number_of_tracked_clients_has_a_hard_cap() {
    // Nothing refills during the test, so nothing can be evicted: only the cap holds.
    let limiter = limiter(1, 1, 100);
    let mut allowed = 0;
    for n in 0..1_000 {
        if limiter.check(&nth_client(n), Access::Read).allowed {
            allowed += 1;
        }
        assert!(limiter.tracked_clients(Access::Read) <= 101);
    }
    assert_eq!(limiter.tracked_clients(Access::Read), 101);
    // 100 clients with a budget of their own, then one shared by all the others.
    assert_eq!(allowed, 101);
    assert!(!limiter.check(&nth_client(0), Access::Read).allowed);
    assert_eq!(limiter.tracked_clients(Access::Write), 0);
}

#[tokio::test]
async fn idle_clients_are_evicted_as_requests_go_on() {
    // A client's state is stale 2 ms after its request (one request per millisecond).
    let limiter = limiter(60_000, 1, 100_000);
    for n in 0..3_000 {
        limiter.check(&nth_client(n), Access::Read);
    }
    let steady = ClientKey::Subject("steady".into());
    let started = Instant::now();
    loop {
        // Only ordinary traffic: the limiter sweeps by itself every so many checks.
        for _ in 0..256 {
            limiter.check(&steady, Access::Read);
        }
        let tracked = limiter.tracked_clients(Access::Read);
        if tracked <= 1 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{tracked} clients still tracked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_full_limiter_makes_room_once_clients_are_idle() {
    let limiter = limiter(60_000, 1, 10);
    for n in 0..10 {
        assert!(limiter.check(&nth_client(n), Access::Read).allowed);
    }
    assert_eq!(limiter.tracked_clients(Access::Read), 10);
    let started = Instant::now();
    let mut n = 10;
    loop {
        // New clients meet a full table; at most once a second that triggers a sweep.
        limiter.check(&nth_client(n), Access::Read);
        n += 1;
        if limiter.tracked_clients(Access::Read) <= 2 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the full table was never swept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const APP_ORIGIN: &str = "https://app.example";

async fn preflight(app: &TestApp, origin: &str, method: &str) -> Response {
    app.client
        .request(Method::OPTIONS, app.url("/api/users"))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .expect("request sent")
}

#[tokio::test]
async fn a_cors_preflight_is_allowed_for_a_listed_origin_and_denied_for_others() {
    // One read per minute: preflights must not count against it.
    let app = spawn_limited((1, 1), (1, 1), |settings| {
        settings.cors.allowed_origins = vec![APP_ORIGIN.into()];
    })
    .await;

    for _ in 0..3 {
        let allowed = preflight(&app, APP_ORIGIN, "POST").await;
        assert_eq!(allowed.status(), StatusCode::OK);
        assert_eq!(header(&allowed, "access-control-allow-origin"), APP_ORIGIN);
        assert!(header(&allowed, "access-control-allow-methods").contains("POST"));
        let allowed_headers = header(&allowed, "access-control-allow-headers");
        assert!(
            allowed_headers.contains("authorization"),
            "{allowed_headers}"
        );
        assert!(
            allowed_headers.contains("content-type"),
            "{allowed_headers}"
        );
        assert!(
            !allowed
                .headers()
                .contains_key("access-control-allow-credentials")
        );
    }

    for (origin, method) in [("https://evil.example", "POST"), (APP_ORIGIN, "DELETE")] {
        let denied = preflight(&app, origin, method).await;
        assert!(!denied.headers().contains_key("access-control-allow-origin"));
        assert!(denied.headers().contains_key("x-content-type-options"));
        assert_problem(denied, StatusCode::BAD_REQUEST).await;
    }

    // An actual request from the listed origin may read the headers it needs.
    let response = app
        .client
        .get(app.url("/api/users"))
        .header("origin", APP_ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "access-control-allow-origin"), APP_ORIGIN);
    let exposed = header(&response, "access-control-expose-headers");
    for name in [
        "x-request-id",
        "link",
        "location",
        "retry-after",
        "ratelimit-remaining",
    ] {
        assert!(exposed.contains(name), "{name} not in {exposed}");
    }
}

#[tokio::test]
async fn by_default_no_origin_is_allowed() {
    let app = spawn(Spawn::default()).await;
    let denied = preflight(&app, APP_ORIGIN, "GET").await;
    assert!(!denied.headers().contains_key("access-control-allow-origin"));
    let problem = assert_problem(denied, StatusCode::BAD_REQUEST).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("Origin"),
        "{problem}"
    );
    let response = app
        .client
        .get(app.url("/health"))
        .header("origin", APP_ORIGIN)
        .send()
        .await
        .unwrap();
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );
}

fn assert_security_headers(response: &Response, csp: &str) {
    let what = response.url().path().to_owned();
    assert_eq!(
        header(response, "x-content-type-options"),
        "nosniff",
        "{what}"
    );
    assert_eq!(header(response, "x-frame-options"), "DENY", "{what}");
    assert_eq!(header(response, "referrer-policy"), "no-referrer", "{what}");
    assert_eq!(header(response, "content-security-policy"), csp, "{what}");
    assert!(
        !response.headers().contains_key("strict-transport-security"),
        "{what}: HSTS over plain HTTP"
    );
}

#[tokio::test]
async fn security_headers_are_on_api_error_and_swagger_answers() {
    let app = spawn_limited((1, 2), (1, 1), |_| {}).await;

    let api = [
        (app.get("/health").await, StatusCode::OK),
        (app.get("/api-docs/openapi.json").await, StatusCode::OK),
        (
            app.get("/api/users/not-a-uuid").await,
            StatusCode::BAD_REQUEST,
        ),
        (app.get("/nope").await, StatusCode::NOT_FOUND),
        // The two reads above spent the budget.
        (app.get("/api/users").await, StatusCode::TOO_MANY_REQUESTS),
        (
            preflight(&app, APP_ORIGIN, "GET").await,
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (response, status) in &api {
        assert_eq!(response.status(), *status, "{}", response.url());
        assert_security_headers(response, API_CSP);
    }
    assert!(API_CSP.contains("default-src 'none'"));

    let page = app.get("/swagger-ui/").await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_security_headers(&page, SWAGGER_UI_CSP);
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("<script>") && !html.contains("<style>"),
        "inline code in the page would need a looser CSP"
    );
    let preset = app.get("/swagger-ui/swagger-ui-standalone-preset.js").await;
    assert_security_headers(&preset, SWAGGER_UI_CSP);
    // The only inline style Swagger UI injects is the one whose hash the CSP allows.
    let script = preset.text().await.unwrap();
    assert!(script.contains(&format!(
        "createElement(\"style\",null,\"{SWAGGER_UI_LOGO_STYLE}\")"
    )));
    let digest = sha2::Sha256::digest(SWAGGER_UI_LOGO_STYLE.as_bytes());
    let hash = base64::engine::general_purpose::STANDARD.encode(digest);
    assert!(SWAGGER_UI_CSP.contains(&format!("'sha256-{hash}'")));
    assert!(!SWAGGER_UI_CSP.contains("unsafe"));
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_after_the_configured_timeout() {
    let app = spawn(Spawn {
        configure: Box::new(|settings| settings.server.client_request_timeout_ms = 300),
        ..Spawn::default()
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the server hangs up well before its old 10 s timeout")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn keep_alive_can_be_turned_off() {
    let app = spawn(Spawn {
        configure: Box::new(|settings| settings.server.keep_alive_secs = 0),
        ..Spawn::default()
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The server closes the connection after one answer: read_to_end returns.
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the connection is closed after the answer")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

/// A self-signed certificate for 127.0.0.1 and localhost, written as `{name}.crt` and
/// `{name}.key` in `dir`; returns the certificate's PEM.
fn write_certificate(dir: &std::path::Path, name: &str) -> String {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate generated");
    let cert_pem = certified.cert.pem();
    std::fs::write(dir.join(format!("{name}.crt")), &cert_pem).unwrap();
    std::fs::write(
        dir.join(format!("{name}.key")),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    cert_pem
}

#[tokio::test]
async fn https_is_served_when_a_certificate_is_configured() {
    let dir = tempfile::TempDir::new().unwrap();
    let cert_pem = write_certificate(dir.path(), "server");
    let path = dir.path().to_owned();
    let app = spawn(Spawn {
        configure: Box::new(move |settings| {
            settings.server.tls.cert_path = Some(path.join("server.crt"));
            settings.server.tls.key_path = Some(path.join("server.key"));
        }),
        ..Spawn::default()
    })
    .await;
    let https = app.address.replacen("http://", "https://", 1);

    userhub::crypto::install_crypto_provider();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let response = client
        .get(format!("{https}/health"))
        .send()
        .await
        .expect("TLS handshake with the configured certificate");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "strict-transport-security"),
        "max-age=63072000"
    );

    // Plain HTTP on the TLS port gets no answer.
    let plain = app.client.get(app.url("/health")).send().await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
}

async fn build_error(configure: impl FnOnce(&mut Settings)) -> String {
    let dir = tempfile::TempDir::new().unwrap();
    let mut settings = Settings::load_for("test").expect("test settings load");
    let sqlite = format!("sqlite://{}", dir.path().join("userhub.db").display());
    settings.database.url = sqlite.clone().into();
    settings.documents.url = sqlite.into();
    settings.server.port = 0;
    configure(&mut settings);
    match Application::build(settings, Roles::ALL).await {
        Ok(_) => panic!("the application started"),
        Err(error) => format!("{error:#}"),
    }
}

#[tokio::test]
async fn a_missing_or_mismatched_tls_file_stops_the_start() {
    let dir = tempfile::TempDir::new().unwrap();
    write_certificate(dir.path(), "one");
    write_certificate(dir.path(), "two");
    let path = dir.path().to_owned();

    let p = path.clone();
    let missing = build_error(move |s| {
        s.server.tls.cert_path = Some(p.join("missing.crt"));
        s.server.tls.key_path = Some(p.join("one.key"));
    })
    .await;
    assert!(
        missing.contains("server.tls.cert_path") && missing.contains("missing.crt"),
        "{missing}"
    );

    let p = path.clone();
    let mismatched = build_error(move |s| {
        s.server.tls.cert_path = Some(p.join("one.crt"));
        s.server.tls.key_path = Some(p.join("two.key"));
    })
    .await;
    assert!(mismatched.contains("does not fit"), "{mismatched}");

    let p = path.clone();
    let not_a_key = build_error(move |s| {
        s.server.tls.cert_path = Some(p.join("one.crt"));
        s.server.tls.key_path = Some(p.join("one.crt"));
    })
    .await;
    assert!(not_a_key.contains("no PEM private key"), "{not_a_key}");

    let p = path.clone();
    let half = build_error(move |s| s.server.tls.cert_path = Some(p.join("one.crt"))).await;
    assert!(half.contains("must be set together"), "{half}");
}

#[tokio::test]
async fn a_wildcard_origin_or_a_bad_proxy_stops_the_start() {
    let wildcard = build_error(|s| s.cors.allowed_origins = vec!["*".into()]).await;
    assert!(wildcard.contains("cors.allowed_origins"), "{wildcard}");
    let proxy = build_error(|s| s.rate_limit.trusted_proxies = vec!["gateway".into()]).await;
    assert!(proxy.contains("rate_limit.trusted_proxies"), "{proxy}");
}

#[tokio::test]
async fn authenticated_clients_are_limited_per_subject_and_bad_tokens_per_address() {
    let app = spawn(Spawn {
        configure: Box::new(|settings| {
            let limits = &mut settings.rate_limit;
            (limits.read_per_minute, limits.read_burst) = (nz(1), nz(1));
        }),
        ..Spawn::default()
    })
    .await;
    let (alice, bob) = (
        hs256_token(&test_claims("alice", &["users:read"])),
        hs256_token(&test_claims("bob", &["users:read"])),
    );
    // Same address, two subjects: two budgets.
    assert_eq!(
        app.get_with_token("/api/users", Some(&alice))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        app.get_with_token("/api/users", Some(&bob)).await.status(),
        StatusCode::OK
    );
    let again = app.get_with_token("/api/users", Some(&alice)).await;
    assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);

    // Refused tokens are counted against the address, before the 401 is answered: a
    // flood of bad tokens is throttled like anything else.
    let first = app.get_with_token("/api/users", Some("not.a.token")).await;
    assert_eq!(first.status(), StatusCode::UNAUTHORIZED);
    let flood = app
        .get_with_token("/api/users", Some("still.not.atoken"))
        .await;
    assert_eq!(flood.status(), StatusCode::TOO_MANY_REQUESTS);
    let anonymous = app.get_with_token("/api/users", None).await;
    assert_eq!(anonymous.status(), StatusCode::TOO_MANY_REQUESTS);
}
