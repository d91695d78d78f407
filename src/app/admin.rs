//! Operator routes: dead letters and their replay.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::bus::{BusError, DeadLetter, EventBus};
use crate::web::page_size;
use crate::web::problem::{ApiError, ApiResult, Problem};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/admin/dead-letters").get(list_dead_letters))
        .service(web::resource("/admin/dead-letters/{id}/replay").post(replay_dead_letter));
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
