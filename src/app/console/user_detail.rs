//! One user's page, and the stream that keeps its enrichment status live: the page opens
//! an `EventSource` on `/console/users/{uuid}/status`, which sends the status block again
//! (rendered by the same template) each time it changes, and ends once it is final.
//!
//! Edit and delete belong here once `PATCH` and `DELETE /api/users/{uuid}` exist (see
//! `configure`); the template has their place too (`console/user.html`, "Actions").

use std::convert::Infallible;
use std::time::{Duration, Instant};

use actix_web::http::{StatusCode, header};
use actix_web::web::Bytes;
use actix_web::{HttpResponse, web};
use askama::Template;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Console;
use super::pages::{ConsoleError, Layout, render};
use super::session::Viewer;
use crate::app::profile_view::{EnrichmentState, EnrichmentView};
use crate::enrichment::{EnrichedProfile, Enrichment, StoreError};
use crate::users::Users;
use crate::web::identity::Role;

/// How often a status stream looks at the store: a change shows within this (plus a
/// round trip), well inside a second.
const POLL: Duration = Duration::from_millis(250);
/// A stream ends after this; the browser's `EventSource` reconnects by itself.
const STREAM_LIFETIME: Duration = Duration::from_secs(120);
/// A comment line this often keeps proxies from closing a quiet stream.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Longest one look at the store may take.
const LOOK_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/users/{uuid}", web::get().to(detail))
        .route("/users/{uuid}/status", web::get().to(status_stream));
    // Once the lifecycle routes land (PATCH and DELETE /api/users/{uuid}, with ETag and
    // If-Match), register here, each behind `Role::UsersWrite` and the CSRF check:
    //   GET  /users/{uuid}/edit    the form, prefilled, with the user's ETag hidden in it;
    //   POST /users/{uuid}/edit    the update through the users facade; 400/409 beside the
    //                              fields as in `users::create`, 412 as "changed meanwhile";
    //   POST /users/{uuid}/delete  after the confirmation on this page; then to the list.
}

/// The enrichment block of a user's page, as the API's combined view describes it.
pub(super) struct StatusView {
    /// `pending`, `completed` or `failed`.
    pub state: &'static str,
    pub linkedin: Option<String>,
    pub github: Option<String>,
    pub enriched_at: Option<String>,
    pub detail: Option<String>,
    /// The stored error of a failed enrichment: admins only (it is operators' data,
    /// like the dead letters).
    pub error: Option<String>,
}

impl StatusView {
    fn new(profile: Option<EnrichedProfile>, show_error: bool) -> Self {
        let error = profile
            .as_ref()
            .and_then(|p| p.error.clone())
            .filter(|_| show_error);
        let view = EnrichmentView::from(profile);
        Self {
            state: match view.status {
                EnrichmentState::Pending => "pending",
                EnrichmentState::Completed => "completed",
                EnrichmentState::Failed => "failed",
                EnrichmentState::Unavailable => "unavailable",
            },
            linkedin: view.linkedin,
            github: view.github,
            enriched_at: view
                .enriched_at
                .map(|at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
            detail: view.detail,
            error: error.filter(|_| view.status == EnrichmentState::Failed),
        }
    }

    /// Nothing more will happen. A failed enrichment is not final: an admin may replay
    /// its dead letter, and the page shows it turn `completed`.
    pub fn is_final(&self) -> bool {
        self.state == "completed"
    }
}

#[derive(Template)]
#[template(path = "console/status.html")]
struct StatusFragment<'a> {
    status: &'a StatusView,
}

struct UserFacts {
    uuid: String,
    name: String,
    email: String,
    created: String,
    updated: String,
}

#[derive(Template)]
#[template(path = "console/user.html")]
struct UserPage {
    layout: Layout,
    user: UserFacts,
    status: StatusView,
    created: bool,
}

#[derive(Deserialize)]
struct DetailQuery {
    created: Option<String>,
}

fn parse_uuid(raw: &str) -> Result<Uuid, ConsoleError> {
    Uuid::parse_str(raw)
        .map_err(|_| ConsoleError::NotFound("There is no user at this address.".into()))
}

fn store_unavailable(error: StoreError) -> ConsoleError {
    tracing::warn!(%error, "profile store unavailable");
    ConsoleError::Unavailable("The profile store is unavailable; try again shortly.".into())
}

async fn detail(
    viewer: Viewer,
    users: web::Data<Users>,
    enrichment: web::Data<Enrichment>,
    path: web::Path<String>,
    query: web::Query<DetailQuery>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersRead)?;
    let uuid = parse_uuid(&path)?;
    let (user, profile) = tokio::join!(users.find(uuid), enrichment.profile(uuid));
    let user = user?.ok_or_else(|| ConsoleError::NotFound(format!("There is no user {uuid}.")))?;
    let status = StatusView::new(profile.map_err(store_unavailable)?, viewer.has(Role::Admin));
    let format = |at: chrono::DateTime<chrono::Utc>| at.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    Ok(render(
        StatusCode::OK,
        &UserPage {
            layout: Layout::new(user.name.clone(), "users", Some(viewer.signed())),
            user: UserFacts {
                uuid: user.uuid.to_string(),
                created: format(user.created_at),
                updated: format(user.updated_at),
                name: user.name,
                email: user.email,
            },
            status,
            created: query.created.is_some(),
        },
    ))
}

/// A status stream's state between two events.
struct Watch {
    enrichment: web::Data<Enrichment>,
    uuid: Uuid,
    show_error: bool,
    shutdown: CancellationToken,
    started: Instant,
    last_sent: Instant,
    /// The state last sent (`None` before the first event).
    last_state: Option<&'static str>,
    done: bool,
}

impl Watch {
    /// The next chunk of the stream: a status event when the status changed, a
    /// heartbeat now and then; `None` when the stream is over.
    async fn next_chunk(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        loop {
            if self.done || self.started.elapsed() > STREAM_LIFETIME {
                return None;
            }
            if self.last_state.is_some() {
                tokio::select! {
                    () = tokio::time::sleep(POLL) => {}
                    () = self.shutdown.cancelled() => return None,
                }
            }
            let looked =
                tokio::time::timeout(LOOK_TIMEOUT, self.enrichment.profile(self.uuid)).await;
            let Ok(Ok(profile)) = looked else {
                // The store is slow or down: try again at the next tick.
                continue;
            };
            let status = StatusView::new(profile, self.show_error);
            if self.last_state != Some(status.state) {
                let first = self.last_state.is_none();
                self.last_state = Some(status.state);
                self.done = status.is_final();
                self.last_sent = Instant::now();
                return Some((Ok(status_event(&status, first)), self));
            }
            if self.last_sent.elapsed() > HEARTBEAT {
                self.last_sent = Instant::now();
                return Some((Ok(Bytes::from_static(b": still watching\n\n")), self));
            }
        }
    }
}

/// `event: status` with the JSON `{status, final, html}`; the first also asks the
/// browser to reconnect after 2 s if the stream drops.
fn status_event(status: &StatusView, first: bool) -> Bytes {
    let html = StatusFragment { status }.render().unwrap_or_default();
    let data = serde_json::json!({
        "status": status.state,
        "final": status.is_final(),
        "html": html,
    });
    let retry = if first { "retry: 2000\n" } else { "" };
    Bytes::from(format!("{retry}event: status\ndata: {data}\n\n"))
}

async fn status_stream(
    viewer: Viewer,
    console: web::Data<Console>,
    enrichment: web::Data<Enrichment>,
    path: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersRead)?;
    let uuid = parse_uuid(&path)?;
    let watch = Watch {
        enrichment,
        uuid,
        show_error: viewer.has(Role::Admin),
        shutdown: console.inner.shutdown.clone(),
        started: Instant::now(),
        last_sent: Instant::now(),
        last_state: None,
        done: false,
    };
    let stream = futures_util::stream::unfold(watch, Watch::next_chunk);
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(stream))
}
