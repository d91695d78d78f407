//! Transport hardening shared by every route: the CORS allow-list, security headers,
//! the last conversion of error answers to problem+json, and the TLS configuration.

use std::sync::Arc;

use actix_cors::Cors;
use actix_web::HttpResponse;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, Uri};
use actix_web::middleware::{ErrorHandlerResponse, Next};
use anyhow::bail;

use super::problem::{Problem, is_rendered_on_purpose, problem_for_plain_errors};
use super::rate_limit::{ClientRateLimiter, RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET};
use super::request_id::REQUEST_ID_HEADER;
use super::tls;
use crate::config::{CorsSettings, Settings};

/// For everything but the Swagger UI: this API serves JSON only, so a browser that
/// renders one of its answers anyway may load nothing and be framed by no one.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; \
                           form-action 'none'";

/// For `/swagger-ui/`: its page loads its own scripts, styles, images (some as `data:`
/// URLs) and fetches the OpenAPI document and the "Try it out" calls from this origin.
/// No inline script, no eval, no third party. The one inline style it injects (the
/// colours of its logo, [`SWAGGER_UI_LOGO_STYLE`] in Swagger UI 5.17.14) is allowed by
/// its hash rather than by `'unsafe-inline'`.
pub const SWAGGER_UI_CSP: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self' 'sha256-RL3ie0nH+Lzz2YNqQN83mnU0J1ot4QL7b99vMdIX99w='; \
    img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
    form-action 'none'";

/// The `<style>` element Swagger UI's logo carries; its SHA-256 is in [`SWAGGER_UI_CSP`].
pub const SWAGGER_UI_LOGO_STYLE: &str =
    ".logo_small_svg__cls-2{fill:#fff}.logo_small_svg__cls-3{fill:#85ea2d}";

/// Sent over HTTPS only: two years, without `includeSubDomains` (other hosts of the
/// domain are not ours to commit).
const HSTS: &str = "max-age=63072000";

/// What the HTTP layer needs from `rate_limit.*`, `cors.*` and `server.tls.*`, checked
/// once at start so a bad setting stops the server with a clear message.
#[derive(Clone)]
pub struct Hardening {
    /// `None` when `rate_limit.enabled` is false. Shared by every worker.
    pub rate_limiter: Option<Arc<ClientRateLimiter>>,
    allowed_origins: Arc<[String]>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Hardening {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        if settings.server.max_connections_per_worker == 0 {
            bail!("server.max_connections_per_worker must be at least 1");
        }
        let rate_limiter = if settings.rate_limit.enabled {
            Some(Arc::new(ClientRateLimiter::from_settings(
                &settings.rate_limit,
            )?))
        } else {
            None
        };
        Ok(Self {
            rate_limiter,
            allowed_origins: allowed_origins(&settings.cors)?.into(),
            tls: tls::server_config(&settings.server.tls)?.map(Arc::new),
        })
    }

    /// The rustls configuration when HTTPS is configured.
    pub fn tls(&self) -> Option<&rustls::ServerConfig> {
        self.tls.as_deref()
    }

    /// The CORS middleware: only the listed origins, GET/POST, the headers our clients
    /// send, and the headers they may read. No credentials (the API takes bearer tokens,
    /// not cookies) and never a wildcard. Built per worker (it is not `Send`).
    pub fn cors(&self) -> Cors {
        let mut cors = Cors::default()
            .allowed_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allowed_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                REQUEST_ID_HEADER,
            ])
            .expose_headers([
                REQUEST_ID_HEADER,
                header::LINK,
                header::LOCATION,
                header::RETRY_AFTER,
                RATELIMIT_LIMIT,
                RATELIMIT_REMAINING,
                RATELIMIT_RESET,
            ])
            .max_age(600);
        for origin in self.allowed_origins.iter() {
            cors = cors.allowed_origin(origin);
        }
        cors
    }

    /// Whether `Strict-Transport-Security` is sent.
    pub fn hsts(&self) -> bool {
        self.tls.is_some()
    }
}

/// Checks `cors.allowed_origins`: each an exact origin as browsers send it.
fn allowed_origins(settings: &CorsSettings) -> anyhow::Result<Vec<String>> {
    let mut origins = Vec::new();
    for raw in &settings.allowed_origins {
        let origin = raw.trim();
        if origin.is_empty() {
            continue;
        }
        if origin == "*" || origin == "null" {
            bail!("cors.allowed_origins: {origin:?} is not allowed; list each origin");
        }
        let uri: Uri = origin.parse().map_err(|_| {
            anyhow::anyhow!("cors.allowed_origins: {origin:?} is not a valid origin")
        })?;
        let exact = match (uri.scheme_str(), uri.authority()) {
            (Some(scheme @ ("http" | "https")), Some(authority))
                if !authority.as_str().contains('@') =>
            {
                format!("{scheme}://{authority}") == origin && origin == origin.to_ascii_lowercase()
            }
            _ => false,
        };
        if !exact {
            bail!(
                "cors.allowed_origins: {origin:?} must be scheme://host[:port] in lower case, \
                 with no path or trailing slash (e.g. \"https://app.example.com\")"
            );
        }
        origins.push(origin.to_owned());
    }
    Ok(origins)
}

/// Outermost layer but the request log: whatever happened inside (a handler, CORS,
/// authentication, rate limiting), the answer leaves with the security headers, and an
/// error answer leaves as problem+json. A middleware error (`Err`) is rendered later by
/// actix; a response mapper gives it the same treatment.
///
/// `hsts` is [`Hardening::hsts`], read once per worker rather than a clone of the
/// [`Hardening`] (and its shared `Arc`s) per request.
pub async fn finish_responses(
    hsts: bool,
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let headers = SecurityHeaders::for_path(req.path(), hsts);
    let res = match next.call(req).await {
        Ok(res) => res,
        Err(mut error) => {
            error.add_response_mapper(move |mut res| {
                res = problem_for_error_response(res);
                headers.apply(res.headers_mut());
                res
            });
            return Err(error);
        }
    };
    let mut res = if res.status().is_client_error() || res.status().is_server_error() {
        match problem_for_plain_errors(res)? {
            ErrorHandlerResponse::Response(res) => res.map_into_boxed_body(),
            ErrorHandlerResponse::Future(fut) => fut.await?.map_into_boxed_body(),
        }
    } else {
        res.map_into_boxed_body()
    };
    headers.apply(res.headers_mut());
    Ok(res)
}

/// The security headers of one answer; set only where the answer has none of its own,
/// so a route that serves pages (and knows what they load) can send a
/// `Content-Security-Policy` of its own.
#[derive(Debug, Clone, Copy)]
struct SecurityHeaders {
    csp: &'static HeaderValue,
    hsts: bool,
}

// The values, built and checked at compile time: `HeaderValue::from_static` called at
// run time checks every byte of a policy again on every answer (2% of a cached GET's
// instructions). Cloning a static value copies a pointer.
static NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
static DENY: HeaderValue = HeaderValue::from_static("DENY");
static NO_REFERRER: HeaderValue = HeaderValue::from_static("no-referrer");
static API_CSP_VALUE: HeaderValue = HeaderValue::from_static(API_CSP);
static SWAGGER_UI_CSP_VALUE: HeaderValue = HeaderValue::from_static(SWAGGER_UI_CSP);
static HSTS_VALUE: HeaderValue = HeaderValue::from_static(HSTS);

impl SecurityHeaders {
    fn for_path(path: &str, hsts: bool) -> Self {
        let swagger_ui = path == "/swagger-ui" || path.starts_with("/swagger-ui/");
        Self {
            csp: if swagger_ui {
                &SWAGGER_UI_CSP_VALUE
            } else {
                &API_CSP_VALUE
            },
            hsts,
        }
    }

    fn apply(self, headers: &mut HeaderMap) {
        let mut set = |name: HeaderName, value: &HeaderValue| {
            if !headers.contains_key(&name) {
                headers.insert(name, value.clone());
            }
        };
        set(header::X_CONTENT_TYPE_OPTIONS, &NOSNIFF);
        set(header::X_FRAME_OPTIONS, &DENY);
        set(header::REFERRER_POLICY, &NO_REFERRER);
        set(header::CONTENT_SECURITY_POLICY, self.csp);
        if self.hsts {
            set(header::STRICT_TRANSPORT_SECURITY, &HSTS_VALUE);
        }
    }
}

/// The error answer of a middleware's `Err` as problem+json, unless it is JSON or an
/// HTML page already; its other headers are kept.
fn problem_for_error_response(res: HttpResponse) -> HttpResponse {
    if is_rendered_on_purpose(res.headers()) {
        return res;
    }
    let status = res.status();
    let mut problem = Problem::status(status);
    if let Some(error) = res.error().filter(|_| status.is_client_error()) {
        problem = problem.detail(error.to_string());
    }
    let mut new = problem.response();
    for (name, value) in res.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            new.headers_mut().append(name.clone(), value.clone());
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(origins: &[&str]) -> anyhow::Result<Vec<String>> {
        allowed_origins(&CorsSettings {
            allowed_origins: origins.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    #[test]
    fn exact_origins_are_accepted_and_blanks_skipped() {
        assert_eq!(
            check(&["https://app.example.com", " http://localhost:3000 ", ""]).unwrap(),
            ["https://app.example.com", "http://localhost:3000"]
        );
    }

    #[test]
    fn wildcards_paths_and_odd_origins_are_refused() {
        for bad in [
            "*",
            "null",
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://user@app.example.com",
            "ftp://app.example.com",
            "https://App.Example.com",
        ] {
            let error = check(&[bad]).err();
            assert!(error.is_some(), "{bad} was accepted");
        }
    }
}
