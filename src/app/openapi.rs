//! The OpenAPI document and Swagger UI.

use actix_web::{HttpResponse, http::header, web};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::{admin, health, profile_view};
use crate::web::auth;
use crate::{enrichment, users};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "userhub",
        description = "User registry with asynchronous profile enrichment. Errors are \
                       `application/problem+json` (RFC 9457). Every response carries \
                       `X-Request-Id` (sent by the client or generated). The `/api`, \
                       `/users/enriched` and `/admin` routes need `Authorization: Bearer \
                       <JWT>` with a role: `users:read`, `users:write` or `admin` (which \
                       grants every role)."
    ),
    modifiers(&BearerSecurity),
    paths(
        users::routes::create_user,
        users::routes::list_users,
        users::routes::get_user,
        profile_view::get_user_profile,
        enrichment::routes::get_enriched_profile,
        admin::list_dead_letters,
        admin::replay_dead_letter,
        health::health,
        health::ready,
        health::metrics,
    ),
    tags(
        (name = "users", description = "Create and read users"),
        (name = "enrichment", description = "Profiles derived asynchronously from new users"),
        (name = "admin", description = "Dead letters and their replay"),
        (name = "operations", description = "Health and metrics for orchestrators"),
    )
)]
pub struct ApiDoc;

/// The bearer scheme, and the security requirement and 401/403 answers of every
/// operation the access policy protects.
struct BearerSecurity;

impl Modify for BearerSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        auth::document(openapi);
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        SwaggerUi::new("/swagger-ui/{_:.*}").url("/api-docs/openapi.json", ApiDoc::openapi()),
    );
}

/// `GET /`: a redirect to `location` (the console where it is served, else Swagger UI).
pub fn root(cfg: &mut web::ServiceConfig, location: &'static str) {
    cfg.route(
        "/",
        web::get().to(move || async move {
            HttpResponse::Found()
                .insert_header((header::LOCATION, location))
                .finish()
        }),
    );
}
