//! The read-through cache: hits skip the database; pending profiles are never cached.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{ControlledStore, Spawn, spawn, spawn_app};

#[tokio::test]
async fn a_cached_user_is_served_without_the_database() {
    let app = spawn_app().await;
    let user = app.create_user("Ada Lovelace", "ada@example.com").await;
    let path = format!("/api/users/{}", user["uuid"].as_str().unwrap());
    assert_eq!(app.get(&path).await.status(), StatusCode::OK);

    // Remove the row behind the app's back: only the cache can still answer.
    app.execute("DELETE FROM users").await;
    let cached: Value = app.get_json(&path).await;
    assert_eq!(cached, user);
}

/// A hit is answered from the cached representation as is: the same bytes, type and
/// tag as the answer that filled the cache; and what reads the user itself (the
/// combined view) reads the same user from it.
#[tokio::test]
async fn a_hit_answers_exactly_what_the_fill_answered() {
    let app = spawn_app().await;
    let user = app.create_user("Zoë Ångström", "zoe@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    let path = format!("/api/users/{uuid}");
    let answer = |response: reqwest::Response| async move {
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let head = (response.status(), header("content-type"), header("etag"));
        (head, response.bytes().await.unwrap())
    };
    let filled = answer(app.get(&path).await).await;
    app.execute("DELETE FROM users").await;
    let hit = answer(app.get(&path).await).await;
    assert_eq!(hit, filled);
    assert_eq!(filled.0.2.as_deref(), Some("\"1\""));
    assert_eq!(serde_json::from_slice::<Value>(&hit.1).unwrap(), user);

    let mut view: Value = app.get_json(&format!("{path}/profile")).await;
    let enrichment = view.as_object_mut().unwrap().remove("enrichment");
    assert_eq!(view, user, "the user's fields, from the cache");
    assert!(enrichment.is_some());
}

#[tokio::test]
async fn a_pending_profile_is_not_cached_and_the_worker_fills_the_cache() {
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    let user = app.create_user("Grace Hopper", "grace@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    let pending: Value = app.get_json(&format!("/api/users/{uuid}/profile")).await;
    assert_eq!(pending["enrichment"]["status"], "pending");

    app.deliver_all().await;
    let done: Value = app.get_json(&format!("/api/users/{uuid}/profile")).await;
    assert_eq!(
        done["enrichment"]["status"], "completed",
        "pending was not cached"
    );

    // The worker wrote the cache after the store: the profile is served while the
    // store is down.
    store.set_down(true);
    let enriched: Value = app.get_json(&format!("/users/enriched/{uuid}")).await;
    assert_eq!(enriched["github"], "github.com/gracehopper");
}

#[tokio::test]
async fn a_dead_redis_changes_no_response() {
    // A port nothing listens on: every cache call fails at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let app = spawn(Spawn {
        configure: Box::new(move |settings| {
            settings.cache.url = format!("redis://127.0.0.1:{port}").into();
        }),
        ..Spawn::default()
    })
    .await;

    let user = app.create_user("Ada Lovelace", "ada@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    for _ in 0..3 {
        let fetched: Value = app.get_json(&format!("/api/users/{uuid}")).await;
        assert_eq!(fetched, user);
    }
    assert_eq!(
        app.get(&format!("/users/enriched/{uuid}")).await.status(),
        StatusCode::NOT_FOUND
    );
    app.deliver_all().await;
    let enriched: Value = app.get_json(&format!("/users/enriched/{uuid}")).await;
    assert_eq!(enriched["github"], "github.com/adalovelace");

    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), StatusCode::OK, "the cache is not required");
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["cache"]["status"], "down");
}
