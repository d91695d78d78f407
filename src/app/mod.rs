//! The composition: which routes the service has, built from the modules' public
//! facades. Each module registers its own routes; this adds what belongs to no single
//! module: health and metrics, the OpenAPI document, the dead-letter admin, the
//! combined profile view, and the web console. `startup` builds the [`Routes`];
//! `web::serve` serves them.
//!
//! Arrows run one way: startup -> app -> modules -> web.

mod admin;
mod asyncapi;
mod console;
mod health;
mod openapi;
mod profile_view;

use std::sync::Arc;

use actix_web::web;

pub use console::Console;
pub use health::{Gauges, ProcessState, Readiness, Report, Required};
pub use openapi::ApiDoc;

use crate::bus::EventBus;
use crate::enrichment::{self, Enrichment};
use crate::users::{self, Users};
use crate::web::conditional::Preconditions;

/// Everything the routes serve from.
#[derive(Clone)]
pub struct Routes {
    pub users: Users,
    pub enrichment: Enrichment,
    pub bus: Arc<dyn EventBus>,
    pub readiness: Readiness,
    pub gauges: Gauges,
    /// `http.require_if_match`.
    pub preconditions: Preconditions,
    /// The web console, served with the API (`None` without the `api` role).
    pub console: Option<Console>,
    /// Serve the `/api`, `/users`, `/admin` and `/console` routes (role `api`);
    /// otherwise only the operational ones (health, metrics, docs).
    pub serve_api: bool,
}

impl Routes {
    /// Registers every route and what it needs; for [`crate::web::serve`].
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        // The router tries resources in this order, so the busy ones come first: the
        // Swagger UI's catch-all pattern ahead of the API cost every API request one
        // more regex search (3% of a cached GET's instructions).
        cfg.app_data(web::Data::new(self.readiness.clone()))
            .app_data(web::Data::new(self.gauges.clone()))
            .configure(health::configure);
        if self.serve_api {
            cfg.app_data(web::Data::new(self.users.clone()))
                .app_data(web::Data::new(self.enrichment.clone()))
                .app_data(web::Data::new(self.preconditions))
                .app_data(web::Data::from(self.bus.clone()))
                .configure(users::configure)
                .configure(enrichment::configure)
                .configure(profile_view::configure)
                .configure(admin::configure);
        }
        cfg.configure(openapi::configure)
            .configure(asyncapi::configure);
        match (&self.console, self.serve_api) {
            (Some(console), true) => {
                cfg.configure(|cfg| console.configure(cfg))
                    .configure(|cfg| openapi::root(cfg, "/console/"));
            }
            _ => {
                cfg.configure(|cfg| openapi::root(cfg, "/swagger-ui/"));
            }
        }
    }
}
