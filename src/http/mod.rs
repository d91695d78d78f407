//! Shared HTTP concerns: problem+json errors, request ids, authentication, rate limiting
//! and transport hardening, health and metrics, OpenAPI, and the combined profile view
//! composed from the two modules' read APIs.

mod admin;
pub mod auth;
mod hardening;
mod health;
pub mod identity;
mod openapi;
pub mod problem;
mod profile_view;
pub mod rate_limit;
mod request_id;
mod tls;

use actix_web::http::KeepAlive;
use actix_web::middleware::{ErrorHandlers, from_fn};
use actix_web::{App, HttpResponse, HttpServer, web};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub use hardening::{API_CSP, Hardening, SWAGGER_UI_CSP, SWAGGER_UI_LOGO_STYLE};
pub use health::{Gauges, Readiness};
pub use openapi::ApiDoc;
pub use request_id::{REQUEST_ID_HEADER, RequestId};

use crate::config::ServerSettings;
use crate::enrichment::{self, Enrichment};
use crate::metrics::Metrics;
use crate::users::{self, Users};
use problem::{ApiError, ApiResult, Problem};

/// Parses a uuid path segment. The nil uuid is well-formed (it is simply not found).
pub fn parse_uuid(raw: &str) -> ApiResult<Uuid> {
    Uuid::try_parse(raw)
        .map_err(|_| ApiError::BadRequest("The uuid in the path is malformed".into()))
}

/// Parses an optional `limit` query parameter: `default` when absent, else a whole
/// number in `1..=max`; the error is the field message.
pub fn page_size(raw: Option<&str>, default: u32, max: u32) -> Result<u32, String> {
    match raw.map(str::parse::<u32>) {
        None => Ok(default),
        Some(Ok(n)) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(format!("must be a whole number from 1 to {max}")),
    }
}

/// What the HTTP layer serves from.
#[derive(Clone)]
pub struct HttpState {
    pub users: Users,
    pub enrichment: Enrichment,
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
    pub gauges: Gauges,
    /// Serve the `/api` and `/users` routes (role `api`); otherwise only operational ones.
    pub serve_api: bool,
    /// Rate limits, CORS, TLS (`rate_limit.*`, `cors.*`, `server.tls.*`).
    pub hardening: Hardening,
    /// Who may call the protected routes (see [`auth::required_access`]).
    pub auth: Arc<auth::Authentication>,
}

/// Starts the HTTP server on `listener` (not yet awaited), over TLS when configured.
pub fn serve(
    listener: TcpListener,
    state: HttpState,
    settings: &ServerSettings,
) -> std::io::Result<actix_web::dev::Server> {
    let body_limit = settings.body_limit_bytes;
    let tls = state.hardening.tls().cloned();
    let server = HttpServer::new(move || {
        let json = web::JsonConfig::default()
            .limit(body_limit)
            .error_handler(problem::json_error);
        let query = web::QueryConfig::default().error_handler(|err, _| {
            let problem = Problem::status(actix_web::http::StatusCode::BAD_REQUEST)
                .detail(format!("The query string is malformed: {err}"));
            actix_web::error::InternalError::from_response(err, problem.response()).into()
        });
        let security = state.hardening.clone();
        let limiter = security.rate_limiter.clone();
        // The last `.wrap` runs first. From the outside in: request log and id; security
        // headers and problem+json for every answer; CORS (preflights end there);
        // authentication, which identifies the caller or notes why it is refused; rate
        // limiting, keyed by the subject or the IP, so refused requests count too; then
        // the refusal (401/403), if any.
        let mut app = App::new()
            .wrap(ErrorHandlers::new().default_handler(problem::problem_for_plain_errors))
            .wrap(from_fn(auth::enforce))
            .wrap(from_fn(move |req, next| {
                rate_limit::limit(limiter.clone(), req, next)
            }))
            .wrap(from_fn(auth::authenticate))
            .wrap(security.cors())
            .wrap(from_fn(move |req, next| {
                hardening::finish_responses(security.clone(), req, next)
            }))
            .wrap(from_fn(request_id::request_context))
            .app_data(web::Data::from(state.auth.clone()))
            .app_data(json)
            .app_data(query)
            .app_data(web::PayloadConfig::default().limit(body_limit))
            .app_data(web::Data::new(state.readiness.clone()))
            .app_data(web::Data::from(state.metrics.clone()))
            .app_data(web::Data::new(state.gauges.clone()))
            .configure(health::configure)
            .configure(openapi::configure);
        if state.serve_api {
            app = app
                .app_data(web::Data::new(state.users.clone()))
                .app_data(web::Data::new(state.enrichment.clone()))
                .configure(users::configure)
                .configure(enrichment::configure)
                .configure(profile_view::configure)
                .app_data(admin::data(state.readiness.bus.clone()))
                .configure(admin::configure);
        }
        app.default_service(web::to(not_found))
    })
    .disable_signals()
    .shutdown_timeout(settings.shutdown_timeout_secs)
    .client_request_timeout(Duration::from_millis(settings.client_request_timeout_ms))
    .keep_alive(KeepAlive::from(Duration::from_secs(
        settings.keep_alive_secs,
    )))
    .max_connections(settings.max_connections_per_worker);
    let server = match tls {
        Some(config) => server.listen_rustls_0_23(listener, config)?,
        None => server.listen(listener)?,
    };
    Ok(server.run())
}

async fn not_found() -> HttpResponse {
    Problem::status(actix_web::http::StatusCode::NOT_FOUND)
        .detail("No such resource")
        .response()
}
