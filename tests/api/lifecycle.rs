//! The user lifecycle: change (PATCH), erase (DELETE), conditional requests, ordering
//! of a user's events, idempotent creates and re-enrichment.

use std::collections::BTreeMap;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use userhub::bus::{Envelope, Outcome, headers};
use userhub::events::{EVENT_VERSION, USER_CREATED, USER_DELETED, USER_UPDATED};

use crate::helpers::{Spawn, TestApp, assert_problem, hs256_token, spawn, spawn_app, test_claims};

fn etag(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("etag")
        .expect("an ETag")
        .to_str()
        .unwrap()
        .to_owned()
}

async fn created(app: &TestApp, name: &str, email: &str) -> (String, String) {
    let user = app.create_user(name, email).await;
    let uuid = user["uuid"].as_str().unwrap().to_owned();
    let response = app.get(&format!("/api/users/{uuid}")).await;
    (uuid, etag(&response))
}

/// The routing keys and payloads of the outbox, oldest first.
async fn outbox(app: &TestApp) -> Vec<(String, Value)> {
    let rows: Vec<(String, String)> = userhub::with_pool!(&app.db, |pool| sqlx::query_as(
        "SELECT routing_key, payload FROM outbox ORDER BY id"
    )
    .fetch_all(pool)
    .await)
    .unwrap();
    rows.into_iter()
        .map(|(key, payload)| (key, serde_json::from_str(&payload).unwrap()))
        .collect()
}

#[tokio::test]
async fn a_patch_changes_the_user_writes_user_updated_and_re_derives_the_profile() {
    let app = spawn_app().await;
    let (uuid, tag) = created(&app, "Ada Lovelace", "ada@example.com").await;
    assert_eq!(tag, "\"1\"");
    app.deliver_all().await;

    let response = app
        .patch_json(
            &format!("/api/users/{uuid}"),
            &json!({"name": "  Ada King  "}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(etag(&response), "\"2\"");
    let user: Value = response.json().await.unwrap();
    assert_eq!(user["name"], "Ada King", "trimmed like a create");
    assert_eq!(user["email"], "ada@example.com", "left alone");
    assert!(user["updated_at"].as_str() > user["created_at"].as_str());

    let events = outbox(&app).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].0, USER_UPDATED);
    assert_eq!(events[1].1["version"], 2);
    assert_eq!(events[1].1["name"], "Ada King");
    assert_eq!(events[1].1["email"], "ada@example.com");

    app.deliver_all().await;
    let profile: Value = app.get_json(&format!("/users/enriched/{uuid}")).await;
    assert_eq!(profile["github"], "github.com/adaking");
    // The read path sees the new version at once (written through the cache).
    let read: Value = app.get_json(&format!("/api/users/{uuid}")).await;
    assert_eq!(read["name"], "Ada King");
}

#[tokio::test]
async fn a_patch_is_validated_like_a_create_and_a_taken_email_is_409() {
    let app = spawn_app().await;
    let (uuid, _) = created(&app, "Ada Lovelace", "ada@example.com").await;
    app.create_user("Grace Hopper", "grace@example.com").await;
    let path = format!("/api/users/{uuid}");

    let problem = assert_problem(
        app.patch_json(
            &path,
            &json!({"name": "Al", "email": "nope", "role": "admin"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(problem["errors"]["name"].is_array(), "{problem}");
    assert!(problem["errors"]["email"].is_array(), "{problem}");
    assert!(problem["errors"]["role"].is_array(), "{problem}");
    let problem = assert_problem(
        app.patch_json(&path, &json!({"email": null})).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(problem["errors"]["email"][0], "cannot be removed");
    assert_problem(
        app.patch_json(&path, &json!(["name"])).await,
        StatusCode::BAD_REQUEST,
    )
    .await;

    let problem = assert_problem(
        app.patch_json(&path, &json!({"email": "GRACE@example.com"}))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(problem["errors"]["email"].is_array(), "{problem}");

    // The user's own address in another case is no conflict.
    let response = app
        .patch_json(&path, &json!({"email": "Ada@Example.com"}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap()["email"],
        "Ada@Example.com"
    );
    assert_eq!(outbox(&app).await.len(), 3, "created, created, updated");
}

#[tokio::test]
async fn a_patch_that_changes_nothing_writes_nothing() {
    let app = spawn_app().await;
    let (uuid, tag) = created(&app, "Ada Lovelace", "ada@example.com").await;
    let path = format!("/api/users/{uuid}");
    for patch in [
        json!({}),
        json!({"name": "Ada Lovelace", "email": "ada@example.com"}),
    ] {
        let response = app.patch_json(&path, &patch).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(etag(&response), tag);
    }
    assert_eq!(outbox(&app).await.len(), 1, "no user.updated");
}

#[tokio::test]
async fn a_merge_patch_content_type_is_accepted_and_other_bodies_are_415() {
    let app = spawn_app().await;
    let (uuid, _) = created(&app, "Ada Lovelace", "ada@example.com").await;
    let url = app.url(&format!("/api/users/{uuid}"));
    let response = app
        .client
        .patch(&url)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"name":"Ada Byron"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = app
        .client
        .patch(&url)
        .header("content-type", "text/plain")
        .body(r#"{"name":"Ada Byron"}"#)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
}

#[tokio::test]
async fn changes_to_unknown_users_are_404_and_malformed_uuids_400() {
    let app = spawn_app().await;
    let nil = "00000000-0000-0000-0000-000000000000";
    assert_problem(
        app.patch_json(&format!("/api/users/{nil}"), &json!({"name": "Nobody"}))
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_problem(
        app.delete(&format!("/api/users/{nil}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_problem(app.delete("/api/users/else").await, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn etags_answer_if_none_match_with_304() {
    let app = spawn_app().await;
    let (uuid, tag) = created(&app, "Ada Lovelace", "ada@example.com").await;
    app.deliver_all().await;
    for path in [
        format!("/api/users/{uuid}"),
        format!("/api/users/{uuid}/profile"),
        format!("/users/enriched/{uuid}"),
    ] {
        let first = app.get(&path).await;
        assert_eq!(first.status(), StatusCode::OK, "{path}");
        let tag = etag(&first);
        for if_none_match in [tag.clone(), format!("W/{tag}"), "*".to_owned()] {
            let again = app
                .send(
                    Method::GET,
                    &path,
                    &[("if-none-match", &if_none_match)],
                    None,
                )
                .await;
            assert_eq!(
                again.status(),
                StatusCode::NOT_MODIFIED,
                "{path} {if_none_match}"
            );
            assert_eq!(etag(&again), tag);
            assert!(again.bytes().await.unwrap().is_empty());
        }
        let other = app
            .send(Method::GET, &path, &[("if-none-match", "\"other\"")], None)
            .await;
        assert_eq!(other.status(), StatusCode::OK, "{path}");
    }
    // A change makes the old tag stale.
    app.patch_json(&format!("/api/users/{uuid}"), &json!({"name": "Ada Byron"}))
        .await;
    let path = format!("/api/users/{uuid}");
    let response = app
        .send(Method::GET, &path, &[("if-none-match", &tag)], None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(etag(&response), "\"2\"");
}

#[tokio::test]
async fn if_match_guards_changes_against_lost_updates() {
    let app = spawn_app().await;
    let (uuid, tag) = created(&app, "Ada Lovelace", "ada@example.com").await;
    let path = format!("/api/users/{uuid}");
    let name = json!({"name": "Ada Byron"});

    let response = app
        .send(Method::PATCH, &path, &[("if-match", &tag)], Some(&name))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let current = etag(&response);

    // Another client still holds the first version: its change is refused.
    for stale in [tag.as_str(), "W/\"2\"", "\"7\", \"8\"", "1"] {
        let response = app
            .send(
                Method::PATCH,
                &path,
                &[("if-match", stale)],
                Some(&json!({"name": "Lost Update"})),
            )
            .await;
        assert_problem(response, StatusCode::PRECONDITION_FAILED).await;
        let response = app
            .send(Method::DELETE, &path, &[("if-match", stale)], None)
            .await;
        assert_problem(response, StatusCode::PRECONDITION_FAILED).await;
    }
    let read: Value = app.get_json(&path).await;
    assert_eq!(read["name"], "Ada Byron");

    let response = app
        .send(
            Method::PATCH,
            &path,
            &[("if-match", &format!("\"9\", {current}"))],
            Some(&json!({"name": "Ada King"})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = app
        .send(Method::DELETE, &path, &[("if-match", "*")], None)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn with_require_if_match_changes_without_it_are_428() {
    let app = spawn(Spawn {
        configure: Box::new(|settings| settings.http.require_if_match = true),
        ..Spawn::default()
    })
    .await;
    let (uuid, tag) = created(&app, "Ada Lovelace", "ada@example.com").await;
    let path = format!("/api/users/{uuid}");
    assert_problem(
        app.patch_json(&path, &json!({"name": "Ada Byron"})).await,
        StatusCode::PRECONDITION_REQUIRED,
    )
    .await;
    assert_problem(app.delete(&path).await, StatusCode::PRECONDITION_REQUIRED).await;
    let response = app
        .send(Method::DELETE, &path, &[("if-match", &tag)], None)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_deleted_user_is_gone_everywhere_and_its_email_can_register_again() {
    let app = spawn_app().await;
    let (uuid, _) = created(&app, "Ada Lovelace", "ada@example.com").await;
    app.deliver_all().await;
    app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;

    let response = app.delete(&format!("/api/users/{uuid}")).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.bytes().await.unwrap().is_empty());
    for path in [
        format!("/api/users/{uuid}"),
        format!("/api/users/{uuid}/profile"),
    ] {
        assert_problem(app.get(&path).await, StatusCode::NOT_FOUND).await;
    }
    assert_problem(
        app.delete(&format!("/api/users/{uuid}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let listed: Vec<Value> = app.get_json("/api/users").await;
    assert!(listed.is_empty());

    let events = outbox(&app).await;
    assert_eq!(events.last().unwrap().0, USER_DELETED);
    assert_eq!(
        events.last().unwrap().1,
        json!({
            "uuid": uuid, "version": 2, "deleted_at": events.last().unwrap().1["deleted_at"]
        })
    );

    let outcomes = app.deliver_all().await;
    assert_eq!(outcomes, [Outcome::Acked]);
    assert_problem(
        app.get(&format!("/users/enriched/{uuid}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    let again = app.create_user("Ada Lovelace", "ADA@example.com").await;
    assert_ne!(again["uuid"], uuid, "a new user");
}

/// An envelope of `routing_key` about `uuid` at `version`, as the users module writes it.
fn event(routing_key: &str, uuid: &str, version: u64, name: &str) -> Envelope {
    let payload = match routing_key {
        USER_DELETED => json!({"uuid": uuid, "version": version,
                               "deleted_at": "2026-11-30T09:00:00.000Z"}),
        _ => json!({"uuid": uuid, "name": name, "email": "ada@example.com", "version": version,
                    "created_at": "2026-11-30T08:00:00.000Z",
                    "updated_at": "2026-11-30T08:00:00.000Z"}),
    };
    let headers = BTreeMap::from([
        (headers::EVENT_VERSION.to_owned(), EVENT_VERSION.to_owned()),
        (headers::SUBJECT.to_owned(), uuid.to_owned()),
    ]);
    Envelope::new(routing_key, payload.to_string(), headers)
}

#[tokio::test]
async fn a_users_events_are_applied_in_version_order_whatever_order_they_arrive_in() {
    let app = spawn_app().await;
    let uuid = uuid::Uuid::now_v7().to_string();
    let profile = || async { app.get(&format!("/users/enriched/{uuid}")).await };

    // v2 arrives before v1: v1 is stale when it comes.
    for envelope in [
        event(USER_UPDATED, &uuid, 2, "Second Name"),
        event(USER_CREATED, &uuid, 1, "First Name"),
    ] {
        app.handler.handle(&envelope).await.unwrap();
    }
    let read: Value = profile().await.json().await.unwrap();
    assert_eq!(read["github"], "github.com/secondname");

    // The deletion, then a late update and a replay of the creation: nothing returns.
    app.handler
        .handle(&event(USER_DELETED, &uuid, 3, ""))
        .await
        .unwrap();
    for late in [
        event(USER_UPDATED, &uuid, 2, "Second Name"),
        event(USER_CREATED, &uuid, 1, "First Name"),
    ] {
        app.handler.handle(&late).await.unwrap();
    }
    assert_eq!(profile().await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_create_and_refuses_another_body() {
    let app = spawn_app().await;
    let body = json!({"name": "Ada Lovelace", "email": "ada@example.com"});
    let send = |key: &'static str, body: Value| {
        let app = &app;
        async move {
            app.send(
                Method::POST,
                "/api/users",
                &[("idempotency-key", key)],
                Some(&body),
            )
            .await
        }
    };
    let first = send("\"create-ada-1\"", body.clone()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers()["location"].clone();
    let first: Value = first.json().await.unwrap();

    // A retry, quoted or not: the same answer, no second user, no second event.
    for key in ["\"create-ada-1\"", "create-ada-1"] {
        let again = send(key, body.clone()).await;
        assert_eq!(again.status(), StatusCode::CREATED);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.headers()["location"], location);
        assert_eq!(again.json::<Value>().await.unwrap(), first);
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM users").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM outbox").await, 1);

    // The same key for another request.
    let other = json!({"name": "Ada Lovelace", "email": "ada.other@example.com"});
    assert_problem(
        send("create-ada-1", other.clone()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    // Another key: a plain create (409, the address is taken by the first).
    assert_problem(
        send("create-ada-2", body.clone()).await,
        StatusCode::CONFLICT,
    )
    .await;
    // Malformed keys.
    for bad in ["", "has space", "\"unterminated"] {
        assert_problem(send_raw(&app, bad, &other).await, StatusCode::BAD_REQUEST).await;
    }
}

async fn send_raw(app: &TestApp, key: &str, body: &Value) -> reqwest::Response {
    app.send(
        Method::POST,
        "/api/users",
        &[("idempotency-key", key)],
        Some(body),
    )
    .await
}

#[tokio::test]
async fn idempotency_keys_belong_to_their_caller() {
    let app = spawn_app().await;
    let token = |subject: &str| hs256_token(&test_claims(subject, &["users:write"]));
    let post = |token: String, email: &'static str| {
        let app = &app;
        async move {
            app.request_with_token(Method::POST, "/api/users", Some(&token))
                .header("idempotency-key", "same-key")
                .json(&json!({"name": "Some Body", "email": email}))
                .send()
                .await
                .unwrap()
        }
    };
    let alice = post(token("alice"), "alice@example.com").await;
    let bob = post(token("bob"), "bob@example.com").await;
    assert_eq!(alice.status(), StatusCode::CREATED);
    assert_eq!(bob.status(), StatusCode::CREATED, "bob's key is his own");
    assert!(bob.headers().get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn concurrent_requests_with_one_key_create_one_user() {
    let app = spawn_app().await;
    let body = json!({"name": "Ada Lovelace", "email": "ada@example.com"});
    let requests = (0..8).map(|_| {
        app.send(
            Method::POST,
            "/api/users",
            &[("idempotency-key", "racing")],
            Some(&body),
        )
    });
    let responses = futures_util::future::join_all(requests).await;
    let mut uuids = std::collections::HashSet::new();
    for response in responses {
        assert_eq!(response.status(), StatusCode::CREATED);
        uuids.insert(response.json::<Value>().await.unwrap()["uuid"].clone());
    }
    assert_eq!(uuids.len(), 1, "{uuids:?}");
    assert_eq!(app.count("SELECT COUNT(*) FROM users").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM outbox").await, 1);
}

#[tokio::test]
async fn reenrich_rebuilds_lost_profiles_from_the_users() {
    let app = spawn_app().await;
    let mut uuids = Vec::new();
    for i in 0..3 {
        let user = app
            .create_user(&format!("Person {i}"), &format!("p{i}@example.com"))
            .await;
        uuids.push(user["uuid"].as_str().unwrap().to_owned());
    }
    app.deliver_all().await;
    let profile = |uuid: &str| format!("/users/enriched/{uuid}");
    let before: Value = app.get_json(&profile(&uuids[0])).await;

    // Selections are validated.
    for bad in [
        json!({}),
        json!({"all": true, "uuids": []}),
        json!({"since": "yesterday"}),
        // An array is not an object, though serde would read a struct from one.
        json!([true]),
    ] {
        let status = app.post_json("/admin/reenrich", &bad).await.status();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }

    let response = app
        .post_json(
            "/admin/reenrich",
            &json!({"uuids": [uuids[1], uuid::Uuid::now_v7()]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.json::<Value>().await.unwrap()["queued"], 1);
    let response = app
        .post_json("/admin/reenrich", &json!({"all": true}))
        .await;
    assert_eq!(response.json::<Value>().await.unwrap()["queued"], 3);
    let events = outbox(&app).await;
    assert_eq!(events.len(), 3 + 1 + 3);
    assert!(
        events[3..]
            .iter()
            .all(|(key, event)| key == USER_UPDATED && event["version"] == 1)
    );

    let outcomes = app.deliver_all().await;
    assert_eq!(outcomes.len(), 4);
    let after: Value = app.get_json(&profile(&uuids[0])).await;
    assert_eq!(after["github"], before["github"]);
    assert_ne!(
        after["source_event_id"], before["source_event_id"],
        "rebuilt"
    );
}
