//! Changing and deleting one user: the edit form and the delete confirmation. Both go
//! through the users facade as `PATCH` and `DELETE /api/users/{uuid}` with `If-Match` do:
//! the version the page showed travels in a hidden field and is the only one the change
//! may apply to, so a change made meanwhile is refused (412) instead of overwritten.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use askama::Template;
use serde::Deserialize;
use uuid::Uuid;

use super::Console;
use super::pages::{ConsoleError, Layout, render};
use super::see_other;
use super::session::Viewer;
use super::user_detail::{find_user, format_time, no_such_user, parse_uuid};
use crate::users::{
    ChangeUserError, CreateUserError, CreateUserRequest, Expected, NewUser, User, UserPatch, Users,
};
use crate::web::RequestId;
use crate::web::identity::Role;
use crate::web::problem::{ApiError, FieldErrors};

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/users/{uuid}/edit", web::get().to(edit_form))
        .route("/users/{uuid}/edit", web::post().to(edit))
        .route("/users/{uuid}/delete", web::get().to(delete_confirmation))
        .route("/users/{uuid}/delete", web::post().to(delete));
}

/// The user as stored, as the pages show it.
struct Stored {
    uuid: String,
    name: String,
    email: String,
    updated: String,
    version: u64,
}

impl From<User> for Stored {
    fn from(user: User) -> Self {
        Self {
            uuid: user.uuid.to_string(),
            updated: format_time(user.updated_at),
            name: user.name,
            email: user.email,
            version: user.version,
        }
    }
}

#[derive(Template)]
#[template(path = "console/edit_user.html")]
struct EditPage {
    layout: Layout,
    csrf: String,
    /// The version the form changes (`version` goes back in the hidden field).
    user: Stored,
    /// What the fields hold: the stored values, or what was typed.
    name: String,
    email: String,
    errors: FieldErrors,
    /// The form was sent for an older version: `user` is the current one now, and the
    /// fields keep what was typed.
    changed: bool,
}

impl EditPage {
    fn new(viewer: &Viewer, user: Stored, typed: Option<(String, String)>) -> Self {
        let (name, email) = typed.unwrap_or_else(|| (user.name.clone(), user.email.clone()));
        Self {
            layout: Layout::new(
                format!("Edit {}", user.name),
                "users",
                Some(viewer.signed()),
            ),
            csrf: viewer.csrf.clone(),
            user,
            name,
            email,
            errors: FieldErrors::new(),
            changed: false,
        }
    }

    fn with_errors(mut self, errors: FieldErrors) -> Self {
        self.layout.title.push_str(" (errors)");
        self.errors = errors;
        self
    }

    fn changed_meanwhile(mut self) -> Self {
        self.layout.title.push_str(" (changed meanwhile)");
        self.changed = true;
        self
    }

    /// The first message for `field`, if any.
    fn error(&self, field: &str) -> Option<&str> {
        self.errors
            .get(field)
            .and_then(|messages| messages.first())
            .map(String::as_str)
    }
}

#[derive(Template)]
#[template(path = "console/delete_user.html")]
struct DeletePage {
    layout: Layout,
    csrf: String,
    user: Stored,
    /// The confirmation was sent for an older version; `user` is the current one.
    changed: bool,
}

impl DeletePage {
    fn new(viewer: &Viewer, user: Stored, changed: bool) -> Self {
        Self {
            layout: Layout::new(
                format!("Delete {}?", user.name),
                "users",
                Some(viewer.signed()),
            ),
            csrf: viewer.csrf.clone(),
            user,
            changed,
        }
    }
}

/// The version a form was read at (its hidden field).
fn parse_version(raw: &str) -> Result<u64, ConsoleError> {
    raw.parse().map_err(|_| {
        ConsoleError::BadRequest(
            "This form is incomplete; nothing was changed. Reload the page and try again.".into(),
        )
    })
}

async fn edit_form(
    viewer: Viewer,
    users: web::Data<Users>,
    path: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersWrite)?;
    let user = find_user(&users, parse_uuid(&path)?).await?;
    Ok(render(
        StatusCode::OK,
        &EditPage::new(&viewer, user.into(), None),
    ))
}

#[derive(Deserialize)]
struct EditForm {
    csrf: String,
    version: String,
    name: String,
    email: String,
}

/// Changes the user as `PATCH /api/users/{uuid}` with `If-Match: "<version>"` would. A
/// 400 or 409 comes back as the same form, with what was typed and the API's messages
/// beside the fields; a 412 as the form for the current version, still holding what
/// was typed.
async fn edit(
    viewer: Viewer,
    users: web::Data<Users>,
    request_id: RequestId,
    path: web::Path<String>,
    form: web::Form<EditForm>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersWrite)?;
    let uuid = parse_uuid(&path)?;
    let form = form.into_inner();
    viewer.check_csrf(&form.csrf)?;
    let version = parse_version(&form.version)?;
    let typed = (form.name.clone(), form.email.clone());
    // A patch is validated like a create, and the form sends both fields: the create's
    // rules, with its messages, are the patch's.
    let request = CreateUserRequest {
        name: Some(form.name),
        email: Some(form.email),
    };
    let patch = match NewUser::try_from(request) {
        Ok(user) => UserPatch {
            name: Some(user.name),
            email: Some(user.email),
        },
        Err(error) => return refused_form(&viewer, &users, uuid, version, typed, &error).await,
    };
    let expected = Expected::OneOf(vec![version]);
    match users
        .update(uuid, &patch, &expected, request_id.as_str())
        .await
    {
        // Nothing differed: nothing was written, and there is nothing to announce.
        Ok(user) if user.version == version => Ok(see_other(&format!("/console/users/{uuid}"))),
        Ok(user) => {
            tracing::info!(user = %uuid, version = user.version, subject = %viewer.principal.subject, "console changed a user");
            Ok(see_other(&format!("/console/users/{uuid}?updated=1")))
        }
        Err(ChangeUserError::VersionMismatch { .. }) => {
            let current = find_user(&users, uuid).await?;
            let page = EditPage::new(&viewer, current.into(), Some(typed)).changed_meanwhile();
            Ok(render(StatusCode::PRECONDITION_FAILED, &page))
        }
        // The same 409 as a create's, on the same field.
        Err(ChangeUserError::EmailTaken) => {
            let error = ApiError::from(CreateUserError::EmailTaken);
            refused_form(&viewer, &users, uuid, version, typed, &error).await
        }
        Err(ChangeUserError::NotFound) => Err(no_such_user(uuid)),
        Err(ChangeUserError::Storage(error)) => Err(error.into()),
    }
}

/// The form again after a 400 or 409: what was typed, the API's messages beside the
/// fields, and still the version it was read at (a change made meanwhile is still
/// refused when it is sent again).
async fn refused_form(
    viewer: &Viewer,
    users: &Users,
    uuid: Uuid,
    version: u64,
    typed: (String, String),
    error: &ApiError,
) -> Result<HttpResponse, ConsoleError> {
    let problem = error.problem();
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut user = Stored::from(find_user(users, uuid).await?);
    user.version = version;
    let page =
        EditPage::new(viewer, user, Some(typed)).with_errors(problem.errors.unwrap_or_default());
    Ok(render(status, &page))
}

async fn delete_confirmation(
    viewer: Viewer,
    users: web::Data<Users>,
    path: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersWrite)?;
    let user = find_user(&users, parse_uuid(&path)?).await?;
    Ok(render(
        StatusCode::OK,
        &DeletePage::new(&viewer, user.into(), false),
    ))
}

#[derive(Deserialize)]
struct DeleteForm {
    csrf: String,
    version: String,
}

/// Deletes the user as `DELETE /api/users/{uuid}` with `If-Match: "<version>"` would,
/// then goes to the list, which says whom it erased (the name travels in the sealed
/// flash cookie, not in the URL). A version that is no longer current gets the
/// confirmation again, for the current one.
async fn delete(
    viewer: Viewer,
    console: web::Data<Console>,
    users: web::Data<Users>,
    request_id: RequestId,
    path: web::Path<String>,
    form: web::Form<DeleteForm>,
) -> Result<HttpResponse, ConsoleError> {
    viewer.require(Role::UsersWrite)?;
    let uuid = parse_uuid(&path)?;
    viewer.check_csrf(&form.csrf)?;
    let version = parse_version(&form.version)?;
    let user = find_user(&users, uuid).await?;
    let changed = |current: User| {
        let page = DeletePage::new(&viewer, current.into(), true);
        render(StatusCode::PRECONDITION_FAILED, &page)
    };
    if user.version != version {
        return Ok(changed(user));
    }
    // The version is checked again in the deletion's transaction: a change between the
    // read above and here is refused all the same.
    match users
        .delete(uuid, &Expected::OneOf(vec![version]), request_id.as_str())
        .await
    {
        Ok(()) => {
            tracing::info!(user = %uuid, subject = %viewer.principal.subject, "console deleted a user");
            let mut response = see_other("/console/?deleted=1");
            let flash = console.sessions().flash(format!("Deleted {}.", user.name));
            let _ = response.add_cookie(&flash);
            Ok(response)
        }
        Err(ChangeUserError::VersionMismatch { .. }) => Ok(changed(find_user(&users, uuid).await?)),
        Err(ChangeUserError::NotFound) => Err(no_such_user(uuid)),
        Err(ChangeUserError::Storage(error)) => Err(error.into()),
        Err(ChangeUserError::EmailTaken) => Err(ConsoleError::Internal(anyhow::anyhow!(
            "a deletion was refused for a taken e-mail address"
        ))),
    }
}
