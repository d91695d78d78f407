//! The users part of the HTTP contract.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};

use userhub::with_pool;

use crate::helpers::{TestApp, assert_problem, spawn_app};

#[tokio::test]
async fn create_returns_201_with_the_stored_user_and_its_location() {
    let app = spawn_app().await;
    let response = app
        .post_user("  Ada Lovelace ", " ada+math@example.com ")
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let user: Value = response.json().await.unwrap();
    assert_eq!(user["name"], "Ada Lovelace", "trimmed");
    assert_eq!(user["email"], "ada+math@example.com", "trimmed, + kept");
    let uuid = user["uuid"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(uuid).unwrap().get_version_num(), 7);
    assert_eq!(location, format!("/api/users/{uuid}"));
    assert!(user["created_at"].is_string() && user["updated_at"].is_string());

    let fetched: Value = app.get_json(&location).await;
    assert_eq!(fetched, user, "GET answers exactly what POST answered");
}

#[tokio::test]
async fn the_user_and_its_event_are_written_together() {
    let app = spawn_app().await;
    app.create_user("Grace Hopper", "grace@example.com").await;
    assert_eq!(app.outbox_unsent().await, 1);
    let payload: String = with_pool!(&app.db, |pool| sqlx::query_scalar(
        "SELECT payload FROM outbox"
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    let event: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(event["email"], "grace@example.com");
}

#[tokio::test]
async fn invalid_input_is_400_with_field_errors_and_nothing_is_written() {
    let app = spawn_app().await;
    let cases = [
        (json!({}), vec!["email", "name"]),
        (json!({"name": "Ada Lovelace"}), vec!["email"]),
        (json!({"email": "ada@example.com"}), vec!["name"]),
        (
            json!({"name": "Al", "email": "al@example.com"}),
            vec!["name"],
        ),
        (
            json!({"name": "  Al  ", "email": "al@example.com"}),
            vec!["name"],
        ),
        (
            json!({"name": "a".repeat(101), "email": "a@example.com"}),
            vec!["name"],
        ),
        (
            json!({"name": "Ada\u{0007}Lovelace", "email": "a@example.com"}),
            vec!["name"],
        ),
        (
            json!({"name": "Ada Lovelace", "email": "not-an-email"}),
            vec!["email"],
        ),
        (json!({"name": "Ada Lovelace", "email": ""}), vec!["email"]),
        (json!({"name": "x", "email": "y"}), vec!["email", "name"]),
        (
            json!({"name": "Ada Lovelace", "email": format!("{}@example.com", "a".repeat(250))}),
            vec!["email"],
        ),
    ];
    for (body, fields) in cases {
        let response = app.post_json("/api/users", &body).await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST).await;
        let mut got: Vec<&str> = problem["errors"]
            .as_object()
            .unwrap_or_else(|| panic!("no errors for {body}: {problem}"))
            .keys()
            .map(String::as_str)
            .collect();
        got.sort_unstable();
        assert_eq!(got, fields, "for {body}");
        for messages in problem["errors"].as_object().unwrap().values() {
            assert!(messages[0].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    let users = app.count("SELECT COUNT(*) FROM users").await;
    assert_eq!(users, 0);
    assert_eq!(app.outbox_unsent().await, 0);
}

#[tokio::test]
async fn wrongly_typed_fields_are_400() {
    let app = spawn_app().await;
    let response = app
        .post_json("/api/users", &json!({"name": 42, "email": ["a@b.io"]}))
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn name_length_boundaries_are_3_and_100_characters() {
    let app = spawn_app().await;
    app.create_user("Abe", "abe@example.com").await;
    app.create_user(&"é".repeat(100), "long@example.com").await;
    let response = app.post_user(&"é".repeat(101), "longer@example.com").await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn a_taken_email_is_409_ignoring_case() {
    let app = spawn_app().await;
    let first = app.create_user("Ada Lovelace", "A@X.io").await;
    for email in ["A@X.io", "a@x.io", "  a@X.IO "] {
        let response = app.post_user("Someone Else", email).await;
        let problem = assert_problem(response, StatusCode::CONFLICT).await;
        assert!(problem["errors"]["email"].is_array(), "{problem}");
    }
    let users = app.count("SELECT COUNT(*) FROM users").await;
    assert_eq!(users, 1);
    assert_eq!(app.outbox_unsent().await, 1, "no event for a refused user");
    let fetched: Value = app
        .get(&format!("/api/users/{}", first["uuid"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["email"], "A@X.io", "stored exactly as given");
}

#[tokio::test]
async fn concurrent_creates_with_one_email_give_one_201() {
    let app = spawn_app().await;
    let app = &app;
    let attempts = (0..8).map(|i| async move {
        app.post_user(&format!("Racer {i}"), "race@example.com")
            .await
    });
    let statuses: Vec<StatusCode> = futures_util::future::join_all(attempts)
        .await
        .iter()
        .map(reqwest::Response::status)
        .collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CONFLICT)
            .count(),
        7,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn get_one_is_404_for_unknown_and_nil_and_400_for_malformed() {
    let app = spawn_app().await;
    for uuid in [
        "00000000-0000-0000-0000-000000000000",
        "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d",
    ] {
        let response = app.get(&format!("/api/users/{uuid}")).await;
        assert_problem(response, StatusCode::NOT_FOUND).await;
    }
    for bad in ["not-a-uuid", "123", "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6"] {
        let response = app.get(&format!("/api/users/{bad}")).await;
        assert_problem(response, StatusCode::BAD_REQUEST).await;
    }
}

async fn create_many(app: &TestApp, n: usize) -> Vec<String> {
    let mut uuids = Vec::new();
    for i in 0..n {
        let user = app
            .create_user(&format!("User {i:03}"), &format!("user{i}@example.com"))
            .await;
        uuids.push(user["uuid"].as_str().unwrap().to_owned());
    }
    uuids
}

/// Follows `Link: <…>; rel="next"` from `first` to the end, returning every uuid seen.
async fn walk(app: &TestApp, first: &str, between_pages: impl AsyncFn(usize)) -> Vec<String> {
    let mut seen = Vec::new();
    let mut next = Some(first.to_owned());
    let mut pages = 0;
    while let Some(path) = next {
        let response = app.get(&path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        next = response.headers().get("link").map(|link| {
            let link = link.to_str().unwrap();
            assert!(link.ends_with(">; rel=\"next\""), "{link}");
            link.trim_start_matches('<')
                .split_once('>')
                .unwrap()
                .0
                .to_owned()
        });
        let page: Vec<Value> = response.json().await.unwrap();
        assert!(!page.is_empty(), "a Link never points at an empty page");
        seen.extend(page.iter().map(|u| u["uuid"].as_str().unwrap().to_owned()));
        pages += 1;
        between_pages(pages).await;
        assert!(pages < 100, "runaway pagination");
    }
    seen
}

#[tokio::test]
async fn list_is_newest_first_and_pages_walk_without_duplicates_or_gaps() {
    let app = spawn_app().await;
    let mut created = create_many(&app, 23).await;
    created.reverse();

    let seen = walk(&app, "/api/users?limit=5", async |_| {}).await;
    assert_eq!(seen, created, "every user once, newest first");

    let all: Vec<Value> = app.get_json("/api/users").await;
    assert_eq!(all.len(), 23, "default limit 50 holds them all");
    let response = app.get("/api/users?limit=23").await;
    assert!(
        response.headers().get("link").is_none(),
        "no next page after the last"
    );
}

#[tokio::test]
async fn users_created_during_a_walk_do_not_shift_the_pages() {
    let app = spawn_app().await;
    let mut created = create_many(&app, 12).await;
    created.reverse();
    let seen = walk(&app, "/api/users?limit=4", async |page| {
        app.create_user(
            &format!("Latecomer {page}"),
            &format!("late{page}@example.com"),
        )
        .await;
    })
    .await;
    assert_eq!(
        seen, created,
        "newer users land before the cursor, never inside the walk"
    );
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len());
}

#[tokio::test]
async fn q_filters_by_name_or_email_ignoring_case_and_survives_paging() {
    let app = spawn_app().await;
    app.create_user("João Silva", "joao@example.com").await;
    app.create_user("Maria Silva", "maria@example.org").await;
    app.create_user("ÉLODIE Martin", "elodie@silva-mail.example")
        .await;
    app.create_user("Bob Stone", "bob@example.com").await;

    let names = |users: Vec<Value>| -> Vec<String> {
        users
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let silva: Vec<Value> = app.get_json("/api/users?q=SILVA").await;
    assert_eq!(names(silva), ["ÉLODIE Martin", "Maria Silva", "João Silva"]);
    let elodie: Vec<Value> = app.get_json("/api/users?q=%C3%A9lodie").await;
    assert_eq!(names(elodie), ["ÉLODIE Martin"], "Unicode case folding");
    let none: Vec<Value> = app.get_json("/api/users?q=%25").await;
    assert!(none.is_empty(), "% is a character, not a wildcard");

    let seen = walk(&app, "/api/users?limit=1&q=silva", async |_| {}).await;
    assert_eq!(seen.len(), 3, "the filter is carried in the next link");
}

#[tokio::test]
async fn bad_list_parameters_are_400_with_field_errors() {
    let app = spawn_app().await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("cursor=garbage", "cursor"),
    ] {
        let response = app.get(&format!("/api/users?{query}")).await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST).await;
        assert!(problem["errors"][field].is_array(), "{query}: {problem}");
    }
    let response = app.get("/api/users?limit=200").await;
    assert_eq!(response.status(), StatusCode::OK);
}
