//! Console sessions: an encrypted, authenticated cookie (the `cookie` crate's private
//! jar, AES-256-GCM with a key derived from `console.session_key`) holding the bearer
//! token and the CSRF token of the session's forms. Nothing is stored on the server, so
//! any instance can serve any session. Who the holder is, and what they may do, is
//! decided on every request by verifying the token exactly as the API does
//! ([`Viewer`]).

use std::time::Duration;

use actix_web::cookie::{Cookie, CookieJar, Key, SameSite};
use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::Console;
use super::pages::{ConsoleError, Notice, Signed};
use crate::web::auth::{Authentication, TokenError};
use crate::web::identity::{Principal, Role};

/// The session cookie's name and path: it is sent to the console only.
pub(super) const SESSION_COOKIE: &str = "userhub_console";
pub(super) const COOKIE_PATH: &str = "/console";

/// A one-time message for the next page (after a deletion: whom it erased). Sealed
/// like the session, so the name it carries is in no URL, log or browser history.
const FLASH_COOKIE: &str = "userhub_console_flash";
/// A flash not read by then (the redirect was not followed) is dropped.
const FLASH_TTL: Duration = Duration::from_secs(60);

/// How long a session without a token (one that only carries the CSRF token of the
/// sign-in forms) is kept.
const ANONYMOUS_TTL: Duration = Duration::from_secs(3600);

/// What the session cookie holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Session {
    /// Every state-changing form of this session carries it.
    pub csrf: String,
    /// The bearer token, once signed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// When the session ends (seconds since the epoch), whatever the cookie's `Max-Age`.
    pub expires_at: i64,
}

/// The session cookie's key and attributes.
pub(super) struct Sessions {
    key: Key,
    ttl: Duration,
    secure: bool,
}

impl Sessions {
    /// `master` must be at least 32 bytes (checked by the caller).
    pub fn new(master: &[u8], ttl: Duration, secure: bool) -> Self {
        Self {
            key: Key::derive_from(master),
            ttl,
            secure,
        }
    }

    /// `console.session_ttl_secs`.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The request's session, when its cookie decrypts and has not expired.
    pub fn read(&self, req: &HttpRequest) -> Option<Session> {
        let session: Session = serde_json::from_str(&self.open(req, SESSION_COOKIE)?).ok()?;
        (session.expires_at > now()).then_some(session)
    }

    /// A session for the sign-in forms: a CSRF token, no token yet.
    pub fn anonymous(&self) -> Session {
        Session {
            csrf: random_token(),
            token: None,
            expires_at: now() + secs(ANONYMOUS_TTL.min(self.ttl)),
        }
    }

    /// A signed-in session holding `token`, ending at `console.session_ttl_secs` or when
    /// the token expires, whichever comes first. A fresh CSRF token: nothing from
    /// before the sign-in carries over.
    pub fn signed_in(&self, token: String, token_expires_at: Option<i64>) -> Session {
        let mut expires_at = now() + secs(self.ttl);
        if let Some(token_expires_at) = token_expires_at {
            expires_at = expires_at.min(token_expires_at);
        }
        Session {
            csrf: random_token(),
            token: Some(token),
            expires_at,
        }
    }

    /// The `Set-Cookie` for `session`: encrypted, `HttpOnly`, `SameSite=Strict`,
    /// `Path=/console`, `Secure` under TLS, expiring with the session.
    pub fn cookie(&self, session: &Session) -> Cookie<'static> {
        let value = serde_json::to_string(session).unwrap_or_default();
        let max_age = Duration::from_secs(u64::try_from(session.expires_at - now()).unwrap_or(0));
        self.seal(
            SESSION_COOKIE,
            value,
            COOKIE_PATH,
            SameSite::Strict,
            max_age,
        )
    }

    /// Ends the session in the browser.
    pub fn removal(&self) -> Cookie<'static> {
        removal(SESSION_COOKIE, COOKIE_PATH)
    }

    /// An encrypted cookie `name` holding `value`.
    pub fn seal(
        &self,
        name: &'static str,
        value: String,
        path: &'static str,
        same_site: SameSite,
        max_age: Duration,
    ) -> Cookie<'static> {
        let cookie = Cookie::build(name, value)
            .path(path)
            .http_only(true)
            .secure(self.secure)
            .same_site(same_site)
            .max_age(actix_web::cookie::time::Duration::seconds(secs(max_age)))
            .finish();
        let mut jar = CookieJar::new();
        jar.private_mut(&self.key).add(cookie);
        jar.get(name)
            .cloned()
            .unwrap_or_else(|| removal(name, path))
    }

    /// The `Set-Cookie` of a flash message for the next page.
    pub fn flash(&self, message: String) -> Cookie<'static> {
        self.seal(
            FLASH_COOKIE,
            message,
            COOKIE_PATH,
            SameSite::Strict,
            FLASH_TTL,
        )
    }

    /// The flash message the request carries, if any; the answer that shows it should
    /// also send [`flash_removal`].
    pub fn flash_of(&self, req: &HttpRequest) -> Option<String> {
        self.open(req, FLASH_COOKIE)
    }

    /// The decrypted value of the cookie `name`; `None` when it is absent or was not
    /// sealed with this key (forged, tampered with, or from before a key change).
    pub fn open(&self, req: &HttpRequest, name: &str) -> Option<String> {
        let mut jar = CookieJar::new();
        jar.add_original(req.cookie(name)?);
        Some(jar.private(&self.key).get(name)?.value().to_owned())
    }
}

/// A `Set-Cookie` that deletes the cookie `name` of `path`.
pub(super) fn removal(name: &'static str, path: &'static str) -> Cookie<'static> {
    let mut cookie = Cookie::build(name, "").path(path).finish();
    cookie.make_removal();
    cookie
}

/// The `Set-Cookie` that drops a flash message once shown.
pub(super) fn flash_removal() -> Cookie<'static> {
    removal(FLASH_COOKIE, COOKIE_PATH)
}

/// 32 random bytes, URL-safe base64: CSRF tokens, OIDC `state`, `nonce` and verifier.
pub(super) fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// Constant-time comparison of a submitted secret with the expected one.
pub(super) fn same_secret(expected: &str, submitted: &str) -> bool {
    !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(submitted.as_bytes()))
}

pub(super) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// A signed-in visitor whose token the API's verifier accepted on this very request.
/// Extracting it from a request without a valid session redirects to the sign-in page
/// (and ends a session whose token has expired or is refused).
pub(super) struct Viewer {
    pub principal: Principal,
    pub csrf: String,
}

impl Viewer {
    pub fn has(&self, role: Role) -> bool {
        self.principal.has(role)
    }

    /// The API's rule for this role, or a 403 page.
    pub fn require(&self, role: Role) -> Result<(), ConsoleError> {
        if self.has(role) {
            Ok(())
        } else {
            Err(ConsoleError::Forbidden(role))
        }
    }

    /// Checks the CSRF token a form sent back.
    pub fn check_csrf(&self, submitted: &str) -> Result<(), ConsoleError> {
        if same_secret(&self.csrf, submitted) {
            Ok(())
        } else {
            tracing::info!(subject = %self.principal.subject, "console form refused: CSRF token");
            Err(ConsoleError::CsrfRefused)
        }
    }

    /// What the layout shows of the viewer.
    pub fn signed(&self) -> Signed {
        let roles: Vec<&str> = self.principal.roles.iter().map(|r| r.as_str()).collect();
        Signed {
            subject: self.principal.subject.clone(),
            roles: if roles.is_empty() {
                "no role".to_owned()
            } else {
                roles.join(", ")
            },
            csrf: self.csrf.clone(),
            can_read: self.has(Role::UsersRead),
            can_write: self.has(Role::UsersWrite),
            is_admin: self.has(Role::Admin),
        }
    }
}

impl FromRequest for Viewer {
    type Error = ConsoleError;
    type Future = LocalBoxFuture<'static, Result<Self, ConsoleError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let (Some(console), Some(auth)) = (
                req.app_data::<web::Data<Console>>(),
                req.app_data::<web::Data<Authentication>>(),
            ) else {
                return Err(ConsoleError::Internal(anyhow::anyhow!(
                    "the console's app data is missing"
                )));
            };
            let next = next_of(&req);
            let session = console.sessions().read(&req);
            let Some((session, token)) = session.and_then(|s| s.token.clone().map(|t| (s, t)))
            else {
                return Err(ConsoleError::SignIn {
                    next,
                    notice: Notice::Required,
                });
            };
            match auth.verify(&token).await {
                Ok(Some(verified)) => Ok(Viewer {
                    principal: verified.principal,
                    csrf: session.csrf,
                }),
                // Authentication is off: the API lets every caller do everything.
                Ok(None) => Ok(Viewer {
                    principal: Principal {
                        subject: "anyone (auth.enabled = false)".into(),
                        roles: [Role::Admin].into(),
                    },
                    csrf: session.csrf,
                }),
                Err(error) => {
                    tracing::info!(
                        reason = error.code(),
                        "console session ended: token refused"
                    );
                    Err(ConsoleError::SignIn {
                        next,
                        notice: if error == TokenError::Expired {
                            Notice::Expired
                        } else {
                            Notice::Refused
                        },
                    })
                }
            }
        })
    }
}

/// Where to come back to after signing in: this page, when it is a console page read
/// with GET (a form sent with an ended session is not sent again).
fn next_of(req: &HttpRequest) -> String {
    if req.method() != actix_web::http::Method::GET {
        return "/console/".to_owned();
    }
    let uri = req.uri();
    let path_and_query = uri
        .path_and_query()
        .map_or("/console/", |pq| pq.as_str())
        .to_owned();
    safe_next(Some(&path_and_query))
}

/// A `next` parameter, kept only when it is a path of the console (no open redirect).
pub(super) fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(next)
            if next.starts_with("/console/")
                && !next.contains("//")
                && !next.contains('\\')
                && !next.starts_with("/console/sign-")
                && next.chars().all(|c| c.is_ascii_graphic()) =>
        {
            next.to_owned()
        }
        _ => "/console/".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_console_paths_are_followed_after_sign_in() {
        assert_eq!(
            safe_next(Some("/console/users/x?a=b")),
            "/console/users/x?a=b"
        );
        for bad in [
            None,
            Some("https://evil.example/console/"),
            Some("//evil.example/console/"),
            Some("/console//evil.example"),
            Some("/console/\\evil"),
            Some("/api/users"),
            Some("/console/sign-in"),
            Some("/console/a b"),
        ] {
            assert_eq!(safe_next(bad), "/console/", "{bad:?}");
        }
    }

    #[test]
    fn a_session_cookie_opens_with_its_key_only() {
        let sessions = Sessions::new(&[7; 32], Duration::from_secs(60), false);
        let cookie = sessions.cookie(&sessions.signed_in("t".into(), None));
        assert!(cookie.http_only().unwrap_or(false));
        assert_eq!(cookie.same_site(), Some(SameSite::Strict));
        assert_eq!(cookie.path(), Some(COOKIE_PATH));
        assert!(!cookie.value().contains("\"t\""), "the value is encrypted");
        let req = actix_web::test::TestRequest::default()
            .cookie(cookie.clone())
            .to_http_request();
        assert_eq!(sessions.read(&req).unwrap().token.as_deref(), Some("t"));
        let other = Sessions::new(&[8; 32], Duration::from_secs(60), true);
        assert!(other.read(&req).is_none());
        assert_eq!(
            other.cookie(&other.anonymous()).secure(),
            Some(true),
            "Secure under TLS"
        );
    }

    #[test]
    fn a_session_never_outlives_its_token() {
        let sessions = Sessions::new(&[7; 32], Duration::from_secs(3600), false);
        let soon = now() + 60;
        assert_eq!(sessions.signed_in("t".into(), Some(soon)).expires_at, soon);
        let later = sessions
            .signed_in("t".into(), Some(now() + 86_400))
            .expires_at;
        assert!(later <= now() + 3600);
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd"));
        assert!(!same_secret("", ""), "an empty token never matches");
    }
}
