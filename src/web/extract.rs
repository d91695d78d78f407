//! Shared request parsing: the `{uuid}` path segment and the `limit` page size.

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest};
use uuid::Uuid;

use super::problem::{ApiError, ApiResult};

/// The `{uuid}` segment of the matched route, parsed; a malformed one is a 400
/// problem. The nil uuid is well-formed (it is simply not found).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UuidParam(pub Uuid);

impl FromRequest for UuidParam {
    type Error = ApiError;
    type Future = Ready<ApiResult<Self>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(parse_uuid(req.match_info().get("uuid").unwrap_or_default()).map(Self))
    }
}

/// Parses a uuid path segment.
pub fn parse_uuid(raw: &str) -> ApiResult<Uuid> {
    Uuid::try_parse(raw)
        .map_err(|_| ApiError::BadRequest("The uuid in the path is malformed".into()))
}

/// Parses an optional `limit` query parameter: `default` when absent, else a whole
/// number in `1..=max`; the error is the field message.
pub fn page_size(raw: Option<&str>, default: u32, max: u32) -> Result<u32, String> {
    match raw.map(str::parse::<u32>) {
        None => Ok(default),
        Some(Ok(n)) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(format!("must be a whole number from 1 to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_and_stay_in_range() {
        assert_eq!(page_size(None, 50, 200), Ok(50));
        assert_eq!(page_size(Some("1"), 50, 200), Ok(1));
        assert_eq!(page_size(Some("200"), 50, 200), Ok(200));
        for bad in ["0", "201", "-1", "ten", ""] {
            assert!(page_size(Some(bad), 50, 200).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_nil_uuid_is_well_formed_and_junk_is_not() {
        assert_eq!(
            parse_uuid("00000000-0000-0000-0000-000000000000").unwrap(),
            Uuid::nil()
        );
        assert!(parse_uuid("else").is_err());
    }
}
