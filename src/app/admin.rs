//! Operator routes: dead letters and their replay; re-enrichment.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::bus::{BusError, DeadLetter, EventBus};
use crate::users::{Selection, Users};
use crate::web::problem::{ApiError, ApiResult, Problem};
use crate::web::{RequestId, page_size};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/admin/dead-letters").get(list_dead_letters))
        .service(web::resource("/admin/dead-letters/{id}/replay").post(replay_dead_letter))
        .service(web::resource("/admin/reenrich").post(reenrich));
}

/// Users republished per transaction.
const REENRICH_PAGE: u32 = 500;
/// Most uuids one request may name.
const MAX_REENRICH_UUIDS: usize = 1000;

/// Body of `POST /admin/reenrich`: exactly one of the three.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"since": "2026-11-30T00:00:00Z"}))]
pub struct ReenrichRequest {
    /// Every user.
    #[serde(default)]
    all: bool,
    /// Users created or changed at or after this instant.
    since: Option<DateTime<Utc>>,
    /// These users (at most 1,000).
    #[schema(max_items = 1000)]
    uuids: Option<Vec<Uuid>>,
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
        (status = 400, description = "Not exactly one of `all`, `since`, `uuids`, or too many uuids", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reenrich(
    users: web::Data<Users>,
    request_id: RequestId,
    body: web::Json<ReenrichRequest>,
) -> ApiResult<HttpResponse> {
    let selection = match body.into_inner() {
        ReenrichRequest {
            all: true,
            since: None,
            uuids: None,
        } => Selection::All,
        ReenrichRequest {
            all: false,
            since: Some(since),
            uuids: None,
        } => Selection::Since(since),
        ReenrichRequest {
            all: false,
            since: None,
            uuids: Some(uuids),
        } => {
            if uuids.len() > MAX_REENRICH_UUIDS {
                return Err(ApiError::field(
                    "uuids",
                    format!("must name at most {MAX_REENRICH_UUIDS} users"),
                ));
            }
            Selection::Some(uuids)
        }
        _ => {
            return Err(ApiError::BadRequest(
                "Send exactly one of: \"all\": true, \"since\": <instant>, \"uuids\": [...]".into(),
            ));
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
    /// The last `id` of the previous page (from the `Link` header).
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
    let page = bus
        .dead_letters(limit, params.after.as_deref())
        .await
        .map_err(|e| match e {
            BusError::Corrupt(_) => ApiError::field("after", "is not a dead-letter id"),
            other => other.into(),
        })?;
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
