//! Enrichment as clients see it: the enriched profile and the combined view.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{assert_problem, spawn_app, spawn_running_app};
use userhub::bus::Outcome;

#[tokio::test]
async fn a_created_user_is_pending_until_its_event_is_delivered() {
    let app = spawn_app().await;
    let user = app
        .create_user("João Silva", "joao.silva@example.com")
        .await;
    let uuid = user["uuid"].as_str().unwrap();

    let response = app.get(&format!("/users/enriched/{uuid}")).await;
    assert_problem(response, StatusCode::NOT_FOUND).await;
    let profile: Value = app.get_json(&format!("/api/users/{uuid}/profile")).await;
    assert_eq!(profile["enrichment"]["status"], "pending");
    assert!(profile["enrichment"].get("github").is_none());

    assert_eq!(app.deliver_all().await, [Outcome::Acked]);

    let enriched: Value = app.get_json(&format!("/users/enriched/{uuid}")).await;
    assert_eq!(enriched["uuid"], uuid);
    assert_eq!(enriched["name"], "João Silva");
    assert_eq!(enriched["email"], "joao.silva@example.com");
    assert_eq!(enriched["linkedin"], "linkedin.com/in/joaosilva");
    assert_eq!(enriched["github"], "github.com/joaosilva");
    assert!(enriched["enriched_at"].is_string());

    let profile: Value = app.get_json(&format!("/api/users/{uuid}/profile")).await;
    assert_eq!(profile["uuid"], uuid);
    assert_eq!(profile["name"], "João Silva");
    assert_eq!(profile["enrichment"]["status"], "completed");
    assert_eq!(profile["enrichment"]["github"], "github.com/joaosilva");
}

#[tokio::test]
async fn a_cjk_only_name_is_enriched_from_the_email() {
    let app = spawn_app().await;
    let user = app.create_user("李小龍", "bruce.lee@example.hk").await;
    app.deliver_all().await;
    let enriched: Value = app
        .get(&format!(
            "/users/enriched/{}",
            user["uuid"].as_str().unwrap()
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(enriched["github"], "github.com/brucelee");
    assert_eq!(enriched["name"], "李小龍", "the name comes back as stored");
}

#[tokio::test]
async fn profile_routes_answer_404_and_400_like_the_user_route() {
    let app = spawn_app().await;
    let nil = "00000000-0000-0000-0000-000000000000";
    for path in [
        format!("/users/enriched/{nil}"),
        format!("/api/users/{nil}/profile"),
    ] {
        assert_problem(app.get(&path).await, StatusCode::NOT_FOUND).await;
    }
    for path in ["/users/enriched/nope", "/api/users/nope/profile"] {
        assert_problem(app.get(path).await, StatusCode::BAD_REQUEST).await;
    }
}

#[tokio::test]
async fn with_real_workers_a_new_user_is_enriched_end_to_end() {
    let app = spawn_running_app().await;
    let user = app.create_user("Ada Lovelace", "ada@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    let enriched = app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    assert_eq!(enriched["github"], "github.com/adalovelace");
    assert_eq!(app.outbox_unsent().await, 0);
    app.stop().await;
}
