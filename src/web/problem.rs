//! RFC 9457 problem details: the one error shape of the whole API.

use std::collections::BTreeMap;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{HttpRequest, HttpResponse, ResponseError, error::JsonPayloadError};
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Field name -> messages, as in the reference system's 400 answers.
pub type FieldErrors = BTreeMap<String, Vec<String>>;

/// An error answer (`application/problem+json`, RFC 9457).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:userhub:problem:validation-error",
    "title": "Your request is not valid",
    "status": 400,
    "detail": "One or more fields are invalid",
    "errors": {"name": ["must be at least 3 characters long"]}
}))]
pub struct Problem {
    /// A URI naming the kind of problem; `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Per-field validation messages (400 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<FieldErrors>,
}

impl Problem {
    /// A problem described by its status alone.
    pub fn status(status: StatusCode) -> Self {
        Self {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: None,
            errors: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn response(&self) -> HttpResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        HttpResponse::build(status)
            .content_type(PROBLEM_JSON)
            .json(self)
    }
}

/// Errors a handler can return. 5xx causes are logged here and never shown.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed")]
    Validation(FieldErrors),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{detail}")]
    Conflict { field: &'static str, detail: String },
    /// 412: an `If-Match` names no current version.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 428: the change must carry `If-Match`.
    #[error("{0}")]
    PreconditionRequired(String),
    /// 422: well-formed, but not something the server can act on (e.g. an
    /// idempotency key reused with another request).
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::Validation(BTreeMap::from([(field.to_owned(), vec![message.into()])]))
    }

    /// The problem+json body this error is answered with (a console shows the same
    /// field errors in its forms).
    pub fn problem(&self) -> Problem {
        match self {
            Self::Validation(errors) => Problem {
                kind: "urn:userhub:problem:validation-error".into(),
                title: "Your request is not valid".into(),
                status: 400,
                detail: Some("One or more fields are invalid".into()),
                errors: Some(errors.clone()),
            },
            Self::BadRequest(detail) => Problem::status(StatusCode::BAD_REQUEST).detail(detail),
            Self::NotFound(detail) => Problem::status(StatusCode::NOT_FOUND).detail(detail),
            Self::Conflict { field, detail } => Problem {
                kind: "urn:userhub:problem:conflict".into(),
                title: "Conflict".into(),
                status: 409,
                detail: Some(detail.clone()),
                errors: Some(BTreeMap::from([(
                    (*field).to_owned(),
                    vec![detail.clone()],
                )])),
            },
            Self::PreconditionFailed(detail) => {
                Problem::status(StatusCode::PRECONDITION_FAILED).detail(detail)
            }
            Self::PreconditionRequired(detail) => {
                Problem::status(StatusCode::PRECONDITION_REQUIRED).detail(detail)
            }
            Self::Unprocessable(detail) => {
                Problem::status(StatusCode::UNPROCESSABLE_ENTITY).detail(detail)
            }
            Self::Unavailable(detail) => {
                Problem::status(StatusCode::SERVICE_UNAVAILABLE).detail(detail)
            }
            Self::Internal(_) => Problem::status(StatusCode::INTERNAL_SERVER_ERROR)
                .detail("An unexpected error occurred; it has been logged"),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.problem().status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        if let Self::Internal(cause) = self {
            tracing::error!(error = ?cause, "request failed");
        }
        let mut response = self.problem().response();
        if matches!(self, Self::Unavailable(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

/// A database error as the client sees it: pool exhaustion and a lost connection (a
/// restart, a failover) are "try again", the rest is ours.
impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut => {
                tracing::warn!("database pool exhausted");
                Self::Unavailable("The database is busy; try again shortly".into())
            }
            sqlx::Error::Io(error) => {
                tracing::warn!(%error, "database connection lost");
                Self::Unavailable("The database connection was lost; try again shortly".into())
            }
            other => Self::Internal(other.into()),
        }
    }
}

/// Maps body extraction failures (wrong content type, too large, malformed) to problems.
pub fn json_error(error: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let problem = match &error {
        JsonPayloadError::ContentType => Problem::status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .detail("The request body must be JSON (Content-Type: application/json)"),
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => {
            Problem::status(StatusCode::PAYLOAD_TOO_LARGE)
                .detail(format!("The request body must not exceed {limit} bytes"))
        }
        JsonPayloadError::Deserialize(e) if e.is_data() => Problem::status(StatusCode::BAD_REQUEST)
            .detail(format!("The JSON body has the wrong shape: {e}")),
        JsonPayloadError::Deserialize(e) => Problem::status(StatusCode::BAD_REQUEST)
            .detail(format!("The request body is not valid JSON: {e}")),
        other => Problem::status(StatusCode::BAD_REQUEST).detail(other.to_string()),
    };
    actix_web::error::InternalError::from_response(error, problem.response()).into()
}

/// Whether an answer with these headers was rendered on purpose by a handler: JSON
/// (problems, the readiness report's 503) or an HTML page (a browser-facing route's own
/// error page). Only other error answers are rewritten as problem+json.
pub fn is_rendered_on_purpose(headers: &header::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.trim_start().to_ascii_lowercase();
            (v.starts_with("application/") && v.contains("json")) || v.starts_with("text/html")
        })
}

/// Last line of defence: any error answer that is neither JSON nor an HTML page (an
/// unknown route, a wrong method, a framework error answering in plain text) is
/// rewritten as problem+json, keeping its status and the headers that matter to the
/// client. JSON answers are ours already (problems, the readiness report's 503), and so
/// are the HTML error pages of the routes that serve browsers.
pub fn problem_for_plain_errors<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    if is_rendered_on_purpose(res.headers()) {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let (req, old) = res.into_parts();
    let mut problem = Problem::status(status);
    if status == StatusCode::NOT_FOUND {
        problem = problem.detail(format!("No resource at {}", req.path()));
    } else if status == StatusCode::METHOD_NOT_ALLOWED {
        problem = problem.detail(format!("{} is not allowed on {}", req.method(), req.path()));
    } else if let Some(error) = old.error().filter(|_| status.is_client_error()) {
        // A framework's own client error (e.g. a refused CORS preflight) says what was
        // wrong with the request; server errors stay undisclosed.
        problem = problem.detail(error.to_string());
    }
    let mut new = problem.response();
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(value) = old.headers().get(&name) {
            new.headers_mut().insert(name, value.clone());
        }
    }
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, new).map_into_right_body(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_database_connection_is_try_again_and_other_database_errors_are_ours() {
        let lost = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let response = ApiError::from(sqlx::Error::Io(lost)).error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "5");
        let response = ApiError::from(sqlx::Error::PoolTimedOut).error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = ApiError::from(sqlx::Error::RowNotFound).error_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
