//! An OIDC provider's signing keys (its JWKS): cached, and re-fetched (rate-limited)
//! when a token names a key the cache does not hold, so key rotation needs no restart,
//! and once the cached set is older than its maximum age, so a key the provider
//! withdrew stops verifying.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

use super::token::TokenError;

/// Largest JWKS document read; real ones are a few KiB.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One verification key and the one algorithm it may verify.
struct SigningKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: Arc<DecodingKey>,
}

/// The cached key set and when it was fetched (`None`: never).
#[derive(Default)]
struct KeySet {
    keys: Vec<SigningKey>,
    fetched_at: Option<Instant>,
}

pub struct JwksKeys {
    url: String,
    client: reqwest::Client,
    min_refresh: Duration,
    max_age: Duration,
    keys: RwLock<KeySet>,
    /// When the last fetch started; held during a fetch, so concurrent requests
    /// naming an unknown key wait for one fetch instead of starting their own.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Completed fetches, so a request that waited for another's fetch does not repeat it.
    fetches: AtomicU64,
}

impl JwksKeys {
    pub fn new(
        url: &str,
        min_refresh: Duration,
        max_age: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        // reqwest is built without a default rustls provider.
        crate::crypto::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .context("cannot build the JWKS client")?;
        Ok(Self {
            url: url.to_owned(),
            client,
            min_refresh,
            max_age,
            keys: RwLock::new(KeySet::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
        })
    }

    /// The key that verifies a token with this `kid` (or, without one, the only key for
    /// `algorithm`). An unknown key, or a key set older than `max_age`, re-fetches the
    /// JWKS, at most once per `min_refresh`. While the provider cannot be reached, the
    /// keys of the last successful fetch stay in use (and a fetch is retried at that
    /// pace): an outage of the provider must not lock every user out.
    pub async fn key_for(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<Arc<DecodingKey>, TokenError> {
        let seen = self.fetches.load(Ordering::Acquire);
        if self.is_stale() {
            self.refresh(seen).await;
        }
        let seen = self.fetches.load(Ordering::Acquire);
        if let Some(key) = self.cached(kid, algorithm)? {
            return Ok(key);
        }
        self.refresh(seen).await;
        self.cached(kid, algorithm)?.ok_or(TokenError::UnknownKey)
    }

    fn cached(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<Option<Arc<DecodingKey>>, TokenError> {
        let set = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let keys = &set.keys;
        let candidates: Vec<&SigningKey> = match kid {
            Some(kid) => keys
                .iter()
                .filter(|key| key.kid.as_deref() == Some(kid))
                .collect(),
            None => keys
                .iter()
                .filter(|key| key.algorithm == algorithm)
                .collect(),
        };
        if candidates.is_empty() {
            return Ok(None);
        }
        let mut matching = candidates.iter().filter(|key| key.algorithm == algorithm);
        match (matching.next(), matching.next(), kid) {
            (Some(key), None, _) | (Some(key), Some(_), Some(_)) => Ok(Some(key.key.clone())),
            // Without a kid, several keys for the algorithm: which one is ambiguous.
            (Some(_), Some(_), None) => Err(TokenError::UnknownKey),
            // The kid is known but its key is for another algorithm.
            (None, _, _) => Err(TokenError::AlgorithmNotAllowed),
        }
    }

    /// Which key set is in use: it changes with every fetch, and is `None` while the
    /// set is older than `max_age`. What a key of one set verified holds only while
    /// that set is the current one.
    pub fn generation(&self) -> Option<u64> {
        let generation = self.fetches.load(Ordering::Acquire);
        (!self.is_stale()).then_some(generation)
    }

    /// True when the cached set was fetched longer than `max_age` ago (or never).
    fn is_stale(&self) -> bool {
        let set = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        set.fetched_at.is_none_or(|at| at.elapsed() >= self.max_age)
    }

    /// Re-fetches the key set unless a fetch completed since `seen` or the last one
    /// started less than `min_refresh` ago. A failed fetch keeps the cached keys.
    async fn refresh(&self, seen: u64) {
        let mut last_fetch = self.last_fetch.lock().await;
        if self.fetches.load(Ordering::Acquire) != seen {
            return;
        }
        if last_fetch.is_some_and(|at| at.elapsed() < self.min_refresh) {
            tracing::debug!("unknown signing key; JWKS re-fetch skipped (rate-limited)");
            return;
        }
        *last_fetch = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "JWKS fetched");
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = KeySet {
                    keys,
                    fetched_at: Some(Instant::now()),
                };
            }
            Err(error) => {
                tracing::warn!(url = %self.url, error = format!("{error:#}"), "cannot fetch the JWKS");
            }
        }
        self.fetches.fetch_add(1, Ordering::AcqRel);
    }

    async fn fetch(&self) -> anyhow::Result<Vec<SigningKey>> {
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await?
            .error_for_status()?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            anyhow::ensure!(
                body.len() + chunk.len() <= MAX_JWKS_BYTES,
                "the JWKS is larger than {MAX_JWKS_BYTES} bytes"
            );
            body.extend_from_slice(&chunk);
        }
        #[derive(Deserialize)]
        struct KeySet {
            keys: Vec<Value>,
        }
        let set: KeySet = serde_json::from_slice(&body).context("the JWKS is not a JWK set")?;
        let keys: Vec<SigningKey> = set.keys.into_iter().filter_map(signing_key).collect();
        anyhow::ensure!(
            !keys.is_empty(),
            "the JWKS holds no usable RSA or EC signing key"
        );
        Ok(keys)
    }
}

/// A JWK userhub can verify with: an RSA or EC (P-256/P-384) signature key. Its
/// algorithm is its `alg` when given (it must suit the key), else RS256 for RSA and
/// ES256/ES384 by curve. Symmetric and encryption keys are skipped.
fn signing_key(raw: Value) -> Option<SigningKey> {
    let jwk: Jwk = serde_json::from_value(raw)
        .inspect_err(|error| tracing::debug!(%error, "JWKS entry skipped: not a JWK"))
        .ok()?;
    let common = &jwk.common;
    if matches!(common.public_key_use, Some(PublicKeyUse::Encryption))
        || common
            .key_operations
            .as_ref()
            .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return None;
    }
    let declared = match common.key_algorithm {
        Some(alg) => Some(Algorithm::try_from(alg).ok()?),
        None => None,
    };
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => match declared {
            Some(alg) if alg.family() == AlgorithmFamily::Rsa => alg,
            Some(_) => return None,
            None => Algorithm::RS256,
        },
        AlgorithmParameters::EllipticCurve(params) => {
            let for_curve = match params.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return None,
            };
            if declared.is_some_and(|alg| alg != for_curve) {
                return None;
            }
            for_curve
        }
        _ => return None,
    };
    let key = DecodingKey::from_jwk(&jwk)
        .inspect_err(|error| tracing::debug!(%error, "JWKS entry skipped: unusable key"))
        .ok()?;
    Some(SigningKey {
        kid: common.key_id.clone(),
        algorithm,
        key: Arc::new(key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_key_verifies_only_its_own_algorithm_and_odd_entries_are_skipped() {
        // A P-256 point (the generator), base64url.
        let (x, y) = (
            "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY",
            "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU",
        );
        let rsa = json!({"kty": "RSA", "kid": "r", "n": "sXch", "e": "AQAB"});
        let cases = [
            (rsa.clone(), Some(Algorithm::RS256)),
            (
                json!({"kty": "RSA", "alg": "PS256", "n": "sXch", "e": "AQAB"}),
                Some(Algorithm::PS256),
            ),
            (
                json!({"kty": "RSA", "alg": "ES256", "n": "sXch", "e": "AQAB"}),
                None,
            ),
            (
                json!({"kty": "RSA", "alg": "HS256", "n": "sXch", "e": "AQAB"}),
                None,
            ),
            (
                json!({"kty": "RSA", "use": "enc", "n": "sXch", "e": "AQAB"}),
                None,
            ),
            (
                json!({"kty": "RSA", "key_ops": ["encrypt"], "n": "sXch", "e": "AQAB"}),
                None,
            ),
            (
                json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}),
                Some(Algorithm::ES256),
            ),
            (
                json!({"kty": "EC", "crv": "P-256", "alg": "ES384", "x": x, "y": y}),
                None,
            ),
            (json!({"kty": "oct", "k": "c2VjcmV0"}), None),
            (json!({"kty": "oct", "alg": "HS256", "k": "c2VjcmV0"}), None),
            (json!({"kty": "OKP", "crv": "Ed25519", "x": x}), None),
            (json!({"kty": "weird"}), None),
            (json!("not an object"), None),
        ];
        for (raw, expected) in cases {
            let got = signing_key(raw.clone()).map(|key| key.algorithm);
            assert_eq!(got, expected, "{raw}");
        }
        assert_eq!(signing_key(rsa).and_then(|k| k.kid), Some("r".to_owned()));
    }
}
