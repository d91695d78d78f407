//! Spawns the application for a test, with typed request helpers and step functions
//! for the background workers.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sqlx::SqlitePool;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use userhub::bus::{EventHandler, InProcessBus, Outcome};
use userhub::config::Settings;
use userhub::enrichment::{BINDING, ProfileStore};
use userhub::outbox::OutboxRelay;
use userhub::startup::{Application, Overrides, Roles};

/// Logs go to the test output only when TEST_LOG is set: `TEST_LOG=1 cargo test`.
static TRACING: LazyLock<()> = LazyLock::new(|| {
    let settings = Settings::load_for("test").expect("test settings load");
    if std::env::var_os("TEST_LOG").is_some() {
        userhub::telemetry::init(&settings.log, std::io::stdout);
    } else {
        userhub::telemetry::init(&settings.log, std::io::sink);
    }
});

/// Sets up logging once per test binary (see [`TRACING`]).
pub fn init_tracing() {
    LazyLock::force(&TRACING);
}

/// How long asynchronous effects may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    /// A separate connection to the test's database, for inspection.
    pub db: SqlitePool,
    pub relay: Arc<OutboxRelay>,
    pub bus: Arc<InProcessBus>,
    pub handler: Arc<dyn EventHandler>,
    pub dir: Arc<TempDir>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// How to spawn an app.
pub struct Spawn {
    pub roles: Roles,
    /// Reuse another app's database folder (restart tests).
    pub dir: Option<Arc<TempDir>>,
    /// Replaces the profile store with one the test can break.
    pub store: Option<Arc<ControlledStore>>,
    pub configure: fn(&mut Settings),
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
            dir: None,
            store: None,
            configure: |_| {},
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

pub fn database_url(dir: &TempDir) -> String {
    format!("sqlite://{}", dir.path().join("userhub.db").display())
}

pub async fn spawn(options: Spawn) -> TestApp {
    init_tracing();
    let dir = options
        .dir
        .unwrap_or_else(|| Arc::new(TempDir::new().expect("temporary folder")));
    let mut settings = Settings::load_for("test").expect("test settings load");
    settings.server.port = 0;
    settings.database.url = database_url(&dir).into();
    settings.documents.url = database_url(&dir).into();
    (options.configure)(&mut settings);

    let overrides = Overrides {
        profile_store: options
            .store
            .clone()
            .map(|store| store as Arc<dyn ProfileStore>),
    };
    let app = Application::build_with(settings, options.roles, overrides)
        .await
        .expect("application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let relay = app.relay();
    let bus = app.bus();
    let handler = app.enrichment().handler();
    let shutdown = app.shutdown_token();
    let task = tokio::spawn(app.run_until_stopped());
    let db = SqlitePool::connect(&database_url(&dir))
        .await
        .expect("inspection connection");
    if let Some(store) = options.store {
        store.attach(db.clone());
    }
    TestApp {
        address,
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client"),
        db,
        relay,
        bus,
        handler,
        dir,
        shutdown,
        task: Some(task),
    }
}

impl TestApp {
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

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent")
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

    /// Relays the whole outbox, then delivers every due message. Returns the outcomes.
    pub async fn deliver_all(&self) -> Vec<Outcome> {
        self.relay.drain().await.expect("outbox drains");
        let mut outcomes = Vec::new();
        while let Some(outcome) = self
            .bus
            .process_next(&BINDING, self.handler.as_ref())
            .await
            .expect("bus step")
        {
            outcomes.push(outcome);
        }
        outcomes
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

    pub async fn outbox_unsent(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
            .fetch_one(&self.db)
            .await
            .expect("outbox count")
    }

    /// Stops the app as SIGTERM would and waits until it has stopped.
    pub async fn stop(mut self) -> Arc<TempDir> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("app stops in time")
                .expect("app task joins")
                .expect("app stops cleanly");
        }
        self.dir.clone()
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
    inner: tokio::sync::OnceCell<userhub::enrichment::SqliteProfileStore>,
    failing_upserts: std::sync::atomic::AtomicU32,
    down: std::sync::atomic::AtomicBool,
    pub upsert_attempts: std::sync::Mutex<Vec<Instant>>,
}

impl ControlledStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: tokio::sync::OnceCell::new(),
            failing_upserts: 0.into(),
            down: false.into(),
            upsert_attempts: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Backs the store with the app's database once it exists.
    pub fn attach(&self, pool: SqlitePool) {
        let _ = self
            .inner
            .set(userhub::enrichment::SqliteProfileStore::new(pool));
    }

    pub fn fail_next_upserts(&self, n: u32) {
        self.failing_upserts
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> Result<&userhub::enrichment::SqliteProfileStore, StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Backend("store is down (test)".into()));
        }
        self.inner
            .get()
            .ok_or_else(|| StoreError::Backend("store not attached (test)".into()))
    }
}

use userhub::enrichment::{EnrichedProfile, StoreError};

#[async_trait::async_trait]
impl ProfileStore for ControlledStore {
    async fn upsert(&self, profile: &EnrichedProfile) -> Result<EnrichedProfile, StoreError> {
        self.upsert_attempts.lock().unwrap().push(Instant::now());
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

    async fn mark_failed(&self, profile: &EnrichedProfile) -> Result<(), StoreError> {
        self.check()?.mark_failed(profile).await
    }

    async fn get(&self, uuid: uuid::Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        self.check()?.get(uuid).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?.ping().await
    }
}
