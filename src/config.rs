//! Settings: embedded defaults < config/default.toml < config/$APP_ENV.toml < APP__* env.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

const EMBEDDED_DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub documents: DocumentsSettings,
    pub cache: CacheSettings,
    pub bus: BusSettings,
    pub outbox: OutboxSettings,
    pub worker: WorkerSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub rate_limit: RateLimitSettings,
    pub cors: CorsSettings,
    pub auth: AuthSettings,
    pub http: HttpSettings,
    pub retention: RetentionSettings,
    pub console: ConsoleSettings,
    /// The `APP_ENV` the settings were loaded for (`local`, `test`, `production`, …).
    #[serde(skip)]
    pub environment: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub body_limit_bytes: usize,
    pub shutdown_timeout_secs: u64,
    /// Longest a client may take to send a request head (then 408).
    pub client_request_timeout_ms: u64,
    /// Idle time before a keep-alive connection is closed; 0 disables keep-alive.
    pub keep_alive_secs: u64,
    /// Concurrent connections each worker thread accepts.
    pub max_connections_per_worker: usize,
    /// After SIGTERM, how long readiness answers 503 while the server keeps serving,
    /// so load balancers stop sending requests before it stops accepting them.
    pub drain_secs: u64,
    /// A readiness result is reused this long, so a flood of probes does not reach the
    /// backends.
    pub readiness_cache_ms: u64,
    #[serde(default)]
    pub tls: TlsSettings,
}

/// HTTPS: served when both paths are set (an empty path counts as unset).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_path: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: Option<PathBuf>,
}

/// `[http]`: HTTP semantics the API enforces.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    /// `PATCH`/`DELETE` without `If-Match` are refused with 428 (lost-update
    /// protection every client must opt into).
    pub require_if_match: bool,
}

/// Per-client request quotas (see `web::rate_limit`).
#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitSettings {
    pub enabled: bool,
    /// Sustained GET/HEAD rate per client.
    pub read_per_minute: NonZeroU32,
    /// GET/HEAD requests a client may send at once.
    pub read_burst: NonZeroU32,
    /// Sustained POST/PUT/PATCH/DELETE rate per client.
    pub write_per_minute: NonZeroU32,
    pub write_burst: NonZeroU32,
    /// Most clients tracked per budget; newer clients share one budget until old ones
    /// are evicted.
    pub max_clients: usize,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
}

/// Cross-origin access for browser clients.
#[derive(Debug, Clone, Deserialize)]
pub struct CorsSettings {
    /// Exact origins (`https://app.example.com`) allowed to call the API; empty: none.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// May carry a password (postgres://user:pass@…), so it never reaches a log.
    pub url: SecretString,
    /// A file holding `url` (container secrets); when set it wins. Empty: unset.
    #[serde(default)]
    pub url_file: String,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    /// PostgreSQL only: longest a single statement may run.
    pub statement_timeout_ms: u64,
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DocumentsSettings {
    pub url: SecretString,
    /// A file holding `url`; when set it wins. Empty: unset.
    #[serde(default)]
    pub url_file: String,
    /// Consecutive failures with the store unreachable (a ping confirms it) that open
    /// its circuit breaker: the consumer then pauses.
    pub breaker_failures: u32,
    /// How long the open breaker waits before it tries the store again.
    pub breaker_cool_down_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CacheSettings {
    pub url: SecretString,
    /// A file holding `url`; when set it wins. Empty: unset.
    #[serde(default)]
    pub url_file: String,
    pub ttl_secs: u64,
    pub max_entries: u64,
    pub key_prefix: String,
    pub timeout_ms: u64,
    /// redis:// only: how long a local copy of a read may be served (0: none).
    pub local_ttl_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BusSettings {
    pub url: SecretString,
    /// A file holding `url`; when set it wins. Empty: unset.
    #[serde(default)]
    pub url_file: String,
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OutboxSettings {
    pub poll_interval_ms: u64,
    pub batch_size: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub handler_timeout_ms: u64,
    pub poll_interval_ms: u64,
    /// Messages one consumer handles at once.
    pub concurrency: usize,
    /// RabbitMQ: deliveries of one message (redeliveries after a consumer died
    /// included) before the broker dead-letters it itself.
    pub delivery_limit: u32,
}

/// `[retention]`: how long what holds personal data is kept once it served.
#[derive(Debug, Clone, Deserialize)]
pub struct RetentionSettings {
    /// Sent outbox rows are deleted this long after they were sent.
    pub outbox_hours: u64,
    /// Dead letters (replayed or not) are deleted this long after they died; on
    /// RabbitMQ it is the DLQs' message TTL.
    pub dead_letter_days: u64,
    /// How often the clean-up runs.
    pub interval_secs: u64,
    /// Rows deleted per statement, so the clean-up never holds a long lock.
    pub batch_size: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

/// `[telemetry]`: OpenTelemetry traces.
#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySettings {
    /// OTLP/HTTP endpoint (`http://collector:4318`, `/v1/traces` is added); empty: no
    /// export (spans still carry trace ids for propagation and logs).
    pub otlp_endpoint: String,
    /// Share of new traces exported, 0.0–1.0; a trace started upstream follows the
    /// caller's sampling decision.
    pub sampling_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Longest one export may take; also bounds the flush at shutdown.
    pub export_timeout_ms: u64,
}

/// `[auth]`: who may call the `/api`, `/users/enriched` and `/admin` routes.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    /// `false` lets every request through (local experiments only; refused in
    /// production).
    pub enabled: bool,
    /// Shared secret of HS256 tokens (local use, tests, `userhub token`). Empty: HS256
    /// tokens are not accepted.
    pub hs256_secret: SecretString,
    /// A file holding the HS256 secret (container secrets); when set it wins over
    /// `hs256_secret`. Empty: unset.
    pub hs256_secret_file: String,
    /// An OIDC provider's JWKS URL (RS256/ES256 keys). Empty: unset.
    pub jwks_url: String,
    /// An unknown `kid` re-fetches the JWKS at most once per this many seconds.
    pub jwks_min_refresh_secs: u64,
    /// The key set is re-fetched once it is older than this, so a key the provider
    /// withdrew stops verifying.
    pub jwks_max_age_secs: u64,
    /// Longest a JWKS fetch may take.
    pub jwks_timeout_ms: u64,
    /// Required `iss` of every token.
    pub issuer: String,
    /// Required `aud` of every token (one of its values when it is a list).
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
}

/// The HS256 secret of `config/default.toml`: good enough for `cargo run`, refused in
/// production.
pub const DEVELOPMENT_HS256_SECRET: &str = "userhub-development-secret-not-for-production-use";

/// Shortest HS256 secret accepted in production (RFC 7518 §3.2: at least the hash size).
pub const MIN_PRODUCTION_SECRET_BYTES: usize = 32;

/// How long reading `auth.hs256_secret_file` may take.
const SECRET_FILE_TIMEOUT: Duration = Duration::from_secs(5);

impl AuthSettings {
    /// The HS256 secret: the content of `hs256_secret_file` (without its trailing line
    /// break) when set, else `hs256_secret`; `None` when empty (HS256 disabled).
    pub async fn hs256_secret(&self) -> anyhow::Result<Option<SecretString>> {
        let secret = if self.hs256_secret_file.is_empty() {
            self.hs256_secret.clone()
        } else {
            read_secret_file("auth.hs256_secret_file", &self.hs256_secret_file).await?
        };
        Ok((!secret.expose_secret().is_empty()).then_some(secret))
    }

    pub fn jwks_url(&self) -> Option<&str> {
        Some(self.jwks_url.trim()).filter(|url| !url.is_empty())
    }
}

/// `[console]`: the web console under `/console/` (its sessions and its sign-in).
#[derive(Debug, Clone, Deserialize)]
pub struct ConsoleSettings {
    /// Encrypts and authenticates the session cookie; at least 32 bytes.
    pub session_key: SecretString,
    /// A file holding the session key; when set it wins over `session_key`. Empty: unset.
    pub session_key_file: String,
    /// Longest a console session lasts; never longer than its token.
    pub session_ttl_secs: u64,
    /// An OpenID Connect issuer (`{issuer}/.well-known/openid-configuration`). Empty:
    /// no "Sign in with OIDC".
    pub oidc_issuer: String,
    pub oidc_client_id: String,
    /// For a confidential client (sent as `client_secret_post`). Empty: a public client.
    pub oidc_client_secret: SecretString,
    /// Where the provider sends the browser back
    /// (`https://HOST/console/sign-in/oidc/callback`). Empty: derived from the request.
    pub oidc_redirect_url: String,
    /// Space-separated scopes to ask for (`openid` is always asked for).
    pub oidc_scopes: String,
    /// Longest a call to the provider (discovery, token exchange) may take.
    pub oidc_timeout_ms: u64,
}

/// The session key of `config/default.toml`: good enough for `cargo run`, refused in
/// production.
pub const DEVELOPMENT_CONSOLE_SESSION_KEY: &str =
    "userhub-console-development-session-key-not-for-production-use";

impl ConsoleSettings {
    /// The session key: the content of `session_key_file` (without its trailing line
    /// break) when set, else `session_key`.
    pub async fn session_key(&self) -> anyhow::Result<SecretString> {
        if self.session_key_file.is_empty() {
            return Ok(self.session_key.clone());
        }
        read_secret_file("console.session_key_file", &self.session_key_file).await
    }

    pub fn oidc_issuer(&self) -> Option<&str> {
        Some(self.oidc_issuer.trim()).filter(|issuer| !issuer.is_empty())
    }
}

/// Reads a secret from a file (container secrets), without its trailing line break;
/// an empty file is an error.
async fn read_secret_file(setting: &str, path: &str) -> anyhow::Result<SecretString> {
    let path = Path::new(path);
    let read = tokio::task::spawn_blocking({
        let path = path.to_owned();
        move || std::fs::read_to_string(path)
    });
    let content = match tokio::time::timeout(SECRET_FILE_TIMEOUT, read).await {
        Ok(Ok(read)) => read.map_err(anyhow::Error::from),
        Ok(Err(panicked)) => Err(anyhow::Error::from(panicked)),
        Err(_) => Err(anyhow::anyhow!("timed out after {SECRET_FILE_TIMEOUT:?}")),
    }
    .with_context(|| format!("cannot read {setting} {}", path.display()))?;
    let secret = content.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!secret.is_empty(), "{setting} {} is empty", path.display());
    Ok(SecretString::from(secret))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

impl Settings {
    /// Loads the settings for `APP_ENV` (default `local`) from `APP_CONFIG_DIR`
    /// (default `./config`) and the process environment.
    pub fn load() -> Result<Self, config::ConfigError> {
        let environment = std::env::var("APP_ENV").unwrap_or_else(|_| "local".into());
        Self::load_for(&environment)
    }

    /// Loads the settings of one named environment (`local`, `test`, `production`, …).
    pub fn load_for(environment: &str) -> Result<Self, config::ConfigError> {
        let dir = std::env::var_os("APP_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("config"));
        let mut settings: Self = Config::builder()
            .add_source(File::from_str(EMBEDDED_DEFAULTS, FileFormat::Toml))
            .add_source(File::from(dir.join("default.toml")).required(false))
            .add_source(File::from(dir.join(format!("{environment}.toml"))).required(false))
            .add_source(
                Environment::with_prefix("APP")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    // Comma-separated lists, e.g. APP__CORS__ALLOWED_ORIGINS=https://a,https://b
                    .list_separator(",")
                    .with_list_parse_key("cors.allowed_origins")
                    .with_list_parse_key("rate_limit.trusted_proxies"),
            )
            .build()?
            .try_deserialize()?;
        settings.environment = environment.to_owned();
        settings.read_url_files()?;
        Ok(settings)
    }

    /// Replaces each URL whose `*_file` twin is set by that file's content (without
    /// its trailing line break): secrets mounted as files, not in the environment.
    fn read_url_files(&mut self) -> Result<(), config::ConfigError> {
        for (setting, file, url) in [
            (
                "database.url_file",
                &self.database.url_file,
                &mut self.database.url,
            ),
            (
                "documents.url_file",
                &self.documents.url_file,
                &mut self.documents.url,
            ),
            ("cache.url_file", &self.cache.url_file, &mut self.cache.url),
            ("bus.url_file", &self.bus.url_file, &mut self.bus.url),
        ] {
            if file.trim().is_empty() {
                continue;
            }
            let content = std::fs::read_to_string(file).map_err(|error| {
                config::ConfigError::Message(format!("cannot read {setting} {file}: {error}"))
            })?;
            let value = content.trim_end_matches(['\r', '\n']);
            if value.is_empty() {
                return Err(config::ConfigError::Message(format!(
                    "{setting} {file} is empty"
                )));
            }
            *url = SecretString::from(value);
        }
        Ok(())
    }

    pub fn is_production(&self) -> bool {
        self.environment == "production"
    }
}

impl DatabaseSettings {
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms)
    }
}

impl TlsSettings {
    /// The certificate and key paths when HTTPS is configured (both set and non-empty).
    pub fn paths(&self) -> (Option<&PathBuf>, Option<&PathBuf>) {
        fn set(path: &Option<PathBuf>) -> Option<&PathBuf> {
            path.as_ref().filter(|p| !p.as_os_str().is_empty())
        }
        (set(&self.cert_path), set(&self.key_path))
    }

    pub fn enabled(&self) -> bool {
        matches!(self.paths(), (Some(_), Some(_)))
    }
}

impl WorkerSettings {
    pub fn handler_timeout(&self) -> Duration {
        Duration::from_millis(self.handler_timeout_ms)
    }
}

/// The scheme of a configured URL (`sqlite`, `postgres`, `memory`, …), lower-cased.
pub fn scheme_of(url: &SecretString) -> String {
    let url = url.expose_secret();
    url.split_once(':')
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_deserialize() {
        let settings: Settings = Config::builder()
            .add_source(File::from_str(EMBEDDED_DEFAULTS, FileFormat::Toml))
            .build()
            .and_then(Config::try_deserialize)
            .expect("embedded defaults are valid");
        assert_eq!(settings.server.port, 8080);
        assert_eq!(scheme_of(&settings.database.url), "sqlite");
        assert_eq!(scheme_of(&settings.bus.url), "memory");
        assert_eq!(settings.log.format, LogFormat::Pretty);
        assert!(settings.rate_limit.enabled);
        assert!(settings.cors.allowed_origins.is_empty());
        assert!(settings.rate_limit.trusted_proxies.is_empty());
        assert!(!settings.server.tls.enabled());
    }

    #[test]
    fn embedded_auth_defaults_work_out_of_the_box_with_the_development_secret() {
        let settings: Settings = Config::builder()
            .add_source(File::from_str(EMBEDDED_DEFAULTS, FileFormat::Toml))
            .build()
            .and_then(Config::try_deserialize)
            .expect("embedded defaults are valid");
        let auth = settings.auth;
        assert!(auth.enabled);
        assert_eq!(auth.hs256_secret.expose_secret(), DEVELOPMENT_HS256_SECRET);
        assert!(DEVELOPMENT_HS256_SECRET.len() >= MIN_PRODUCTION_SECRET_BYTES);
        assert_eq!(auth.jwks_url(), None);
        assert!(!auth.issuer.is_empty() && !auth.audience.is_empty());
        assert!(!format!("{auth:?}").contains(DEVELOPMENT_HS256_SECRET));
    }

    fn auth_with(secret: &str, file: &str) -> AuthSettings {
        AuthSettings {
            enabled: true,
            hs256_secret: SecretString::from(secret),
            hs256_secret_file: file.to_owned(),
            jwks_url: " ".into(),
            jwks_min_refresh_secs: 60,
            jwks_max_age_secs: 3600,
            jwks_timeout_ms: 5000,
            issuer: "i".into(),
            audience: "a".into(),
            leeway_secs: 30,
        }
    }

    #[tokio::test]
    async fn the_secret_file_wins_without_its_line_break_and_empty_means_off() {
        let dir = tempfile::TempDir::new().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-the-file\r\n").unwrap();
        let path = file.display().to_string();
        let secret = auth_with("configured", &path).hs256_secret().await.unwrap();
        assert_eq!(secret.unwrap().expose_secret(), "from-the-file");
        let secret = auth_with("configured", "").hs256_secret().await.unwrap();
        assert_eq!(secret.unwrap().expose_secret(), "configured");
        assert!(auth_with("", "").hs256_secret().await.unwrap().is_none());
        assert_eq!(auth_with("", "").jwks_url(), None, "blank means unset");

        std::fs::write(&file, "\n").unwrap();
        let error = auth_with("x", &path).hs256_secret().await.unwrap_err();
        assert!(format!("{error:#}").contains("is empty"), "{error:#}");
        let error = auth_with("x", "/nonexistent/secret").hs256_secret().await;
        assert!(error.is_err());
    }

    #[test]
    fn database_url_is_redacted_in_debug_output() {
        let db = DatabaseSettings {
            url: SecretString::from("postgres://app:hunter2@db/userhub"),
            url_file: String::new(),
            max_connections: 1,
            acquire_timeout_ms: 1,
            statement_timeout_ms: 1,
            migrate_on_start: false,
        };
        assert!(!format!("{db:?}").contains("hunter2"));
    }
}
