//! The whole application on RabbitMQ: a broker outage only delays enrichment, and dead
//! letters are listed and replayed through the admin API.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use userhub::startup::Roles;

use crate::helpers::{Api, ControlledStore, DEADLINE, Spawn, spawn};
use crate::proxy::ToggleProxy;
use crate::services::{AMQP, service_url};

/// host:port of an amqp:// URL.
fn broker_address(url: &str) -> SocketAddr {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host_port = authority.split('/').next().unwrap_or(authority);
    host_port
        .parse()
        .expect("the AMQP URL names an IP address and port")
}

/// Polls `path` until it answers `status`.
async fn wait_for_status(api: &Api, path: &str, status: StatusCode, deadline: Duration) {
    let started = Instant::now();
    loop {
        if api.get(path).await.status() == status {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "{path} never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_broker_outage_delays_enrichment_but_loses_and_duplicates_nothing() {
    let Some(broker) = service_url(AMQP) else {
        return;
    };
    let proxy = ToggleProxy::start(broker_address(&broker)).await;
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        roles: Roles::ALL,
        store: Some(store.clone()),
        amqp: Some(format!("amqp://guest:guest@{}/%2f", proxy.addr)),
        ..Spawn::default()
    })
    .await;
    wait_for_status(&app, "/health/ready", StatusCode::OK, DEADLINE).await;
    let mut uuids = Vec::new();
    for i in 0..5 {
        let user = app
            .create_user(&format!("Before {i}"), &format!("before{i}@example.com"))
            .await;
        uuids.push(user["uuid"].as_str().unwrap().to_owned());
    }
    for uuid in &uuids {
        app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    }

    proxy.cut();
    wait_for_status(
        &app,
        "/health/ready",
        StatusCode::SERVICE_UNAVAILABLE,
        DEADLINE,
    )
    .await;
    let ready: Value = app.get_json("/health/ready").await;
    assert_eq!(ready["checks"]["bus"]["status"], "down", "{ready}");
    for i in 0..20 {
        let user = app
            .create_user(&format!("During {i}"), &format!("during{i}@example.com"))
            .await;
        uuids.push(user["uuid"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        app.outbox_unsent().await,
        20,
        "the outbox holds what the broker cannot take"
    );

    let restored = Instant::now();
    proxy.restore();
    // The relay and the connection back off during the outage (up to seconds), so
    // allow more than the usual deadline for the backlog to drain.
    let drain_deadline = Duration::from_secs(60);
    for uuid in &uuids {
        let started = Instant::now();
        while app.get(&format!("/users/enriched/{uuid}")).await.status() != StatusCode::OK {
            assert!(started.elapsed() < drain_deadline, "{uuid} never enriched");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "backlog of 20 drained {:?} after the broker came back",
        restored.elapsed()
    );
    assert_eq!(app.outbox_unsent().await, 0);
    // One event per user, relayed once: every user's profile comes from exactly one
    // event id. Delivery is at-least-once, so an ack lost in the cut may bring one
    // event back; that redelivery rewrites the same profile and is only reported.
    let events = store.events_by_user();
    assert_eq!(events.len(), 25, "every user enriched");
    assert!(events.values().all(|ids| ids.len() == 1), "{events:?}");
    let upserts = store.upsert_attempts.lock().unwrap().len();
    eprintln!(
        "{upserts} handler runs for 25 events (redeliveries: {})",
        upserts - 25
    );
    let dead: Vec<Value> = app.get_json("/admin/dead-letters").await;
    assert!(dead.is_empty(), "{dead:?}");
    app.stop().await;
}

#[tokio::test]
async fn on_rabbitmq_a_failing_store_ends_in_the_dlq_and_replay_enriches_the_user() {
    let Some(broker) = service_url(AMQP) else {
        return;
    };
    let store = ControlledStore::new();
    store.fail_next_upserts(u32::MAX);
    let app = spawn(Spawn {
        roles: Roles::ALL,
        store: Some(store.clone()),
        amqp: Some(broker),
        ..Spawn::default()
    })
    .await;
    wait_for_status(&app, "/health/ready", StatusCode::OK, DEADLINE).await;
    let user = app.create_user("Grace Hopper", "grace@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();

    let started = Instant::now();
    let dead = loop {
        let listed: Vec<Value> = app.get_json("/admin/dead-letters").await;
        if let Some(letter) = listed.into_iter().next() {
            break letter;
        }
        assert!(started.elapsed() < DEADLINE, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead["attempts"], 3, "{dead}");
    assert!(
        dead["error"].as_str().unwrap().contains("upsert refused"),
        "{dead}"
    );
    assert_eq!(store.upsert_attempts.lock().unwrap().len(), 3);
    // Retries waited for the retry queues' TTLs (20 ms, then 40 ms in test settings).
    let attempts = store.upsert_attempts.lock().unwrap().clone();
    assert!(attempts[1] - attempts[0] >= Duration::from_millis(20));
    assert!(attempts[2] - attempts[1] >= Duration::from_millis(40));
    let profile: Value = app.get_json(&format!("/api/users/{uuid}/profile")).await;
    assert_eq!(profile["enrichment"]["status"], "failed");

    store.fail_next_upserts(0);
    let id = dead["id"].as_str().unwrap();
    let replay = app
        .client
        .post(app.url(&format!("/admin/dead-letters/{id}/replay")))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    let listed: Vec<Value> = app.get_json("/admin/dead-letters").await;
    assert!(listed.is_empty(), "{listed:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_message_on_the_work_queue_is_dead_lettered_without_blocking_users() {
    let Some(broker) = service_url(AMQP) else {
        return;
    };
    let app = spawn(Spawn {
        roles: Roles::ALL,
        amqp: Some(broker.clone()),
        ..Spawn::default()
    })
    .await;
    wait_for_status(&app, "/health/ready", StatusCode::OK, DEADLINE).await;
    let prefix = app.storage.rabbit.as_ref().unwrap().prefix.clone();

    // Published by hand with the event's routing key, bypassing the outbox: not JSON.
    let (connection, channel) = crate::rabbitmq_bus::raw_channel(&broker).await;
    let poison_id = uuid::Uuid::now_v7().to_string();
    channel
        .basic_publish(
            format!("{prefix}userhub.events").as_str().into(),
            userhub::enrichment::BINDING.routing_keys[0].into(),
            lapin::options::BasicPublishOptions::default(),
            b"{\"uuid\": 42",
            lapin::BasicProperties::default()
                .with_message_id(poison_id.as_str().into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();

    let user = app.create_user("Alan Turing", "alan@example.com").await;
    app.wait_for_ok(&format!(
        "/users/enriched/{}",
        user["uuid"].as_str().unwrap()
    ))
    .await;
    let started = Instant::now();
    loop {
        let dead: Vec<Value> = app.get_json("/admin/dead-letters").await;
        if let Some(letter) = dead.first() {
            assert_eq!(letter["message_id"], poison_id);
            assert_eq!(letter["attempts"], 1, "never retried");
            assert!(
                letter["error"].as_str().unwrap().contains("malformed"),
                "{letter}"
            );
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the poison message never reached the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}
