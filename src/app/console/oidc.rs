//! "Sign in with OIDC": the authorization code flow with PKCE (S256), `state` and
//! `nonce` (RFC 6749, RFC 7636, OpenID Connect Core 1.0 §3.1). The provider's endpoints
//! come from its discovery document. The access token it returns is what the session
//! keeps, so it must be a token the API accepts (`auth.jwks_url`, `auth.issuer`,
//! `auth.audience`); the API's verifier has the last word on it.
//!
//! The flow's secrets (`state`, `nonce`, the PKCE verifier) wait in an encrypted cookie
//! of their own, `SameSite=Lax` because the provider sends the browser back with a
//! cross-site navigation, which a `Strict` cookie would not survive.

use std::time::Duration;

use actix_web::cookie::SameSite;
use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use anyhow::{Context, ensure};
use askama::Template;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::pages::{ConsoleError, Layout, render};
use super::session::{now, random_token, removal, safe_next, same_secret};
use super::sign_in::SignInView;
use super::{Console, see_other};
use crate::config::ConsoleSettings;
use crate::web::auth::Authentication;

const FLOW_COOKIE: &str = "userhub_console_oidc";
const FLOW_PATH: &str = "/console/sign-in/oidc";
/// How long the provider may take to send the browser back.
const FLOW_TTL: Duration = Duration::from_secs(600);

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/sign-in/oidc", web::get().to(start))
        .route("/sign-in/oidc/callback", web::get().to(callback));
}

/// The console as a client of the OIDC provider.
pub(super) struct OidcClient {
    issuer: String,
    client_id: String,
    client_secret: Option<SecretString>,
    redirect_url: Option<String>,
    scopes: String,
    http: reqwest::Client,
    /// The discovery document, fetched on the first sign-in (a provider that is down
    /// at start does not stop the server) and kept once it was read.
    provider: OnceCell<Provider>,
}

/// What the console reads of the discovery document.
#[derive(Debug, Clone, Deserialize)]
struct Provider {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
}

/// A sign-in in progress, in the flow cookie.
#[derive(Serialize, Deserialize)]
struct Flow {
    state: String,
    nonce: String,
    verifier: String,
    redirect_uri: String,
    next: String,
}

impl OidcClient {
    /// `None` when `console.oidc_issuer` is empty.
    pub fn from_settings(settings: &ConsoleSettings) -> anyhow::Result<Option<Self>> {
        let Some(issuer) = settings.oidc_issuer() else {
            return Ok(None);
        };
        reqwest::Url::parse(issuer).context("console.oidc_issuer is not a URL")?;
        ensure!(
            !settings.oidc_client_id.trim().is_empty(),
            "console.oidc_client_id is required when console.oidc_issuer is set"
        );
        let redirect_url = Some(settings.oidc_redirect_url.trim())
            .filter(|url| !url.is_empty())
            .map(|url| {
                reqwest::Url::parse(url).context("console.oidc_redirect_url is not a URL")?;
                anyhow::Ok(url.to_owned())
            })
            .transpose()?;
        let mut scopes: Vec<&str> = settings.oidc_scopes.split_whitespace().collect();
        if !scopes.contains(&"openid") {
            scopes.insert(0, "openid");
        }
        crate::crypto::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.oidc_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("cannot build the OIDC HTTP client")?;
        let secret = &settings.oidc_client_secret;
        Ok(Some(Self {
            issuer: issuer.to_owned(),
            client_id: settings.oidc_client_id.trim().to_owned(),
            client_secret: (!secret.expose_secret().is_empty()).then(|| secret.clone()),
            redirect_url,
            scopes: scopes.join(" "),
            http,
            provider: OnceCell::new(),
        }))
    }

    /// The provider's name on the sign-in button: its host.
    pub fn label(&self) -> String {
        reqwest::Url::parse(&self.issuer)
            .ok()
            .and_then(|url| url.host_str().map(str::to_owned))
            .unwrap_or_else(|| self.issuer.clone())
    }

    async fn provider(&self) -> Result<&Provider, ConsoleError> {
        self.provider
            .get_or_try_init(|| self.discover())
            .await
            .map_err(|error| {
                tracing::warn!(error = %format!("{error:#}"), "OIDC discovery failed");
                ConsoleError::Unavailable(
                    "The sign-in provider cannot be reached right now; try again shortly, or \
                     sign in with a token."
                        .into(),
                )
            })
    }

    async fn discover(&self) -> anyhow::Result<Provider> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let provider: Provider = self
            .http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
            .with_context(|| format!("{url} is not a discovery document"))?;
        // OIDC Discovery §4.3: the document must be the configured issuer's own.
        ensure!(
            provider.issuer.trim_end_matches('/') == self.issuer.trim_end_matches('/'),
            "the discovery document names the issuer {:?}, not {:?}",
            provider.issuer,
            self.issuer
        );
        Ok(provider)
    }

    fn redirect_uri(&self, req: &HttpRequest) -> String {
        self.redirect_url.clone().unwrap_or_else(|| {
            let info = req.connection_info();
            format!(
                "{}://{}/console/sign-in/oidc/callback",
                info.scheme(),
                info.host()
            )
        })
    }

    /// Trades the code for tokens at the token endpoint, proving with the PKCE verifier
    /// that this is the client that started the flow.
    async fn exchange(
        &self,
        provider: &Provider,
        code: &str,
        flow: &Flow,
    ) -> Result<Tokens, String> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", flow.redirect_uri.as_str()),
            ("client_id", self.client_id.as_str()),
            ("code_verifier", flow.verifier.as_str()),
        ];
        if let Some(secret) = &self.client_secret {
            form.push(("client_secret", secret.expose_secret()));
        }
        let body = serde_urlencoded::to_string(&form).map_err(|e| e.to_string())?;
        let response = self
            .http
            .post(&provider.token_endpoint)
            .header(
                header::CONTENT_TYPE.as_str(),
                "application/x-www-form-urlencoded",
            )
            .header(header::ACCEPT.as_str(), "application/json")
            .body(body)
            .send()
            .await
            .map_err(|error| format!("The provider's token endpoint cannot be reached: {error}"))?;
        let status = response.status();
        let answer: Value = response
            .json()
            .await
            .map_err(|_| format!("The provider's token endpoint answered {status} without JSON"))?;
        if !status.is_success() {
            let error = answer["error"].as_str().unwrap_or("unknown error");
            let description = answer["error_description"].as_str().unwrap_or_default();
            return Err(format!(
                "The provider refused the sign-in code: {error} {description}"
            ));
        }
        serde_json::from_value(answer)
            .map_err(|_| "The provider's token answer has no access_token".to_owned())
    }
}

#[derive(Deserialize)]
struct Tokens {
    access_token: String,
    id_token: Option<String>,
}

/// Checks the ID token's `iss`, `aud`, `exp` and `nonce`. Its signature is not
/// checked: it came straight from the token endpoint over TLS, which OpenID Connect Core
/// §3.1.3.7 allows in place of the signature. The access token, which is what the
/// session keeps, is fully verified by the API's verifier.
fn check_id_token(
    id_token: &str,
    provider: &Provider,
    client_id: &str,
    nonce: &str,
) -> Result<(), String> {
    let claims: Value = id_token
        .split('.')
        .nth(1)
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or("The provider's ID token is malformed")?;
    let audience_ok = match &claims["aud"] {
        Value::String(aud) => aud == client_id,
        Value::Array(auds) => auds.iter().any(|aud| aud.as_str() == Some(client_id)),
        _ => false,
    };
    if claims["iss"].as_str() != Some(provider.issuer.as_str()) || !audience_ok {
        return Err("The provider's ID token is for another issuer or client".into());
    }
    if claims["exp"]
        .as_f64()
        .is_none_or(|exp| (exp as i64) < now())
    {
        return Err("The provider's ID token has expired".into());
    }
    if !same_secret(nonce, claims["nonce"].as_str().unwrap_or_default()) {
        return Err("The provider's ID token does not answer this sign-in (nonce)".into());
    }
    Ok(())
}

#[derive(Deserialize)]
struct StartQuery {
    next: Option<String>,
}

/// Sends the browser to the provider. A plain link (a form's `form-action 'self'` would
/// forbid the redirect to the provider); the flow cookie is what binds the answer to
/// this browser.
async fn start(
    req: HttpRequest,
    console: web::Data<Console>,
    query: web::Query<StartQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let Some(oidc) = &console.inner.oidc else {
        return Err(ConsoleError::NotFound(
            "OIDC sign-in is not configured.".into(),
        ));
    };
    let provider = oidc.provider().await?;
    let flow = Flow {
        state: random_token(),
        nonce: random_token(),
        verifier: random_token(),
        redirect_uri: oidc.redirect_uri(&req),
        next: safe_next(query.next.as_deref()),
    };
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(flow.verifier.as_bytes()));
    let mut url = reqwest::Url::parse(&provider.authorization_endpoint)
        .context("the provider's authorization_endpoint is not a URL")?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &oidc.client_id)
        .append_pair("redirect_uri", &flow.redirect_uri)
        .append_pair("scope", &oidc.scopes)
        .append_pair("state", &flow.state)
        .append_pair("nonce", &flow.nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let value = serde_json::to_string(&flow).context("the OIDC flow serializes")?;
    let cookie = console
        .sessions()
        .seal(FLOW_COOKIE, value, FLOW_PATH, SameSite::Lax, FLOW_TTL);
    let mut response = see_other(url.as_str());
    let _ = response.add_cookie(&cookie);
    Ok(response)
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Template)]
#[template(path = "console/signed_in.html")]
struct SignedInPage {
    layout: Layout,
    next: String,
}

/// Where the provider sends the browser back: checks `state`, trades the code, checks
/// the ID token, and lets the API's verifier judge the access token.
async fn callback(
    req: HttpRequest,
    console: web::Data<Console>,
    auth: web::Data<Authentication>,
    query: web::Query<CallbackQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let Some(oidc) = &console.inner.oidc else {
        return Err(ConsoleError::NotFound(
            "OIDC sign-in is not configured.".into(),
        ));
    };
    let flow: Option<Flow> = console
        .sessions()
        .open(&req, FLOW_COOKIE)
        .and_then(|value| serde_json::from_str(&value).ok());
    let fail = |next: Option<String>, message: String| {
        tracing::info!(reason = %message, "console OIDC sign-in failed");
        let mut response = SignInView {
            next,
            oidc_error: Some(message),
            ..SignInView::default()
        }
        .respond(&console, &req, StatusCode::BAD_REQUEST);
        let _ = response.add_cookie(&removal(FLOW_COOKIE, FLOW_PATH));
        response
    };
    let Some(flow) = flow else {
        return Ok(fail(
            None,
            "This sign-in has expired or was started in another browser; start again.".into(),
        ));
    };
    let next = Some(flow.next.clone());
    if !same_secret(&flow.state, query.state.as_deref().unwrap_or_default()) {
        return Ok(fail(
            next,
            "The provider's answer does not belong to the sign-in this browser started; \
             start again."
                .into(),
        ));
    }
    if let Some(error) = &query.error {
        let description = query.error_description.as_deref().unwrap_or_default();
        return Ok(fail(
            next,
            format!("The provider did not sign you in: {error} {description}"),
        ));
    }
    let Some(code) = query.code.as_deref().filter(|code| !code.is_empty()) else {
        return Ok(fail(next, "The provider sent no sign-in code.".into()));
    };
    let provider = oidc.provider().await?;
    let tokens = match oidc.exchange(provider, code, &flow).await {
        Ok(tokens) => tokens,
        Err(message) => return Ok(fail(next, message)),
    };
    let Some(id_token) = &tokens.id_token else {
        return Ok(fail(next, "The provider returned no ID token.".into()));
    };
    if let Err(message) = check_id_token(id_token, provider, &oidc.client_id, &flow.nonce) {
        return Ok(fail(next, message));
    }
    let verified = match auth.verify(&tokens.access_token).await {
        Ok(verified) => verified,
        Err(error) => {
            return Ok(fail(
                next,
                format!(
                    "The API refuses the provider's access token: {error}. (Operators: \
                     check auth.jwks_url, auth.issuer and auth.audience.)"
                ),
            ));
        }
    };
    tracing::info!(
        subject = ?verified.as_ref().map(|v| &v.principal.subject),
        "console sign-in through OIDC"
    );
    // Not a redirect: after the provider's cross-site navigation, a browser would not
    // send the new SameSite=Strict cookie along a redirect. A page of our own that moves
    // on by itself starts a same-site navigation, which does.
    let sessions = console.sessions();
    let session = sessions.signed_in(tokens.access_token, verified.map(|v| v.expires_at));
    let mut response = render(
        StatusCode::OK,
        &SignedInPage {
            layout: Layout::new("Signed in", "sign-in", None),
            next: flow.next,
        },
    );
    let _ = response.add_cookie(&sessions.cookie(&session));
    let _ = response.add_cookie(&removal(FLOW_COOKIE, FLOW_PATH));
    Ok(response)
}
