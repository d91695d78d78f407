//! Conditional requests (RFC 9110 §13): `ETag` on representations, `If-None-Match`
//! answered with 304, and `If-Match` read for the changes it guards (412 when stale,
//! 428 when required and missing).

use actix_web::body::MessageBody;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, EntityTag, Header, HeaderValue, IfMatch, IfNoneMatch};
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::problem::{ApiError, ApiResult};

/// `http.*`: whether changes must say which version they apply to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Preconditions {
    /// `PATCH`/`DELETE` without `If-Match` are refused with 428.
    pub require_if_match: bool,
}

/// A strong entity tag from a version number: `"3"`.
pub fn version_tag(version: u64) -> EntityTag {
    EntityTag::new_strong(version.to_string())
}

/// A strong entity tag from the bytes of a representation (its SHA-256, shortened):
/// for representations composed from several sources, which no single version names.
pub fn content_tag(body: &[u8]) -> EntityTag {
    let digest = Sha256::digest(body);
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    EntityTag::new_strong(hex)
}

/// True when the request's `If-None-Match` matches `tag` (weak comparison; `*`
/// matches any current representation).
fn none_match_fails(req: &HttpRequest, tag: &EntityTag) -> bool {
    match req.get_header::<IfNoneMatch>() {
        Some(IfNoneMatch::Any) => true,
        Some(IfNoneMatch::Items(tags)) => tags.iter().any(|t| t.weak_eq(tag)),
        None => false,
    }
}

/// `304 Not Modified`, with the `ETag` the client already holds.
fn not_modified(tag: EntityTag) -> HttpResponse {
    let mut response = HttpResponse::new(StatusCode::NOT_MODIFIED);
    response
        .headers_mut()
        .insert(header::ETAG, etag_value(&tag));
    response
}

/// `Content-Type: application/json`, checked once rather than on every answer.
static JSON: HeaderValue = HeaderValue::from_static("application/json");

/// `200` with a body already serialized as JSON and `tag` as its `ETag`. The headers
/// are written as values: the builder's typed headers go through `Display` and check
/// each byte again (834 of a cached `GET`'s 42,714 instructions; README,
/// "Performance").
fn tagged_json_response(tag: &EntityTag, body: impl MessageBody + 'static) -> HttpResponse {
    let mut response = HttpResponse::with_body(StatusCode::OK, body).map_into_boxed_body();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag_value(tag));
    headers.insert(header::CONTENT_TYPE, JSON.clone());
    response
}

/// The `ETag` header's value for `tag`: `"3"`, or `W/"3"` when weak (RFC 9110 §8.8.3).
fn etag_value(tag: &EntityTag) -> HeaderValue {
    let mut value = String::with_capacity(tag.tag().len() + 4);
    if tag.weak {
        value.push_str("W/");
    }
    value.push('"');
    value.push_str(tag.tag());
    value.push('"');
    HeaderValue::try_from(value).expect("EntityTag::new admits only etagc characters")
}

/// `200` with `body` as JSON and `tag` as its `ETag`, or `304 Not Modified` when the
/// client's `If-None-Match` already holds it.
pub fn json_tagged<T: Serialize>(req: &HttpRequest, tag: EntityTag, body: &T) -> HttpResponse {
    if none_match_fails(req, &tag) {
        return not_modified(tag);
    }
    HttpResponse::Ok()
        .insert_header((header::ETAG, etag_value(&tag)))
        .json(body)
}

/// Like [`json_tagged`], for a body already serialized as JSON.
pub fn json_body_tagged(req: &HttpRequest, tag: EntityTag, body: String) -> HttpResponse {
    if none_match_fails(req, &tag) {
        return not_modified(tag);
    }
    tagged_json_response(&tag, body)
}

/// Like [`json_tagged`], the tag taken from the serialized body itself.
pub fn json_content_tagged<T: Serialize>(req: &HttpRequest, body: &T) -> ApiResult<HttpResponse> {
    let bytes = serde_json::to_vec(body).map_err(anyhow::Error::from)?;
    let tag = content_tag(&bytes);
    if none_match_fails(req, &tag) {
        return Ok(not_modified(tag));
    }
    Ok(tagged_json_response(&tag, bytes))
}

/// What a change's `If-Match` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// No `If-Match`: apply to whatever is current.
    None,
    /// `If-Match: *`: apply if the resource exists.
    Exists,
    /// Apply only if the current representation has one of these strong tags (weak
    /// tags never match an `If-Match`).
    OneOf(Vec<String>),
}

/// Reads the `If-Match` of a change: 428 when `policy` requires one and it is missing.
/// What is not an entity tag in it matches nothing (so the change gets 412).
pub fn if_match(req: &HttpRequest, policy: &Preconditions) -> ApiResult<Precondition> {
    if !req.headers().contains_key(header::IF_MATCH) {
        if policy.require_if_match {
            return Err(ApiError::PreconditionRequired(
                "This request must say which version it changes: send If-Match with the \
                 ETag of the representation you read"
                    .into(),
            ));
        }
        return Ok(Precondition::None);
    }
    match IfMatch::parse(req) {
        Ok(IfMatch::Any) => Ok(Precondition::Exists),
        Ok(IfMatch::Items(tags)) => Ok(Precondition::OneOf(
            tags.into_iter()
                .filter(|tag| !tag.weak)
                .map(|tag| tag.tag().to_owned())
                .collect(),
        )),
        Err(_) => Err(ApiError::BadRequest(
            "If-Match must be * or a list of entity tags".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn precondition(value: Option<&str>, required: bool) -> ApiResult<Precondition> {
        let mut req = TestRequest::default();
        if let Some(value) = value {
            req = req.insert_header((header::IF_MATCH, value));
        }
        if_match(
            &req.to_http_request(),
            &Preconditions {
                require_if_match: required,
            },
        )
    }

    #[test]
    fn if_match_is_read_with_strong_comparison() {
        assert_eq!(precondition(None, false).unwrap(), Precondition::None);
        assert_eq!(
            precondition(Some("*"), false).unwrap(),
            Precondition::Exists
        );
        assert_eq!(
            precondition(Some(r#""3", W/"4", "5""#), false).unwrap(),
            Precondition::OneOf(vec!["3".into(), "5".into()])
        );
        assert!(matches!(
            precondition(None, true),
            Err(ApiError::PreconditionRequired(_))
        ));
        // A tag that is not one (unquoted) matches nothing: the change is refused.
        assert_eq!(
            precondition(Some("3"), false).unwrap(),
            Precondition::OneOf(Vec::new())
        );
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let tag = version_tag(3);
        for (value, matches) in [
            (r#""3""#, true),
            (r#"W/"3""#, true),
            (r#""2", "3""#, true),
            ("*", true),
            (r#""4""#, false),
        ] {
            let req = TestRequest::default()
                .insert_header((header::IF_NONE_MATCH, value))
                .to_http_request();
            assert_eq!(none_match_fails(&req, &tag), matches, "{value}");
        }
    }

    #[test]
    fn content_tags_follow_the_bytes() {
        assert_eq!(content_tag(b"a"), content_tag(b"a"));
        assert_ne!(content_tag(b"a"), content_tag(b"b"));
        assert!(!content_tag(b"a").weak);
    }

    #[test]
    fn etag_values_read_as_the_typed_header_writes_them() {
        for tag in [
            version_tag(3),
            EntityTag::new_weak("4".into()),
            content_tag(b"a"),
        ] {
            assert_eq!(
                etag_value(&tag),
                header::ETag(tag.clone()).to_string(),
                "{tag}"
            );
        }
    }

    #[test]
    fn tagged_json_answers_200_with_the_tag_or_304_when_the_client_holds_it() {
        let fresh = TestRequest::default().to_http_request();
        let response = json_body_tagged(&fresh, version_tag(3), r#"{"a":1}"#.to_owned());
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers().get(header::ETAG).unwrap(), r#""3""#);
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE).unwrap(),
            "application/json"
        );
        let holding = TestRequest::default()
            .insert_header((header::IF_NONE_MATCH, r#""3""#))
            .to_http_request();
        let response = json_body_tagged(&holding, version_tag(3), r#"{"a":1}"#.to_owned());
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(response.headers().get(header::ETAG).unwrap(), r#""3""#);
    }
}
