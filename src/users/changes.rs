//! HTTP routes that change a user: `PATCH` (JSON merge patch) and `DELETE`, both
//! guarded by `If-Match` when the client sends it (or when `http.require_if_match`).

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::routes::{UserResponse, not_found};
use super::{ChangeUserError, Email, Expected, UserName, UserPatch, Users};
use crate::web::conditional::{self, Precondition, Preconditions, json_tagged, version_tag};
use crate::web::problem::{ApiError, ApiResult, FieldErrors, Problem};
use crate::web::{RequestId, UuidParam};

/// Body of `PATCH /api/users/{uuid}`: a JSON merge patch (RFC 7396) of the fields to
/// change. Absent fields are left alone; neither field can be removed (`null`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the body is read as a JSON object, to tell `null` from absent
#[schema(example = json!({"email": "joao.silva@example.org"}))]
pub struct PatchUserRequest {
    /// 3 to 100 characters once trimmed, no control characters. Cannot be removed
    /// (`null`).
    #[schema(value_type = String, required = false)]
    name: Option<String>,
    /// A valid address of at most 255 characters; unique, ignoring case. Cannot be
    /// removed (`null`).
    #[schema(value_type = String, required = false, format = Email, max_length = 255)]
    email: Option<String>,
}

/// Reads a merge patch: an object whose members are fields of a user.
fn parse_patch(body: Value) -> ApiResult<UserPatch> {
    let Value::Object(members) = body else {
        return Err(ApiError::BadRequest(
            "A merge patch is a JSON object of the fields to change".into(),
        ));
    };
    let mut errors = FieldErrors::new();
    let name = field(&mut errors, &members, "name", UserName::parse);
    let email = field(&mut errors, &members, "email", Email::parse);
    for unknown in members.keys().filter(|k| *k != "name" && *k != "email") {
        errors.insert(unknown.clone(), vec!["is not a field of a user".into()]);
    }
    if errors.is_empty() {
        Ok(UserPatch { name, email })
    } else {
        Err(ApiError::Validation(errors))
    }
}

fn field<T>(
    errors: &mut FieldErrors,
    members: &Map<String, Value>,
    name: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    let result = match members.get(name)? {
        Value::String(text) => parse(text),
        Value::Null => Err("cannot be removed".to_owned()),
        _ => Err("must be a string".to_owned()),
    };
    result
        .map_err(|message| errors.insert(name.to_owned(), vec![message]))
        .ok()
}

/// The versions an `If-Match` allows: entity tags are versions (see `GET`).
fn expected(precondition: Precondition) -> Expected {
    match precondition {
        Precondition::None | Precondition::Exists => Expected::Any,
        Precondition::OneOf(tags) => {
            Expected::OneOf(tags.iter().filter_map(|tag| tag.parse().ok()).collect())
        }
    }
}

fn change_error(uuid: uuid::Uuid, error: ChangeUserError) -> ApiError {
    match error {
        ChangeUserError::NotFound => not_found(uuid),
        ChangeUserError::VersionMismatch { current } => ApiError::PreconditionFailed(format!(
            "The user has changed: its current ETag is \"{current}\"; read it again and \
             send that in If-Match"
        )),
        ChangeUserError::EmailTaken => ApiError::Conflict {
            field: "email",
            detail: "The email has already been taken.".into(),
        },
        ChangeUserError::Storage(e) => e.into(),
    }
}

/// Change a user.
///
/// A JSON merge patch of `name` and/or `email`, validated like a create. In the same
/// transaction it writes a `user.updated` event, and enrichment re-derives the profile.
/// A patch that changes nothing answers the user unchanged (same `ETag`, no event).
#[utoipa::path(
    patch,
    path = "/api/users/{uuid}",
    tag = "users",
    params(
        ("uuid" = uuid::Uuid, Path, description = "The user's uuid"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` of the version this change applies to (or `*`)"),
    ),
    request_body(content = PatchUserRequest, content_type = "application/merge-patch+json"),
    responses(
        (status = 200, description = "The user as changed", body = UserResponse,
         headers(("ETag" = String, description = "The new version"))),
        (status = 400, description = "Invalid input, with per-field `errors`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The e-mail address is taken (ignoring case)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`If-Match` names no current version", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "`If-Match` is required (`http.require_if_match`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn patch_user(
    req: HttpRequest,
    users: web::Data<Users>,
    preconditions: web::Data<Preconditions>,
    request_id: RequestId,
    UuidParam(uuid): UuidParam,
    body: web::Json<Value>,
) -> ApiResult<HttpResponse> {
    let precondition = conditional::if_match(&req, &preconditions)?;
    let patch = parse_patch(body.into_inner())?;
    let user = users
        .update(uuid, &patch, &expected(precondition), request_id.as_str())
        .await
        .map_err(|e| change_error(uuid, e))?;
    let tag = version_tag(user.version);
    Ok(json_tagged(&req, tag, &UserResponse::from(user)))
}

/// Delete a user, and erase it.
///
/// In the same transaction it writes a `user.deleted` event; enrichment then erases the
/// profile, and no store keeps the user's name or e-mail: not the database, the
/// outbox, the dead letters, the profile store nor the caches. The e-mail address can
/// register again at once.
#[utoipa::path(
    delete,
    path = "/api/users/{uuid}",
    tag = "users",
    params(
        ("uuid" = uuid::Uuid, Path, description = "The user's uuid"),
        ("If-Match" = Option<String>, Header, description = "The `ETag` of the version this deletion applies to (or `*`)"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed uuid", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`If-Match` names no current version", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "`If-Match` is required (`http.require_if_match`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_user(
    req: HttpRequest,
    users: web::Data<Users>,
    preconditions: web::Data<Preconditions>,
    request_id: RequestId,
    UuidParam(uuid): UuidParam,
) -> ApiResult<HttpResponse> {
    let precondition = conditional::if_match(&req, &preconditions)?;
    users
        .delete(uuid, &expected(precondition), request_id.as_str())
        .await
        .map_err(|e| change_error(uuid, e))?;
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_merge_patch_sets_fields_and_refuses_removals_and_strangers() {
        let patch = parse_patch(json!({"name": " Ada "})).unwrap();
        assert_eq!(patch.name.unwrap().as_str(), "Ada");
        assert!(patch.email.is_none());
        let Err(ApiError::Validation(errors)) =
            parse_patch(json!({"name": null, "email": 3, "role": "admin"}))
        else {
            panic!("invalid patch accepted");
        };
        assert_eq!(errors["name"], ["cannot be removed"]);
        assert_eq!(errors["email"], ["must be a string"]);
        assert_eq!(errors["role"], ["is not a field of a user"]);
        assert!(matches!(
            parse_patch(json!([])),
            Err(ApiError::BadRequest(_))
        ));
        let empty = parse_patch(json!({})).unwrap();
        assert!(empty.name.is_none() && empty.email.is_none());
    }

    #[test]
    fn if_match_tags_are_versions() {
        assert_eq!(expected(Precondition::None), Expected::Any);
        assert_eq!(expected(Precondition::Exists), Expected::Any);
        assert_eq!(
            expected(Precondition::OneOf(vec!["2".into(), "x".into()])),
            Expected::OneOf(vec![2])
        );
    }
}
