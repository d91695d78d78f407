//! The web console under `/console/`: server-rendered pages (askama templates compiled
//! into the binary, a small stylesheet and a few lines of our own script) for the people
//! who manage users. It is composition code: it reads and writes through the modules'
//! facades and the bus port, and signs people in with the API's own tokens and roles. It
//! never allows more than the API would; it only hides what the API would refuse.
//!
//! One file per page group: [`session`] (the cookie, CSRF, who is signed in),
//! [`sign_in`] (pasted token, development sign-in, sign-out) and [`oidc`] (authorization
//! code + PKCE), [`users`] (list, search, create), [`user_detail`] (one user and its live
//! enrichment status), [`user_changes`] (edit and delete), [`dead_letters`] (admin),
//! [`assets`] (stylesheet and script) and [`pages`] (the layout, the error pages and the
//! headers every console answer gets).

mod assets;
mod dead_letters;
mod oidc;
mod pages;
mod session;
mod sign_in;
mod user_changes;
mod user_detail;
mod users;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::middleware::from_fn;
use actix_web::{HttpResponse, web};
use anyhow::{Context, ensure};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::{
    AuthSettings, DEVELOPMENT_CONSOLE_SESSION_KEY, MIN_PRODUCTION_SECRET_BYTES, Settings,
};
use pages::ConsoleError;

/// The console as configured: its session cookie, its ways to sign in, and when to stop
/// the live status streams. Cheap to clone.
#[derive(Clone)]
pub struct Console {
    inner: Arc<State>,
}

struct State {
    sessions: session::Sessions,
    /// `[auth]`, to mint development tokens; `None` in production, or without an HS256
    /// secret to sign them with.
    dev_sign_in: Option<AuthSettings>,
    oidc: Option<oidc::OidcClient>,
    /// Cancelled when the application stops: open status streams end.
    shutdown: CancellationToken,
}

impl Console {
    /// Builds it from `[console]` (and `[auth]`, `server.tls`), refusing in production
    /// the development session key or one shorter than 32 bytes.
    pub async fn from_settings(
        settings: &Settings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let console = &settings.console;
        let mut key = console.session_key().await?;
        if settings.is_production() && key.expose_secret() == DEVELOPMENT_CONSOLE_SESSION_KEY {
            // Unset in production: the cookie key is derived from the HS256 secret (the
            // one secret a single container needs). The derivation (HKDF, in
            // `Key::derive_from`) keeps the two keys apart: a cookie key reveals nothing
            // of the token secret.
            key = settings.auth.hs256_secret().await?.context(
                "console.session_key is the development key, refused when \
                 APP_ENV=production: set APP__CONSOLE__SESSION_KEY or \
                 APP__CONSOLE__SESSION_KEY_FILE (or an HS256 secret to derive it from)",
            )?;
        }
        let key = key.expose_secret();
        // Also outside production: the cookie key is derived from it with HKDF, which
        // needs 32 bytes of input.
        ensure!(
            key.len() >= MIN_PRODUCTION_SECRET_BYTES,
            "console.session_key is shorter than {MIN_PRODUCTION_SECRET_BYTES} bytes"
        );
        ensure!(
            console.session_ttl_secs > 0,
            "console.session_ttl_secs must be at least 1"
        );
        let sessions = session::Sessions::new(
            key.as_bytes(),
            Duration::from_secs(console.session_ttl_secs),
            settings.server.tls.enabled(),
        );
        let dev_sign_in = if settings.is_production() || !settings.auth.enabled {
            None
        } else {
            settings
                .auth
                .hs256_secret()
                .await?
                .map(|_| settings.auth.clone())
        };
        let oidc = oidc::OidcClient::from_settings(console)
            .context("console.oidc_* settings")?
            .inspect(|_| {
                if settings.auth.jwks_url().is_none() {
                    tracing::warn!(
                        "console.oidc_issuer is set but auth.jwks_url is not: the API will \
                         refuse the provider's tokens, so OIDC sign-in cannot succeed"
                    );
                }
            });
        Ok(Self {
            inner: Arc::new(State {
                sessions,
                dev_sign_in,
                oidc,
                shutdown,
            }),
        })
    }

    /// Registers `/console` and everything under it. Needs the users and enrichment
    /// facades and the bus in the app data (the API role registers them).
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        let form = web::FormConfig::default()
            .limit(16 * 1024)
            .error_handler(|error, _| {
                let page = ConsoleError::BadRequest(format!("The form could not be read: {error}"));
                actix_web::error::InternalError::from_response(error, page.page()).into()
            });
        cfg.route(
            "/console",
            web::get().to(|| async { see_other("/console/") }),
        )
        .service(
            web::scope("/console")
                .app_data(web::Data::new(self.clone()))
                .app_data(form)
                .wrap(from_fn(pages::console_headers))
                .configure(assets::configure)
                .configure(users::configure)
                .configure(user_detail::configure)
                .configure(user_changes::configure)
                .configure(dead_letters::configure)
                .configure(|cfg| sign_in::configure(cfg, self.inner.dev_sign_in.is_some()))
                .configure(oidc::configure)
                .default_service(web::to(pages::not_found)),
        );
    }

    fn sessions(&self) -> &session::Sessions {
        &self.inner.sessions
    }
}

/// `303 See Other` to `location` (after a form: the browser GETs it).
fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}
