//! API and integration tests: every API test spawns the real application on port 0 with
//! a fresh temporary SQLite database (see helpers.rs); the production adapters are tested
//! against the services that scripts/test-services.sh provides (see services.rs).

mod architecture;
mod asyncapi;
mod auth;
mod cache;
mod console;
mod console_oidc;
mod delivery;
mod enrichment;
mod erasure;
mod errors;
mod hardening;
mod health;
mod helpers;
mod lifecycle;
mod mongo_store;
mod monitoring;
mod otlp;
mod postgres;
mod process;
mod profile_store;
mod proxy;
mod rabbitmq_bus;
mod rabbitmq_system;
mod redis_cache;
mod retention;
#[allow(dead_code)] // until every service has its integration tests
mod services;
mod split;
mod traces;
mod users;
