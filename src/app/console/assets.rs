//! The console's stylesheet and script, compiled into the binary and served under a
//! name that carries a hash of their content, so browsers may cache them for a year and
//! a new build is never mixed with an old cached file.

use std::sync::LazyLock;

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use sha2::{Digest, Sha256};

use super::pages::ConsoleError;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// `/console/assets/console.<hash>.css`
static CSS_PATH: LazyLock<String> = LazyLock::new(|| hashed_path("css", CSS));
/// `/console/assets/console.<hash>.js`
static JS_PATH: LazyLock<String> = LazyLock::new(|| hashed_path("js", JS));

fn hashed_path(extension: &str, content: &str) -> String {
    let digest = Sha256::digest(content.as_bytes());
    let hash: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("/console/assets/console.{hash}.{extension}")
}

pub(super) fn css_path() -> &'static str {
    &CSS_PATH
}

pub(super) fn js_path() -> &'static str {
    &JS_PATH
}

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/assets/{file}", web::get().to(asset));
}

async fn asset(path: web::Path<String>) -> Result<HttpResponse, ConsoleError> {
    let requested = format!("/console/assets/{}", path.into_inner());
    let (content_type, body) = if requested == css_path() {
        ("text/css; charset=utf-8", CSS)
    } else if requested == js_path() {
        ("text/javascript; charset=utf-8", JS)
    } else {
        return Err(ConsoleError::NotFound(
            "No such file (an old page may name the assets of another build).".into(),
        ));
    };
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "public, max-age=31536000, immutable"))
        .body(body))
}
