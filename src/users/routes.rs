//! HTTP routes of the users module (`/api/users`).

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{CreateUserError, Email, ListQuery, NewUser, User, UserName, Users};
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
    .service(web::resource("/api/users/{uuid}").route(web::get().to(get_user)));
}

/// Body of `POST /api/users`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "João Silva", "email": "joao.silva+work@example.com"}))]
pub struct CreateUserRequest {
    /// 3 to 100 characters once trimmed.
    #[schema(value_type = String, example = "João Silva")]
    pub name: Option<String>,
    /// A valid address of at most 255 characters; unique, ignoring case.
    #[schema(value_type = String, example = "joao.silva+work@example.com")]
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
#[derive(Debug, Serialize, ToSchema)]
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
/// asynchronously (see `GET /api/users/{uuid}/profile`).
#[utoipa::path(
    post,
    path = "/api/users",
    tag = "users",
    request_body = CreateUserRequest,
    responses(
        (status = 201, description = "User created", body = UserResponse,
         headers(("Location" = String, description = "URL of the new user"))),
        (status = 400, description = "Invalid input, with per-field `errors`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The e-mail address is taken (ignoring case)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_user(
    users: web::Data<Users>,
    request_id: RequestId,
    body: web::Json<CreateUserRequest>,
) -> ApiResult<HttpResponse> {
    let new_user = NewUser::try_from(body.into_inner())?;
    let user = users.register(new_user, request_id.as_str()).await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/api/users/{}", user.uuid)))
        .json(UserResponse::from(user)))
}

/// Query of `GET /api/users`. Parsed by hand so each bad value gets a field error.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListUsersParams {
    /// Page size, 1 to 200 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200, example = 50)]
    limit: Option<String>,
    /// Opaque cursor from the previous page's `Link: <…>; rel="next"` header.
    #[param(value_type = Option<String>)]
    cursor: Option<String>,
    /// Case-insensitive substring of the name or the e-mail.
    #[param(value_type = Option<String>, example = "silva")]
    q: Option<String>,
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
    params(("uuid" = String, Path, description = "The user's uuid", example = "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d")),
    responses(
        (status = 200, description = "The user", body = UserResponse),
        (status = 400, description = "Malformed uuid", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_user(
    users: web::Data<Users>,
    UuidParam(uuid): UuidParam,
) -> ApiResult<HttpResponse> {
    let user = users
        .find(uuid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No user with uuid {uuid}")))?;
    Ok(HttpResponse::Ok().json(UserResponse::from(user)))
}
