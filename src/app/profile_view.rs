//! The combined view a UI needs: a user plus the state of its enrichment, composed from
//! the users and enrichment read APIs (neither module knows the other).

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::enrichment::{EnrichedProfile, Enrichment, EnrichmentStatus};
use crate::users::Users;
use crate::web::UuidParam;
use crate::web::conditional::json_content_tagged;
use crate::web::problem::{ApiError, ApiResult, Problem};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/users/{uuid}/profile").route(web::get().to(get_user_profile)));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EnrichmentState {
    /// The event is on its way or being retried.
    Pending,
    Completed,
    /// Given up on after retries; an operator can replay the dead letter.
    Failed,
    /// The profile store cannot be reached right now; ask again shortly.
    Unavailable,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EnrichmentView {
    pub status: EnrichmentState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linkedin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub github: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enriched_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl EnrichmentView {
    fn unavailable() -> Self {
        Self {
            status: EnrichmentState::Unavailable,
            linkedin: None,
            github: None,
            enriched_at: None,
            detail: Some("The profile store is unavailable; try again shortly".into()),
        }
    }
}

impl EnrichmentView {
    /// The enrichment of the user at `version`. A profile of an earlier version (the
    /// user changed since) is no answer yet: its change is on its way to enrichment.
    pub(crate) fn of(profile: Option<EnrichedProfile>, version: u64) -> Self {
        let pending = Self {
            status: EnrichmentState::Pending,
            linkedin: None,
            github: None,
            enriched_at: None,
            detail: None,
        };
        match profile {
            None => pending,
            Some(p) if p.version < version => pending,
            Some(p) if p.status == EnrichmentStatus::Completed => Self {
                status: EnrichmentState::Completed,
                linkedin: p.linkedin,
                github: p.github,
                enriched_at: p.enriched_at,
                ..pending
            },
            // The stored error is for operators (dead letters), not for clients.
            Some(_) => Self {
                status: EnrichmentState::Failed,
                detail: Some("Enrichment failed after retries; it can be replayed".into()),
                ..pending
            },
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "uuid": "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d",
    "name": "João Silva",
    "email": "joao.silva+work@example.com",
    "created_at": "2026-11-29T10:15:30.123Z",
    "updated_at": "2026-11-29T10:15:30.123Z",
    "enrichment": {
        "status": "completed",
        "linkedin": "linkedin.com/in/joaosilva",
        "github": "github.com/joaosilva",
        "enriched_at": "2026-11-29T10:15:30.456Z"
    }
}))]
pub struct UserProfileResponse {
    pub uuid: Uuid,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub enrichment: EnrichmentView,
}

/// Get a user with the state of its enrichment (`pending`, `completed`, `failed`,
/// `unavailable`).
#[utoipa::path(
    get,
    path = "/api/users/{uuid}/profile",
    tag = "users",
    params(
        ("uuid" = uuid::Uuid, Path, description = "The user's uuid"),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` of this representation the client holds"),
    ),
    responses(
        (status = 200, description = "The user and its enrichment (`unavailable` while the profile store cannot be reached)", body = UserProfileResponse,
         headers(("ETag" = String, description = "Changes whenever the answer does"))),
        (status = 304, description = "Not modified since the `ETag` in `If-None-Match`"),
        (status = 400, description = "Malformed uuid", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_user_profile(
    req: HttpRequest,
    users: web::Data<Users>,
    enrichment: web::Data<Enrichment>,
    UuidParam(uuid): UuidParam,
) -> ApiResult<HttpResponse> {
    let (user, profile) = tokio::join!(users.find(uuid), enrichment.profile(uuid));
    let user = user?.ok_or_else(|| ApiError::NotFound(format!("No user with uuid {uuid}")))?;
    // The user is what this answer is about; a profile store that cannot answer makes
    // its part unknown, not the whole answer an error.
    let enrichment = profile.map_or_else(
        |error| {
            tracing::warn!(user = %uuid, %error, "profile store unavailable; answering without it");
            EnrichmentView::unavailable()
        },
        |profile| EnrichmentView::of(profile, user.version),
    );
    json_content_tagged(
        &req,
        &UserProfileResponse {
            uuid: user.uuid,
            name: user.name,
            email: user.email,
            created_at: user.created_at,
            updated_at: user.updated_at,
            enrichment,
        },
    )
}
