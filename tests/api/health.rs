//! Health, readiness, OpenAPI and Swagger UI.

use reqwest::StatusCode;
use serde_json::Value;
use userhub::startup::Roles;

use crate::helpers::{ControlledStore, Spawn, spawn, spawn_app};

#[tokio::test]
async fn health_reports_service_and_version() {
    let app = spawn_app().await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["service"], "userhub");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["timestamp"].is_string());
}

#[tokio::test]
async fn readiness_checks_each_dependency() {
    let app = spawn_app().await;
    let response = app.get("/health/ready").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    for dependency in ["database", "documents", "bus", "cache"] {
        assert_eq!(body["checks"][dependency]["status"], "up", "{body}");
        assert!(body["checks"][dependency]["latency_ms"].is_number());
    }
}

#[tokio::test]
async fn readiness_is_503_when_a_dependency_is_down() {
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        roles: Roles::ALL,
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    store.set_down(true);
    let response = app.get("/health/ready").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["documents"]["status"], "down");
    assert_eq!(body["checks"]["documents"]["required"], true);
    assert_eq!(body["checks"]["database"]["status"], "up");
    assert!(
        !body.to_string().contains("store is down (test)"),
        "no error text leaves the process: {body}"
    );

    store.set_down(false);
    assert_eq!(app.get("/health/ready").await.status(), StatusCode::OK);
    app.stop().await;
}

/// An API-only process serves users without the profile store (profile reads degrade
/// to `unavailable`): taking it out of the load balancer would not bring the store
/// back, only take the users API down with it.
#[tokio::test]
async fn an_api_process_stays_ready_without_the_profile_store() {
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        roles: Roles {
            api: true,
            relay: false,
            worker: false,
        },
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    store.set_down(true);
    let response = app.get("/health/ready").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["checks"]["documents"]["status"], "down");
    assert_eq!(body["checks"]["documents"]["required"], false);
    assert_eq!(body["checks"]["database"]["required"], true);
    assert_eq!(body["checks"]["bus"]["required"], false);
}

#[tokio::test]
async fn openapi_documents_every_route_with_its_errors() {
    let app = spawn_app().await;
    let doc: Value = app.get_json("/api-docs/openapi.json").await;
    let paths = doc["paths"].as_object().unwrap();
    for (path, method, statuses) in [
        (
            "/api/users",
            "post",
            &["201", "400", "409", "413", "415", "422", "429", "503"][..],
        ),
        ("/api/users", "get", &["200", "400", "429", "503"][..]),
        (
            "/api/users/{uuid}",
            "get",
            &["200", "304", "400", "404"][..],
        ),
        (
            "/api/users/{uuid}",
            "patch",
            &["200", "400", "404", "409", "412", "413", "415", "428"][..],
        ),
        (
            "/api/users/{uuid}",
            "delete",
            &["204", "400", "404", "412", "428"][..],
        ),
        ("/admin/reenrich", "post", &["202", "400", "413", "415"][..]),
        (
            "/api/users/{uuid}/profile",
            "get",
            &["200", "400", "404"][..],
        ),
        ("/users/enriched/{uuid}", "get", &["200", "400", "404"][..]),
        ("/health", "get", &["200"][..]),
        ("/health/ready", "get", &["200", "503"][..]),
    ] {
        let operation = &paths[path][method];
        assert!(operation.is_object(), "{method} {path} is documented");
        for status in statuses {
            assert!(
                operation["responses"][status].is_object(),
                "{method} {path} documents {status}"
            );
        }
    }
    // Every answer says its request id; rate-limited ones their quota.
    let created = &paths["/api/users"]["post"]["responses"]["201"]["headers"];
    for header in ["X-Request-Id", "Location", "ETag", "RateLimit-Remaining"] {
        assert!(created[header].is_object(), "201 declares {header}");
    }
    assert!(
        paths["/health"]["get"]["responses"]["429"].is_null(),
        "never limited"
    );
    // Links, spelt as the specification does (utoipa writes `operation_id`).
    let links = &paths["/api/users"]["post"]["responses"]["201"]["links"];
    assert_eq!(links["PatchUser"]["operationId"], "patch_user");
    assert_eq!(
        links["PatchUser"]["parameters"]["uuid"],
        "$response.body#/uuid"
    );
    assert!(!doc.to_string().contains("operation_id"));
    // The rules the parsers apply, as patterns.
    let name = &doc["components"]["schemas"]["CreateUserRequest"]["properties"]["name"];
    assert!(name["pattern"].as_str().unwrap().starts_with('^'), "{name}");

    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "Problem",
        "UserResponse",
        "CreateUserRequest",
        "EnrichedProfileResponse",
        "UserProfileResponse",
    ] {
        assert!(schemas.contains_key(schema), "schema {schema}");
        assert!(
            schemas[schema]["example"].is_object(),
            "{schema} has an example"
        );
    }
}

#[tokio::test]
async fn swagger_ui_is_served_and_the_root_redirects_to_the_console() {
    let app = spawn_app().await;
    let ui = app.get("/swagger-ui/").await;
    assert_eq!(ui.status(), StatusCode::OK);
    assert!(ui.text().await.unwrap().contains("swagger"));
    let root = app.get("/").await;
    assert_eq!(root.status(), StatusCode::FOUND);
    assert_eq!(root.headers()["location"], "/console/");
}

#[tokio::test]
async fn swagger_ui_ships_what_its_page_loads_and_not_the_rest() {
    let app = spawn_app().await;
    // What /swagger-ui/ loads, whole.
    for (asset, at_least) in [
        ("swagger-ui-bundle.js", 1_000_000),
        ("swagger-ui-standalone-preset.js", 200_000),
        ("swagger-ui.css", 100_000),
    ] {
        let response = app.get(&format!("/swagger-ui/{asset}")).await;
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
        let size = response.bytes().await.unwrap().len();
        assert!(size >= at_least, "{asset} is {size} bytes");
    }
    // The source maps and the builds no page here loads: each file of assets/swagger-ui
    // (.cargo/config.toml) is served in place of Swagger UI's own.
    let placeholders = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/swagger-ui");
    for entry in std::fs::read_dir(placeholders).unwrap() {
        let path = entry.unwrap().path();
        let asset = path.file_name().unwrap().to_str().unwrap();
        let response = app.get(&format!("/swagger-ui/{asset}")).await;
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
        let served = response.bytes().await.unwrap();
        assert_eq!(served, std::fs::read(&path).unwrap(), "{asset}");
    }
}

#[tokio::test]
async fn metrics_count_requests_per_route_deliveries_cache_and_backlog() {
    let app = crate::helpers::spawn_running_app().await;
    let user = app.create_user("Ada Lovelace", "ada@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    // The profile is readable a moment before the consumer counts the delivery.
    crate::helpers::eventually("the delivery is counted", async || {
        let text = app.get("/metrics").await.text().await.unwrap();
        text.contains(r#"userhub_deliveries_total{outcome="ok",queue="enrichment.users"} 1"#)
            .then_some(())
    })
    .await;
    app.get(&format!("/api/users/{uuid}")).await;
    app.get(&format!("/api/users/{uuid}")).await;

    let response = app.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for expected in [
        r#"userhub_http_requests_total{method="POST",route="/api/users",status="201"} 1"#,
        r#"userhub_http_requests_total{method="GET",route="/api/users/{uuid}",status="200"} 2"#,
        r#"userhub_deliveries_total{outcome="ok",queue="enrichment.users"} 1"#,
        r#"userhub_cache_lookups_total{result="hit"}"#,
        "userhub_outbox_backlog 0",
        r#"userhub_db_connections{state="size"}"#,
        "userhub_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
    assert!(!text.contains(uuid), "no per-uuid series");
    app.stop().await;
}
