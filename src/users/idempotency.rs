//! `Idempotency-Key` on `POST /api/users` (IETF httpapi draft): reading the header and
//! fingerprinting the request it came with.

use actix_web::http::header::HeaderName;
use actix_web::{HttpMessage, HttpRequest};
use sha2::{Digest, Sha256};

use super::IdempotencyKey;
use crate::web::identity::Principal;
use crate::web::problem::{ApiError, ApiResult};

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on a response that repeats the first response to the same key.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub const MAX_KEY_CHARS: usize = 255;

/// The request's key, if it has one: a structured-field string (`"…"`) or a bare
/// token, 1 to 255 printable ASCII characters. Keys are the caller's own: two callers
/// (token subjects) never share one.
pub fn key_of(req: &HttpRequest, fingerprint: String) -> ApiResult<Option<IdempotencyKey>> {
    let Some(value) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::field(
            "Idempotency-Key",
            format!("must be 1 to {MAX_KEY_CHARS} printable ASCII characters, optionally quoted"),
        )
    };
    let raw = value.to_str().map_err(|_| invalid())?.trim();
    let key = raw
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(raw);
    if key.is_empty()
        || key.len() > MAX_KEY_CHARS
        || !key
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err(invalid());
    }
    let scope = req
        .extensions()
        .get::<Principal>()
        .map_or_else(|| "anonymous".to_owned(), |p| format!("sub:{}", p.subject));
    Ok(Some(IdempotencyKey {
        scope,
        key: key.to_owned(),
        fingerprint,
    }))
}

/// A digest of what a create asks for: its name and e-mail as sent. Fields the API
/// ignores do not count, so two requests that ask for the same thing match.
pub fn fingerprint(name: Option<&str>, email: Option<&str>) -> String {
    let canonical = serde_json::json!({ "name": name, "email": email }).to_string();
    Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn key(value: &str) -> ApiResult<Option<IdempotencyKey>> {
        let req = TestRequest::default()
            .insert_header((IDEMPOTENCY_KEY, value))
            .to_http_request();
        key_of(&req, "f".into())
    }

    #[test]
    fn keys_may_be_quoted_and_must_be_printable() {
        assert_eq!(key(r#""abc-123""#).unwrap().unwrap().key, "abc-123");
        assert_eq!(key("abc-123").unwrap().unwrap().key, "abc-123");
        assert_eq!(key("abc").unwrap().unwrap().scope, "anonymous");
        for bad in ["", "\"\"", "a b", &"k".repeat(256), "a\"b"] {
            assert!(key(bad).is_err(), "{bad:?}");
        }
        let none = key_of(&TestRequest::default().to_http_request(), "f".into());
        assert_eq!(none.unwrap(), None);
    }

    #[test]
    fn fingerprints_depend_on_name_and_email_only() {
        let a = fingerprint(Some("Ada"), Some("ada@example.com"));
        assert_eq!(a, fingerprint(Some("Ada"), Some("ada@example.com")));
        assert_ne!(a, fingerprint(Some("Ada"), Some("ada@example.org")));
        assert_ne!(a, fingerprint(Some("Ada"), None));
    }
}
