//! What the browser tests share: the app (port 0, a temporary SQLite file, its workers
//! running), a headless Debian chromium of its own driven over CDP by chromiumoxide, and
//! the checks every page gets (axe-core, no CSP violation, no sideways scrolling at
//! 360 px, screenshots at 1280 and 390 px).

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::input::InsertTextParams;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig, Page};
use futures_util::StreamExt;
use serde::Deserialize;
use tempfile::TempDir;
use tokio::sync::{Semaphore, SemaphorePermit, watch};
use tokio_util::sync::CancellationToken;
use userhub::config::Settings;
use userhub::enrichment::{EnrichedProfile, ProfileStore, StoreError, Write};
use userhub::startup::{Application, Overrides, Roles};
use userhub::web::auth::{LocalToken, mint_local_token};
use userhub::web::identity::Role;

pub const CHROMIUM: &str = "/usr/bin/chromium";
/// How long anything asynchronous may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// At most two browsers at once (two cores).
static BROWSERS: Semaphore = Semaphore::const_new(2);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn axe_path() -> PathBuf {
    root().join("target/browser/node_modules/axe-core/axe.min.js")
}

pub fn screenshot_dir() -> PathBuf {
    root().join("target/console-screenshots")
}

/// Whether the browser tests can run here. Without chromium or axe-core they are
/// skipped (saying so), unless `CI` is set: then they fail.
pub fn available() -> bool {
    let missing: Vec<String> = [PathBuf::from(CHROMIUM), axe_path()]
        .into_iter()
        .filter(|path| !path.exists())
        .map(|path| path.display().to_string())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "{} missing: run scripts/browser-deps.sh (apt-get install chromium, npm install axe-core)",
        missing.join(" and ")
    );
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("SKIPPED: browser test: {message}");
    false
}

/// A profile store whose writes the test can hold back (to watch `pending` turn into
/// `completed`) or make fail (to get a dead letter).
pub struct ControlledStore {
    inner: OnceLock<Arc<dyn ProfileStore>>,
    open: watch::Sender<bool>,
    failing: std::sync::atomic::AtomicBool,
}

impl ControlledStore {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: OnceLock::new(),
            open: watch::Sender::new(true),
            failing: false.into(),
        })
    }

    /// Holds every write back until [`ControlledStore::release`].
    pub fn hold(&self) {
        self.open.send_replace(false);
    }

    pub fn release(&self) {
        self.open.send_replace(true);
    }

    pub fn fail_writes(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    fn store(&self) -> Result<&Arc<dyn ProfileStore>, StoreError> {
        self.inner
            .get()
            .ok_or_else(|| StoreError::Backend("not attached".into()))
    }
}

#[async_trait::async_trait]
impl ProfileStore for ControlledStore {
    async fn upsert(&self, profile: &EnrichedProfile) -> Result<Write, StoreError> {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Backend(
                "the profile store refused the write (test)".into(),
            ));
        }
        self.store()?.upsert(profile).await
    }

    async fn mark_failed(&self, profile: &EnrichedProfile) -> Result<Write, StoreError> {
        self.store()?.mark_failed(profile).await
    }

    async fn erase(
        &self,
        uuid: uuid::Uuid,
        version: u64,
        source_event_id: uuid::Uuid,
    ) -> Result<Write, StoreError> {
        self.store()?.erase(uuid, version, source_event_id).await
    }

    async fn get(&self, uuid: uuid::Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        self.store()?.get(uuid).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.store()?.ping().await
    }
}

/// One test's app and browser.
pub struct Harness {
    pub address: String,
    pub page: Page,
    pub store: Arc<ControlledStore>,
    settings: Settings,
    browser: Browser,
    shutdown: CancellationToken,
    _data: TempDir,
    _profile: TempDir,
    _slot: SemaphorePermit<'static>,
}

static TRACING: LazyLock<()> = LazyLock::new(|| {
    let settings = Settings::load_for("test").expect("test settings");
    if std::env::var_os("TEST_LOG").is_some() {
        userhub::telemetry::init(&settings.log, &settings.telemetry, std::io::stdout);
    } else {
        userhub::telemetry::init(&settings.log, &settings.telemetry, std::io::sink);
    }
});

impl Harness {
    /// Starts the app (every role, so the workers enrich by themselves) and a browser.
    pub async fn start() -> Self {
        LazyLock::force(&TRACING);
        let slot = BROWSERS.acquire().await.expect("semaphore open");
        let data = TempDir::new().expect("temporary folder");
        let database = format!("sqlite://{}", data.path().join("userhub.db").display());
        let mut settings = Settings::load_for("test").expect("test settings");
        settings.server.port = 0;
        settings.database.url = database.clone().into();
        settings.documents.url = database.into();
        // A held-back write must not time out while the test looks at `pending`.
        settings.worker.handler_timeout_ms = 60_000;
        let store = ControlledStore::new();
        let overrides = Overrides {
            wrap_profile_store: Some(Box::new({
                let store = store.clone();
                move |inner| {
                    let _ = store.inner.set(inner);
                    store as Arc<dyn ProfileStore>
                }
            })),
        };
        let app = Application::build_with(settings.clone(), Roles::ALL, overrides)
            .await
            .expect("application builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let shutdown = app.shutdown_token();
        tokio::spawn(app.run_until_stopped());

        let profile = TempDir::new().expect("browser profile folder");
        let config = BrowserConfig::builder()
            .chrome_executable(CHROMIUM)
            .no_sandbox()
            .user_data_dir(profile.path())
            .window_size(1280, 900)
            .viewport(None)
            .arg("--disable-gpu")
            .arg("--disable-dev-shm-usage")
            .build()
            .expect("browser configuration");
        let (browser, mut handler) = Browser::launch(config).await.expect("chromium starts");
        // The CDP connection: keep reading it (an event this crate does not know is
        // no reason to stop).
        tokio::spawn(async move { while handler.next().await.is_some() {} });
        let page = browser.new_page("about:blank").await.expect("a page");
        // Any CSP violation on any page is recorded, to be asserted on.
        page.evaluate_on_new_document(
            "window.__csp = []; document.addEventListener('securitypolicyviolation', \
             e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));",
        )
        .await
        .expect("CSP listener");
        let harness = Self {
            address,
            page,
            store,
            settings,
            browser,
            shutdown,
            _data: data,
            _profile: profile,
            _slot: slot,
        };
        harness.width(1280).await;
        harness
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Sets the page's width (CSS pixels); below 600 it is a phone.
    pub async fn width(&self, width: i64) {
        let params = SetDeviceMetricsOverrideParams::new(width, 900, 1.0, width < 600);
        self.page.execute(params).await.expect("device metrics");
    }

    /// Opens `path` and waits for the page to load.
    pub async fn open(&self, path: &str) {
        self.page.goto(self.url(path)).await.expect("navigation");
        self.wait_for("the page is loaded", "document.readyState === 'complete'")
            .await;
    }

    /// Evaluates `expression` in the page.
    pub async fn eval<T: serde::de::DeserializeOwned>(&self, expression: &str) -> T {
        self.page
            .evaluate_expression(expression)
            .await
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
            .into_value()
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// Polls `condition` (a JS expression) until it is true; panics after [`DEADLINE`].
    pub async fn wait_for(&self, what: &str, condition: &str) -> Duration {
        let started = Instant::now();
        loop {
            let met = self
                .page
                .evaluate_expression(format!("!!({condition})"))
                .await
                .ok()
                .and_then(|r| r.into_value::<bool>().ok())
                .unwrap_or(false);
            if met {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{what}: not after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The text of the first element matching `selector` ("" when there is none).
    pub async fn text(&self, selector: &str) -> String {
        let selector = serde_json::to_string(selector).unwrap();
        self.eval(&format!(
            "(document.querySelector({selector}) || {{innerText: ''}}).innerText"
        ))
        .await
    }

    pub async fn path(&self) -> String {
        self.eval("location.pathname + location.search").await
    }

    /// Types `text` into the field `selector` (clearing it first), as a user would.
    pub async fn fill(&self, selector: &str, text: &str) {
        let quoted = serde_json::to_string(selector).unwrap();
        self.eval::<bool>(&format!(
            "(document.querySelector({quoted}).value = '', true)"
        ))
        .await;
        let field = self.page.find_element(selector).await.expect(selector);
        field.click().await.expect("click");
        // As a keyboard (or an input method, for "ã") would: into the focused field.
        self.page
            .execute(InsertTextParams::new(text))
            .await
            .expect("insert text");
    }

    /// Clicks `selector` and waits for the next page to load.
    pub async fn click_and_wait(&self, selector: &str) {
        self.eval::<bool>("(window.__stay = true, true)").await;
        self.page
            .find_element(selector)
            .await
            .unwrap_or_else(|e| panic!("{selector}: {e}"))
            .click()
            .await
            .expect("click");
        self.wait_for(
            &format!("a new page after clicking {selector}"),
            "window.__stay === undefined && document.readyState === 'complete'",
        )
        .await;
    }

    /// Signs in through the development sign-in as `reader`, `writer` or `admin`.
    pub async fn sign_in_as(&self, role: &str) {
        self.open("/console/sign-in").await;
        self.page
            .find_element(&format!("#role-{role}"))
            .await
            .expect("the role choice")
            .click()
            .await
            .expect("click");
        self.click_and_wait("form[action='/console/sign-in/dev'] button")
            .await;
        let html: String = self.eval("document.documentElement.outerHTML").await;
        assert_eq!(self.path().await, "/console/", "{html}");
    }

    /// An API token with `roles`, signed with the test secret.
    pub async fn token(&self, roles: Vec<Role>) -> String {
        let token = LocalToken {
            subject: "browser-test".into(),
            roles,
            ttl: Duration::from_secs(600),
        };
        mint_local_token(&self.settings.auth, &token)
            .await
            .expect("token")
    }

    /// Creates users through the API (faster than the form), oldest first.
    pub async fn seed_users(&self, users: &[(&str, &str)]) {
        userhub::crypto::install_crypto_provider();
        let token = self.token(vec![Role::UsersWrite]).await;
        let client = reqwest::Client::new();
        for (name, email) in users {
            let response = client
                .post(self.url("/api/users"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"name": name, "email": email}))
                .send()
                .await
                .expect("POST /api/users");
            assert_eq!(response.status(), reqwest::StatusCode::CREATED, "{email}");
        }
    }

    /// How many users the API lists.
    pub async fn user_count(&self) -> usize {
        let token = self.token(vec![Role::UsersRead]).await;
        let users: Vec<serde_json::Value> = reqwest::Client::new()
            .get(self.url("/api/users?limit=200"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("GET /api/users")
            .json()
            .await
            .expect("JSON");
        users.len()
    }

    /// The checks every page gets, at 1280 and 390 px (and 360 px for sideways
    /// scrolling): no CSP violation, axe-core finds no serious or critical violation
    /// (a summary line per page and width is printed and appended to
    /// target/console-screenshots/axe-summary.txt), and a full-page screenshot
    /// `target/console-screenshots/{name}-{width}.png`.
    pub async fn check_page(&self, name: &str) {
        std::fs::create_dir_all(screenshot_dir()).expect("screenshot folder");
        let csp: Vec<String> = self.eval("window.__csp || []").await;
        assert!(csp.is_empty(), "{name}: CSP violations {csp:?}");
        for width in [1280, 390, 360] {
            self.width(width).await;
            let overflow: i64 = self
                .eval("document.documentElement.scrollWidth - window.innerWidth")
                .await;
            assert!(
                overflow <= 0,
                "{name} scrolls sideways at {width} px by {overflow} px"
            );
            if width == 360 {
                continue;
            }
            let violations = self.axe_violations().await;
            let serious: Vec<&Violation> = violations
                .iter()
                .filter(|v| v.impact == "serious" || v.impact == "critical")
                .collect();
            let line = format!(
                "axe-core: {name} @{width}px: {} violations, {} serious or critical{}",
                violations.len(),
                serious.len(),
                violations
                    .iter()
                    .map(|v| format!("; {} ({}, {} nodes): {}", v.id, v.impact, v.nodes, v.help))
                    .collect::<String>()
            );
            println!("{line}");
            append_summary(&line);
            assert!(serious.is_empty(), "{line}");
            let file = screenshot_dir().join(format!("{name}-{width}.png"));
            self.page
                .save_screenshot(ScreenshotParams::builder().full_page(true).build(), &file)
                .await
                .expect("screenshot");
        }
        self.width(1280).await;
    }

    /// Runs axe-core on the page as it is (injected first, through CDP: the page's CSP
    /// forbids loading it).
    pub async fn axe_violations(&self) -> Vec<Violation> {
        if !self.eval::<bool>("typeof window.axe === 'object'").await {
            let axe = std::fs::read_to_string(axe_path()).expect("axe.min.js");
            self.page
                .evaluate_expression(axe)
                .await
                .expect("axe-core loads");
        }
        self.eval(
            "axe.run(document, {resultTypes: ['violations']}).then(r => \
             r.violations.map(v => ({id: v.id, impact: v.impact || 'minor', \
             nodes: v.nodes.length, help: v.help})))",
        )
        .await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let mut browser = self.browser;
        let _ = browser.close().await;
        let _ = browser.wait().await;
    }
}

#[derive(Debug, Deserialize)]
pub struct Violation {
    pub id: String,
    impact: String,
    nodes: usize,
    help: String,
}

/// Appends to `axe-summary.txt`, which each run of the tests starts afresh.
fn append_summary(line: &str) {
    use std::io::Write;
    static LOCK: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut started = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let fresh = !*started;
    *started = true;
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(!fresh)
        .truncate(fresh)
        .open(screenshot_dir().join("axe-summary.txt"))
    {
        let _ = writeln!(file, "{line}");
    }
}
