//! The events are a contract too: `/api-docs/asyncapi.json` is an AsyncAPI 3.0 document
//! of the three user events, and what the code publishes validates against it.

use std::collections::BTreeMap;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};

/// The schema `reference` (`#/components/…`) points to in `document`.
fn resolve<'a>(document: &'a Value, reference: &Value) -> &'a Value {
    let pointer = reference["$ref"]
        .as_str()
        .expect("a $ref")
        .trim_start_matches('#');
    document.pointer(pointer).expect("the reference resolves")
}

/// Validates `instance` against `schema`, formats included; the errors, if any.
fn errors(schema: &Value, instance: &Value) -> Vec<String> {
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .expect("a valid JSON Schema");
    validator
        .iter_errors(instance)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect()
}

/// Every message of the outbox: routing key, payload and headers.
async fn published(app: &TestApp) -> Vec<(String, Value, Value)> {
    let rows: Vec<(String, String, String)> = userhub::with_pool!(&app.db, |pool| {
        sqlx::query_as("SELECT routing_key, payload, headers FROM outbox ORDER BY id")
            .fetch_all(pool)
            .await
    })
    .unwrap();
    rows.into_iter()
        .map(|(key, payload, headers)| {
            (
                key,
                serde_json::from_str(&payload).unwrap(),
                serde_json::from_str(&headers).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_asyncapi_document_describes_the_three_events_on_the_exchange() {
    let app = spawn_app().await;
    let response = app
        .anonymous
        .get(app.url("/api-docs/asyncapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "public, like the OpenAPI document"
    );
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["asyncapi"], "3.0.0");
    let exchange = &document["channels"]["userEvents"];
    assert_eq!(exchange["address"], "userhub.events");
    assert_eq!(exchange["bindings"]["amqp"]["exchange"]["type"], "topic");
    let queue = &document["channels"]["enrichmentUsers"];
    assert_eq!(queue["address"], userhub::enrichment::BINDING.queue);
    let names: Vec<&str> = ["UserCreated", "UserUpdated", "UserDeleted"]
        .iter()
        .map(|m| {
            document["components"]["messages"][m]["name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(names, ["user.created", "user.updated", "user.deleted"]);
    for operation in [
        "publishUserCreated",
        "publishUserUpdated",
        "publishUserDeleted",
    ] {
        assert_eq!(
            document["operations"][operation]["action"], "send",
            "{operation}"
        );
    }
    assert_eq!(
        document["operations"]["receiveUserEvents"]["action"],
        "receive"
    );
    // The payloads' schemas are the event types', with their required fields.
    let created = &document["components"]["schemas"]["UserCreated"];
    let required: Vec<&str> = created["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for field in ["uuid", "name", "email", "created_at"] {
        assert!(required.contains(&field), "{field} in {required:?}");
    }
}

#[tokio::test]
async fn every_published_event_validates_against_the_document() {
    let app = spawn_app().await;
    let document: Value = app.get_json("/api-docs/asyncapi.json").await;
    let user = app.create_user("Ada Lovelace", "ada@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    app.patch_json(&format!("/api/users/{uuid}"), &json!({"name": "Ada King"}))
        .await;
    app.post_json("/admin/reenrich", &json!({"all": true}))
        .await;
    // Read before the deletion, which drops (or redacts) the user's earlier events.
    let mut events = published(&app).await;
    assert_eq!(
        app.delete(&format!("/api/users/{uuid}")).await.status(),
        StatusCode::NO_CONTENT
    );
    events.extend(published(&app).await);

    let messages: BTreeMap<&str, &Value> = document["components"]["messages"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| (m["name"].as_str().unwrap(), m))
        .collect();
    let keys: Vec<&str> = events.iter().map(|(key, ..)| key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "user.created",
            "user.updated",
            "user.updated",
            "user.deleted"
        ]
    );
    for (key, payload, headers) in &events {
        let message = messages[key.as_str()];
        let payload_schema = resolve(&document, &message["payload"]);
        let headers_schema = resolve(&document, &message["headers"]);
        assert_eq!(
            errors(payload_schema, payload),
            Vec::<String>::new(),
            "{key} {payload}"
        );
        assert_eq!(
            errors(headers_schema, headers),
            Vec::<String>::new(),
            "{key} {headers}"
        );
    }

    // The check can fail: a payload without its uuid, or with a version of 0, does not.
    let broken = json!({"deleted_at": "2026-11-30T09:00:00Z", "version": 0});
    let deleted = resolve(&document, &messages["user.deleted"]["payload"]);
    assert!(!errors(deleted, &broken).is_empty());
}
