//! The OpenAPI document and Swagger UI.

use actix_web::{HttpResponse, http::header, web};
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::{RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::{admin, health, profile_view};
use crate::web::problem::PROBLEM_JSON;
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
    modifiers(&Contract),
    paths(
        users::routes::create_user,
        users::routes::list_users,
        users::routes::get_user,
        users::changes::patch_user,
        users::changes::delete_user,
        profile_view::get_user_profile,
        enrichment::routes::get_enriched_profile,
        admin::list_dead_letters,
        admin::replay_dead_letter,
        admin::replay_dead_letters,
        admin::reenrich,
        health::health,
        health::ready,
        health::metrics,
    ),
    tags(
        (name = "users", description = "Create, read, change and erase users"),
        (name = "enrichment", description = "Profiles derived asynchronously from users"),
        (name = "admin", description = "Dead letters and their replay; re-enrichment"),
        (name = "operations", description = "Health and metrics for orchestrators"),
    )
)]
pub struct ApiDoc;

/// What the annotations of single operations cannot say: the web layer's behaviour on
/// every operation (security, request ids, rate limits), the patterns of the users
/// module's inputs, the 503 of every operation that needs storage, and the links
/// between operations (for clients and for stateful contract tests).
struct Contract;

impl Modify for Contract {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        crate::web::openapi::document(openapi);
        users::routes::document(openapi);
        for (path, item) in &mut openapi.paths.paths {
            if !needs_storage(path) {
                continue;
            }
            for (_, operation) in crate::web::openapi::operations(item) {
                operation
                    .responses
                    .responses
                    .entry("503".into())
                    .or_insert_with(|| {
                        ResponseBuilder::new()
                        .description(
                            "The database, the profile store or the bus cannot take the request \
                             now (busy or down); retry after `Retry-After` seconds",
                        )
                        .content(PROBLEM_JSON, crate::web::openapi::problem_content())
                        .build()
                        .into()
                    });
            }
        }
        link_operations(openapi);
    }
}

/// The routes that read or write storage (health answers its own 503).
fn needs_storage(path: &str) -> bool {
    ["/api/", "/users/", "/admin/"]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

/// OpenAPI links: from a created or listed user to what can be done with it, from a
/// dead-letter listing to the replay of its first letter.
fn link_operations(openapi: &mut utoipa::openapi::OpenApi) {
    let user_operations = [
        ("GetUser", "get_user"),
        ("PatchUser", "patch_user"),
        ("DeleteUser", "delete_user"),
        ("GetUserProfile", "get_user_profile"),
        ("GetEnrichedProfile", "get_enriched_profile"),
    ];
    let links = [
        (
            "/api/users",
            "post",
            "201",
            "$response.body#/uuid",
            "uuid",
            &user_operations[..],
        ),
        (
            "/api/users/{uuid}",
            "patch",
            "200",
            "$response.body#/uuid",
            "uuid",
            &user_operations[..],
        ),
        (
            "/api/users",
            "get",
            "200",
            "$response.body#/0/uuid",
            "uuid",
            &user_operations[..1],
        ),
        (
            "/admin/dead-letters",
            "get",
            "200",
            "$response.body#/0/id",
            "id",
            &[("ReplayFirst", "replay_dead_letter")][..],
        ),
    ];
    for (path, method, status, value, parameter, targets) in links {
        let Some(item) = openapi.paths.paths.get_mut(path) else {
            continue;
        };
        let operation = match method {
            "post" => item.post.as_mut(),
            "patch" => item.patch.as_mut(),
            _ => item.get.as_mut(),
        };
        let Some(RefOr::T(response)) =
            operation.and_then(|op| op.responses.responses.get_mut(status))
        else {
            continue;
        };
        for (name, operation_id) in targets {
            let link = LinkBuilder::new()
                .operation_id(*operation_id)
                .parameter(parameter, value)
                .build();
            response.links.insert((*name).to_owned(), RefOr::T(link));
        }
    }
}

/// Where the document is served.
const DOCUMENT_URL: &str = "/api-docs/openapi.json";

/// The document as served: utoipa's, with the field names of its link objects as the
/// specification spells them (utoipa 5.4 writes `operation_id`, `operation_ref` and
/// `request_body`, which clients do not recognise).
pub fn document() -> serde_json::Value {
    let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let links = document["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(|item| item.as_object_mut())
        .flat_map(|operations| operations.values_mut())
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut())
        .filter_map(|response| response.get_mut("links")?.as_object_mut())
        .flat_map(|links| links.values_mut())
        .filter_map(|link| link.as_object_mut());
    for link in links {
        for (from, to) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
            ("request_body", "requestBody"),
        ] {
            if let Some(value) = link.remove(from) {
                link.insert(to.to_owned(), value);
            }
        }
    }
    document
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    let document = web::Bytes::from(document().to_string());
    cfg.service(web::resource(DOCUMENT_URL).get(move || {
        let document = document.clone();
        async move {
            HttpResponse::Ok()
                .content_type(header::ContentType::json())
                .body(document)
        }
    }))
    .service(
        SwaggerUi::new("/swagger-ui/{_:.*}").config(utoipa_swagger_ui::Config::from(DOCUMENT_URL)),
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
