//! Authentication and roles: bearer tokens on the protected routes, every way a token
//! can be wrong, both key sources (the HS256 secret; an OIDC JWKS, with rotation and a
//! rate-limited re-fetch), production refusals, `userhub token`, the OpenAPI security
//! declarations, and tokens and secrets kept out of the log.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use reqwest::{Method, Response, StatusCode};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tempfile::TempDir;
use userhub::config::{DEVELOPMENT_HS256_SECRET, Settings};
use userhub::startup::{Application, Roles};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::{
    Api, DEADLINE, Spawn, TEST_AUTH, TestApp, assert_problem, hs256_token, init_tracing, spawn,
    spawn_app, test_claims, token_with_roles,
};

const NIL: &str = "00000000-0000-0000-0000-000000000000";

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// One request of each route class the policy protects, and the role it needs.
fn protected_routes() -> Vec<(Method, String, &'static str)> {
    vec![
        (Method::GET, "/api/users".into(), "users:read"),
        (Method::GET, format!("/api/users/{NIL}"), "users:read"),
        (
            Method::GET,
            format!("/api/users/{NIL}/profile"),
            "users:read",
        ),
        (Method::GET, format!("/users/enriched/{NIL}"), "users:read"),
        (Method::POST, "/api/users".into(), "users:write"),
        (Method::PATCH, format!("/api/users/{NIL}"), "users:write"),
        (Method::DELETE, format!("/api/users/{NIL}"), "users:write"),
        (Method::GET, "/admin/dead-letters".into(), "admin"),
        (
            Method::POST,
            format!("/admin/dead-letters/{NIL}/replay"),
            "admin",
        ),
        (Method::POST, "/admin/dead-letters/replay".into(), "admin"),
        (Method::POST, "/admin/reenrich".into(), "admin"),
    ]
}

/// Sends one request of `protected_routes` (a fresh valid user for the POST).
async fn send(app: &TestApp, method: &Method, path: &str, token: Option<&str>) -> Response {
    let mut request = app.request_with_token(method.clone(), path, token);
    if method == Method::POST && path == "/api/users" {
        let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
        request = request.json(&json!({"name": "Grace Hopper", "email": email}));
    } else if method == Method::PATCH {
        request = request.json(&json!({"name": "Grace Hopper"}));
    } else if path == "/admin/reenrich" {
        request = request.json(&json!({"uuids": []}));
    }
    request.send().await.expect("request sent")
}

fn www_authenticate(response: &Response) -> String {
    response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Asserts a 401 problem with a Bearer challenge: a bare one when `error` is `None`
/// (no token sent), else one naming `error` with a description.
async fn assert_unauthorized(response: Response, error: Option<&str>) -> Value {
    let challenge = www_authenticate(&response);
    let body = assert_problem(response, StatusCode::UNAUTHORIZED).await;
    match error {
        None => assert_eq!(challenge, r#"Bearer realm="userhub""#),
        Some(error) => {
            assert!(
                challenge.starts_with(r#"Bearer realm="userhub", "#),
                "{challenge}"
            );
            assert!(
                challenge.contains(&format!(r#"error="{error}""#)),
                "{challenge}"
            );
            assert!(challenge.contains(r#"error_description=""#), "{challenge}");
        }
    }
    body
}

/// Asserts that GET /api/users refuses `token` as invalid; returns the problem.
async fn assert_invalid_token(app: &TestApp, token: &str) -> Value {
    let response = app.get_with_token("/api/users", Some(token)).await;
    assert_unauthorized(response, Some("invalid_token")).await
}

/// Asserts that GET /api/users accepts `token`.
async fn assert_accepted(app: &TestApp, token: &str) {
    let response = app.get_with_token("/api/users", Some(token)).await;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn spawn_with(configure: impl FnOnce(&mut Settings) + Send + 'static) -> TestApp {
    spawn(Spawn {
        // Every role: production (which some tests configure) refuses embedded stores
        // split across processes.
        roles: Roles::ALL,
        configure: Box::new(configure),
        ..Spawn::default()
    })
    .await
}

async fn spawn_with_jwks(url: String, min_refresh_secs: u64) -> TestApp {
    spawn_with(move |settings| {
        settings.auth.jwks_url = url;
        settings.auth.jwks_min_refresh_secs = min_refresh_secs;
    })
    .await
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A token assembled by hand: any header, any signature bytes.
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

/// A token signed with HMAC-`alg` and any key bytes, with an optional `kid`.
fn hmac_token(alg: Algorithm, key: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let header = Header {
        kid: kid.map(str::to_owned),
        ..Header::new(alg)
    };
    let key = EncodingKey::from_secret(key).expect("HMAC key");
    jsonwebtoken::encode(&header, claims, &key).expect("token signs")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Read-only, admin-less claims for the test user, with `edit` applied.
fn claims_with(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut claims = test_claims("test-user", &["users:read"]);
    if let Value::Object(map) = &mut claims {
        edit(map);
    }
    claims
}

/// A signing key of the test OIDC provider, with its public JWK.
pub(crate) struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl TestKey {
    /// An RSA key of tests/fixtures/auth/ (RS256).
    pub(crate) fn rsa(fixture: &str, kid: &str) -> Self {
        let pem = std::fs::read(fixture_path(&format!("{fixture}.key.pem"))).expect("fixture");
        Self::new(
            EncodingKey::from_rsa_pem(&pem).expect("RSA key"),
            Algorithm::RS256,
            kid,
        )
    }

    /// A fresh P-256 key (ES256).
    fn ec(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
        let encoding = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("EC PEM");
        Self::new(encoding, Algorithm::ES256, kid)
    }

    fn new(encoding: EncodingKey, alg: Algorithm, kid: &str) -> Self {
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("public JWK");
        jwk.common.key_id = Some(kid.to_owned());
        Self {
            kid: kid.to_owned(),
            alg,
            encoding,
            jwk: serde_json::to_value(&jwk).expect("JWK JSON"),
        }
    }

    pub(crate) fn sign(&self, claims: &Value) -> String {
        self.sign_as(self.alg, Some(&self.kid), claims)
    }

    /// Signs with this key but any algorithm of its family and any `kid`.
    fn sign_as(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let header = Header {
            kid: kid.map(str::to_owned),
            ..Header::new(alg)
        };
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("token signs")
    }
}

fn fixture_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

pub(crate) fn jwk_set(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>()})
}

/// A test OIDC provider's JWKS endpoint whose key set the test can swap (rotation).
struct TestJwks {
    server: MockServer,
    answer: Arc<Mutex<(Value, Duration, u16)>>,
}

/// Answers with the current key set after the current delay, with the current status.
struct ServeKeys(Arc<Mutex<(Value, Duration, u16)>>);

impl Respond for ServeKeys {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let (keys, delay, status) = self.0.lock().unwrap().clone();
        ResponseTemplate::new(status)
            .set_body_json(keys)
            .set_delay(delay)
    }
}

impl TestJwks {
    async fn serving(keys: &[&TestKey]) -> Self {
        let server = MockServer::start().await;
        let answer = Arc::new(Mutex::new((jwk_set(keys), Duration::ZERO, 200)));
        Mock::given(wiremock::matchers::method("GET"))
            .and(wiremock::matchers::path("/certs"))
            .respond_with(ServeKeys(answer.clone()))
            .mount(&server)
            .await;
        Self { server, answer }
    }

    fn url(&self) -> String {
        format!("{}/certs", self.server.uri())
    }

    /// Publishes another key set (the provider rotated its keys).
    fn publish(&self, keys: &[&TestKey]) {
        self.answer.lock().unwrap().0 = jwk_set(keys);
    }

    /// Makes every later answer carry `status` (an outage of the provider).
    fn answer_with_status(&self, status: u16) {
        self.answer.lock().unwrap().2 = status;
    }

    /// Makes every later answer take `delay`.
    fn answer_after(&self, delay: Duration) {
        self.answer.lock().unwrap().1 = delay;
    }

    /// How many times the app fetched the key set.
    async fn fetches(&self) -> usize {
        self.server
            .received_requests()
            .await
            .map_or(0, |requests| requests.len())
    }
}

/// Builds the application with the test settings, `configure` applied, and returns
/// why it refused to start. Also checks it refused before creating its database.
pub(crate) async fn start_error(configure: impl FnOnce(&mut Settings)) -> String {
    init_tracing();
    let dir = TempDir::new().expect("temporary folder");
    let database = dir.path().join("userhub.db");
    let url = format!("sqlite://{}", database.display());
    let mut settings = Settings::load_for("test").expect("test settings load");
    settings.database.url = url.clone().into();
    settings.documents.url = url.into();
    configure(&mut settings);
    // Every role: production refuses embedded stores split across processes.
    let error = match Application::build(settings, Roles::ALL).await {
        Ok(_) => panic!("the application must refuse to start"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        !database.exists(),
        "the configuration is checked before anything is opened"
    );
    error
}

/// The `userhub` binary with the test configuration and a clean environment.
fn userhub(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_userhub"));
    command
        .args(args)
        .env("APP_ENV", "test")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command` to its end (killing it at the deadline): success, stdout, stderr.
fn run_to_exit(mut command: Command) -> (bool, String, String) {
    let mut child = command.spawn().expect("userhub starts");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            let mut stdout = String::new();
            let mut stderr = String::new();
            if let Some(mut out) = child.stdout.take() {
                out.read_to_string(&mut stdout).expect("stdout");
            }
            if let Some(mut err) = child.stderr.take() {
                err.read_to_string(&mut stderr).expect("stderr");
            }
            return (status.success(), stdout, stderr);
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("userhub did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `userhub serve`, killed when dropped, its output (stdout and stderr)
/// collected line by line.
struct Server {
    child: Child,
    api: Api,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(env: &[(&str, &str)], dir: &TempDir) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
            .to_string();
        let database = format!("sqlite://{}", dir.path().join("userhub.db").display());
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.extend([
            ("APP__SERVER__PORT", port.as_str()),
            ("APP__DATABASE__URL", database.as_str()),
            ("APP__DOCUMENTS__URL", database.as_str()),
        ]);
        let mut child = userhub(&["serve"], &env).spawn().expect("userhub starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        for stream in streams {
            let output = output.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line);
                }
            }));
        }
        Self {
            child,
            api: Api::new(format!("http://127.0.0.1:{port}")),
            output,
            readers,
        }
    }

    async fn wait_until_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(response) = self.api.anonymous.get(self.api.url("/health")).send().await
                && response.status() == StatusCode::OK
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "userhub exited ({status}): {}",
                    self.output.lock().unwrap().join("\n")
                );
            }
            assert!(started.elapsed() < DEADLINE, "userhub never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server and returns everything it printed.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.output.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// No token, public routes
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn every_protected_route_answers_401_with_a_bearer_challenge_without_a_token() {
    let app = spawn_app().await;
    for (method, path, _) in protected_routes() {
        let response = send(&app, &method, &path, None).await;
        let problem = assert_unauthorized(response, None).await;
        assert!(
            problem["detail"].as_str().unwrap().contains("bearer token"),
            "{method} {path}: {problem}"
        );
    }
    // Another scheme is no bearer token either (RFC 6750 §3.1: a bare challenge).
    let response = app
        .anonymous
        .get(app.url("/api/users"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_unauthorized(response, None).await;
}

#[tokio::test]
async fn health_docs_and_preflights_need_no_token() {
    let app = spawn_app().await;
    for path in [
        "/health",
        "/health/ready",
        "/api-docs/openapi.json",
        "/swagger-ui/",
    ] {
        let response = app.get_with_token(path, None).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let root = app.get_with_token("/", None).await;
    assert_eq!(root.status(), StatusCode::FOUND);
    // OPTIONS is left to the CORS middleware: never a 401 here.
    for path in ["/api/users", "/admin/dead-letters"] {
        let response = app
            .request_with_token(Method::OPTIONS, path, None)
            .send()
            .await
            .unwrap();
        assert_ne!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "OPTIONS {path}"
        );
    }
}

#[tokio::test]
async fn encoded_or_odd_paths_do_not_slip_past_the_policy() {
    let app = spawn_app().await;
    app.create_user("Ada Lovelace", "ada@example.com").await;
    let enriched = format!("/users/%65nriched/{NIL}");
    for path in [
        "/%61pi/users",
        "/api/%75sers",
        "/%61dmin/dead-letters",
        enriched.as_str(),
        "/api/users/",
        "//api/users",
        "/API/users",
        "/api/users;x",
        "/api/users/../users",
        "/health/../api/users",
    ] {
        let response = app.get_with_token(path, None).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(
            status == StatusCode::UNAUTHORIZED || status == StatusCode::NOT_FOUND,
            "{path}: {status} {body}"
        );
        assert!(!body.contains("ada@example.com"), "{path} leaked: {body}");
    }
    // The policy sees the path the router matches (percent-decoded).
    for path in ["/%61pi/users", "/api/%75sers", "/%61dmin/dead-letters"] {
        assert_unauthorized(app.get_with_token(path, None).await, None).await;
    }
}

// ---------------------------------------------------------------------------------
// Invalid tokens (HS256 secret)
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_malformed_token_is_401_invalid_token() {
    let app = spawn_app().await;
    let valid = token_with_roles(&["users:read"]);
    let not_json = format!(
        "{}.{}.c2ln",
        b64(b"hello"),
        b64(test_claims("x", &[]).to_string().as_bytes())
    );
    let huge = format!("{valid}{}", "A".repeat(9 * 1024));
    for token in [
        "not-a-jwt",
        "a.b.c",
        "a.b",
        ".....",
        &format!("{valid}.extra"),
        &not_json,
        &huge,
        &format!("{valid} trailing"),
    ] {
        assert_invalid_token(&app, token).await;
    }
    let twice = format!("Bearer {valid}");
    for headers in [vec!["Bearer"], vec!["Bearer    "], vec![&twice, &twice]] {
        let mut request = app.anonymous.get(app.url("/api/users"));
        for value in headers {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_unauthorized(response, Some("invalid_token")).await;
    }
    // The control: the same token alone passes.
    assert_accepted(&app, &valid).await;
}

#[tokio::test]
async fn a_token_with_a_wrong_signature_is_401() {
    let app = spawn_app().await;
    let reader = test_claims("test-user", &["users:read"]);
    let other_secret = hmac_token(
        Algorithm::HS256,
        b"another-secret-of-the-same-length-as-the-test-one!",
        None,
        &reader,
    );
    let problem = assert_invalid_token(&app, &other_secret).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("signature"),
        "{problem}"
    );

    // A reader's token with its payload swapped for an admin's keeps a stale signature.
    let token = hs256_token(&reader);
    let admin_payload = b64(test_claims("test-user", &["admin"]).to_string().as_bytes());
    let parts: Vec<&str> = token.split('.').collect();
    let tampered = format!("{}.{admin_payload}.{}", parts[0], parts[2]);
    assert_invalid_token(&app, &tampered).await;

    // Another valid token's signature spliced on.
    let other = hs256_token(&test_claims("someone-else", &["admin"]));
    let spliced = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        other.rsplit('.').next().unwrap()
    );
    assert_invalid_token(&app, &spliced).await;
    assert_accepted(&app, &token).await;
}

#[tokio::test]
async fn an_expired_token_is_401_but_the_leeway_absorbs_clock_skew() {
    let app = spawn_app().await;
    let expired = hs256_token(&claims_with(|c| {
        c.insert("iat".into(), json!(now() - 7200));
        c.insert("nbf".into(), json!(now() - 7200));
        c.insert("exp".into(), json!(now() - 3600));
    }));
    let problem = assert_invalid_token(&app, &expired).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("expired"),
        "{problem}"
    );
    let without_exp = hs256_token(&claims_with(|c| {
        c.remove("exp");
    }));
    assert_invalid_token(&app, &without_exp).await;
    // test.toml keeps the default leeway of 30 s.
    let just_expired = hs256_token(&claims_with(|c| {
        c.insert("exp".into(), json!(now() - 5));
    }));
    assert_accepted(&app, &just_expired).await;
}

#[tokio::test]
async fn a_token_not_yet_valid_is_401_but_the_leeway_absorbs_clock_skew() {
    let app = spawn_app().await;
    let future = hs256_token(&claims_with(|c| {
        c.insert("nbf".into(), json!(now() + 3600));
    }));
    let problem = assert_invalid_token(&app, &future).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("not valid yet"),
        "{problem}"
    );
    let almost = hs256_token(&claims_with(|c| {
        c.insert("nbf".into(), json!(now() + 5));
    }));
    assert_accepted(&app, &almost).await;
}

#[tokio::test]
async fn a_token_from_another_issuer_is_401() {
    let app = spawn_app().await;
    for issuer in [json!("https://evil.example"), json!(""), json!(42)] {
        let token = hs256_token(&claims_with(|c| {
            c.insert("iss".into(), issuer);
        }));
        assert_invalid_token(&app, &token).await;
    }
    let without = hs256_token(&claims_with(|c| {
        c.remove("iss");
    }));
    assert_invalid_token(&app, &without).await;
}

#[tokio::test]
async fn a_token_for_another_audience_is_401() {
    let app = spawn_app().await;
    for audience in [json!("another-api"), json!(["another-api"]), json!([])] {
        let token = hs256_token(&claims_with(|c| {
            c.insert("aud".into(), audience);
        }));
        assert_invalid_token(&app, &token).await;
    }
    let without = hs256_token(&claims_with(|c| {
        c.remove("aud");
    }));
    assert_invalid_token(&app, &without).await;
    // A list of audiences that includes ours is fine.
    let listed = hs256_token(&claims_with(|c| {
        c.insert("aud".into(), json!(["another-api", TEST_AUTH.audience]));
    }));
    assert_accepted(&app, &listed).await;
}

#[tokio::test]
async fn a_token_without_a_subject_is_401() {
    let app = spawn_app().await;
    for subject in [None, Some(json!("")), Some(json!(7))] {
        let token = hs256_token(&claims_with(|c| match subject {
            Some(subject) => {
                c.insert("sub".into(), subject);
            }
            None => {
                c.remove("sub");
            }
        }));
        assert_invalid_token(&app, &token).await;
    }
}

#[tokio::test]
async fn alg_none_and_stripped_signatures_are_refused() {
    let app = spawn_app().await;
    let claims = test_claims("mallory", &["admin"]);
    let valid = hs256_token(&claims);
    let real_signature = URL_SAFE_NO_PAD
        .decode(valid.rsplit('.').next().unwrap())
        .unwrap();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": alg, "typ": "JWT"});
        assert_invalid_token(&app, &raw_token(&header, &claims, b"")).await;
        assert_invalid_token(&app, &raw_token(&header, &claims, &real_signature)).await;
        let no_signature_part = raw_token(&header, &claims, b"");
        assert_invalid_token(&app, no_signature_part.trim_end_matches('.')).await;
    }
    // HS256 announced, signature stripped.
    let stripped = raw_token(&json!({"alg": "HS256", "typ": "JWT"}), &claims, b"");
    assert_invalid_token(&app, &stripped).await;
}

#[tokio::test]
async fn the_secret_verifies_hs256_only() {
    let app = spawn_app().await;
    let secret = TEST_AUTH.hs256_secret.expose_secret().as_bytes().to_vec();
    let claims = test_claims("test-user", &["users:read"]);
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token = hmac_token(alg, &secret, None, &claims);
        let problem = assert_invalid_token(&app, &token).await;
        assert!(
            problem["detail"].as_str().unwrap().contains("algorithm"),
            "{problem}"
        );
    }
    // No JWKS is configured here: an RS256 token has no key to be checked with.
    let rs256 = TestKey::rsa("rsa-a", "rsa-a").sign(&claims);
    assert_invalid_token(&app, &rs256).await;
    assert_accepted(&app, &hmac_token(Algorithm::HS256, &secret, None, &claims)).await;
}

// ---------------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_without_the_route_role_is_403_for_each_route_class() {
    let app = spawn_app().await;
    let tokens = [
        ("", token_with_roles(&[])),
        ("users:read", token_with_roles(&["users:read"])),
        ("users:write", token_with_roles(&["users:write"])),
    ];
    for (method, path, needed) in protected_routes() {
        for (granted, token) in &tokens {
            let response = send(&app, &method, &path, Some(token)).await;
            let status = response.status();
            if *granted == needed {
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{method} {path} with {granted}: {status}"
                );
                continue;
            }
            let challenge = www_authenticate(&response);
            let problem = assert_problem(response, StatusCode::FORBIDDEN).await;
            assert!(
                challenge.starts_with(r#"Bearer realm="userhub", error="insufficient_scope""#),
                "{method} {path}: {challenge}"
            );
            assert!(
                challenge.contains(&format!(r#"scope="{needed}""#)),
                "{challenge}"
            );
            assert!(
                problem["detail"].as_str().unwrap().contains(needed),
                "{problem}"
            );
        }
    }
}

#[tokio::test]
async fn admin_implies_read_and_write() {
    let app = spawn_app().await;
    let admin = token_with_roles(&["admin"]);
    for (method, path, _) in protected_routes() {
        let status = send(&app, &method, &path, Some(&admin)).await.status();
        assert!(
            status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
            "{method} {path}: {status}"
        );
    }
    let created = app
        .post_json_with_token(
            "/api/users",
            &json!({"name": "Ada Lovelace", "email": "ada@example.com"}),
            Some(&admin),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn roles_in_the_scope_claim_are_honoured() {
    let app = spawn_app().await;
    let token = hs256_token(&claims_with(|c| {
        c.remove("roles");
        c.insert(
            "scope".into(),
            json!("openid profile users:read users:write"),
        );
    }));
    assert_accepted(&app, &token).await;
    let created = app
        .post_json_with_token(
            "/api/users",
            &json!({"name": "Ada Lovelace", "email": "ada@example.com"}),
            Some(&token),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let admin_route = app
        .get_with_token("/admin/dead-letters", Some(&token))
        .await;
    assert_eq!(admin_route.status(), StatusCode::FORBIDDEN);

    let admin_scope = hs256_token(&claims_with(|c| {
        c.remove("roles");
        c.insert("scope".into(), json!("admin"));
    }));
    let response = app
        .get_with_token("/admin/dead-letters", Some(&admin_scope))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn unknown_or_miscased_role_names_grant_nothing() {
    let app = spawn_app().await;
    let token = hs256_token(&claims_with(|c| {
        c.insert(
            "roles".into(),
            json!(["Admin", "ADMIN", "users:READ", "root", "*", "users:*"]),
        );
        c.insert("scope".into(), json!("Admin users:Read"));
    }));
    let response = app.get_with_token("/api/users", Some(&token)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = app
        .get_with_token("/admin/dead-letters", Some(&token))
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

// ---------------------------------------------------------------------------------
// JWKS (an OIDC provider's keys)
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn rs256_and_es256_tokens_signed_by_the_jwks_keys_pass() {
    let rsa = TestKey::rsa("rsa-a", "rsa-a");
    let ec = TestKey::ec("ec-1");
    let jwks = TestJwks::serving(&[&rsa, &ec]).await;
    let app = spawn_with_jwks(jwks.url(), 60).await;
    let claims = test_claims("oidc-user", &["users:read"]);
    assert_accepted(&app, &rsa.sign(&claims)).await;
    assert_accepted(&app, &ec.sign(&claims)).await;
    assert_eq!(jwks.fetches().await, 1, "one fetch serves both keys");
    // The HS256 secret keeps working next to the JWKS.
    assert_accepted(&app, &hs256_token(&claims)).await;
    // Issuer, audience and roles are checked on JWKS tokens too.
    let foreign = rsa.sign(&claims_with(|c| {
        c.insert("aud".into(), json!("another-api"));
    }));
    assert_invalid_token(&app, &foreign).await;
    let elsewhere = ec.sign(&claims_with(|c| {
        c.insert("iss".into(), json!("https://evil.example"));
    }));
    assert_invalid_token(&app, &elsewhere).await;
    let writer = rsa.sign(&test_claims("oidc-user", &["users:write"]));
    let response = app.get_with_token("/api/users", Some(&writer)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_hs256_token_keyed_with_the_rsa_public_key_is_refused() {
    let rsa = TestKey::rsa("rsa-a", "rsa-a");
    let jwks = TestJwks::serving(&[&rsa]).await;
    let app = spawn_with_jwks(jwks.url(), 60).await;
    let claims = test_claims("mallory", &["admin"]);
    assert_accepted(&app, &rsa.sign(&claims)).await;

    let pem = std::fs::read(fixture_path("rsa-a.pub.pem")).unwrap();
    let pem_text = String::from_utf8(pem.clone()).unwrap();
    let der = STANDARD
        .decode(
            pem_text
                .lines()
                .filter(|line| !line.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    let modulus = URL_SAFE_NO_PAD
        .decode(rsa.jwk["n"].as_str().unwrap())
        .unwrap();
    for public_key in [&pem, &der, &modulus] {
        for kid in [Some("rsa-a"), None] {
            let forged = hmac_token(Algorithm::HS256, public_key, kid, &claims);
            assert_invalid_token(&app, &forged).await;
        }
    }
}

#[tokio::test]
async fn a_jwks_key_verifies_only_its_own_algorithm() {
    let rsa = TestKey::rsa("rsa-a", "rsa-a");
    let ec = TestKey::ec("ec-1");
    let jwks = TestJwks::serving(&[&rsa, &ec]).await;
    let app = spawn_with_jwks(jwks.url(), 60).await;
    let claims = test_claims("mallory", &["users:read"]);
    assert_accepted(&app, &rsa.sign(&claims)).await;
    // The RSA key is published for RS256: RS384, RS512 and PS256 signatures by the very
    // same key are still refused.
    for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
        let token = rsa.sign_as(alg, Some("rsa-a"), &claims);
        assert_invalid_token(&app, &token).await;
    }
    // An ES256 token naming the RSA key's kid, and the other way round.
    assert_invalid_token(&app, &ec.sign_as(Algorithm::ES256, Some("rsa-a"), &claims)).await;
    assert_invalid_token(&app, &rsa.sign_as(Algorithm::RS256, Some("ec-1"), &claims)).await;
    assert_eq!(jwks.fetches().await, 1, "a known kid never re-fetches");
}

#[tokio::test]
async fn keys_named_or_embedded_in_the_token_header_are_never_used() {
    let legit = TestKey::rsa("rsa-a", "rsa-a");
    let jwks = TestJwks::serving(&[&legit]).await;
    let app = spawn_with_jwks(jwks.url(), 0).await;
    let attacker = TestKey::ec("attacker");
    let attacker_jwks = TestJwks::serving(&[&attacker]).await;
    let claims = test_claims("mallory", &["admin"]);
    let embedded: Jwk = serde_json::from_value(attacker.jwk.clone()).unwrap();
    for kid in [
        Some("attacker"),
        Some("rsa-a"),
        Some("../../../../dev/null"),
        None,
    ] {
        let header = Header {
            kid: kid.map(str::to_owned),
            jwk: Some(embedded.clone()),
            jku: Some(attacker_jwks.url()),
            x5u: Some(attacker_jwks.url()),
            ..Header::new(Algorithm::ES256)
        };
        let token = jsonwebtoken::encode(&header, &claims, &attacker.encoding).unwrap();
        assert_invalid_token(&app, &token).await;
    }
    assert_eq!(
        attacker_jwks.fetches().await,
        0,
        "jku/x5u are never fetched"
    );
    assert_accepted(&app, &legit.sign(&claims)).await;
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_a_restart() {
    let old = TestKey::rsa("rsa-a", "2026-01");
    let new = TestKey::rsa("rsa-b", "2026-02");
    let jwks = TestJwks::serving(&[&old]).await;
    let app = spawn_with_jwks(jwks.url(), 0).await;
    let claims = test_claims("oidc-user", &["users:read"]);
    assert_accepted(&app, &old.sign(&claims)).await;
    assert_eq!(jwks.fetches().await, 1);

    jwks.publish(&[&new]);
    assert_accepted(&app, &new.sign(&claims)).await;
    assert_eq!(
        jwks.fetches().await,
        2,
        "the unknown kid re-fetched the set"
    );
    // The provider dropped the old key: its tokens stop working.
    assert_invalid_token(&app, &old.sign(&claims)).await;
}

#[tokio::test]
async fn a_withdrawn_key_stops_verifying_once_the_key_set_is_older_than_its_max_age() {
    let withdrawn = TestKey::rsa("rsa-a", "withdrawn");
    let kept = TestKey::ec("kept");
    let jwks = TestJwks::serving(&[&withdrawn, &kept]).await;
    // A maximum age of zero: every verification finds the set stale and re-fetches.
    let url = jwks.url();
    let app = spawn_with(move |settings| {
        settings.auth.jwks_url = url;
        settings.auth.jwks_min_refresh_secs = 0;
        settings.auth.jwks_max_age_secs = 0;
    })
    .await;
    let claims = test_claims("oidc-user", &["users:read"]);
    assert_accepted(&app, &withdrawn.sign(&claims)).await;

    // The provider withdraws the key; no token names an unknown kid, yet the stale set
    // is re-fetched and the withdrawn key's tokens stop verifying.
    jwks.publish(&[&kept]);
    assert_invalid_token(&app, &withdrawn.sign(&claims)).await;
    assert_accepted(&app, &kept.sign(&claims)).await;

    // The provider goes away: the last keys it served stay in use.
    jwks.answer_with_status(503);
    assert_accepted(&app, &kept.sign(&claims)).await;
}

#[tokio::test]
async fn the_refetch_for_unknown_kids_is_rate_limited() {
    let known = TestKey::rsa("rsa-a", "known");
    let later = TestKey::rsa("rsa-b", "later");
    let jwks = TestJwks::serving(&[&known]).await;
    let app = spawn_with_jwks(jwks.url(), 3600).await;
    let claims = test_claims("oidc-user", &["users:read"]);
    assert_accepted(&app, &known.sign(&claims)).await;
    assert_eq!(jwks.fetches().await, 1);

    jwks.publish(&[&known, &later]);
    for i in 0..20 {
        let token = later.sign_as(Algorithm::RS256, Some(&format!("made-up-{i}")), &claims);
        let problem = assert_invalid_token(&app, &token).await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("key is unknown"),
            "{problem}"
        );
    }
    // Within jwks_min_refresh_secs even a genuinely new key waits.
    assert_invalid_token(&app, &later.sign(&claims)).await;
    assert_accepted(&app, &known.sign(&claims)).await;
    assert_eq!(jwks.fetches().await, 1, "no re-fetch within the interval");
}

#[tokio::test]
async fn once_the_interval_passed_an_unknown_kid_refetches_again() {
    let known = TestKey::rsa("rsa-a", "known");
    let later = TestKey::ec("later");
    let jwks = TestJwks::serving(&[&known]).await;
    let app = spawn_with_jwks(jwks.url(), 1).await;
    let claims = test_claims("oidc-user", &["users:read"]);
    assert_accepted(&app, &known.sign(&claims)).await;

    jwks.publish(&[&known, &later]);
    let token = later.sign(&claims);
    let started = Instant::now();
    loop {
        let response = app.get_with_token("/api/users", Some(&token)).await;
        if response.status() == StatusCode::OK {
            break;
        }
        assert_unauthorized(response, Some("invalid_token")).await;
        assert!(
            started.elapsed() < DEADLINE,
            "the new key was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fetches = jwks.fetches().await;
    let at_most = 2 + usize::try_from(started.elapsed().as_secs()).unwrap();
    assert!(
        (2..=at_most).contains(&fetches),
        "{fetches} fetches in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn concurrent_requests_naming_a_new_kid_share_one_fetch() {
    let known = TestKey::rsa("rsa-a", "known");
    let later = TestKey::rsa("rsa-b", "later");
    let jwks = TestJwks::serving(&[&known]).await;
    let app = spawn_with_jwks(jwks.url(), 0).await;
    let claims = test_claims("oidc-user", &["users:read"]);
    assert_accepted(&app, &known.sign(&claims)).await;

    jwks.publish(&[&known, &later]);
    // A slow provider, so the requests pile up while the first one fetches; with or
    // without the pile-up, exactly one more fetch may happen.
    jwks.answer_after(Duration::from_millis(500));
    let token = later.sign(&claims);
    let responses = futures_util::future::join_all(
        (0..20).map(|_| app.get_with_token("/api/users", Some(&token))),
    )
    .await;
    for response in responses {
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(jwks.fetches().await, 2);
}

#[tokio::test]
async fn a_failing_slow_or_garbled_jwks_refuses_the_token_in_time() {
    let key = TestKey::rsa("rsa-a", "rsa-a");
    let server = MockServer::start().await;
    let answers = [
        ("/broken", ResponseTemplate::new(500)),
        (
            "/slow",
            ResponseTemplate::new(200)
                .set_body_json(jwk_set(&[&key]))
                .set_delay(Duration::from_secs(5)),
        ),
        (
            "/garbled",
            ResponseTemplate::new(200).set_body_string("<html>"),
        ),
        (
            "/empty",
            ResponseTemplate::new(200).set_body_json(json!({"keys": []})),
        ),
    ];
    let claims = test_claims("oidc-user", &["users:read"]);
    for (route, answer) in answers {
        Mock::given(wiremock::matchers::path(route))
            .respond_with(answer)
            .mount(&server)
            .await;
        let url = format!("{}{route}", server.uri());
        let app = spawn_with(move |settings| {
            settings.auth.jwks_url = url;
            settings.auth.jwks_timeout_ms = 300;
        })
        .await;
        let started = Instant::now();
        assert_invalid_token(&app, &key.sign(&claims)).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{route}: {:?}",
            started.elapsed()
        );
        // The HS256 secret is unaffected.
        assert_accepted(&app, &hs256_token(&claims)).await;
    }
}

// ---------------------------------------------------------------------------------
// Configuration: production refusals, the secret file, auth off
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn auth_disabled_is_refused_in_production() {
    let error = start_error(|settings| {
        settings.environment = "production".into();
        settings.auth.enabled = false;
    })
    .await;
    assert!(error.contains("auth.enabled = false"), "{error}");
}

#[tokio::test]
async fn the_development_or_a_short_secret_is_refused_in_production() {
    let error = start_error(|settings| {
        settings.environment = "production".into();
        settings.auth.hs256_secret = DEVELOPMENT_HS256_SECRET.into();
    })
    .await;
    assert!(error.contains("development secret"), "{error}");
    let error = start_error(|settings| {
        settings.environment = "production".into();
        settings.auth.hs256_secret = "only-31-bytes-long-aaaaaaaaaaaa".into();
    })
    .await;
    assert!(error.contains("shorter than 32 bytes"), "{error}");
}

#[tokio::test]
async fn production_starts_with_a_strong_secret_or_with_a_jwks_alone() {
    let secret = "a-production-secret-of-forty-bytes-or-so";
    let app = spawn_with(move |settings| {
        settings.environment = "production".into();
        settings.auth.hs256_secret = secret.into();
    })
    .await;
    let claims = test_claims("ops", &["users:read"]);
    assert_accepted(
        &app,
        &hmac_token(Algorithm::HS256, secret.as_bytes(), None, &claims),
    )
    .await;
    assert_invalid_token(&app, &hs256_token(&claims)).await;

    // hs256_secret = "" turns HS256 off: only the provider's tokens pass.
    let key = TestKey::ec("ec-1");
    let jwks = TestJwks::serving(&[&key]).await;
    let url = jwks.url();
    let app = spawn_with(move |settings| {
        settings.environment = "production".into();
        settings.auth.hs256_secret = "".into();
        settings.auth.jwks_url = url;
    })
    .await;
    assert_accepted(&app, &key.sign(&claims)).await;
    let problem = assert_invalid_token(&app, &hs256_token(&claims)).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("algorithm"),
        "{problem}"
    );
}

#[tokio::test]
async fn without_any_key_source_the_server_refuses_to_start() {
    let error = start_error(|settings| {
        settings.auth.hs256_secret = "".into();
        settings.auth.jwks_url = "".into();
    })
    .await;
    assert!(error.contains("no key source"), "{error}");
    let error = start_error(|settings| {
        settings.auth.hs256_secret_file = "/nonexistent/userhub-secret".into();
    })
    .await;
    assert!(error.contains("auth.hs256_secret_file"), "{error}");
}

#[tokio::test]
async fn the_secret_file_replaces_the_configured_secret() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("hs256");
    let secret = "a-secret-mounted-by-the-container-runtime";
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let path = file.display().to_string();
    let app = spawn_with(move |settings| settings.auth.hs256_secret_file = path).await;
    let claims = test_claims("test-user", &["users:read"]);
    assert_accepted(
        &app,
        &hmac_token(Algorithm::HS256, secret.as_bytes(), None, &claims),
    )
    .await;
    assert_invalid_token(&app, &hs256_token(&claims)).await;
}

#[tokio::test]
async fn with_auth_disabled_requests_need_no_token() {
    let app = spawn_with(|settings| settings.auth.enabled = false).await;
    let response = app.get_with_token("/api/users", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = app.get_with_token("/admin/dead-letters", None).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[test]
fn auth_settings_never_show_the_secret_in_debug_output() {
    let settings = Settings::load_for("test").unwrap();
    let secret = settings.auth.hs256_secret.expose_secret().to_owned();
    assert!(!secret.is_empty());
    assert!(!format!("{settings:?}").contains(&secret));
    assert!(!format!("{settings:#?}").contains(&secret));
}

// ---------------------------------------------------------------------------------
// The binary: start refusals, `userhub token`, what reaches the log
// ---------------------------------------------------------------------------------

#[test]
fn the_binary_refuses_to_start_in_production_with_auth_off_or_the_dev_secret() {
    let dir = TempDir::new().unwrap();
    let database = dir.path().join("userhub.db");
    let url = format!("sqlite://{}", database.display());
    let base = [
        ("APP_ENV", "production"),
        ("APP__SERVER__HOST", "127.0.0.1"),
        ("APP__SERVER__PORT", "0"),
        ("APP__DATABASE__URL", url.as_str()),
        ("APP__DOCUMENTS__URL", url.as_str()),
    ];
    let cases = [
        (
            vec![("APP__AUTH__ENABLED", "false")],
            "auth.enabled = false",
        ),
        (vec![], "development secret"),
        (
            vec![("APP__AUTH__HS256_SECRET", "short")],
            "shorter than 32 bytes",
        ),
    ];
    for (extra, expected) in cases {
        let env: Vec<(&str, &str)> = base.iter().copied().chain(extra).collect();
        let (success, _, stderr) = run_to_exit(userhub(&["serve"], &env));
        assert!(!success, "userhub must refuse to start ({expected})");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!database.exists());
    }
}

#[tokio::test]
async fn userhub_token_prints_a_token_the_server_accepts() {
    let (success, stdout, stderr) = run_to_exit(userhub(
        &[
            "token",
            "--sub",
            "alice",
            "--role",
            "users:read",
            "--role",
            "users:write",
            "--ttl",
            "15m",
        ],
        &[],
    ));
    assert!(success, "{stderr}");
    assert_eq!(
        stdout.lines().count(),
        1,
        "stdout is the token alone: {stdout}"
    );
    let token = stdout.trim();

    // Checked independently of userhub's own verifier.
    let secret = TEST_AUTH.hs256_secret.expose_secret().as_bytes();
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&[&TEST_AUTH.issuer]);
    validation.set_audience(&[&TEST_AUTH.audience]);
    validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
    validation.validate_nbf = true;
    let data = jsonwebtoken::decode::<Value>(
        token,
        &DecodingKey::from_secret(secret).unwrap(),
        &validation,
    )
    .expect("the token verifies with the configured secret");
    let claims = data.claims;
    assert_eq!(data.header.alg, Algorithm::HS256);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["roles"], json!(["users:read", "users:write"]));
    let iat = claims["iat"].as_i64().unwrap();
    assert!((iat - now()).abs() < 60, "iat is now: {claims}");
    assert_eq!(claims["nbf"], claims["iat"]);
    assert_eq!(claims["exp"].as_i64().unwrap() - iat, 15 * 60);

    let app = spawn_app().await;
    let created = app
        .post_json_with_token(
            "/api/users",
            &json!({"name": "Alice Liddell", "email": "alice@example.com"}),
            Some(token),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_accepted(&app, token).await;
    let admin = app.get_with_token("/admin/dead-letters", Some(token)).await;
    assert_eq!(admin.status(), StatusCode::FORBIDDEN);
}

#[test]
fn userhub_token_refuses_unknown_roles_bad_lifetimes_and_a_missing_secret() {
    for args in [
        vec!["token", "--sub", "a", "--role", "root"],
        vec!["token", "--sub", "a", "--role", "Admin"],
        vec!["token", "--sub", "a", "--ttl", "0s"],
        vec!["token", "--sub", "a", "--ttl", "1w"],
        vec!["token", "--sub", "a", "--ttl", "999d"],
        vec!["token", "--role", "admin"],
    ] {
        let (success, stdout, _) = run_to_exit(userhub(&args, &[]));
        assert!(!success, "{args:?} must fail");
        assert!(stdout.is_empty(), "{args:?} printed {stdout}");
    }
    let (success, stdout, stderr) = run_to_exit(userhub(
        &["token", "--sub", "a", "--role", "admin"],
        &[("APP__AUTH__HS256_SECRET", "")],
    ));
    assert!(!success && stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("auth.hs256_secret is empty"), "{stderr}");
}

#[tokio::test]
async fn secrets_and_tokens_never_reach_the_log_even_at_debug() {
    let secret = format!("log-test-secret-{}", uuid::Uuid::new_v4().simple());
    let dir = TempDir::new().unwrap();
    let mut server = Server::start(
        &[
            ("APP__AUTH__HS256_SECRET", secret.as_str()),
            ("APP__LOG__LEVEL", "debug"),
            ("APP__LOG__FORMAT", "json"),
        ],
        &dir,
    );
    server.wait_until_ready().await;
    let api = &server.api;
    let writer = test_claims("writer", &["users:read", "users:write"]);
    let good = hmac_token(Algorithm::HS256, secret.as_bytes(), None, &writer);
    let forged = hs256_token(&writer);
    let expired = hmac_token(
        Algorithm::HS256,
        secret.as_bytes(),
        None,
        &claims_with(|c| {
            c.insert("exp".into(), json!(now() - 3600));
        }),
    );
    let reader = hmac_token(
        Algorithm::HS256,
        secret.as_bytes(),
        None,
        &test_claims("reader", &["users:read"]),
    );
    let status = |response: Response| response.status();
    assert_eq!(
        status(
            api.post_json_with_token(
                "/api/users",
                &json!({"name": "Ada Lovelace", "email": "ada@example.com"}),
                Some(&good)
            )
            .await
        ),
        StatusCode::CREATED
    );
    assert_eq!(
        status(api.get_with_token("/api/users", Some(&good)).await),
        StatusCode::OK
    );
    for (token, expected) in [
        (&forged, StatusCode::UNAUTHORIZED),
        (&expired, StatusCode::UNAUTHORIZED),
        (&reader, StatusCode::FORBIDDEN),
    ] {
        let response = api
            .post_json_with_token("/api/users", &json!({"name": "x"}), Some(token))
            .await;
        assert_eq!(response.status(), expected);
    }
    let log = server.stop();
    assert!(log.contains("bearer token refused"), "{log}");
    assert!(log.contains("bearer token accepted"), "{log}");
    assert!(!log.contains(&secret), "the secret reached the log");
    // E-mail addresses are masked: the registration is logged, the address is not.
    assert!(log.contains("a***@example.com"), "{log}");
    assert!(
        !log.contains("ada@example.com"),
        "a full e-mail reached the log"
    );
    for token in [&good, &forged, &expired, &reader] {
        for (i, part) in token.split('.').enumerate() {
            assert!(!log.contains(part), "part {i} of a token reached the log");
        }
    }
}

#[tokio::test]
async fn auth_disabled_outside_production_warns_at_start() {
    let dir = TempDir::new().unwrap();
    let mut server = Server::start(&[("APP__AUTH__ENABLED", "false")], &dir);
    server.wait_until_ready().await;
    let response = server.api.get_with_token("/api/users", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let log = server.stop();
    let warning = log
        .lines()
        .find(|line| line.contains("authentication is OFF"))
        .unwrap_or_else(|| panic!("no warning in {log}"));
    assert!(warning.contains("WARN"), "{warning}");
}

// ---------------------------------------------------------------------------------
// OpenAPI
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn the_openapi_document_declares_bearer_security_on_every_protected_operation() {
    let app = spawn_app().await;
    let doc: Value = app
        .get_with_token("/api-docs/openapi.json", None)
        .await
        .json()
        .await
        .unwrap();
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    assert_eq!(scheme["bearerFormat"], "JWT");
    assert!(doc["components"]["schemas"]["Problem"].is_object());

    let mut protected = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let expected_role = if path.starts_with("/admin/") {
                Some("admin")
            } else if path.starts_with("/api/") || path.starts_with("/users/enriched/") {
                Some(if method == "get" {
                    "users:read"
                } else {
                    "users:write"
                })
            } else {
                None
            };
            let Some(role) = expected_role else {
                assert!(
                    operation.get("security").is_none(),
                    "{method} {path} is public"
                );
                continue;
            };
            protected += 1;
            assert_eq!(
                operation["security"],
                json!([{"bearer": [role]}]),
                "{method} {path}"
            );
            for status in ["401", "403"] {
                let answer = &operation["responses"][status];
                assert_eq!(
                    answer["content"]["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{method} {path} {status}"
                );
                assert!(answer["headers"]["WWW-Authenticate"].is_object());
            }
            // The server agrees with the document.
            let concrete = path.replace("{uuid}", NIL).replace("{id}", NIL);
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = send(&app, &method, &concrete, None).await;
            assert_unauthorized(response, None).await;
        }
    }
    assert_eq!(protected, protected_routes().len());
}
