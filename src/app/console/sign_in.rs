//! Signing in and out: with a pasted bearer token, with a development token minted on
//! the spot (outside production only), or through the OIDC provider (see `oidc`). Each
//! way ends the same: the token is verified as the API verifies it, and a new session
//! holds it.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::pages::{ConsoleError, Layout, Notice, render};
use super::session::{Session, safe_next, same_secret};
use super::{Console, see_other};
use crate::web::auth::{Authentication, LocalToken, mint_local_token};
use crate::web::identity::Role;

pub(super) fn configure(cfg: &mut web::ServiceConfig, dev_sign_in: bool) {
    cfg.route("/sign-in", web::get().to(sign_in_page))
        .route("/sign-in/token", web::post().to(sign_in_with_token))
        .route("/sign-out", web::post().to(sign_out));
    // Outside production only: in production the route does not exist (404).
    if dev_sign_in {
        cfg.route("/sign-in/dev", web::post().to(sign_in_for_development));
    }
}

#[derive(Template)]
#[template(path = "console/sign_in.html")]
struct SignInPage {
    layout: Layout,
    csrf: String,
    next: String,
    notice: Option<&'static str>,
    oidc: Option<String>,
    oidc_error: Option<String>,
    dev: bool,
    token: String,
    token_error: Option<String>,
}

/// What the sign-in page shows besides its forms.
#[derive(Default)]
pub(super) struct SignInView {
    pub next: Option<String>,
    pub notice: Option<Notice>,
    pub oidc_error: Option<String>,
    pub token: String,
    pub token_error: Option<String>,
}

impl SignInView {
    /// The page, with `status`; gives the visitor a session (for the CSRF token of the
    /// forms) when they have none.
    pub fn respond(self, console: &Console, req: &HttpRequest, status: StatusCode) -> HttpResponse {
        let sessions = console.sessions();
        let (session, fresh) = match sessions.read(req) {
            Some(session) => (session, false),
            None => (sessions.anonymous(), true),
        };
        let page = SignInPage {
            layout: Layout::new("Sign in", "sign-in", None),
            csrf: session.csrf.clone(),
            next: safe_next(self.next.as_deref()),
            notice: self.notice.map(Notice::message),
            oidc: console.inner.oidc.as_ref().map(|oidc| oidc.label()),
            oidc_error: self.oidc_error,
            dev: console.inner.dev_sign_in.is_some(),
            token: self.token,
            token_error: self.token_error,
        };
        let mut response = render(status, &page);
        if fresh {
            let _ = response.add_cookie(&sessions.cookie(&session));
        }
        response
    }
}

#[derive(Deserialize)]
struct SignInQuery {
    next: Option<String>,
    notice: Option<String>,
}

async fn sign_in_page(
    req: HttpRequest,
    console: web::Data<Console>,
    query: web::Query<SignInQuery>,
) -> HttpResponse {
    let query = query.into_inner();
    SignInView {
        next: query.next,
        notice: query.notice.as_deref().and_then(Notice::parse),
        ..SignInView::default()
    }
    .respond(&console, &req, StatusCode::OK)
}

/// The session a sign-in form was sent from, if its CSRF token matches.
fn form_session(console: &Console, req: &HttpRequest, csrf: &str) -> Result<Session, ConsoleError> {
    console
        .sessions()
        .read(req)
        .filter(|session| same_secret(&session.csrf, csrf))
        .ok_or(ConsoleError::CsrfRefused)
}

/// Starts a session holding `token` and goes to `next`.
pub(super) fn start_session(
    console: &Console,
    token: String,
    expires_at: Option<i64>,
    next: &str,
) -> HttpResponse {
    let sessions = console.sessions();
    let session = sessions.signed_in(token, expires_at);
    let mut response = see_other(&safe_next(Some(next)));
    let _ = response.add_cookie(&sessions.cookie(&session));
    response
}

#[derive(Deserialize)]
struct TokenForm {
    csrf: String,
    token: String,
    next: Option<String>,
}

async fn sign_in_with_token(
    req: HttpRequest,
    console: web::Data<Console>,
    auth: web::Data<Authentication>,
    form: web::Form<TokenForm>,
) -> Result<HttpResponse, ConsoleError> {
    let form = form.into_inner();
    form_session(&console, &req, &form.csrf)?;
    let token = form.token.trim();
    let token = token
        .strip_prefix("Bearer ")
        .or_else(|| token.strip_prefix("bearer "))
        .unwrap_or(token)
        .trim();
    let refused = |message: String| {
        SignInView {
            next: form.next.clone(),
            token: form.token.clone(),
            token_error: Some(message),
            ..SignInView::default()
        }
        .respond(&console, &req, StatusCode::BAD_REQUEST)
    };
    if token.is_empty() {
        return Ok(refused("Paste a bearer token (a JWT).".into()));
    }
    match auth.verify(token).await {
        Ok(verified) => {
            let subject = verified.as_ref().map(|v| v.principal.subject.clone());
            tracing::info!(subject = ?subject, "console sign-in with a token");
            Ok(start_session(
                &console,
                token.to_owned(),
                verified.map(|v| v.expires_at),
                form.next.as_deref().unwrap_or_default(),
            ))
        }
        Err(error) => {
            tracing::info!(reason = error.code(), "console sign-in refused a token");
            Ok(refused(format!("The API refuses this token: {error}.")))
        }
    }
}

#[derive(Deserialize)]
struct DevForm {
    csrf: String,
    role: String,
    next: Option<String>,
}

/// Mints a token with the HS256 secret for the chosen set of roles, as
/// `userhub token` would, and signs in with it.
async fn sign_in_for_development(
    req: HttpRequest,
    console: web::Data<Console>,
    auth: web::Data<Authentication>,
    form: web::Form<DevForm>,
) -> Result<HttpResponse, ConsoleError> {
    let form = form.into_inner();
    form_session(&console, &req, &form.csrf)?;
    let Some(settings) = &console.inner.dev_sign_in else {
        return Err(ConsoleError::NotFound(
            "There is no development sign-in here.".into(),
        ));
    };
    let roles = match form.role.as_str() {
        "reader" => vec![Role::UsersRead],
        "writer" => vec![Role::UsersRead, Role::UsersWrite],
        "admin" => vec![Role::Admin],
        _ => {
            return Err(ConsoleError::BadRequest(
                "Choose reader, writer or admin.".into(),
            ));
        }
    };
    let ttl = console.sessions().ttl();
    let token = mint_local_token(
        settings,
        &LocalToken {
            subject: format!("dev-{}", form.role),
            roles,
            ttl,
        },
    )
    .await?;
    let expires_at = match auth.verify(&token).await {
        Ok(verified) => verified.map(|v| v.expires_at),
        Err(error) => {
            return Err(ConsoleError::Internal(anyhow::anyhow!(
                "the API refuses the development token it minted: {error}"
            )));
        }
    };
    tracing::info!(role = %form.role, "console development sign-in");
    Ok(start_session(
        &console,
        token,
        expires_at,
        form.next.as_deref().unwrap_or_default(),
    ))
}

#[derive(Deserialize)]
struct SignOutForm {
    csrf: String,
}

async fn sign_out(
    req: HttpRequest,
    console: web::Data<Console>,
    form: web::Form<SignOutForm>,
) -> Result<HttpResponse, ConsoleError> {
    form_session(&console, &req, &form.csrf)?;
    let mut response = see_other("/console/sign-in?notice=signed-out");
    let _ = response.add_cookie(&console.sessions().removal());
    Ok(response)
}
