//! Dead letters (admin): the list, oldest first, and their replay after a confirmation,
//! through the same bus port as `GET /admin/dead-letters` and
//! `POST /admin/dead-letters/{id}/replay`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::pages::{ConsoleError, Layout, render};
use super::see_other;
use super::session::Viewer;
use crate::bus::{BusError, DeadLetter, EventBus};
use crate::web::identity::Role;
use crate::web::problem::ApiError;

const PAGE_SIZE: u32 = 25;

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/dead-letters", web::get().to(list))
        .route("/dead-letters/{id}/replay", web::post().to(replay));
}

pub(super) struct Row {
    pub id: String,
    pub queue: String,
    pub routing_key: String,
    pub message_id: String,
    pub attempts: u32,
    pub error: String,
    pub payload: String,
    pub dead_at: String,
    pub dead_at_iso: String,
}

impl From<DeadLetter> for Row {
    fn from(letter: DeadLetter) -> Self {
        Self {
            id: letter.id,
            queue: letter.queue,
            routing_key: letter.routing_key,
            message_id: letter.message_id.to_string(),
            attempts: letter.attempts,
            error: letter.error,
            payload: letter.payload,
            dead_at: letter.dead_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            dead_at_iso: letter.dead_at.to_rfc3339(),
        }
    }
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
struct ListPage {
    layout: Layout,
    csrf: String,
    rows: Vec<Row>,
    /// Set after a replay: what became of it.
    notice: Option<String>,
    next: Option<String>,
    paged: bool,
}

#[derive(Deserialize)]
struct ListParams {
    after: Option<String>,
    replayed: Option<String>,
    gone: Option<String>,
}

fn bus_error(error: BusError) -> ConsoleError {
    match error {
        BusError::Corrupt(_) => ConsoleError::BadRequest("This page link is broken.".into()),
        other => ApiError::from(other).into(),
    }
}

async fn list(
    viewer: Viewer,
    bus: web::Data<dyn EventBus>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::Admin)?;
    let params = params.into_inner();
    let mut page = bus
        .dead_letters(PAGE_SIZE + 1, params.after.as_deref())
        .await
        .map_err(bus_error)?;
    let more = page.len() > PAGE_SIZE as usize;
    page.truncate(PAGE_SIZE as usize);
    let next = page.last().filter(|_| more).map(|last| {
        let query = serde_urlencoded::to_string([("after", &last.id)]).unwrap_or_default();
        format!("/console/dead-letters?{query}")
    });
    let notice = match (&params.replayed, &params.gone) {
        (Some(id), _) => Some(format!(
            "Dead letter {id} is back on its queue with a fresh attempt count."
        )),
        (None, Some(id)) => Some(format!(
            "Dead letter {id} was not replayed: it is unknown or was replayed already."
        )),
        (None, None) => None,
    };
    let signed = viewer.signed();
    Ok(render(
        StatusCode::OK,
        &ListPage {
            layout: Layout::new("Dead letters", "dead-letters", Some(signed.clone())),
            csrf: signed.csrf,
            rows: page.into_iter().map(Row::from).collect(),
            notice,
            next,
            paged: params.after.is_some(),
        },
    ))
}

#[derive(Deserialize)]
struct ReplayForm {
    csrf: String,
}

async fn replay(
    viewer: Viewer,
    bus: web::Data<dyn EventBus>,
    path: web::Path<String>,
    form: web::Form<ReplayForm>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::Admin)?;
    viewer.check_csrf(&form.csrf)?;
    let id = path.into_inner();
    let replayed = bus.replay(&id).await.map_err(bus_error)?;
    tracing::info!(dead_letter = %id, replayed, subject = %viewer.principal.subject, "console replay");
    let key = if replayed { "replayed" } else { "gone" };
    let query = serde_urlencoded::to_string([(key, &id)]).unwrap_or_default();
    Ok(see_other(&format!("/console/dead-letters?{query}")))
}
