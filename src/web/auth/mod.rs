//! Authentication and authorization: bearer tokens (JWT) on the `/api`,
//! `/users/enriched` and `/admin` routes, and the role each route requires.

mod jwks;
mod token;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpResponse, web};
use secrecy::ExposeSecret;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, Ref, ResponseBuilder};

pub use token::{
    LocalToken, TokenError, TokenVerifier, VerifiedToken, mint_local_token, parse_ttl,
};

use super::identity::Role;
use super::problem::{PROBLEM_JSON, Problem};
use crate::config::{DEVELOPMENT_HS256_SECRET, MIN_PRODUCTION_SECRET_BYTES, Settings};

/// The realm of every `WWW-Authenticate` challenge.
pub const REALM: &str = "userhub";

/// The name of the bearer security scheme in the OpenAPI document.
pub const SECURITY_SCHEME: &str = "bearer";

/// What a request needs to get through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    /// A valid bearer token granting this role (`admin` grants every role).
    Requires(Role),
}

/// The access policy of every route, in one place (the OpenAPI document is derived
/// from it too): `/admin/**` needs `admin`; `/api/**` and `/users/enriched/**` need
/// `users:read` to GET (or HEAD) and `users:write` for any other method; everything
/// else is public, and so are OPTIONS requests (CORS preflights).
///
/// `path` must be the path the router matches (`req.match_info().as_str()`, with
/// percent-encoded characters decoded), not the raw one, or `/%61pi/users` would slip
/// past a policy that only knows `/api/users`.
pub fn required_access(method: &Method, path: &str) -> Access {
    if method == Method::OPTIONS {
        return Access::Public;
    }
    if is_under(path, "/admin") {
        return Access::Requires(Role::Admin);
    }
    if is_under(path, "/api") || is_under(path, "/users/enriched") {
        let reads = method == Method::GET || method == Method::HEAD;
        return Access::Requires(if reads {
            Role::UsersRead
        } else {
            Role::UsersWrite
        });
    }
    Access::Public
}

fn is_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The authentication of a running server: a token verifier, or none when
/// `auth.enabled = false`.
pub struct Authentication {
    verifier: Option<TokenVerifier>,
}

impl Authentication {
    /// Builds it from `[auth]`, refusing what must not run in production: auth turned
    /// off, the development secret, an HS256 secret shorter than 32 bytes.
    pub async fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let auth = &settings.auth;
        if !auth.enabled {
            anyhow::ensure!(
                !settings.is_production(),
                "auth.enabled = false is refused when APP_ENV=production"
            );
            tracing::warn!(
                "authentication is OFF (auth.enabled = false): anyone who reaches this \
                 server can read and write every user; use it for local experiments only"
            );
            return Ok(Self { verifier: None });
        }
        let secret = auth.hs256_secret().await?;
        if settings.is_production()
            && let Some(secret) = &secret
        {
            let secret = secret.expose_secret();
            anyhow::ensure!(
                secret != DEVELOPMENT_HS256_SECRET,
                "auth.hs256_secret is the development secret, refused when \
                 APP_ENV=production: set APP__AUTH__HS256_SECRET or \
                 APP__AUTH__HS256_SECRET_FILE, or set it to \"\" to accept only \
                 auth.jwks_url tokens"
            );
            anyhow::ensure!(
                secret.len() >= MIN_PRODUCTION_SECRET_BYTES,
                "auth.hs256_secret is shorter than {MIN_PRODUCTION_SECRET_BYTES} bytes, \
                 refused when APP_ENV=production"
            );
        }
        anyhow::ensure!(
            secret.is_some() || auth.jwks_url().is_some(),
            "auth: no key source; set auth.hs256_secret (or auth.hs256_secret_file) or \
             auth.jwks_url, or auth.enabled = false for local experiments"
        );
        anyhow::ensure!(
            !auth.issuer.trim().is_empty() && !auth.audience.trim().is_empty(),
            "auth.issuer and auth.audience must not be empty"
        );
        let verifier = TokenVerifier::new(secret.as_ref(), auth)?;
        tracing::info!(
            hs256 = secret.is_some(),
            jwks_url = auth.jwks_url().unwrap_or("(none)"),
            issuer = %auth.issuer,
            audience = %auth.audience,
            "bearer authentication on"
        );
        Ok(Self {
            verifier: Some(verifier),
        })
    }

    /// `false` when `auth.enabled = false`: no request carries a principal then.
    pub fn is_enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// Verifies a token exactly as the bearer middleware does, for routes that receive
    /// it some other way (e.g. kept in a session). `Ok(None)` when authentication is
    /// off: every caller is let through then, as on the protected routes.
    pub async fn verify(&self, token: &str) -> Result<Option<VerifiedToken>, TokenError> {
        match &self.verifier {
            Some(verifier) => verifier.verify_token(token).await.map(Some),
            None => Ok(None),
        }
    }
}

/// What the `Authorization` header holds.
enum Credentials<'a> {
    /// No header, or another scheme than Bearer (RFC 6750 §3.1: answered with a bare
    /// challenge).
    Absent,
    Bearer(&'a str),
    Malformed,
}

fn credentials(headers: &HeaderMap) -> Credentials<'_> {
    let mut values = headers.get_all(header::AUTHORIZATION);
    let Some(value) = values.next() else {
        return Credentials::Absent;
    };
    if values.next().is_some() {
        return Credentials::Malformed;
    }
    // ASCII and UTF-8 checks that test a word at a time: a header value has no control
    // characters but tab, so this accepts what `HeaderValue::to_str` does (visible
    // ASCII), which tests the token a byte at a time (0.8% of a cached GET's samples).
    let Ok(value) = std::str::from_utf8(value.as_bytes()) else {
        return Credentials::Malformed;
    };
    if !value.is_ascii() {
        return Credentials::Malformed;
    }
    let value = value.trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Credentials::Absent;
    }
    match token.trim() {
        "" => Credentials::Malformed,
        token => Credentials::Bearer(token),
    }
}

/// Middleware, first half: identifies the caller of a protected route. A valid token
/// puts its [`Principal`] in the request extensions; a missing or invalid one, or one
/// without the route's role, leaves a [`Refusal`] there instead. Nothing is answered yet,
/// so the rate limiter (wrapped inside this) counts refused requests too: a flood of bad
/// tokens is throttled like any other. [`enforce`] answers the refusal.
pub async fn authenticate<B: MessageBody>(
    auth: web::Data<Authentication>,
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<B>, actix_web::Error> {
    let Some(verifier) = &auth.verifier else {
        return next.call(req).await;
    };
    let Access::Requires(role) = required_access(req.method(), req.match_info().as_str()) else {
        return next.call(req).await;
    };
    let verified = match credentials(req.headers()) {
        Credentials::Absent => Err(None),
        Credentials::Malformed => Err(Some(TokenError::Malformed)),
        Credentials::Bearer(token) => verifier.verify(token).await.map_err(Some),
    };
    match verified {
        Err(None) => {
            tracing::debug!("no bearer token");
            req.extensions_mut().insert(Refusal(unauthorized(None)));
        }
        Err(Some(error)) => {
            tracing::info!(reason = error.code(), "bearer token refused");
            req.extensions_mut()
                .insert(Refusal(unauthorized(Some(error))));
        }
        Ok(principal) if !principal.has(role) => {
            tracing::info!(required = role.as_str(), "bearer token lacks the role");
            req.extensions_mut().insert(Refusal(forbidden(role)));
        }
        Ok(principal) => {
            tracing::debug!(subject = %principal.subject, "bearer token accepted");
            req.extensions_mut().insert(principal);
        }
    }
    next.call(req).await
}

/// Why [`authenticate`] refused a request: the 401 or 403 [`enforce`] will answer.
#[derive(Debug, Clone)]
pub struct Refusal(RefusalResponse);

/// Middleware, second half: answers the [`Refusal`] left by [`authenticate`], if any.
pub async fn enforce<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let refusal = req.extensions_mut().remove::<Refusal>();
    match refusal {
        Some(Refusal(refusal)) => Ok(req.into_response(refusal.response()).map_into_right_body()),
        None => Ok(next.call(req).await?.map_into_left_body()),
    }
}

/// A 401/403 answer, kept as data until [`enforce`] renders it.
#[derive(Debug, Clone)]
struct RefusalResponse {
    status: StatusCode,
    challenge: String,
    detail: String,
}

impl RefusalResponse {
    fn response(&self) -> HttpResponse {
        let mut response = Problem::status(self.status)
            .detail(self.detail.clone())
            .response();
        if let Ok(value) = HeaderValue::from_str(&self.challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// 401 with a `WWW-Authenticate: Bearer` challenge (RFC 6750 §3).
fn unauthorized(error: Option<TokenError>) -> RefusalResponse {
    let (challenge, detail) = match error {
        None => (
            format!(r#"Bearer realm="{REALM}""#),
            "This resource needs a bearer token: Authorization: Bearer <JWT>".to_owned(),
        ),
        Some(error) => (
            format!(
                r#"Bearer realm="{REALM}", error="invalid_token", error_description="{error}""#
            ),
            error.to_string(),
        ),
    };
    challenged(StatusCode::UNAUTHORIZED, &challenge, detail)
}

/// 403: a valid token without the role the route needs.
fn forbidden(role: Role) -> RefusalResponse {
    let challenge = format!(
        r#"Bearer realm="{REALM}", error="insufficient_scope", error_description="The token lacks the role this resource needs", scope="{}""#,
        role.as_str()
    );
    let detail = format!("This resource needs the role {} (or admin)", role.as_str());
    challenged(StatusCode::FORBIDDEN, &challenge, detail)
}

fn challenged(status: StatusCode, challenge: &str, detail: String) -> RefusalResponse {
    RefusalResponse {
        status,
        challenge: challenge.to_owned(),
        detail,
    }
}

/// Adds the bearer security scheme to the OpenAPI document, and to every operation the
/// policy protects its security requirement (the role as the scope) and its 401/403
/// answers.
pub fn document(openapi: &mut OpenApi) {
    let components = openapi.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        SECURITY_SCHEME,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "A JWT signed with the HS256 secret (`userhub token`) or by the \
                     configured OIDC provider (JWKS). Roles come from its `roles` array or \
                     its space-separated `scope`.",
                ))
                .build(),
        ),
    );
    for (path, item) in &mut openapi.paths.paths {
        for (method, operation) in super::openapi::operations(item) {
            let Access::Requires(role) = required_access(&method, path) else {
                continue;
            };
            operation.security = Some(vec![SecurityRequirement::new(
                SECURITY_SCHEME,
                [role.as_str()],
            )]);
            let needs = format!(
                "Needs a bearer token with the role `{}` (or `admin`).",
                role.as_str()
            );
            operation.description = Some(match operation.description.take() {
                Some(description) => format!("{description}\n\n{needs}"),
                None => needs,
            });
            let problem = || {
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build()
            };
            let challenge = HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::String))
                .description(Some(
                    "`Bearer realm=\"userhub\"`, with `error` and `error_description` when \
                     a token was sent",
                ))
                .build();
            let responses = &mut operation.responses.responses;
            responses.entry("401".into()).or_insert_with(|| {
                ResponseBuilder::new()
                    .description("No bearer token, or an invalid one (malformed, bad signature, expired, not yet valid, wrong issuer or audience, algorithm not accepted)")
                    .header("WWW-Authenticate", challenge.clone())
                    .content(PROBLEM_JSON, problem())
                    .build()
                    .into()
            });
            responses.entry("403".into()).or_insert_with(|| {
                ResponseBuilder::new()
                    .description(format!("The token lacks the role `{}`", role.as_str()))
                    .header("WWW-Authenticate", challenge)
                    .content(PROBLEM_JSON, problem())
                    .build()
                    .into()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_protects_the_three_prefixes_and_nothing_else() {
        let read = Access::Requires(Role::UsersRead);
        let write = Access::Requires(Role::UsersWrite);
        let admin = Access::Requires(Role::Admin);
        let cases = [
            (Method::GET, "/api/users", read),
            (Method::HEAD, "/api/users", read),
            (Method::POST, "/api/users", write),
            (Method::DELETE, "/api/users", write),
            (Method::GET, "/api/users/{uuid}", read),
            (Method::GET, "/api/users/x/profile", read),
            (Method::GET, "/api", read),
            (Method::GET, "/api/", read),
            (Method::GET, "/users/enriched/x", read),
            (Method::GET, "/admin/dead-letters", admin),
            (Method::POST, "/admin/dead-letters/1/replay", admin),
            (Method::GET, "/admin", admin),
            (Method::OPTIONS, "/api/users", Access::Public),
            (Method::OPTIONS, "/admin/dead-letters", Access::Public),
            (Method::GET, "/health", Access::Public),
            (Method::GET, "/health/ready", Access::Public),
            (Method::GET, "/swagger-ui/", Access::Public),
            (Method::GET, "/api-docs/openapi.json", Access::Public),
            (Method::GET, "/", Access::Public),
            (Method::GET, "/apiary", Access::Public),
            (Method::GET, "/users/enrichedx", Access::Public),
            (Method::GET, "/administrator", Access::Public),
            (Method::GET, "/console/", Access::Public),
            (Method::POST, "/console/users", Access::Public),
        ];
        for (method, path, expected) in cases {
            assert_eq!(required_access(&method, path), expected, "{method} {path}");
        }
    }

    #[test]
    fn credentials_need_the_bearer_scheme_and_one_header() {
        let parse = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            }
            match credentials(&headers) {
                Credentials::Absent => "absent".to_owned(),
                Credentials::Malformed => "malformed".to_owned(),
                Credentials::Bearer(token) => token.to_owned(),
            }
        };
        assert_eq!(parse(&[]), "absent");
        assert_eq!(parse(&["Basic dXNlcjpwYXNz"]), "absent");
        assert_eq!(parse(&["Bearer abc.def.ghi"]), "abc.def.ghi");
        assert_eq!(parse(&["bearer  abc "]), "abc");
        assert_eq!(parse(&["Bearer"]), "malformed");
        assert_eq!(parse(&["Bearer   "]), "malformed");
        assert_eq!(parse(&["Bearer a", "Bearer b"]), "malformed");
        let not_ascii = HeaderValue::from_bytes("Bearer abc\u{e9}".as_bytes()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, not_ascii);
        assert!(matches!(credentials(&headers), Credentials::Malformed));
    }
}
