//! HTTP routes of the users module (`/api/users`): create, list, read; changes are in
//! `changes.rs`.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::changes::{delete_user, patch_user};
use super::idempotency::{self, IDEMPOTENT_REPLAYED};
use super::{CreateUserError, Created, Email, ListQuery, NewUser, User, UserName, Users};
use crate::web::conditional::{json_body_tagged, version_tag};
use crate::web::problem::{ApiError, ApiResult, FieldErrors, Problem};
use crate::web::{RequestId, UuidParam, page_size};

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 200;
const MAX_QUERY_CHARS: usize = 255;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/users")
            .route(web::post().to(create_user))
            .route(web::get().to(list_users)),
    )
    .service(
        web::resource("/api/users/{uuid}")
            .route(web::get().to(get_user))
            .route(web::patch().to(patch_user))
            .route(web::delete().to(delete_user)),
    );
}

/// Body of `POST /api/users`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "João Silva", "email": "joao.silva+work@example.com"}))]
pub struct CreateUserRequest {
    /// 3 to 100 characters once trimmed, no control characters.
    #[schema(value_type = String, example = "João Silva")]
    pub name: Option<String>,
    /// A valid address of at most 255 characters; unique, ignoring case.
    #[schema(value_type = String, format = Email, max_length = 255, example = "joao.silva+work@example.com")]
    pub email: Option<String>,
}

impl TryFrom<CreateUserRequest> for NewUser {
    type Error = ApiError;

    fn try_from(body: CreateUserRequest) -> Result<Self, Self::Error> {
        let mut errors = FieldErrors::new();
        let name = required(&mut errors, "name", body.name, UserName::parse);
        let email = required(&mut errors, "email", body.email, Email::parse);
        match (name, email) {
            (Some(name), Some(email)) => Ok(NewUser { name, email }),
            _ => Err(ApiError::Validation(errors)),
        }
    }
}

/// A taken e-mail is a 409 on the `email` field, with the reference system's message.
impl From<CreateUserError> for ApiError {
    fn from(error: CreateUserError) -> Self {
        match error {
            CreateUserError::EmailTaken => ApiError::Conflict {
                field: "email",
                detail: "The email has already been taken.".into(),
            },
            CreateUserError::KeyReused => ApiError::Unprocessable(
                "This Idempotency-Key was used with another request; use a new key for a \
                 new request"
                    .into(),
            ),
            CreateUserError::Storage(e) => e.into(),
        }
    }
}

/// Parses a required field, recording its error under `field`.
fn required<T>(
    errors: &mut FieldErrors,
    field: &str,
    raw: Option<String>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    raw.ok_or_else(|| "is required".to_owned())
        .and_then(|value| parse(&value))
        .map_err(|message| errors.insert(field.to_owned(), vec![message]))
        .ok()
}

/// A user, with `name` and `email` exactly as stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "uuid": "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d",
    "name": "João Silva",
    "email": "joao.silva+work@example.com",
    "created_at": "2026-11-29T10:15:30.123Z",
    "updated_at": "2026-11-29T10:15:30.123Z"
}))]
pub struct UserResponse {
    pub uuid: Uuid,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl UserResponse {
    /// The user this represents, at `version`.
    pub(super) fn at_version(self, version: u64) -> User {
        User {
            uuid: self.uuid,
            name: self.name,
            email: self.email,
            created_at: self.created_at,
            updated_at: self.updated_at,
            version,
        }
    }
}

impl From<User> for UserResponse {
    fn from(user: User) -> Self {
        Self {
            uuid: user.uuid,
            name: user.name,
            email: user.email,
            created_at: user.created_at,
            updated_at: user.updated_at,
        }
    }
}

/// Create a user.
///
/// Stores the user and its `user.created` event in one transaction; enrichment follows
/// asynchronously (see `GET /api/users/{uuid}/profile`). With an `Idempotency-Key`, a
/// retry of the same request within 24 hours answers the first response again (with
/// `Idempotent-Replayed: true`), creating nothing; the same key with another request
/// is refused with 422.
#[utoipa::path(
    post,
    path = "/api/users",
    tag = "users",
    request_body = CreateUserRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, pattern = r#"^(?:[!#-\[\]-~]{1,255}|"[!#-\[\]-~]{1,255}")$"#,
         description = "A key of the caller's choice (1 to 255 printable ASCII characters but `\"` and `\\`, optionally quoted) that makes retries of this request safe for 24 hours"),
    ),
    responses(
        (status = 201, description = "User created (or, for a repeated `Idempotency-Key`, the user the first request created)", body = UserResponse,
         headers(
            ("Location" = String, description = "URL of the new user"),
            ("ETag" = String, description = "The user's version"),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the first response to the `Idempotency-Key`"),
         )),
        (status = 400, description = "Invalid input, with per-field `errors`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The e-mail address is taken (ignoring case)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The `Idempotency-Key` was used with another request", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_user(
    req: HttpRequest,
    users: web::Data<Users>,
    request_id: RequestId,
    body: web::Json<CreateUserRequest>,
) -> ApiResult<HttpResponse> {
    let body = body.into_inner();
    let fingerprint = idempotency::fingerprint(body.name.as_deref(), body.email.as_deref());
    let key = idempotency::key_of(&req, fingerprint)?;
    let new_user = NewUser::try_from(body)?;
    let created = users
        .register(new_user, request_id.as_str(), key.as_ref())
        .await?;
    let (user, replayed) = match created {
        Created::New(user) => (user, false),
        Created::Replayed(user) => (user, true),
    };
    let mut response = HttpResponse::Created();
    response
        .insert_header((header::LOCATION, format!("/api/users/{}", user.uuid)))
        .insert_header(header::ETag(version_tag(user.version)));
    if replayed {
        response.insert_header((IDEMPOTENT_REPLAYED, "true"));
    }
    Ok(response.json(UserResponse::from(user)))
}

/// Query of `GET /api/users`. Parsed by hand so each bad value gets a field error.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListUsersParams {
    /// Page size, 1 to 200 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200, example = 50)]
    limit: Option<String>,
    /// Cursor from the previous page's `Link: <…>; rel="next"` header.
    #[param(value_type = Option<uuid::Uuid>)]
    cursor: Option<String>,
    /// Case-insensitive substring of the name or the e-mail: at most 255 characters once
    /// trimmed, no control characters; blank means no filter.
    #[param(value_type = Option<String>, example = "silva")]
    q: Option<String>,
}

/// Rust's `str::trim` strips Unicode `White_Space`; `char::is_control` is category Cc.
/// Spelt out for JSON Schema (ECMA-262) regular expressions.
const WHITE_SPACE: &str =
    r"\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";
const CONTROL: &str = r"\u0000-\u001F\u007F-\u009F";

/// What `UserName::parse` accepts: 3 to 100 characters once trimmed, none a control
/// character.
fn name_pattern() -> String {
    let (ws, cc) = (WHITE_SPACE, CONTROL);
    format!("^[{ws}]*[^{ws}{cc}][^{cc}]{{1,98}}[^{ws}{cc}][{ws}]*$")
}

/// What the `q` filter accepts: at most 255 characters once trimmed, none a control
/// character (blank is no filter).
fn query_pattern() -> String {
    let (ws, cc) = (WHITE_SPACE, CONTROL);
    format!("^[{ws}]*(?:[^{ws}{cc}](?:[^{cc}]{{0,253}}[^{ws}{cc}])?)?[{ws}]*$")
}

/// Puts into the OpenAPI document the rules its annotations cannot state: the
/// patterns of names and of `q`, as the parsers apply them.
pub fn document(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, Schema};
    let name = name_pattern();
    if let Some(components) = openapi.components.as_mut() {
        for body in ["CreateUserRequest", "PatchUserRequest"] {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(body)
                && let Some(RefOr::T(Schema::Object(field))) = object.properties.get_mut("name")
            {
                field.pattern = Some(name.clone());
            }
        }
    }
    let list = openapi
        .paths
        .paths
        .get_mut("/api/users")
        .and_then(|item| item.get.as_mut());
    for parameter in list
        .into_iter()
        .flat_map(|op| op.parameters.iter_mut().flatten())
    {
        if parameter.name == "q"
            && let Some(RefOr::T(Schema::Object(schema))) = parameter.schema.as_mut()
        {
            schema.pattern = Some(query_pattern());
        }
    }
}

impl ListUsersParams {
    fn into_query(self) -> ApiResult<ListQuery> {
        let mut errors = FieldErrors::new();
        let limit = page_size(self.limit.as_deref(), DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            .unwrap_or_else(|message| {
                errors.insert("limit".into(), vec![message]);
                DEFAULT_PAGE_SIZE
            });
        let after = match self.cursor.as_deref().map(Uuid::parse_str) {
            None => None,
            Some(Ok(uuid)) => Some(uuid),
            Some(Err(_)) => {
                errors.insert(
                    "cursor".into(),
                    vec!["is not a cursor this API issued".into()],
                );
                None
            }
        };
        let q = self
            .q
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty());
        if q.as_ref()
            .is_some_and(|q| q.chars().count() > MAX_QUERY_CHARS || q.chars().any(char::is_control))
        {
            errors.insert(
                "q".into(),
                vec![format!(
                    "must be at most {MAX_QUERY_CHARS} printable characters"
                )],
            );
        }
        if errors.is_empty() {
            Ok(ListQuery {
                limit,
                after,
                before: None,
                q,
            })
        } else {
            Err(ApiError::Validation(errors))
        }
    }
}

/// List users, newest first.
///
/// Keyset pagination: when more users follow, the response has a
/// `Link: </api/users?…&cursor=…>; rel="next"` header. Walking the pages never repeats
/// or skips a user, even while users are being created.
#[utoipa::path(
    get,
    path = "/api/users",
    tag = "users",
    params(ListUsersParams),
    responses(
        (status = 200, description = "One page of users", body = Vec<UserResponse>,
         headers(("Link" = String, description = "`<url>; rel=\"next\"` when another page follows"))),
        (status = 400, description = "Invalid query parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_users(
    users: web::Data<Users>,
    params: web::Query<ListUsersParams>,
) -> ApiResult<HttpResponse> {
    let mut query = params.into_inner().into_query()?;
    let limit = query.limit;
    // One extra row tells whether a next page exists without a COUNT.
    query.limit += 1;
    let mut page = users.list(&query).await?;
    let mut response = HttpResponse::Ok();
    if page.len() > limit as usize {
        page.truncate(limit as usize);
        if let Some(last) = page.last() {
            let mut next = vec![
                ("limit", limit.to_string()),
                ("cursor", last.uuid.to_string()),
            ];
            if let Some(q) = &query.q {
                next.push(("q", q.clone()));
            }
            let qs = serde_urlencoded::to_string(&next).map_err(anyhow::Error::from)?;
            response.insert_header((header::LINK, format!("</api/users?{qs}>; rel=\"next\"")));
        }
    }
    Ok(response.json(page.into_iter().map(UserResponse::from).collect::<Vec<_>>()))
}

/// Get one user.
#[utoipa::path(
    get,
    path = "/api/users/{uuid}",
    tag = "users",
    params(
        ("uuid" = uuid::Uuid, Path, description = "The user's uuid", example = "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d"),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` of this user the client holds"),
    ),
    responses(
        (status = 200, description = "The user", body = UserResponse,
         headers(("ETag" = String, description = "The user's version, for `If-None-Match` and `If-Match`"))),
        (status = 304, description = "Not modified since the `ETag` in `If-None-Match`"),
        (status = 400, description = "Malformed uuid", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_user(
    req: HttpRequest,
    users: web::Data<Users>,
    UuidParam(uuid): UuidParam,
) -> ApiResult<HttpResponse> {
    let user = users
        .find_json(uuid)
        .await?
        .ok_or_else(|| not_found(uuid))?;
    Ok(json_body_tagged(&req, version_tag(user.version), user.json))
}

pub(super) fn not_found(uuid: Uuid) -> ApiError {
    ApiError::NotFound(format!("No user with uuid {uuid}"))
}
