//! One user's page, and the stream that keeps its enrichment status live: the page opens
//! an `EventSource` on `/console/users/{uuid}/status`, which sends the status block again
//! (rendered by the same template) each time it changes, and ends once it is final or
//! the user is deleted. Editing and deleting are in [`super::user_changes`].

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
use crate::users::{User, Users};
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
/// How often a status stream checks that its user still exists: a deletion ends it
/// within this (a failed or pending status would otherwise be followed forever).
const USER_CHECK: Duration = Duration::from_secs(1);

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/users/{uuid}", web::get().to(detail))
        .route("/users/{uuid}/status", web::get().to(status_stream));
}

/// The enrichment block of a user's page, as the API's combined view describes it.
pub(super) struct StatusView {
    /// `pending`, `completed`, `failed`, `unavailable`, or `deleted` (the user is gone).
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
    /// The enrichment of the user at `version`, as the combined view reports it.
    fn new(profile: Option<EnrichedProfile>, version: u64, show_error: bool) -> Self {
        let error = profile
            .as_ref()
            .and_then(|p| p.error.clone())
            .filter(|_| show_error);
        let view = EnrichmentView::of(profile, version);
        Self {
            state: match view.status {
                EnrichmentState::Pending => "pending",
                EnrichmentState::Completed => "completed",
                EnrichmentState::Failed => "failed",
                EnrichmentState::Unavailable => "unavailable",
            },
            linkedin: view.linkedin,
            github: view.github,
            enriched_at: view.enriched_at.map(format_time),
            detail: view.detail,
            error: error.filter(|_| view.status == EnrichmentState::Failed),
        }
    }

    /// What a status stream sends when the user has been deleted.
    fn deleted() -> Self {
        Self {
            state: "deleted",
            linkedin: None,
            github: None,
            enriched_at: None,
            detail: None,
            error: None,
        }
    }

    /// Nothing more will happen. A failed enrichment is not final: an admin may replay
    /// its dead letter, and the page shows it turn `completed`.
    pub fn is_final(&self) -> bool {
        self.state == "completed" || self.state == "deleted"
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
    updated: bool,
}

#[derive(Deserialize)]
struct DetailQuery {
    created: Option<String>,
    updated: Option<String>,
}

pub(super) fn parse_uuid(raw: &str) -> Result<Uuid, ConsoleError> {
    Uuid::parse_str(raw)
        .map_err(|_| ConsoleError::NotFound("There is no user at this address.".into()))
}

/// The console's 404 for a user that does not exist (or no longer does).
pub(super) fn no_such_user(uuid: Uuid) -> ConsoleError {
    ConsoleError::NotFound(format!("There is no user {uuid}."))
}

/// The user, or the console's 404 page.
pub(super) async fn find_user(users: &Users, uuid: Uuid) -> Result<User, ConsoleError> {
    users.find(uuid).await?.ok_or_else(|| no_such_user(uuid))
}

/// How the console shows an instant.
pub(super) fn format_time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
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
    let (user, profile) = tokio::join!(find_user(&users, uuid), enrichment.profile(uuid));
    let user = user?;
    let status = StatusView::new(
        profile.map_err(store_unavailable)?,
        user.version,
        viewer.has(Role::Admin),
    );
    Ok(render(
        StatusCode::OK,
        &UserPage {
            layout: Layout::new(user.name.clone(), "users", Some(viewer.signed())),
            user: UserFacts {
                uuid: user.uuid.to_string(),
                created: format_time(user.created_at),
                updated: format_time(user.updated_at),
                name: user.name,
                email: user.email,
            },
            status,
            created: query.created.is_some(),
            updated: query.updated.is_some(),
        },
    ))
}

/// A status stream's state between two events.
struct Watch {
    enrichment: web::Data<Enrichment>,
    users: web::Data<Users>,
    uuid: Uuid,
    /// The user's version at the last look: a profile of an earlier one is pending.
    version: u64,
    show_error: bool,
    shutdown: CancellationToken,
    started: Instant,
    last_sent: Instant,
    last_user_check: Instant,
    /// The state last sent (`None` before the first event).
    last_state: Option<&'static str>,
    done: bool,
}

impl Watch {
    /// The next chunk of the stream: a status event when the status changed (or the
    /// user was deleted), a heartbeat now and then; `None` when the stream is over.
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
            if self.last_user_check.elapsed() >= USER_CHECK {
                self.last_user_check = Instant::now();
                let found = tokio::time::timeout(LOOK_TIMEOUT, self.users.find(self.uuid)).await;
                // Only a definite "no such user" ends the stream; a slow or failing look
                // is tried again at the next check.
                match found {
                    Ok(Ok(None)) => {
                        self.done = true;
                        let first = self.last_state.is_none();
                        return Some((Ok(status_event(&StatusView::deleted(), first)), self));
                    }
                    Ok(Ok(Some(user))) => self.version = user.version,
                    _ => {}
                }
            }
            let looked =
                tokio::time::timeout(LOOK_TIMEOUT, self.enrichment.profile(self.uuid)).await;
            let Ok(Ok(profile)) = looked else {
                // The store is slow or down: try again at the next tick.
                continue;
            };
            let status = StatusView::new(profile, self.version, self.show_error);
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
    users: web::Data<Users>,
    enrichment: web::Data<Enrichment>,
    path: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersRead)?;
    let uuid = parse_uuid(&path)?;
    // A deleted user has no stream: a 404 closes the browser's `EventSource` for good
    // (it would reconnect after a stream that merely ended).
    let user = find_user(&users, uuid).await?;
    let watch = Watch {
        enrichment,
        users,
        uuid,
        version: user.version,
        show_error: viewer.has(Role::Admin),
        shutdown: console.inner.shutdown.clone(),
        started: Instant::now(),
        last_sent: Instant::now(),
        last_user_check: Instant::now(),
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
