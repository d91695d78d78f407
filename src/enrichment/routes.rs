//! HTTP routes of the enrichment module (`/users/enriched`).

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{EnrichedProfile, Enrichment, EnrichmentStatus, StoreError};
use crate::web::UuidParam;
use crate::web::conditional::json_content_tagged;
use crate::web::problem::{ApiError, ApiResult, Problem};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/users/enriched/{uuid}").route(web::get().to(get_enriched_profile)));
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(why) => {
                tracing::warn!(%why, "profile store unavailable");
                ApiError::Unavailable("The profile store is unavailable; try again shortly".into())
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

/// An enriched profile, with the handles at the top level as in the reference system.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "uuid": "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d",
    "name": "João Silva",
    "email": "joao.silva+work@example.com",
    "linkedin": "linkedin.com/in/joaosilva",
    "github": "github.com/joaosilva",
    "status": "completed",
    "source_event_id": "01936f0e-8a4d-7000-8000-0123456789ab",
    "enriched_at": "2026-11-29T10:15:30.456Z",
    "updated_at": "2026-11-29T10:15:30.456Z"
}))]
pub struct EnrichedProfileResponse {
    pub uuid: Uuid,
    pub name: String,
    pub email: String,
    pub linkedin: String,
    pub github: String,
    /// Always `completed` here.
    pub status: String,
    /// Id of the event this profile was derived from.
    pub source_event_id: Uuid,
    pub enriched_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl EnrichedProfileResponse {
    /// `None` unless the profile is completed.
    pub fn from_completed(p: EnrichedProfile) -> Option<Self> {
        match (p.status, p.linkedin, p.github, p.enriched_at) {
            (EnrichmentStatus::Completed, Some(linkedin), Some(github), Some(enriched_at)) => {
                Some(Self {
                    uuid: p.uuid,
                    name: p.name,
                    email: p.email,
                    linkedin,
                    github,
                    status: EnrichmentStatus::Completed.as_str().into(),
                    source_event_id: p.source_event_id,
                    enriched_at,
                    updated_at: p.updated_at,
                })
            }
            _ => None,
        }
    }
}

/// Get a user's enriched profile.
///
/// 404 until the `user.created` event has been processed (usually milliseconds after
/// creation), and when enrichment failed; `GET /api/users/{uuid}/profile` tells which.
#[utoipa::path(
    get,
    path = "/users/enriched/{uuid}",
    tag = "enrichment",
    params(
        ("uuid" = uuid::Uuid, Path, description = "The user's uuid"),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` of this representation the client holds"),
    ),
    responses(
        (status = 200, description = "The enriched profile", body = EnrichedProfileResponse,
         headers(("ETag" = String, description = "Changes whenever the profile does"))),
        (status = 304, description = "Not modified since the `ETag` in `If-None-Match`"),
        (status = 400, description = "Malformed uuid", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not (yet) enriched", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_enriched_profile(
    req: HttpRequest,
    enrichment: web::Data<Enrichment>,
    UuidParam(uuid): UuidParam,
) -> ApiResult<HttpResponse> {
    let profile = enrichment
        .profile(uuid)
        .await?
        .and_then(EnrichedProfileResponse::from_completed)
        .ok_or_else(|| ApiError::NotFound(format!("No enriched profile for user {uuid} (yet)")))?;
    json_content_tagged(&req, &profile)
}
