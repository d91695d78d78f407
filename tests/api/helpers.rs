//! Spawns the application for a test, with typed request helpers and step functions
//! for the background workers.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sqlx::Connection;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use userhub::bus::{EventHandler, InProcessBus, Outcome};
use userhub::config::Settings;
use userhub::db::Database;
use userhub::enrichment::{BINDING, ProfileStore};
use userhub::outbox::OutboxRelay;
use userhub::startup::{Application, Overrides, Roles};
use userhub::with_pool;

/// Logs go to the test output only when TEST_LOG is set: `TEST_LOG=1 cargo test`.
static TRACING: LazyLock<()> = LazyLock::new(|| {
    let settings = Settings::load_for("test").expect("test settings load");
    if std::env::var_os("TEST_LOG").is_some() {
        userhub::telemetry::init(&settings.log, &settings.telemetry, std::io::stdout);
    } else {
        userhub::telemetry::init(&settings.log, &settings.telemetry, std::io::sink);
    }
});

/// Sets up logging once per test binary (see [`TRACING`]).
pub fn init_tracing() {
    LazyLock::force(&TRACING);
}

/// How long asynchronous effects may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `check` until it gives a value, failing the test after [`DEADLINE`].
pub async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: not after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An HTTP client bound to one running app, with typed request helpers.
pub struct Api {
    pub address: String,
    /// Sends an admin token (signed with the test secret) with every request, unless the
    /// request sets its own `Authorization`.
    pub client: reqwest::Client,
    /// Sends no `Authorization` header: for requests with a chosen token or none.
    pub anonymous: reqwest::Client,
}

/// `[auth]` of `config/test.toml`.
pub static TEST_AUTH: LazyLock<userhub::config::AuthSettings> =
    LazyLock::new(|| Settings::load_for("test").expect("test settings load").auth);

/// The claims of a test token signed with the test secret of `config/test.toml`: the
/// test issuer and audience, valid from now for an hour. Tests adjust them as needed.
pub fn test_claims(subject: &str, roles: &[&str]) -> Value {
    let auth = &*TEST_AUTH;
    let now = chrono::Utc::now().timestamp();
    json!({
        "sub": subject,
        "iss": auth.issuer,
        "aud": auth.audience,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "roles": roles,
    })
}

/// Signs `claims` with HS256 and the test secret.
pub fn hs256_token(claims: &Value) -> String {
    let secret = TEST_AUTH.hs256_secret.expose_secret();
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).expect("HMAC key");
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).expect("token signs")
}

/// A valid test token granting `roles`.
pub fn token_with_roles(roles: &[&str]) -> String {
    hs256_token(&test_claims("test-user", roles))
}

pub struct TestApp {
    pub api: Api,
    /// A separate connection to the test's database, for inspection.
    pub db: Database,
    pub relay: Arc<OutboxRelay>,
    pub retention: Arc<userhub::startup::Retention>,
    /// Set when the app uses the in-process bus (see [`TestApp::bus`]).
    pub in_process: Option<Arc<InProcessBus>>,
    pub handler: Arc<dyn EventHandler>,
    pub storage: Storage,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Which backends the app under test uses: the embedded ones by default;
/// `USERHUB_TEST_BACKENDS=services` runs the same tests against PostgreSQL (users,
/// outbox and the database-backed bus), MongoDB (profiles) and Redis (cache).
fn use_services() -> bool {
    std::env::var("USERHUB_TEST_BACKENDS").is_ok_and(|v| v == "services")
}

/// A test's own storage: a temporary folder, and in services mode a PostgreSQL
/// database of its own, dropped when the last app using it is gone.
#[derive(Clone)]
pub struct Storage {
    pub dir: Arc<TempDir>,
    pub postgres: Option<Arc<PgTestDatabase>>,
    pub mongo: Option<Arc<MongoTestDatabase>>,
    pub redis: Option<Arc<RedisTestPrefix>>,
    pub rabbit: Option<Arc<RabbitTestPrefix>>,
}

impl Storage {
    async fn new() -> Self {
        let dir = Arc::new(TempDir::new().expect("temporary folder"));
        if !use_services() {
            return Self {
                dir,
                postgres: None,
                mongo: None,
                redis: None,
                rabbit: None,
            };
        }
        Self {
            dir,
            postgres: Some(Arc::new(PgTestDatabase::create().await)),
            mongo: Some(Arc::new(MongoTestDatabase::new())),
            redis: Some(Arc::new(RedisTestPrefix::new())),
            rabbit: None,
        }
    }

    /// Points the settings at this storage.
    fn configure(&self, settings: &mut Settings) {
        settings.database.url = self.database_url().into();
        settings.documents.url = match &self.mongo {
            Some(mongo) => mongo.url.clone().into(),
            None => self.sqlite_url().into(),
        };
        if let Some(redis) = &self.redis {
            settings.cache.url = redis.url.clone().into();
            settings.cache.key_prefix = redis.prefix.clone();
        }
    }

    fn sqlite_url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("userhub.db").display())
    }

    fn database_url(&self) -> String {
        match &self.postgres {
            Some(pg) => pg.url.clone(),
            None => self.sqlite_url(),
        }
    }
}

/// A PostgreSQL database created for one test and dropped afterwards.
pub struct PgTestDatabase {
    pub url: String,
    name: String,
    admin_url: String,
}

impl PgTestDatabase {
    pub async fn create() -> Self {
        let admin_url = crate::services::service_url(crate::services::POSTGRES)
            .expect("USERHUB_TEST_BACKENDS=services needs USERHUB_TEST_POSTGRES_URL");
        let name = crate::services::unique_name("userhub_test");
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL admin connection");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("the PostgreSQL URL names a database");
        Self {
            url: format!("{base}/{name}"),
            name,
            admin_url,
        }
    }
}

impl Drop for PgTestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        block_on_cleanup(&self.name, async move {
            let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await?;
            Ok(())
        });
    }
}

/// Runs `cleanup` to completion from a `Drop`, on a thread with a runtime of its own.
fn block_on_cleanup<F>(what: &str, cleanup: F)
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let outcome = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(cleanup)
    })
    .join();
    if !matches!(outcome, Ok(Ok(()))) {
        eprintln!("could not clean up {what}");
    }
}

/// A MongoDB database for one test, dropped afterwards.
pub struct MongoTestDatabase {
    pub url: String,
    name: String,
    base: String,
}

impl MongoTestDatabase {
    pub fn new() -> Self {
        let base = crate::services::service_url(crate::services::MONGO)
            .expect("USERHUB_TEST_BACKENDS=services needs USERHUB_TEST_MONGO_URL");
        let name = crate::services::unique_name("userhub_test");
        Self {
            url: crate::services::mongo_url_with_database(&base, &name),
            name,
            base,
        }
    }
}

impl MongoTestDatabase {
    /// Every document of the profile collection, as an operator would read it.
    pub async fn documents(&self) -> Vec<mongodb::bson::Document> {
        let client = mongodb::Client::with_uri_str(&self.base)
            .await
            .expect("inspection client");
        let mut cursor = client
            .database(&self.name)
            .collection::<mongodb::bson::Document>("enriched_users")
            .find(mongodb::bson::doc! {})
            .await
            .expect("find");
        let mut documents = Vec::new();
        while cursor.advance().await.expect("next document") {
            documents.push(cursor.deserialize_current().expect("a document"));
        }
        documents
    }
}

impl Drop for MongoTestDatabase {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        block_on_cleanup(&self.name, async move {
            let client = mongodb::Client::with_uri_str(&base).await?;
            client.database(&name).drop().await?;
            Ok(())
        });
    }
}

/// A Redis key prefix for one test; its keys are deleted afterwards.
pub struct RedisTestPrefix {
    pub url: String,
    pub prefix: String,
}

impl RedisTestPrefix {
    pub fn new() -> Self {
        Self {
            url: crate::services::service_url(crate::services::REDIS)
                .expect("USERHUB_TEST_BACKENDS=services needs USERHUB_TEST_REDIS_URL"),
            prefix: format!("{}:", crate::services::unique_name("userhub_test")),
        }
    }
}

impl Drop for RedisTestPrefix {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        block_on_cleanup(&self.prefix, async move {
            let mut connection = crate::redis_cache::raw_connection(&url).await;
            crate::redis_cache::delete_prefixed(&mut connection, &prefix).await;
            Ok(())
        });
    }
}

/// A RabbitMQ name prefix for one test; its queues and exchanges are deleted afterwards.
pub struct RabbitTestPrefix {
    pub prefix: String,
}

impl RabbitTestPrefix {
    pub fn new() -> Self {
        Self {
            prefix: format!("{}.", crate::services::unique_name("userhub_test")),
        }
    }
}

impl Drop for RabbitTestPrefix {
    fn drop(&mut self) {
        let Some(url) = crate::services::service_url(crate::services::AMQP) else {
            return;
        };
        let prefix = self.prefix.clone();
        block_on_cleanup(&self.prefix, async move {
            let settings = Settings::load_for("test")?;
            let policy = userhub::startup::delivery_policy(&settings);
            let bus =
                userhub::bus::RabbitBus::connect(&url, &prefix, vec![BINDING], policy).await?;
            bus.wait_until_connected(DEADLINE).await?;
            bus.delete_topology().await?;
            bus.close().await;
            Ok(())
        });
    }
}

/// How to spawn an app.
pub struct Spawn {
    pub roles: Roles,
    /// Reuse another app's storage (restart tests).
    pub storage: Option<Storage>,
    /// Puts a store the test can break in front of the real profile store.
    pub store: Option<Arc<ControlledStore>>,
    /// Use RabbitMQ at this URL (e.g. through a proxy) with a topology of the test's own.
    pub amqp: Option<String>,
    /// Last word on the settings.
    pub configure: Box<dyn FnOnce(&mut Settings) + Send>,
}

impl Default for Spawn {
    fn default() -> Self {
        Self {
            // HTTP only: tests drive the relay and the consumer step by step.
            roles: Roles {
                api: true,
                relay: false,
                worker: false,
            },
            storage: None,
            store: None,
            amqp: None,
            configure: Box::new(|_| {}),
        }
    }
}

/// An app whose background workers are off: call `deliver_all` to move events.
pub async fn spawn_app() -> TestApp {
    spawn(Spawn::default()).await
}

/// An app that runs its relay and consumer like production does.
pub async fn spawn_running_app() -> TestApp {
    spawn(Spawn {
        roles: Roles::ALL,
        ..Spawn::default()
    })
    .await
}

pub async fn spawn(options: Spawn) -> TestApp {
    init_tracing();
    let mut storage = match options.storage {
        Some(storage) => storage,
        None => Storage::new().await,
    };
    if options.amqp.is_some() && storage.rabbit.is_none() {
        storage.rabbit = Some(Arc::new(RabbitTestPrefix::new()));
    }
    let mut settings = Settings::load_for("test").expect("test settings load");
    settings.server.port = 0;
    storage.configure(&mut settings);
    if let (Some(url), Some(rabbit)) = (&options.amqp, &storage.rabbit) {
        settings.bus.url = url.clone().into();
        settings.bus.prefix = rabbit.prefix.clone();
    }
    (options.configure)(&mut settings);

    let overrides = Overrides {
        wrap_profile_store: options.store.map(|store| {
            Box::new(move |inner: Arc<dyn ProfileStore>| {
                store.attach(inner);
                store as Arc<dyn ProfileStore>
            }) as _
        }),
    };
    let app = Application::build_with(settings, options.roles, overrides)
        .await
        .expect("application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let relay = app.relay();
    let retention = app.retention();
    let in_process = app.in_process_bus();
    let handler = app.enrichment().handler();
    let shutdown = app.shutdown_token();
    let task = tokio::spawn(app.run_until_stopped());
    let db = userhub::db::Database::connect(&storage.database_url(), &inspection_settings())
        .await
        .expect("inspection connection");
    TestApp {
        api: Api::new(address),
        db,
        relay,
        retention,
        in_process,
        handler,
        storage,
        shutdown,
        task: Some(task),
    }
}

fn inspection_settings() -> userhub::config::DatabaseSettings {
    let mut settings = Settings::load_for("test")
        .expect("test settings load")
        .database;
    settings.max_connections = 2;
    settings
}

impl Api {
    pub fn new(address: String) -> Self {
        // reqwest is built without a default TLS provider, as the app is.
        userhub::crypto::install_crypto_provider();
        let admin = format!("Bearer {}", token_with_roles(&["admin"]));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&admin).expect("token header"),
        );
        let client = |headers| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .default_headers(headers)
                .build()
                .expect("http client")
        };
        Self {
            address,
            client: client(headers),
            anonymous: client(reqwest::header::HeaderMap::new()),
        }
    }

    /// A request carrying `token` as its bearer token, or no `Authorization` at all.
    pub fn request_with_token(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let request = self.anonymous.request(method, self.url(path));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub async fn get_with_token(&self, path: &str, token: Option<&str>) -> Response {
        self.request_with_token(reqwest::Method::GET, path, token)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_json_with_token(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Response {
        self.request_with_token(reqwest::Method::POST, path, token)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    /// GETs `path` and decodes its JSON body, whatever the status.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.get(path).await.json().await.expect("a JSON body")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Sends `method` to `path` (admin token) with these headers and, if given, a JSON
    /// body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Response {
        let mut request = self.client.request(method, self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.expect("request sent")
    }

    pub async fn patch_json(&self, path: &str, body: &Value) -> Response {
        self.send(reqwest::Method::PATCH, path, &[], Some(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.send(reqwest::Method::DELETE, path, &[], None).await
    }

    pub async fn post_user(&self, name: &str, email: &str) -> Response {
        self.post_json("/api/users", &json!({"name": name, "email": email}))
            .await
    }

    /// Creates a user and returns its JSON, failing the test on anything but 201.
    pub async fn create_user(&self, name: &str, email: &str) -> Value {
        let response = self.post_user(name, email).await;
        assert_eq!(response.status(), StatusCode::CREATED, "creating {email}");
        response.json().await.expect("user JSON")
    }

    /// Polls `path` until it answers 200 or the deadline passes.
    pub async fn wait_for_ok(&self, path: &str) -> Value {
        let started = Instant::now();
        loop {
            let response = self.get(path).await;
            if response.status() == StatusCode::OK {
                return response.json().await.expect("JSON body");
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{path} still answers {} after {DEADLINE:?}",
                response.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl std::ops::Deref for TestApp {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl TestApp {
    /// The in-process bus, for tests that drive delivery step by step.
    pub fn bus(&self) -> &InProcessBus {
        self.in_process
            .as_deref()
            .expect("this test needs the in-process bus")
    }

    /// Relays the whole outbox, then delivers every due message. Returns the outcomes.
    pub async fn deliver_all(&self) -> Vec<Outcome> {
        self.relay.drain().await.expect("outbox drains");
        let mut outcomes = Vec::new();
        while let Some(outcome) = self
            .bus()
            .process_next(&BINDING, self.handler.as_ref())
            .await
            .expect("bus step")
        {
            outcomes.push(outcome);
        }
        outcomes
    }

    pub async fn outbox_unsent(&self) -> i64 {
        self.count("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
            .await
    }

    /// Runs a `SELECT COUNT(*) …` on the test's database.
    pub async fn count(&self, sql: &'static str) -> i64 {
        with_pool!(&self.db, |pool| sqlx::query_scalar(sql)
            .fetch_one(pool)
            .await)
        .expect("count query")
    }

    /// Runs one statement on the test's database, behind the app's back.
    pub async fn execute(&self, sql: &'static str) {
        with_pool!(&self.db, |pool| sqlx::query(sql)
            .execute(pool)
            .await
            .map(drop))
        .expect("statement");
    }

    /// Stops the app as SIGTERM would and waits until it has stopped, returning its
    /// storage for a restart.
    pub async fn stop(mut self) -> Storage {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("app stops in time")
                .expect("app task joins")
                .expect("app stops cleanly");
        }
        self.storage.clone()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Asserts a problem+json answer with `status`, returning its body.
pub async fn assert_problem(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["title"].is_string(), "{body}");
    assert!(body["type"].is_string(), "{body}");
    body
}

/// A profile store the test can break: upserts fail while `failing_upserts` is above
/// zero, and everything fails while it is "down". Records when upserts were attempted.
pub struct ControlledStore {
    inner: std::sync::OnceLock<Arc<dyn ProfileStore>>,
    failing_upserts: std::sync::atomic::AtomicU32,
    down: std::sync::atomic::AtomicBool,
    pub upsert_attempts: std::sync::Mutex<Vec<Instant>>,
    /// (user, source event) of every upsert attempted.
    upserted_events: std::sync::Mutex<Vec<(uuid::Uuid, uuid::Uuid)>>,
    /// Pings answered "down".
    pub failed_pings: std::sync::atomic::AtomicU32,
}

impl ControlledStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: std::sync::OnceLock::new(),
            failing_upserts: 0.into(),
            down: false.into(),
            upsert_attempts: std::sync::Mutex::new(Vec::new()),
            upserted_events: std::sync::Mutex::new(Vec::new()),
            failed_pings: 0.into(),
        })
    }

    /// Puts this store in front of the app's real one.
    fn attach(&self, inner: Arc<dyn ProfileStore>) {
        if self.inner.set(inner).is_err() {
            panic!("a ControlledStore serves one app");
        }
    }

    pub fn fail_next_upserts(&self, n: u32) {
        self.failing_upserts
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The distinct source events each user's upserts came from.
    pub fn events_by_user(
        &self,
    ) -> std::collections::HashMap<uuid::Uuid, std::collections::HashSet<uuid::Uuid>> {
        let mut by_user = std::collections::HashMap::<_, std::collections::HashSet<_>>::new();
        for (user, event) in self.upserted_events.lock().unwrap().iter() {
            by_user.entry(*user).or_default().insert(*event);
        }
        by_user
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> Result<&Arc<dyn ProfileStore>, StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Backend("store is down (test)".into()));
        }
        self.inner
            .get()
            .ok_or_else(|| StoreError::Backend("store not attached (test)".into()))
    }
}

use userhub::enrichment::{EnrichedProfile, StoreError, Write};

#[async_trait::async_trait]
impl ProfileStore for ControlledStore {
    async fn upsert(&self, profile: &EnrichedProfile) -> Result<Write, StoreError> {
        self.upsert_attempts.lock().unwrap().push(Instant::now());
        self.upserted_events
            .lock()
            .unwrap()
            .push((profile.uuid, profile.source_event_id));
        let store = self.check()?;
        let failing = self
            .failing_upserts
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if failing {
            return Err(StoreError::Backend("upsert refused (test)".into()));
        }
        store.upsert(profile).await
    }

    async fn mark_failed(&self, profile: &EnrichedProfile) -> Result<Write, StoreError> {
        self.check()?.mark_failed(profile).await
    }

    async fn erase(
        &self,
        uuid: uuid::Uuid,
        version: u64,
        source_event_id: uuid::Uuid,
    ) -> Result<Write, StoreError> {
        self.check()?.erase(uuid, version, source_event_id).await
    }

    async fn get(&self, uuid: uuid::Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        self.check()?.get(uuid).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let store = self.check().inspect_err(|_| {
            self.failed_pings
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })?;
        store.ping().await
    }
}

/// A browser-like client of the web console: it keeps the cookies the console sets
/// (by name, as a browser does for one path) and sends no bearer token.
pub struct ConsoleClient {
    pub address: String,
    client: reqwest::Client,
    pub cookies: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

/// A console answer, read whole.
pub struct Page {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Page {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Every `Set-Cookie` of the answer.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }

    /// The value of the first `name="csrf"` hidden field.
    pub fn csrf(&self) -> String {
        let start = self
            .body
            .find(r#"name="csrf" value=""#)
            .unwrap_or_else(|| panic!("no CSRF field in {}", self.body))
            + r#"name="csrf" value=""#.len();
        let end = self.body[start..].find('"').expect("end of the CSRF value");
        self.body[start..start + end].to_owned()
    }
}

impl ConsoleClient {
    pub fn new(app: &TestApp) -> Self {
        userhub::crypto::install_crypto_provider();
        Self {
            address: app.address.clone(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("http client"),
            cookies: std::sync::Mutex::new(Default::default()),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .lock()
            .unwrap()
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Sends `request` with the cookies held, keeps the ones it sets, reads the answer.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Page {
        let response = request
            .header("cookie", self.cookie_header())
            .send()
            .await
            .expect("request sent");
        let (status, headers) = (response.status(), response.headers().clone());
        let body = response.text().await.unwrap_or_default();
        let page = Page {
            status,
            headers,
            body,
        };
        let mut cookies = self.cookies.lock().unwrap();
        for set_cookie in page.set_cookies() {
            let pair = set_cookie.split(';').next().unwrap_or_default();
            let (name, value) = pair.split_once('=').expect("name=value");
            let removed = set_cookie.to_ascii_lowercase().contains("max-age=0");
            if removed || value.is_empty() {
                cookies.remove(name);
            } else {
                cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        page
    }

    pub async fn get(&self, path: &str) -> Page {
        self.send(self.client.get(format!("{}{path}", self.address)))
            .await
    }

    /// POSTs a form as a browser on the console's own page would (no `Origin` header
    /// unless `extra` adds one).
    pub async fn post_form(
        &self,
        path: &str,
        form: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> Page {
        let body = serde_urlencoded::to_string(form).expect("form encodes");
        let mut request = self
            .client
            .post(format!("{}{path}", self.address))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        self.send(request).await
    }

    /// Signs in through the development sign-in as `reader`, `writer` or `admin`.
    pub async fn sign_in_as(&self, role: &str) {
        let page = self.get("/console/sign-in").await;
        assert_eq!(page.status, StatusCode::OK);
        let csrf = page.csrf();
        let signed_in = self
            .post_form(
                "/console/sign-in/dev",
                &[("csrf", &csrf), ("role", role), ("next", "/console/")],
                &[],
            )
            .await;
        assert_eq!(
            signed_in.status,
            StatusCode::SEE_OTHER,
            "{}",
            signed_in.body
        );
        assert_eq!(signed_in.header("location"), "/console/");
    }

    /// Signs in with a pasted token; returns the answer.
    pub async fn sign_in_with_token(&self, token: &str) -> Page {
        let csrf = self.get("/console/sign-in").await.csrf();
        self.post_form(
            "/console/sign-in/token",
            &[("csrf", &csrf), ("token", token), ("next", "/console/")],
            &[],
        )
        .await
    }
}
