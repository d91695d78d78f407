//! Shared HTTP concerns: problem+json errors, request ids, authentication, health,
//! OpenAPI, and the combined profile view composed from the two modules' read APIs.

mod admin;
pub mod auth;
mod health;
pub mod identity;
mod openapi;
pub mod problem;
mod profile_view;
mod request_id;

use actix_web::middleware::{ErrorHandlers, from_fn};
use actix_web::{App, HttpResponse, HttpServer, web};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub use health::Readiness;
pub use openapi::ApiDoc;
pub use request_id::{REQUEST_ID_HEADER, RequestId};

use crate::config::ServerSettings;
use crate::enrichment::{self, Enrichment};
use crate::users::{self, Users};
use problem::{ApiError, ApiResult, Problem};

/// Parses a uuid path segment. The nil uuid is well-formed (it is simply not found).
pub fn parse_uuid(raw: &str) -> ApiResult<Uuid> {
    Uuid::try_parse(raw)
        .map_err(|_| ApiError::BadRequest("The uuid in the path is malformed".into()))
}

/// What the HTTP layer serves from.
#[derive(Clone)]
pub struct HttpState {
    pub users: Users,
    pub enrichment: Enrichment,
    pub readiness: Readiness,
    /// Serve the `/api` and `/users` routes (role `api`); otherwise only operational ones.
    pub serve_api: bool,
    /// Who may call the protected routes (see [`auth::required_access`]).
    pub auth: Arc<auth::Authentication>,
}

/// Starts the HTTP server on `listener` (not yet awaited).
pub fn serve(
    listener: TcpListener,
    state: HttpState,
    settings: &ServerSettings,
) -> std::io::Result<actix_web::dev::Server> {
    let body_limit = settings.body_limit_bytes;
    let server = HttpServer::new(move || {
        let json = web::JsonConfig::default()
            .limit(body_limit)
            .error_handler(problem::json_error);
        let query = web::QueryConfig::default().error_handler(|err, _| {
            let problem = Problem::status(actix_web::http::StatusCode::BAD_REQUEST)
                .detail(format!("The query string is malformed: {err}"));
            actix_web::error::InternalError::from_response(err, problem.response()).into()
        });
        let mut app = App::new()
            .wrap(ErrorHandlers::new().default_handler(problem::problem_for_plain_errors))
            // Inside the request context, so refusals carry a request id and are logged
            // in the request's span; what needs the `Principal` goes inside this.
            .wrap(from_fn(auth::authenticate))
            .wrap(from_fn(request_id::request_context))
            .app_data(web::Data::from(state.auth.clone()))
            .app_data(json)
            .app_data(query)
            .app_data(web::PayloadConfig::default().limit(body_limit))
            .app_data(web::Data::new(state.readiness.clone()))
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
    .client_request_timeout(Duration::from_secs(10))
    .listen(listener)?
    .run();
    Ok(server)
}

async fn not_found() -> HttpResponse {
    Problem::status(actix_web::http::StatusCode::NOT_FOUND)
        .detail("No such resource")
        .response()
}
