//! API and integration tests: every test spawns the real application on port 0 with a
//! fresh temporary SQLite database (see helpers.rs).

mod architecture;
mod cache;
mod delivery;
mod enrichment;
mod errors;
mod health;
mod helpers;
mod rabbitmq_bus;
#[allow(dead_code)] // until every service has its integration tests
mod services;
mod users;
