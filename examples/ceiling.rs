//! The ceiling of scripts/bench.sh: a minimal actix-web server answering
//! `GET /api/users/{uuid}` with a fixed user as JSON, with none of userhub's middleware,
//! auth, cache or storage. What userhub's read path achieves is compared with this,
//! measured in the same run on the same machine.
//!
//!     cargo build --release --example ceiling
//!     target/release/examples/ceiling 127.0.0.1:18080

use actix_web::{App, HttpResponse, HttpServer, web};
use serde::Serialize;

/// The allocator userhub's binary uses (src/main.rs), so that the ratio compares the
/// code on the request path, not two allocators.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Serialize)]
struct User {
    uuid: String,
    name: &'static str,
    email: &'static str,
    created_at: &'static str,
    updated_at: &'static str,
    version: u64,
}

async fn user(path: web::Path<String>) -> HttpResponse {
    HttpResponse::Ok().json(User {
        uuid: path.into_inner(),
        name: "Ada Lovelace",
        email: "ada@example.com",
        created_at: "2026-11-30T10:00:00.000Z",
        updated_at: "2026-11-30T10:00:00.000Z",
        version: 1,
    })
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".to_owned());
    HttpServer::new(|| App::new().route("/api/users/{uuid}", web::get().to(user)))
        .bind(addr)?
        .run()
        .await
}
