//! Operator routes: dead letters and their replay; re-enrichment.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::bus::{BusError, DeadLetter, EventBus, ReplayFilter};
use crate::users::{Selection, Users};
use crate::web::problem::{ApiError, ApiResult, Problem};
use crate::web::{RequestId, page_size};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/admin/dead-letters").get(list_dead_letters))
        .service(web::resource("/admin/dead-letters/replay").post(replay_dead_letters))
        .service(web::resource("/admin/dead-letters/{id}/replay").post(replay_dead_letter))
        .service(web::resource("/admin/reenrich").post(reenrich));
}

/// A JSON body that must be an object.
type JsonObject = serde_json::Map<String, serde_json::Value>;

/// Reads `T` from a JSON object. Taking the body as an object first refuses arrays,
/// which serde would otherwise read as a struct's fields in order (`[null, null]`).
fn from_object<T: serde::de::DeserializeOwned>(body: JsonObject) -> ApiResult<T> {
    serde_json::from_value(serde_json::Value::Object(body)).map_err(|error| {
        ApiError::BadRequest(format!("The JSON body has the wrong shape: {error}"))
    })
}

/// Users republished per transaction.
const REENRICH_PAGE: u32 = 500;
/// Most uuids one request may name (250 of them fit in the body limit of 16 KiB).
const MAX_REENRICH_UUIDS: usize = 250;

/// Body of `POST /admin/reenrich`: which users, one of three ways.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ReenrichRequest {
    All(ReenrichAll),
    Since(ReenrichSince),
    Uuids(ReenrichUuids),
}

/// Every user (`false` selects none).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"all": true}))]
pub struct ReenrichAll {
    all: bool,
}

/// Users created or changed at or after an instant.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"since": "2026-11-30T00:00:00Z"}))]
pub struct ReenrichSince {
    since: DateTime<Utc>,
}

/// These users (at most 250; unknown ones are skipped).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"uuids": ["01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d"]}))]
pub struct ReenrichUuids {
    #[schema(max_items = 250)]
    uuids: Vec<Uuid>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"queued": 1200}))]
pub struct ReenrichResponse {
    /// Users republished (unknown uuids are skipped).
    queued: u64,
}

/// Re-enrich users.
///
/// Republishes the chosen users as `user.updated` events (header `reason: reenrich`)
/// through the outbox, so enrichment rebuilds their profiles: the profile store is
/// derived data, and a lost one is rebuilt rather than restored. Answers once every
/// event is in the outbox; delivery follows. For millions of users prefer
/// `userhub reenrich --all`, which shows its progress.
#[utoipa::path(
    post,
    path = "/admin/reenrich",
    tag = "admin",
    request_body = ReenrichRequest,
    responses(
        (status = 202, description = "Queued for re-enrichment", body = ReenrichResponse),
        (status = 400, description = "Not one of the three selections, or more than 250 uuids", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reenrich(
    users: web::Data<Users>,
    request_id: RequestId,
    body: web::Json<JsonObject>,
) -> ApiResult<HttpResponse> {
    let selection = match from_object::<ReenrichRequest>(body.into_inner())? {
        ReenrichRequest::All(ReenrichAll { all: true }) => Selection::All,
        ReenrichRequest::All(ReenrichAll { all: false }) => Selection::Some(Vec::new()),
        ReenrichRequest::Since(ReenrichSince { since }) => Selection::Since(since),
        ReenrichRequest::Uuids(ReenrichUuids { uuids }) => {
            if uuids.len() > MAX_REENRICH_UUIDS {
                return Err(ApiError::field(
                    "uuids",
                    format!("must name at most {MAX_REENRICH_UUIDS} users"),
                ));
            }
            Selection::Some(uuids)
        }
    };
    let queued = users
        .republish(&selection, REENRICH_PAGE, request_id.as_str(), |_| {})
        .await?;
    Ok(HttpResponse::Accepted().json(ReenrichResponse { queued }))
}

impl From<BusError> for ApiError {
    fn from(error: BusError) -> Self {
        match error {
            BusError::Unavailable(detail) => {
                tracing::warn!(%detail, "bus unavailable");
                ApiError::Unavailable("The event bus is unavailable; try again shortly".into())
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterParams {
    /// Page size, 1 to 500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The last `id` of the previous page (from the `Link` header); an id this server
    /// did not issue gives an empty page.
    after: Option<String>,
}

/// List dead letters, oldest first.
///
/// Messages given up on after `worker.max_attempts` transient failures, or at once when
/// they cannot be processed. Replayed ones are no longer listed.
#[utoipa::path(
    get,
    path = "/admin/dead-letters",
    tag = "admin",
    params(DeadLetterParams),
    responses(
        (status = 200, description = "One page of dead letters", body = Vec<DeadLetter>,
         headers(("Link" = String, description = "`<url>; rel=\"next\"` when another page may follow"))),
        (status = 400, description = "Invalid query parameter", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The bus is unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_dead_letters(
    bus: web::Data<dyn EventBus>,
    params: web::Query<DeadLetterParams>,
) -> ApiResult<HttpResponse> {
    let limit = page_size(params.limit.as_deref(), DEFAULT_PAGE, MAX_PAGE)
        .map_err(|message| ApiError::field("limit", message))?;
    let page = bus.dead_letters(limit, params.after.as_deref()).await?;
    let mut response = HttpResponse::Ok();
    if page.len() == limit as usize
        && let Some(last) = page.last()
    {
        let qs =
            serde_urlencoded::to_string([("limit", limit.to_string()), ("after", last.id.clone())])
                .map_err(anyhow::Error::from)?;
        response.insert_header((
            header::LINK,
            format!("</admin/dead-letters?{qs}>; rel=\"next\""),
        ));
    }
    Ok(response.json(page))
}

/// Replay a dead letter: put it back on its queue with a fresh attempt count.
#[utoipa::path(
    post,
    path = "/admin/dead-letters/{id}/replay",
    tag = "admin",
    params(("id" = String, Path, description = "The dead letter's `id`")),
    responses(
        (status = 202, description = "Queued again; it will be delivered shortly"),
        (status = 404, description = "No such dead letter (or already replayed)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The bus is unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn replay_dead_letter(
    bus: web::Data<dyn EventBus>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = path.into_inner();
    if bus.replay(&id).await? {
        Ok(HttpResponse::Accepted().json(serde_json::json!({ "replayed": id })))
    } else {
        Err(ApiError::NotFound(format!("No dead letter {id} to replay")))
    }
}

/// How many dead letters a bulk replay queued again.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"replayed": 1200}))]
pub struct BulkReplayResponse {
    replayed: u64,
}

/// Replay dead letters in bulk: every one, or those of a queue, or those whose error
/// contains a text (`{}` takes them all).
///
/// After an outage, or once the bug that killed them is fixed. One pass in the bus
/// (set-based on the in-process bus); each is queued again with a fresh attempt count.
#[utoipa::path(
    post,
    path = "/admin/dead-letters/replay",
    tag = "admin",
    request_body(content = ReplayFilter, example = json!({"queue": "enrichment.users", "error_contains": "timed out"})),
    responses(
        (status = 202, description = "Queued again; they will be delivered shortly", body = BulkReplayResponse),
        (status = 400, description = "Not a filter", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The bus is unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn replay_dead_letters(
    bus: web::Data<dyn EventBus>,
    body: web::Json<JsonObject>,
) -> ApiResult<HttpResponse> {
    let filter: ReplayFilter = from_object(body.into_inner())?;
    let replayed = bus.replay_all(&filter).await?;
    tracing::info!(replayed, ?filter, "dead letters replayed in bulk");
    Ok(HttpResponse::Accepted().json(BulkReplayResponse { replayed }))
}
