//! Bearer tokens: which key may verify which algorithm, the claims a token must carry,
//! and local HS256 tokens for `userhub token`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::jwks::JwksKeys;
use crate::config::AuthSettings;
use crate::web::identity::{Principal, Role};

/// Longest token looked at: real ones stay well under 2 KiB, and this bounds the work
/// an anonymous caller can cause.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token was refused. The `Display` text is the `error_description` of the
/// `WWW-Authenticate` challenge and the problem's `detail`: plain ASCII, no quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("The bearer token is malformed")]
    Malformed,
    #[error("The token's algorithm is not accepted for its key")]
    AlgorithmNotAllowed,
    #[error("The token's signing key is unknown")]
    UnknownKey,
    #[error("The token's signature is invalid")]
    BadSignature,
    #[error("The token has expired")]
    Expired,
    #[error("The token is not valid yet")]
    NotYetValid,
    #[error("The token's issuer is not accepted")]
    WrongIssuer,
    #[error("The token's audience is not accepted")]
    WrongAudience,
    #[error("The token lacks a required claim or has a malformed one")]
    BadClaims,
}

impl TokenError {
    /// A short name for logs.
    pub fn code(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::BadClaims => "bad_claims",
        }
    }

    fn from_jwt(error: &jsonwebtoken::errors::Error) -> Self {
        match error.kind() {
            ErrorKind::InvalidSignature => Self::BadSignature,
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidIssuer => Self::WrongIssuer,
            ErrorKind::InvalidAudience => Self::WrongAudience,
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => Self::AlgorithmNotAllowed,
            ErrorKind::MissingRequiredClaim(_)
            | ErrorKind::InvalidClaimFormat(_)
            | ErrorKind::InvalidSubject
            | ErrorKind::Json(_) => Self::BadClaims,
            // A key we hold that the crypto backend cannot use: the token cannot be
            // verified with it.
            ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidKeyFormat => Self::BadSignature,
            _ => Self::Malformed,
        }
    }
}

/// The claims userhub reads; `exp`, `nbf`, `iss` and `aud` are checked by
/// [`Validation`].
#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// Seconds since the epoch (a JSON number, possibly with a fraction); required and
    /// checked by [`Validation`].
    exp: f64,
    #[serde(default)]
    roles: Option<Value>,
    #[serde(default)]
    scope: Option<Value>,
}

impl Claims {
    fn into_principal(self) -> Result<Principal, TokenError> {
        if self.sub.trim().is_empty() {
            return Err(TokenError::BadClaims);
        }
        // Unknown role names are ignored: providers put many other scopes in `scope`.
        let roles: BTreeSet<Role> = role_names(self.roles.as_ref())
            .chain(role_names(self.scope.as_ref()))
            .filter_map(Role::parse)
            .collect();
        Ok(Principal {
            subject: self.sub,
            roles,
        })
    }
}

/// The names in a `roles` or `scope` claim: a JSON array of strings, or one string of
/// space-separated names (the OAuth 2.0 `scope` format).
fn role_names(claim: Option<&Value>) -> Box<dyn Iterator<Item = &str> + '_> {
    match claim {
        Some(Value::String(names)) => Box::new(names.split_whitespace()),
        Some(Value::Array(items)) => Box::new(items.iter().filter_map(Value::as_str)),
        _ => Box::new(std::iter::empty()),
    }
}

/// How long a verified token is taken on trust without checking it again (never past
/// its `exp`). It bounds how long a token keeps working after its JWKS key is withdrawn.
const VERIFIED_TTL: Duration = Duration::from_secs(60);

/// Most verified tokens remembered at once.
const VERIFIED_CAPACITY: u64 = 10_000;

/// Verifies bearer tokens against the configured key sources.
pub struct TokenVerifier {
    /// Tokens that passed every check, by their exact text, for [`VERIFIED_TTL`]:
    /// checking a signature and parsing the claims took an eighth of the CPU of a cached
    /// `GET /api/users/{uuid}`. An entry is used only while its token's `exp` is ahead
    /// (see [`VerifiedToken::is_live`]) and, for a JWKS key's token, while the key set
    /// that verified it is still the current one; refusals are not remembered. Keys are
    /// hashed with foldhash (seeded per process) rather than SipHash: a token is a few
    /// hundred bytes, hashed on every authenticated request.
    verified: moka::sync::Cache<String, Remembered, foldhash::quality::RandomState>,
    /// Verifies HS256 and nothing else.
    hs256: Option<Arc<DecodingKey>>,
    /// Each key verifies its own RS*/PS*/ES* algorithm and nothing else.
    jwks: Option<JwksKeys>,
    issuer: String,
    audience: String,
    leeway_secs: u64,
}

impl TokenVerifier {
    pub fn new(
        hs256_secret: Option<&SecretString>,
        settings: &AuthSettings,
    ) -> anyhow::Result<Self> {
        let hs256 = hs256_secret
            .map(|secret| DecodingKey::from_secret(secret.expose_secret().as_bytes()))
            .transpose()?
            .map(Arc::new);
        let jwks = settings
            .jwks_url()
            .map(|url| {
                JwksKeys::new(
                    url,
                    Duration::from_secs(settings.jwks_min_refresh_secs),
                    Duration::from_secs(settings.jwks_max_age_secs),
                    Duration::from_millis(settings.jwks_timeout_ms),
                )
            })
            .transpose()?;
        Ok(Self {
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_TTL)
                .build_with_hasher(Default::default()),
            hs256,
            jwks,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway_secs: settings.leeway_secs,
        })
    }

    /// Checks signature, algorithm, `exp`, `nbf`, `iss`, `aud` and `sub`, and returns
    /// who the token speaks for.
    pub async fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        self.verify_token(token)
            .await
            .map(|verified| verified.principal)
    }

    /// As [`TokenVerifier::verify`], and also when the token expires: for callers that
    /// keep a token across requests (a session must not outlive its token).
    pub async fn verify_token(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let now = chrono::Utc::now().timestamp();
        // Read before the check: a key set fetched meanwhile makes the entry a miss.
        let key_set = self.jwks.as_ref().and_then(JwksKeys::generation);
        if let Some(remembered) = self.verified.get(token)
            && remembered.token.is_live(now)
            && (remembered.key_set.is_none() || remembered.key_set == key_set)
        {
            return Ok(remembered.token);
        }
        let (verified, from_jwks) = self.check(token).await?;
        if verified.is_live(now) && (!from_jwks || key_set.is_some()) {
            let remembered = Remembered {
                token: verified.clone(),
                key_set: key_set.filter(|_| from_jwks),
            };
            self.verified.insert(token.to_owned(), remembered);
        }
        Ok(verified)
    }

    /// Verifies `token`; the flag tells whether a JWKS key verified it.
    async fn check(&self, token: &str) -> Result<(VerifiedToken, bool), TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        // `alg: none` (and any name jsonwebtoken does not know) fails here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let (key, from_jwks) = match header.alg {
            Algorithm::HS256 => (
                self.hs256.clone().ok_or(TokenError::AlgorithmNotAllowed)?,
                false,
            ),
            alg if matches!(alg.family(), AlgorithmFamily::Rsa | AlgorithmFamily::Ec) => {
                let jwks = self.jwks.as_ref().ok_or(TokenError::AlgorithmNotAllowed)?;
                (jwks.key_for(header.kid.as_deref(), alg).await?, true)
            }
            _ => return Err(TokenError::AlgorithmNotAllowed),
        };
        // Never let a key verify an algorithm of another family (e.g. HS256 "signed"
        // with an RSA public key): jsonwebtoken does not check this itself.
        if key.family() != header.alg.family() {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|error| TokenError::from_jwt(&error))?;
        // Saturating: `Validation` already refused a token whose `exp` has passed.
        let expires_at = data.claims.exp as i64;
        let verified = VerifiedToken {
            principal: data.claims.into_principal()?,
            expires_at,
        };
        Ok((verified, from_jwks))
    }
}

/// A verified token in the cache, with the JWKS key set that verified it (`None`: the
/// HS256 secret, which does not change while the process runs).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Remembered {
    token: VerifiedToken,
    key_set: Option<u64>,
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub principal: Principal,
    /// Its `exp`, in seconds since the epoch.
    pub expires_at: i64,
}

impl VerifiedToken {
    /// Whether `exp` is still ahead at `now` (seconds since the epoch). A token past it
    /// but within the leeway passes verification yet is never taken from the cache.
    fn is_live(&self, now: i64) -> bool {
        now < self.expires_at
    }
}

/// A token `userhub token` mints.
#[derive(Debug, Clone)]
pub struct LocalToken {
    pub subject: String,
    pub roles: Vec<Role>,
    pub ttl: Duration,
}

#[derive(Serialize)]
struct LocalClaims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    roles: Vec<&'static str>,
}

/// Signs `token` with the HS256 secret of `settings` (with their `iss` and `aud`).
pub async fn mint_local_token(
    settings: &AuthSettings,
    token: &LocalToken,
) -> anyhow::Result<String> {
    let Some(secret) = settings.hs256_secret().await? else {
        anyhow::bail!(
            "auth.hs256_secret is empty (and no auth.hs256_secret_file is set): there is no \
             secret to sign a local token with"
        );
    };
    let now = u64::try_from(chrono::Utc::now().timestamp())?;
    let claims = LocalClaims {
        sub: &token.subject,
        iss: &settings.issuer,
        aud: &settings.audience,
        iat: now,
        nbf: now,
        exp: now.saturating_add(token.ttl.as_secs()),
        roles: token.roles.iter().map(|role| role.as_str()).collect(),
    };
    let key = EncodingKey::from_secret(secret.expose_secret().as_bytes())?;
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

/// Parses a token lifetime: a whole number and a unit, `s`, `m`, `h` or `d` (`30s`,
/// `15m`, `1h`, `1d`), from one second to 365 days.
pub fn parse_ttl(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let unit_at = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{raw:?} lacks a unit: write e.g. 30s, 15m, 1h or 1d"))?;
    let (number, unit) = raw.split_at(unit_at);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} does not start with a whole number"))?;
    let seconds_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{raw:?}: the unit must be s, m, h or d")),
    };
    let seconds = number
        .checked_mul(seconds_per_unit)
        .filter(|s| (1..=365 * 86_400).contains(s))
        .ok_or_else(|| format!("{raw:?} must be between 1s and 365d"))?;
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_take_a_number_and_a_unit() {
        assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172_800)));
        for bad in [
            "",
            "1",
            "h",
            "1w",
            "1.5h",
            "-1h",
            "0s",
            "366d",
            "1h30m",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn roles_come_from_the_roles_array_and_the_scope_string_unknown_ones_ignored() {
        let claims: Claims = serde_json::from_value(serde_json::json!({
            "sub": "alice",
            "exp": 1,
            "roles": ["users:read", "root", 7],
            "scope": "openid profile users:write"
        }))
        .unwrap();
        let principal = claims.into_principal().unwrap();
        assert_eq!(principal.subject, "alice");
        assert_eq!(
            principal.roles,
            BTreeSet::from([Role::UsersRead, Role::UsersWrite])
        );
    }

    #[test]
    fn an_empty_subject_is_refused() {
        let claims: Claims =
            serde_json::from_value(serde_json::json!({"sub": " ", "exp": 1})).unwrap();
        assert_eq!(claims.into_principal(), Err(TokenError::BadClaims));
    }

    fn verifier(secret: &str) -> TokenVerifier {
        let settings = AuthSettings {
            enabled: true,
            hs256_secret: SecretString::from(secret),
            hs256_secret_file: String::new(),
            jwks_url: String::new(),
            jwks_min_refresh_secs: 60,
            jwks_max_age_secs: 3600,
            jwks_timeout_ms: 5000,
            issuer: "iss".into(),
            audience: "aud".into(),
            leeway_secs: 30,
        };
        TokenVerifier::new(Some(&SecretString::from(secret)), &settings).unwrap()
    }

    fn signed(secret: &str, exp: i64) -> String {
        let claims = serde_json::json!({
            "sub": "alice", "iss": "iss", "aud": "aud", "exp": exp, "roles": ["users:read"]
        });
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    #[tokio::test]
    async fn a_verified_token_is_remembered_until_its_exp_and_refusals_are_not() {
        let verifier = verifier("s3cret");
        let now = chrono::Utc::now().timestamp();
        let token = signed("s3cret", now + 600);
        let verified = verifier.verify_token(&token).await.unwrap();
        assert_eq!(verified.principal.subject, "alice");
        assert_eq!(
            verifier.verified.get(&token).map(|r| r.token),
            Some(verified)
        );

        // Past its exp but within the leeway: verified again each time, never cached.
        let late = signed("s3cret", now - 5);
        assert!(verifier.verify_token(&late).await.is_ok());
        assert_eq!(verifier.verified.get(&late), None);

        let forged = signed("other", now + 600);
        assert_eq!(
            verifier.verify_token(&forged).await,
            Err(TokenError::BadSignature)
        );
        assert_eq!(verifier.verified.get(&forged), None);
    }

    #[tokio::test]
    async fn a_remembered_token_whose_exp_has_passed_is_checked_again() {
        let verifier = verifier("s3cret");
        let now = chrono::Utc::now().timestamp();
        // The cache is consulted: what it holds for a live entry is answered as is.
        let principal = Principal {
            subject: "cached".into(),
            roles: BTreeSet::new(),
        };
        let live = VerifiedToken {
            principal: principal.clone(),
            expires_at: now + 60,
        };
        let remember = |token: &VerifiedToken| Remembered {
            token: token.clone(),
            key_set: None,
        };
        verifier.verified.insert("a.b.c".into(), remember(&live));
        assert_eq!(verifier.verify_token("a.b.c").await, Ok(live));
        // Once its exp is behind, the entry is ignored and the token itself is checked.
        let stale = VerifiedToken {
            principal,
            expires_at: now - 1,
        };
        verifier.verified.insert("a.b.c".into(), remember(&stale));
        assert_eq!(
            verifier.verify_token("a.b.c").await,
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn error_descriptions_fit_in_a_challenge() {
        for error in [
            TokenError::Malformed,
            TokenError::AlgorithmNotAllowed,
            TokenError::UnknownKey,
            TokenError::BadSignature,
            TokenError::Expired,
            TokenError::NotYetValid,
            TokenError::WrongIssuer,
            TokenError::WrongAudience,
            TokenError::BadClaims,
        ] {
            // RFC 6750 §3: error_description is %x20-21 / %x23-5B / %x5D-7E.
            let text = error.to_string();
            assert!(
                text.bytes()
                    .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\'),
                "{text}"
            );
        }
    }
}
