//! The user list (newest first, keyset pages both ways, search) and the create form,
//! whose field errors are the API's own (`ApiError::problem().errors`).

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;
use uuid::Uuid;

use super::pages::{ConsoleError, Layout, render};
use super::session::{Viewer, flash_removal};
use super::{Console, see_other};
use crate::users::{CreateUserRequest, Created, ListQuery, NewUser, User, Users};
use crate::web::identity::Role;
use crate::web::problem::{ApiError, FieldErrors};
use crate::web::{RequestId, page_size};

/// Users per page unless `limit` says otherwise (1 to 200, like the API).
const PAGE_SIZE: u32 = 25;
const MAX_PAGE_SIZE: u32 = 200;
const MAX_QUERY_CHARS: usize = 255;

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(list))
        .route("/users", web::get().to(|| async { see_other("/console/") }))
        .route("/users", web::post().to(create))
        .route("/users/new", web::get().to(new_form));
}

/// One row of the list.
pub(super) struct UserRow {
    pub uuid: String,
    pub name: String,
    pub email: String,
    pub created: String,
    pub created_iso: String,
}

impl From<User> for UserRow {
    fn from(user: User) -> Self {
        Self {
            uuid: user.uuid.to_string(),
            name: user.name,
            email: user.email,
            created: user.created_at.format("%Y-%m-%d %H:%M UTC").to_string(),
            created_iso: user.created_at.to_rfc3339(),
        }
    }
}

#[derive(Template)]
#[template(path = "console/users.html")]
struct ListPage {
    layout: Layout,
    q: String,
    rows: Vec<UserRow>,
    /// Position of the first row (1-based) and of the last.
    first: usize,
    last: usize,
    newer: Option<String>,
    older: Option<String>,
    /// Anywhere but the first page (so an empty page is "no more", not "none").
    paged: bool,
    can_write: bool,
    /// After a deletion: whom it erased.
    notice: Option<String>,
}

#[derive(Deserialize)]
struct ListParams {
    q: Option<String>,
    /// The last uuid of the page before (older users follow).
    after: Option<String>,
    /// The first uuid of the page after (newer users come before it).
    before: Option<String>,
    limit: Option<String>,
    /// Position of this page's first row, for "Showing 26–50"; carried in the links.
    start: Option<usize>,
    /// Set by the redirect after a deletion (the name is in the flash cookie).
    deleted: Option<String>,
}

async fn list(
    req: HttpRequest,
    viewer: Viewer,
    console: web::Data<Console>,
    users: web::Data<Users>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersRead)?;
    let params = params.into_inner();
    let limit = page_size(params.limit.as_deref(), PAGE_SIZE, MAX_PAGE_SIZE)
        .map_err(|message| ConsoleError::BadRequest(format!("The page size {message}.")))?;
    let q = params.q.as_deref().unwrap_or_default().trim().to_owned();
    if q.chars().count() > MAX_QUERY_CHARS || q.chars().any(char::is_control) {
        return Err(ConsoleError::BadRequest(format!(
            "Search for at most {MAX_QUERY_CHARS} printable characters."
        )));
    }
    let cursor = |raw: Option<&str>| {
        raw.map(Uuid::parse_str)
            .transpose()
            .map_err(|_| ConsoleError::BadRequest("This page link is broken.".into()))
    };
    let (after, before) = (
        cursor(params.after.as_deref())?,
        cursor(params.before.as_deref())?,
    );
    let backwards = before.is_some() && after.is_none();
    // One extra row says whether another page follows, without a COUNT.
    let mut page = users
        .list(&ListQuery {
            limit: limit + 1,
            after,
            before: before.filter(|_| backwards),
            q: Some(q.clone()).filter(|q| !q.is_empty()),
        })
        .await?;
    let more = page.len() > limit as usize;
    let (has_newer, has_older) = if backwards {
        if more {
            page.remove(0);
        }
        (more, true)
    } else {
        page.truncate(limit as usize);
        (after.is_some(), more)
    };
    let first = if has_newer {
        params.start.unwrap_or(1).max(1)
    } else {
        1
    };
    let rows: Vec<UserRow> = page.into_iter().map(UserRow::from).collect();
    let link = |cursor: &str, uuid: &str, start: usize| {
        let mut pairs = vec![(cursor, uuid.to_owned()), ("start", start.to_string())];
        if !q.is_empty() {
            pairs.push(("q", q.clone()));
        }
        if limit != PAGE_SIZE {
            pairs.push(("limit", limit.to_string()));
        }
        format!(
            "/console/?{}",
            serde_urlencoded::to_string(&pairs).unwrap_or_default()
        )
    };
    let newer = rows.first().filter(|_| has_newer).map(|row| {
        let start = first.saturating_sub(limit as usize).max(1);
        link("before", &row.uuid, start)
    });
    let older = rows
        .last()
        .filter(|_| has_older)
        .map(|row| link("after", &row.uuid, first + rows.len()));
    let signed = viewer.signed();
    let title = if q.is_empty() {
        "Users".to_owned()
    } else {
        format!("Users matching “{q}”")
    };
    let flash = console.sessions().flash_of(&req);
    let notice = params.deleted.as_ref().map(|_| {
        flash
            .clone()
            .unwrap_or_else(|| "The user was deleted.".into())
    });
    let mut response = render(
        StatusCode::OK,
        &ListPage {
            layout: Layout::new(title, "users", Some(signed.clone())),
            last: first + rows.len().saturating_sub(1),
            first,
            rows,
            newer,
            older,
            paged: after.is_some() || before.is_some(),
            can_write: signed.can_write,
            notice,
            q,
        },
    );
    if flash.is_some() {
        // Shown once: a reload does not say it again.
        let _ = response.add_cookie(&flash_removal());
    }
    Ok(response)
}

#[derive(Template)]
#[template(path = "console/new_user.html")]
struct NewUserPage {
    layout: Layout,
    csrf: String,
    name: String,
    email: String,
    errors: FieldErrors,
}

impl NewUserPage {
    /// The first message for `field`, if any.
    fn error(&self, field: &str) -> Option<&str> {
        self.errors
            .get(field)
            .and_then(|messages| messages.first())
            .map(String::as_str)
    }
}

fn form_page(viewer: &Viewer, name: String, email: String, errors: FieldErrors) -> NewUserPage {
    let title = if errors.is_empty() {
        "New user"
    } else {
        "New user (errors)"
    };
    NewUserPage {
        layout: Layout::new(title, "new-user", Some(viewer.signed())),
        csrf: viewer.csrf.clone(),
        name,
        email,
        errors,
    }
}

async fn new_form(viewer: Viewer) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersWrite)?;
    Ok(render(
        StatusCode::OK,
        &form_page(&viewer, String::new(), String::new(), FieldErrors::new()),
    ))
}

#[derive(Deserialize)]
struct CreateForm {
    csrf: String,
    name: String,
    email: String,
}

/// Registers the user exactly as `POST /api/users` does; a 400 or 409 of the API comes
/// back as the same form, with what was typed and the API's messages beside the fields.
async fn create(
    viewer: Viewer,
    users: web::Data<Users>,
    request_id: RequestId,
    form: web::Form<CreateForm>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersWrite)?;
    let form = form.into_inner();
    viewer.check_csrf(&form.csrf)?;
    let request = CreateUserRequest {
        name: Some(form.name.clone()),
        email: Some(form.email.clone()),
    };
    let registered = match NewUser::try_from(request) {
        Ok(new_user) => users
            .register(new_user, request_id.as_str(), None)
            .await
            .map(Created::into_user)
            .map_err(ApiError::from),
        Err(error) => Err(error),
    };
    match registered {
        Ok(user) => {
            tracing::info!(user = %user.uuid, subject = %viewer.principal.subject, "console created a user");
            Ok(see_other(&format!(
                "/console/users/{}?created=1",
                user.uuid
            )))
        }
        Err(error @ (ApiError::Validation(_) | ApiError::Conflict { .. })) => {
            let problem = error.problem();
            let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::BAD_REQUEST);
            let errors = problem.errors.unwrap_or_default();
            Ok(render(
                status,
                &form_page(&viewer, form.name, form.email, errors),
            ))
        }
        Err(other) => Err(other.into()),
    }
}
