//! Every error is problem+json; request ids are echoed.

use reqwest::StatusCode;

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn malformed_json_is_400_problem() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/api/users"))
        .header("content-type", "application/json")
        .body(r#"{"name": "Ada", "email": "#)
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, StatusCode::BAD_REQUEST).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("JSON"),
        "{problem}"
    );
}

#[tokio::test]
async fn a_non_json_content_type_is_415_problem() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/api/users"))
        .header("content-type", "text/plain")
        .body(r#"{"name": "Ada Lovelace", "email": "ada@example.com"}"#)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_problem() {
    let app = spawn_app().await;
    let name = "a".repeat(20 * 1024);
    let response = app.post_user(&name, "big@example.com").await;
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
}

#[tokio::test]
async fn an_unknown_route_is_404_problem() {
    let app = spawn_app().await;
    for path in ["/nope", "/api/users/x/y/z", "/api"] {
        let response = app.get(path).await;
        assert_problem(response, StatusCode::NOT_FOUND).await;
    }
}

#[tokio::test]
async fn a_wrong_method_is_405_problem_with_allow_on_every_route() {
    let app = spawn_app().await;
    let uuid = "01936f0e-8a4c-7b21-9c3d-2f5e8a1b4c6d";
    for (method, path, allowed) in [
        ("DELETE", "/api/users".to_owned(), "GET"),
        ("TRACE", "/health".to_owned(), "GET"),
        ("POST", "/health/ready".to_owned(), "GET"),
        ("PUT", "/metrics".to_owned(), "GET"),
        ("PATCH", "/admin/dead-letters".to_owned(), "GET"),
        ("GET", "/admin/dead-letters/1/replay".to_owned(), "POST"),
        ("POST", format!("/users/enriched/{uuid}"), "GET"),
        ("PUT", format!("/api/users/{uuid}/profile"), "GET"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = app
            .client
            .request(method.clone(), app.url(&path))
            .send()
            .await
            .unwrap();
        let allow = response.headers().get("allow").cloned();
        assert_problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
        let allow = allow.unwrap_or_else(|| panic!("{method} {path}: no Allow header"));
        assert!(
            allow.to_str().unwrap().contains(allowed),
            "{method} {path}: Allow {allow:?}"
        );
    }
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-chosen-42");

    let generated = app.get("/health").await;
    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");

    let problem = app.get("/nope").await;
    assert!(
        problem.headers().contains_key("x-request-id"),
        "errors carry it too"
    );

    let hostile = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "evil value with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(hostile.headers()["x-request-id"], "evil value with spaces");
}
