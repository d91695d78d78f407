//! The web layer: what every route shares, knowing no module. Problem+json errors,
//! request ids, authentication and roles, rate limiting, transport hardening, TLS, the
//! shared extractors, and the server with its middleware stack. Which routes exist is
//! the business of the composition (`app`), which hands them to [`serve`].

pub mod auth;
pub mod conditional;
pub mod extract;
mod hardening;
pub mod identity;
pub mod openapi;
pub mod problem;
pub mod rate_limit;
mod request_id;
mod tls;

use actix_web::http::KeepAlive;
use actix_web::middleware::{ErrorHandlers, from_fn};
use actix_web::{App, HttpResponse, HttpServer, web};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

pub use extract::{UuidParam, page_size, parse_uuid};
pub use hardening::{API_CSP, Hardening, SWAGGER_UI_CSP, SWAGGER_UI_LOGO_STYLE};
pub use request_id::{REQUEST_ID_HEADER, RequestId};

use crate::config::ServerSettings;
use crate::metrics::Metrics;
use problem::Problem;

/// What the middleware stack needs, whatever the routes.
#[derive(Clone)]
pub struct Stack {
    /// Rate limits, CORS, TLS (`rate_limit.*`, `cors.*`, `server.tls.*`).
    pub hardening: Hardening,
    /// Who may call the protected routes (see [`auth::required_access`]).
    pub auth: Arc<auth::Authentication>,
    /// RED metrics of every request.
    pub metrics: Arc<Metrics>,
}

/// Starts the HTTP server on `listener` (not yet awaited), over TLS when configured,
/// serving the routes `routes` registers behind the middleware stack.
pub fn serve<F>(
    listener: TcpListener,
    stack: Stack,
    settings: &ServerSettings,
    routes: F,
) -> std::io::Result<actix_web::dev::Server>
where
    F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
{
    let body_limit = settings.body_limit_bytes;
    let tls = stack.hardening.tls().cloned();
    let server = HttpServer::new(move || {
        let json = web::JsonConfig::default()
            .limit(body_limit)
            .error_handler(problem::json_error);
        let query = web::QueryConfig::default().error_handler(|err, _| {
            let problem = Problem::status(actix_web::http::StatusCode::BAD_REQUEST)
                .detail(format!("The query string is malformed: {err}"));
            actix_web::error::InternalError::from_response(err, problem.response()).into()
        });
        let security = &stack.hardening;
        let limiter = security.rate_limiter.clone();
        let hsts = security.hsts();
        // The last `.wrap` runs first. From the outside in: request log and id; security
        // headers and problem+json for every answer; CORS (preflights end there);
        // authentication, which identifies the caller or notes why it is refused; rate
        // limiting, keyed by the subject or the IP, so refused requests count too; then
        // the refusal (401/403), if any.
        App::new()
            .wrap(ErrorHandlers::new().default_handler(problem::problem_for_plain_errors))
            .wrap(from_fn(auth::enforce))
            .wrap(from_fn(move |req, next| {
                rate_limit::limit(limiter.clone(), req, next)
            }))
            .wrap(from_fn(auth::authenticate))
            .wrap(security.cors())
            .wrap(from_fn(move |req, next| {
                hardening::finish_responses(hsts, req, next)
            }))
            .wrap(from_fn(request_id::request_context))
            .app_data(web::Data::from(stack.auth.clone()))
            .app_data(web::Data::from(stack.metrics.clone()))
            .app_data(json)
            .app_data(query)
            .app_data(web::PayloadConfig::default().limit(body_limit))
            .configure(routes.clone())
            .default_service(web::to(not_found))
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
