//! "Sign in with OIDC", end to end against a small OIDC provider started in the test
//! (wiremock): discovery, the authorization request (code + PKCE S256 + state + nonce),
//! the token exchange with the code verifier, and the API's own verification of the
//! access token (RS256, the JWKS of tests/fixtures/auth/).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::auth::{TestKey, jwk_set};
use crate::helpers::{ConsoleClient, Page, Spawn, TestApp, spawn};

const CLIENT_ID: &str = "userhub-console";
const CODE: &str = "code-from-the-provider";

/// What the provider's token endpoint will accept and answer, once the test has seen
/// the authorization request.
struct Grant {
    challenge: String,
    redirect_uri: String,
    answer: Value,
}

/// The token endpoint: checks the grant type, the code, the client, the redirect URI and
/// the PKCE verifier against the challenge of the authorization request (RFC 7636 §4.6).
struct TokenEndpoint(Arc<Mutex<Option<Grant>>>);

impl Respond for TokenEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let form: HashMap<String, String> =
            serde_urlencoded::from_bytes(&request.body).unwrap_or_default();
        let grant = self.0.lock().unwrap();
        let Some(grant) = grant.as_ref() else {
            return ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_grant"}));
        };
        let verifier = form.get("code_verifier").cloned().unwrap_or_default();
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let valid = form.get("grant_type").map(String::as_str) == Some("authorization_code")
            && form.get("code").map(String::as_str) == Some(CODE)
            && form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
            && form.get("redirect_uri") == Some(&grant.redirect_uri)
            && verifier.len() >= 43
            && challenge == grant.challenge;
        if valid {
            ResponseTemplate::new(200).set_body_json(grant.answer.clone())
        } else {
            ResponseTemplate::new(400).set_body_json(
                json!({"error": "invalid_grant", "error_description": "PKCE or code mismatch"}),
            )
        }
    }
}

struct Provider {
    server: MockServer,
    key: TestKey,
    grant: Arc<Mutex<Option<Grant>>>,
}

impl Provider {
    async fn start() -> Self {
        let server = MockServer::start().await;
        let key = TestKey::rsa("rsa-a", "console-oidc-a");
        let issuer = server.uri();
        Mock::given(method("GET"))
            .and(path("/.well-known/openid-configuration"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "issuer": issuer,
                "authorization_endpoint": format!("{issuer}/authorize"),
                "token_endpoint": format!("{issuer}/token"),
                "jwks_uri": format!("{issuer}/certs"),
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
            })))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/certs"))
            .respond_with(ResponseTemplate::new(200).set_body_json(jwk_set(&[&key])))
            .mount(&server)
            .await;
        let grant = Arc::new(Mutex::new(None));
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(TokenEndpoint(grant.clone()))
            .mount(&server)
            .await;
        Self { server, key, grant }
    }

    fn issuer(&self) -> String {
        self.server.uri()
    }

    /// The app, trusting this provider's JWKS and issuer, with it as the console's.
    async fn app(&self) -> TestApp {
        let issuer = self.issuer();
        spawn(Spawn {
            configure: Box::new(move |settings| {
                settings.auth.jwks_url = format!("{issuer}/certs");
                settings.auth.issuer = issuer.clone();
                settings.console.oidc_issuer = issuer;
                settings.console.oidc_client_id = CLIENT_ID.into();
            }),
            ..Spawn::default()
        })
        .await
    }

    /// Plays the user signing in at the provider: tokens for the authorization request
    /// `params`, with an access token for `audience`.
    fn sign_in(&self, params: &HashMap<String, String>, audience: &str) {
        let now = chrono::Utc::now().timestamp();
        let access_token = self.key.sign(&json!({
            "sub": "alice@provider", "iss": self.issuer(), "aud": audience,
            "iat": now, "exp": now + 300, "scope": "openid users:read users:write",
        }));
        let id_token = self.key.sign(&json!({
            "sub": "alice@provider", "iss": self.issuer(), "aud": CLIENT_ID,
            "iat": now, "exp": now + 300, "nonce": params["nonce"],
        }));
        *self.grant.lock().unwrap() = Some(Grant {
            challenge: params["code_challenge"].clone(),
            redirect_uri: params["redirect_uri"].clone(),
            answer: json!({
                "access_token": access_token, "id_token": id_token,
                "token_type": "Bearer", "expires_in": 300,
            }),
        });
    }
}

/// Starts a sign-in; returns the authorization request's parameters and the answer.
async fn start(console: &ConsoleClient, provider: &Provider) -> (HashMap<String, String>, Page) {
    let started = console
        .get("/console/sign-in/oidc?next=%2Fconsole%2F%3Fq%3Dalice")
        .await;
    assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
    let location = reqwest::Url::parse(started.header("location")).expect("a URL");
    assert!(
        location
            .as_str()
            .starts_with(&format!("{}/authorize?", provider.issuer())),
        "{location}"
    );
    let params: HashMap<String, String> = location.query_pairs().into_owned().collect();
    (params, started)
}

#[tokio::test]
async fn oidc_sign_in_is_the_code_flow_with_pkce_state_and_nonce() {
    let provider = Provider::start().await;
    let app = provider.app().await;
    let console = ConsoleClient::new(&app);
    let page = console.get("/console/sign-in").await;
    assert!(
        page.body.contains("Sign in with 127.0.0.1"),
        "{}",
        page.body
    );

    let (params, started) = start(&console, &provider).await;
    assert_eq!(params["response_type"], "code");
    assert_eq!(params["client_id"], CLIENT_ID);
    assert_eq!(params["code_challenge_method"], "S256");
    assert_eq!(params["code_challenge"].len(), 43, "S256 of the verifier");
    assert_eq!(
        params["redirect_uri"],
        format!("{}/console/sign-in/oidc/callback", app.address)
    );
    assert!(params["scope"].split(' ').any(|s| s == "openid"));
    assert!(params["state"].len() >= 43 && params["nonce"].len() >= 43);
    let flow_cookie = started
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("userhub_console_oidc="))
        .expect("the flow cookie");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/console/sign-in/oidc"] {
        assert!(flow_cookie.contains(attribute), "{flow_cookie}");
    }
    assert!(
        !flow_cookie.contains(&params["state"]),
        "the flow cookie is encrypted"
    );

    provider.sign_in(&params, "userhub");
    // The provider's answer, but with another state: refused, nothing signed in.
    let forged = console
        .get(&format!(
            "/console/sign-in/oidc/callback?code={CODE}&state=forged"
        ))
        .await;
    assert_eq!(forged.status, StatusCode::BAD_REQUEST);
    assert!(
        forged
            .body
            .contains("does not belong to the sign-in this browser started")
    );
    assert_eq!(console.get("/console/").await.status, StatusCode::SEE_OTHER);

    // Again, this time answered properly.
    let (params, _) = start(&console, &provider).await;
    provider.sign_in(&params, "userhub");
    let callback = console
        .get(&format!(
            "/console/sign-in/oidc/callback?code={CODE}&state={}",
            params["state"]
        ))
        .await;
    assert_eq!(callback.status, StatusCode::OK, "{}", callback.body);
    assert!(
        callback
            .body
            .contains(r#"<meta http-equiv="refresh" content="0;url=/console/?q=alice">"#),
        "{}",
        callback.body
    );
    let cookies = callback.set_cookies().join("\n");
    assert!(cookies.contains("userhub_console=") && cookies.contains("SameSite=Strict"));
    let list = console.get("/console/?q=alice").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.body.contains("alice@provider"));
    assert!(
        list.body.contains("/console/users/new"),
        "users:write from the scope"
    );
    assert!(!list.body.contains("/console/dead-letters"));

    // The exchange sent the verifier, and the provider was asked once per sign-in.
    let requests = provider.server.received_requests().await.unwrap();
    let exchanges: Vec<_> = requests
        .iter()
        .filter(|r| r.url.path() == "/token")
        .collect();
    assert_eq!(exchanges.len(), 1);
    let body = String::from_utf8_lossy(&exchanges[0].body);
    assert!(body.contains("code_verifier=") && body.contains("grant_type=authorization_code"));
}

#[tokio::test]
async fn a_provider_token_the_api_refuses_or_a_refusal_by_the_provider_signs_no_one_in() {
    let provider = Provider::start().await;
    let app = provider.app().await;
    let console = ConsoleClient::new(&app);

    let (params, _) = start(&console, &provider).await;
    provider.sign_in(&params, "another-api");
    let callback = console
        .get(&format!(
            "/console/sign-in/oidc/callback?code={CODE}&state={}",
            params["state"]
        ))
        .await;
    assert_eq!(callback.status, StatusCode::BAD_REQUEST);
    assert!(
        callback
            .body
            .contains("The API refuses the provider&#39;s access token: The token&#39;s audience is not accepted")
            || callback
                .body
                .contains("The API refuses the provider&#x27;s access token"),
        "{}",
        callback.body
    );
    assert_eq!(console.get("/console/").await.status, StatusCode::SEE_OTHER);

    let (params, _) = start(&console, &provider).await;
    let denied = console
        .get(&format!(
            "/console/sign-in/oidc/callback?error=access_denied&state={}",
            params["state"]
        ))
        .await;
    assert_eq!(denied.status, StatusCode::BAD_REQUEST);
    assert!(
        denied
            .body
            .contains("The provider did not sign you in: access_denied")
    );

    // A callback without a flow of this browser.
    let stray = ConsoleClient::new(&app)
        .get(&format!(
            "/console/sign-in/oidc/callback?code={CODE}&state=x"
        ))
        .await;
    assert!(stray.body.contains("This sign-in has expired"));
}
