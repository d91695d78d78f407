//! What every console page shares: the layout, the error pages, and the headers of
//! every console answer (a strict Content-Security-Policy of its own, `no-store`, and
//! the refusal of cross-site form posts).

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode, Uri};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, ResponseError};
use askama::Template;

use super::assets;
use super::session::{self, COOKIE_PATH, SESSION_COOKIE};
use crate::web::identity::Role;
use crate::web::problem::ApiError;

/// Console pages load only their own stylesheet and script, fetch only from this
/// origin, post forms only here, and are framed by no one. No inline script or style.
pub(super) const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
    frame-ancestors 'none'; base-uri 'none'";

/// The frame of every page.
pub(super) struct Layout {
    pub title: String,
    /// The navigation entry of this page (`users`, `new-user`, `dead-letters`,
    /// `sign-in`), marked `aria-current`.
    pub section: &'static str,
    pub signed: Option<Signed>,
    pub css: &'static str,
    pub js: &'static str,
    pub version: &'static str,
}

impl Layout {
    pub fn new(title: impl Into<String>, section: &'static str, signed: Option<Signed>) -> Self {
        Self {
            title: title.into(),
            section,
            signed,
            css: assets::css_path(),
            js: assets::js_path(),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// The signed-in viewer, as the layout shows it (and what it may be offered).
#[derive(Debug, Clone)]
pub(super) struct Signed {
    pub subject: String,
    pub roles: String,
    pub csrf: String,
    pub can_read: bool,
    pub can_write: bool,
    pub is_admin: bool,
}

/// Why someone lands on the sign-in page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    Required,
    Expired,
    Refused,
    SignedOut,
}

impl Notice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Required => "required",
            Self::Expired => "expired",
            Self::Refused => "refused",
            Self::SignedOut => "signed-out",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Required,
            Self::Expired,
            Self::Refused,
            Self::SignedOut,
        ]
        .into_iter()
        .find(|notice| notice.as_str() == raw)
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::Required => "Sign in to use the console.",
            Self::Expired => "Your session has expired. Sign in again.",
            Self::Refused => "Your token is no longer accepted. Sign in again.",
            Self::SignedOut => "You have signed out.",
        }
    }
}

/// Why a console request ends with something other than the page it asked for. Each is
/// answered with a page in the console's layout (or a redirect to the sign-in page).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsoleError {
    #[error("sign-in required")]
    SignIn { next: String, notice: Notice },
    #[error("the role {0:?} is needed")]
    Forbidden(Role),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the form's CSRF token is wrong")]
    CsrfRefused,
    #[error("a cross-site form post")]
    CrossSite,
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage {
    layout: Layout,
    heading: String,
    message: String,
    sign_in: bool,
}

impl ConsoleError {
    /// The answer: a redirect to the sign-in page, or an error page.
    pub fn page(&self) -> HttpResponse {
        let (status, heading, message, sign_in) = match self {
            Self::SignIn { next, notice } => {
                let query = serde_urlencoded::to_string([
                    ("next", next.as_str()),
                    ("notice", notice.as_str()),
                ])
                .unwrap_or_default();
                let mut response = super::see_other(&format!("/console/sign-in?{query}"));
                if *notice != Notice::Required {
                    let _ = response.add_cookie(&session::removal(SESSION_COOKIE, COOKIE_PATH));
                }
                return response;
            }
            Self::Forbidden(role) => (
                StatusCode::FORBIDDEN,
                "Not allowed",
                format!(
                    "This page needs the role {} (or admin), which your token does not carry.",
                    role.as_str()
                ),
                true,
            ),
            Self::NotFound(message) => (StatusCode::NOT_FOUND, "Not found", message.clone(), false),
            Self::BadRequest(message) => (
                StatusCode::BAD_REQUEST,
                "Bad request",
                message.clone(),
                false,
            ),
            Self::CsrfRefused => (
                StatusCode::FORBIDDEN,
                "Form expired",
                "This form is out of date or was not sent from this console; nothing was \
                 changed. Go back, reload the page and try again."
                    .to_owned(),
                false,
            ),
            Self::CrossSite => (
                StatusCode::FORBIDDEN,
                "Refused",
                "This form was sent from another site; nothing was changed.".to_owned(),
                false,
            ),
            Self::Unavailable(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Temporarily unavailable",
                message.clone(),
                false,
            ),
            Self::Internal(cause) => {
                tracing::error!(error = ?cause, "console request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong",
                    "An unexpected error occurred; it has been logged. Try again shortly."
                        .to_owned(),
                    false,
                )
            }
        };
        let mut response = render(
            status,
            &ErrorPage {
                layout: Layout::new(heading, "", None),
                heading: heading.to_owned(),
                message,
                sign_in,
            },
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::SignIn { .. } => StatusCode::SEE_OTHER,
            Self::Forbidden(_) | Self::CsrfRefused | Self::CrossSite => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        self.page()
    }
}

/// The API's errors as console pages (field errors are shown by the forms themselves).
impl From<ApiError> for ConsoleError {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::NotFound(detail) => Self::NotFound(detail),
            ApiError::Unavailable(detail) => Self::Unavailable(detail),
            ApiError::Internal(cause) => Self::Internal(cause),
            other => Self::BadRequest(other.problem().detail.unwrap_or_default()),
        }
    }
}

impl From<sqlx::Error> for ConsoleError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::from(error).into()
    }
}

/// Renders `page` as an HTML answer with `status`.
pub(super) fn render(status: StatusCode, page: &impl Template) -> HttpResponse {
    match page.render() {
        Ok(body) => HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .body(body),
        Err(error) => {
            tracing::error!(%error, "console template failed");
            HttpResponse::InternalServerError()
                .content_type("text/html; charset=utf-8")
                .body("<!doctype html><title>Error</title><p>The page could not be rendered.")
        }
    }
}

/// An unknown console path.
pub(super) async fn not_found() -> HttpResponse {
    ConsoleError::NotFound("There is no console page at this address.".into()).page()
}

/// Middleware of the `/console` scope: refuses state-changing requests sent from another
/// site before any handler runs; gives every answer the console's CSP, the
/// `same-origin` referrer policy and, unless it says otherwise (the assets),
/// `Cache-Control: no-store` (pages show personal data, and must not come back from the
/// cache after signing out).
pub(super) async fn console_headers(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) && cross_site(&req) {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        tracing::info!(
            path = req.path(),
            origin = header("origin"),
            sec_fetch_site = header("sec-fetch-site"),
            host = req.connection_info().host(),
            "console refused a cross-site request"
        );
        let response = ConsoleError::CrossSite.page();
        return Ok(finish(req.into_response(response)));
    }
    Ok(finish(next.call(req).await?.map_into_boxed_body()))
}

fn finish(mut res: ServiceResponse<BoxBody>) -> ServiceResponse<BoxBody> {
    let headers = res.headers_mut();
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONSOLE_CSP),
        );
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    // Not the API's `no-referrer`: under it, browsers send `Origin: null` with the
    // console's own form posts, which the cross-site check must refuse. `same-origin`
    // still tells other sites nothing.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    res
}

/// Whether a request comes from another site: the browser says so (`Sec-Fetch-Site`),
/// or its `Origin` names another host than the one it was sent to. Only the host and
/// port are compared, so a TLS-terminating proxy that does not say `https` is no
/// problem; `Origin: null` (sandboxes, some redirects) is refused.
fn cross_site(req: &ServiceRequest) -> bool {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("\u{0}").to_ascii_lowercase())
    };
    if let Some(site) = header("sec-fetch-site")
        && site != "same-origin"
        && site != "none"
    {
        return true;
    }
    let Some(origin) = header("origin") else {
        return false;
    };
    let host = req.connection_info().host().to_ascii_lowercase();
    match origin.parse::<Uri>() {
        Ok(uri) if uri.scheme().is_some() => uri.authority().map(|a| a.as_str()) != Some(&host),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn post(headers: &[(&str, &str)]) -> ServiceRequest {
        let mut req = TestRequest::post()
            .uri("/console/users")
            .insert_header(("host", "console.example:8080"));
        for (name, value) in headers {
            req = req.insert_header((*name, *value));
        }
        req.to_srv_request()
    }

    #[test]
    fn posts_from_this_origin_pass_and_others_are_cross_site() {
        assert!(!cross_site(&post(&[])));
        assert!(!cross_site(&post(&[(
            "origin",
            "http://console.example:8080"
        )])));
        assert!(!cross_site(&post(&[(
            "origin",
            "https://Console.Example:8080"
        )])));
        assert!(!cross_site(&post(&[("sec-fetch-site", "same-origin")])));
        assert!(cross_site(&post(&[("origin", "http://evil.example")])));
        assert!(cross_site(&post(&[(
            "origin",
            "http://console.example:9090"
        )])));
        assert!(cross_site(&post(&[("origin", "null")])));
        assert!(cross_site(&post(&[("sec-fetch-site", "cross-site")])));
        assert!(cross_site(&post(&[("sec-fetch-site", "same-site")])));
    }
}
