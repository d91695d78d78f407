//! The erasure proof: after `DELETE /api/users/{uuid}` and delivery, no store holds the
//! user's name or e-mail any more: not the database (users, outbox, bus queue, dead
//! letters, idempotency keys), not the profile store, not the cache, not the broker.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::Row;
use userhub::bus::Outcome;
use userhub::db::Database;
use userhub::enrichment::BINDING;
use userhub::startup::Roles;

use crate::helpers::{ControlledStore, DEADLINE, Spawn, TestApp, eventually, spawn};
use crate::services::{AMQP, service_url};

const TABLES: [&str; 6] = [
    "users",
    "outbox",
    "bus_messages",
    "dead_letters",
    "idempotency_keys",
    "enriched_profiles",
];

/// Rows of `table` with a text column containing `needle` (0 when there is no such
/// table: PostgreSQL has no profile table, MongoDB holds the profiles then).
async fn rows_holding(db: &Database, table: &str, needle: &str) -> usize {
    match db {
        Database::Sqlite(pool) => {
            let sql = format!("SELECT * FROM {table}");
            let Ok(rows) = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await else {
                return 0;
            };
            rows.iter()
                .filter(|row| {
                    (0..row.len()).any(|i| {
                        row.try_get::<Option<String>, _>(i)
                            .ok()
                            .flatten()
                            .is_some_and(|text| text.contains(needle))
                    })
                })
                .count()
        }
        Database::Postgres(pool) => {
            let sql = format!("SELECT COUNT(*) FROM {table} t WHERE strpos(t::text, $1) > 0");
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                .bind(needle)
                .fetch_one(pool)
                .await
                .map_or(0, |n| usize::try_from(n).unwrap_or(0))
        }
    }
}

/// Every place of `app`'s stores that still holds `needle`.
async fn places_holding(app: &TestApp, needle: &str) -> Vec<String> {
    let mut places = Vec::new();
    for table in TABLES {
        let rows = rows_holding(&app.db, table, needle).await;
        if rows > 0 {
            places.push(format!("{rows} rows of table {table}"));
        }
    }
    if let Some(mongo) = &app.storage.mongo {
        let documents = mongo.documents().await;
        let holding = documents
            .iter()
            .filter(|d| d.to_string().contains(needle))
            .count();
        if holding > 0 {
            places.push(format!("{holding} MongoDB documents"));
        }
    }
    if let Some(redis) = &app.storage.redis {
        let mut connection = crate::redis_cache::raw_connection(&redis.url).await;
        let values = crate::redis_cache::values_prefixed(&mut connection, &redis.prefix).await;
        let holding = values.iter().filter(|v| v.contains(needle)).count();
        if holding > 0 {
            places.push(format!("{holding} Redis keys"));
        }
    }
    let dead: Vec<Value> = app.get_json("/admin/dead-letters?limit=500").await;
    let holding = dead
        .iter()
        .filter(|d| d.to_string().contains(needle))
        .count();
    if holding > 0 {
        places.push(format!("{holding} dead letters"));
    }
    places
}

/// Delivers until a message is dead-lettered (retries wait for their backoff).
async fn deliver_until_dead_lettered(app: &TestApp) {
    let started = Instant::now();
    loop {
        app.relay.drain().await.unwrap();
        let outcome = app
            .bus()
            .process_next(&BINDING, app.handler.as_ref())
            .await
            .unwrap();
        if matches!(outcome, Some(Outcome::DeadLettered { .. })) {
            return;
        }
        assert!(started.elapsed() < DEADLINE, "nothing was dead-lettered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn after_a_delete_no_store_holds_the_users_name_or_email() {
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    let token = uuid::Uuid::now_v7().simple().to_string();
    let (name, email) = (
        format!("Erase {token}"),
        format!("erase.{token}@example.com"),
    );
    let new_email = format!("moved.{token}@example.com");

    // Everywhere a user's data can be: the user row, its events, an idempotency key, a
    // dead letter (the first enrichment fails for good: a failed profile with the
    // name and e-mail), an update, a completed profile, the caches.
    let response = app
        .send(
            Method::POST,
            "/api/users",
            &[("idempotency-key", "erase-me")],
            Some(&json!({"name": name, "email": email})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let uuid = response.json::<Value>().await.unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    store.fail_next_upserts(3);
    deliver_until_dead_lettered(&app).await;
    let view: Value = app.get_json(&format!("/api/users/{uuid}/profile")).await;
    assert_eq!(view["enrichment"]["status"], "failed");
    let response = app
        .patch_json(&format!("/api/users/{uuid}"), &json!({"email": new_email}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    app.deliver_all().await;
    app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    app.wait_for_ok(&format!("/api/users/{uuid}")).await;
    for needle in [&token] {
        assert!(
            !places_holding(&app, needle).await.is_empty(),
            "the data is there first"
        );
    }

    let response = app.delete(&format!("/api/users/{uuid}")).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    app.deliver_all().await;

    // The token is in the name and in both addresses.
    assert_eq!(places_holding(&app, &token).await, Vec::<String>::new());
    for path in [
        format!("/api/users/{uuid}"),
        format!("/api/users/{uuid}/profile"),
        format!("/users/enriched/{uuid}"),
    ] {
        assert_eq!(
            app.get(&path).await.status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    // The record of what happened stays, without personal data: the created and
    // updated events were sent before the deletion, so they are redacted, not dropped.
    let rows: Vec<(String, String)> = userhub::with_pool!(&app.db, |pool| sqlx::query_as(
        "SELECT routing_key, payload FROM outbox ORDER BY id"
    )
    .fetch_all(pool)
    .await)
    .unwrap();
    let keys: Vec<&str> = rows.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(keys, ["user.created", "user.updated", "user.deleted"]);
    for (_, payload) in &rows[..2] {
        let payload: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(payload, json!({"uuid": uuid, "erased": true}));
    }
}

#[tokio::test]
async fn on_rabbitmq_after_a_delete_no_store_or_queue_holds_the_user() {
    let Some(broker) = service_url(AMQP) else {
        return;
    };
    let store = ControlledStore::new();
    store.fail_next_upserts(3);
    let app = spawn(Spawn {
        roles: Roles::ALL,
        store: Some(store.clone()),
        amqp: Some(broker.clone()),
        ..Spawn::default()
    })
    .await;
    let prefix = app.storage.rabbit.as_ref().unwrap().prefix.clone();
    app.wait_for_ok("/health/ready").await;
    let token = uuid::Uuid::now_v7().simple().to_string();
    let user = app
        .create_user(
            &format!("Erase {token}"),
            &format!("erase.{token}@example.com"),
        )
        .await;
    let uuid = user["uuid"].as_str().unwrap().to_owned();

    // The first enrichment fails for good: a dead letter in the DLQ holds the data.
    eventually("the creation dead-lettered", async || {
        let dead: Vec<Value> = app.get_json("/admin/dead-letters").await;
        (!dead.is_empty()).then_some(())
    })
    .await;
    app.patch_json(
        &format!("/api/users/{uuid}"),
        &json!({"email": format!("moved.{token}@example.com")}),
    )
    .await;
    app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;

    let response = app.delete(&format!("/api/users/{uuid}")).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    eventually("the profile erased", async || {
        let status = app.get(&format!("/users/enriched/{uuid}")).await.status();
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    // The DLQ is purged right after the deletion is acknowledged; the queues drain.
    let work = format!("{prefix}{}", BINDING.queue);
    eventually("everything erased and drained", async || {
        let places = places_holding(&app, &token).await;
        let queued = crate::rabbitmq_bus::depth(&broker, &work).await
            + crate::rabbitmq_bus::depth(&broker, &format!("{work}.dlq")).await;
        (places.is_empty() && queued == 0).then_some(())
    })
    .await;
    app.stop().await;
}
