//! Delivery guarantees: outbox, retries with backoff, dead letters, idempotency,
//! restart safety, request id propagation.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use userhub::bus::{Envelope, EventBus, Outcome, headers};
use userhub::enrichment::BINDING;
use userhub::startup::Roles;
use userhub::with_pool;

use crate::helpers::{
    ControlledStore, DEADLINE, Spawn, TestApp, assert_problem, eventually, spawn, spawn_app,
};

/// Polls the consumer until a message is due and delivered.
async fn next_outcome(app: &TestApp) -> Outcome {
    let started = Instant::now();
    loop {
        if let Some(outcome) = app
            .bus()
            .process_next(&BINDING, app.handler.as_ref())
            .await
            .unwrap()
        {
            return outcome;
        }
        assert!(started.elapsed() < DEADLINE, "no message became due");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn spawn_with_store() -> (TestApp, std::sync::Arc<ControlledStore>) {
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    (app, store)
}

async fn outbox_envelope(app: &TestApp) -> Envelope {
    let (id, payload, headers_json): (String, String, String) =
        with_pool!(&app.db, |pool| sqlx::query_as(
            "SELECT CAST(event_id AS TEXT), payload, headers FROM outbox ORDER BY id LIMIT 1"
        )
        .fetch_one(pool)
        .await)
        .unwrap();
    Envelope {
        id: id.parse().unwrap(),
        routing_key: "user.created".into(),
        payload,
        headers: serde_json::from_str(&headers_json).unwrap(),
        occurred_at: chrono::Utc::now(),
    }
}

#[tokio::test]
async fn transient_failures_are_retried_on_the_backoff_schedule_then_succeed() {
    let (app, store) = spawn_with_store().await;
    store.fail_next_upserts(2);
    let user = app.create_user("Ada Lovelace", "ada@example.com").await;
    assert_eq!(app.relay.drain().await.unwrap(), 1);

    // Test settings: base 20 ms, so retry 1 waits 10–20 ms and retry 2 waits 20–40 ms.
    assert!(
        matches!(next_outcome(&app).await, Outcome::Retried { attempt: 1, delay } if delay >= Duration::from_millis(10) && delay <= Duration::from_millis(20))
    );
    assert!(
        matches!(next_outcome(&app).await, Outcome::Retried { attempt: 2, delay } if delay >= Duration::from_millis(20) && delay <= Duration::from_millis(40))
    );
    assert_eq!(next_outcome(&app).await, Outcome::Acked);

    let attempts = store.upsert_attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts[1] - attempts[0] >= Duration::from_millis(10),
        "first retry waited"
    );
    assert!(
        attempts[2] - attempts[1] >= Duration::from_millis(20),
        "second retry waited longer"
    );

    let uuid = user["uuid"].as_str().unwrap();
    let enriched = app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    assert_eq!(enriched["github"], "github.com/adalovelace");
    assert!(app.bus().dead_letters(10, None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_store_that_keeps_failing_leads_to_a_dead_letter_and_a_failed_profile() {
    let (app, store) = spawn_with_store().await;
    store.fail_next_upserts(u32::MAX);
    let user = app.create_user("Grace Hopper", "grace@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    app.relay.drain().await.unwrap();

    assert!(matches!(
        next_outcome(&app).await,
        Outcome::Retried { attempt: 1, .. }
    ));
    assert!(matches!(
        next_outcome(&app).await,
        Outcome::Retried { attempt: 2, .. }
    ));
    assert_eq!(
        next_outcome(&app).await,
        Outcome::DeadLettered { attempt: 3 }
    );
    assert_eq!(app.bus().pending(BINDING.queue).await.unwrap(), 0);

    let dead = app.bus().dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].queue, BINDING.queue);
    assert!(
        dead[0].error.contains("upsert refused"),
        "{}",
        dead[0].error
    );
    assert!(
        dead[0].payload.contains(uuid),
        "the event is kept for replay"
    );

    let profile: Value = app.get_json(&format!("/api/users/{uuid}/profile")).await;
    assert_eq!(profile["enrichment"]["status"], "failed");
    let response = app.get(&format!("/users/enriched/{uuid}")).await;
    assert_problem(response, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn an_unparseable_message_is_dead_lettered_at_once_without_blocking_others() {
    let app = spawn_app().await;
    let poison = Envelope::new("user.created", "{not json".into(), Default::default());
    app.bus().publish(&poison).await.unwrap();
    let user = app.create_user("Alan Turing", "alan@example.com").await;

    let outcomes = app.deliver_all().await;
    assert_eq!(
        outcomes,
        [Outcome::DeadLettered { attempt: 1 }, Outcome::Acked]
    );
    let dead = app.bus().dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, poison.id);
    assert!(dead[0].error.contains("malformed"), "{}", dead[0].error);
    app.wait_for_ok(&format!(
        "/users/enriched/{}",
        user["uuid"].as_str().unwrap()
    ))
    .await;
}

#[tokio::test]
async fn an_unknown_event_version_is_dead_lettered_not_retried() {
    let app = spawn_app().await;
    let user = app.create_user("Alan Turing", "alan@example.com").await;
    app.relay.drain().await.unwrap();
    let mut future = outbox_envelope(&app).await;
    future.id = uuid::Uuid::now_v7();
    future
        .headers
        .insert(headers::EVENT_VERSION.into(), "99".into());
    app.bus().publish(&future).await.unwrap();
    let outcomes = app.deliver_all().await;
    assert!(
        outcomes.contains(&Outcome::DeadLettered { attempt: 1 }),
        "{outcomes:?}"
    );
    assert!(outcomes.contains(&Outcome::Acked), "{outcomes:?}");
    let _ = user;
}

#[tokio::test]
async fn redelivery_of_an_event_is_harmless() {
    let app = spawn_app().await;
    let user = app.create_user("Ada Lovelace", "ada@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    assert_eq!(app.deliver_all().await, [Outcome::Acked]);
    let first: Value = app.get_json(&format!("/users/enriched/{uuid}")).await;

    // The relay crashed after publishing but before marking the row sent: the same
    // event (same id) is published again — twice, even.
    let envelope = outbox_envelope(&app).await;
    app.bus().publish(&envelope).await.unwrap();
    app.bus().publish(&envelope).await.unwrap();
    assert_eq!(
        app.bus().pending(BINDING.queue).await.unwrap(),
        1,
        "queued once per id"
    );
    assert_eq!(app.deliver_all().await, [Outcome::Acked]);

    let again: Value = app.get_json(&format!("/users/enriched/{uuid}")).await;
    assert_eq!(
        again["enriched_at"], first["enriched_at"],
        "first enrichment time kept"
    );
    assert_eq!(again["source_event_id"], envelope.id.to_string());
    assert_eq!(again["github"], first["github"]);
}

#[tokio::test]
async fn the_request_id_travels_with_the_event() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/api/users"))
        .header("x-request-id", "trace-me-123")
        .json(&serde_json::json!({"name": "Ada Lovelace", "email": "ada@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let envelope = outbox_envelope(&app).await;
    assert_eq!(envelope.header(headers::REQUEST_ID), Some("trace-me-123"));
    assert_eq!(envelope.header(headers::EVENT_VERSION), Some("1"));
}

#[tokio::test]
async fn a_user_created_while_the_relay_is_stopped_is_enriched_after_a_restart() {
    let api_only = spawn(Spawn {
        roles: Roles {
            api: true,
            relay: false,
            worker: false,
        },
        ..Spawn::default()
    })
    .await;
    let user = api_only
        .create_user("Ada Lovelace", "ada@example.com")
        .await;
    assert_eq!(api_only.outbox_unsent().await, 1);
    let storage = api_only.stop().await;

    let restarted = spawn(Spawn {
        roles: Roles::ALL,
        storage: Some(storage),
        ..Spawn::default()
    })
    .await;
    let uuid = user["uuid"].as_str().unwrap();
    let enriched = restarted
        .wait_for_ok(&format!("/users/enriched/{uuid}"))
        .await;
    assert_eq!(enriched["github"], "github.com/adalovelace");
    restarted.stop().await;
}

/// On PostgreSQL, a process that serves the API without a relay wakes the relays of
/// the others with a `NOTIFY` after its commits: here a relay that would otherwise
/// poll once in ten minutes. (SQLite has no relay in another process.)
#[tokio::test]
async fn an_api_process_without_a_relay_wakes_the_relay_of_another() {
    let api_only = spawn_app().await;
    if api_only.storage.postgres.is_none() {
        return;
    }
    let relay_only = spawn(Spawn {
        roles: Roles {
            api: false,
            relay: true,
            worker: false,
        },
        storage: Some(api_only.storage.clone()),
        configure: Box::new(|settings| settings.outbox.poll_interval_ms = 600_000),
        ..Spawn::default()
    })
    .await;
    // The relay listens before its first batch: the first user's event may be in that
    // batch, the second's reaches the relay only through the NOTIFY.
    for (name, email) in [
        ("Ada Lovelace", "ada@example.com"),
        ("Grace Hopper", "grace@example.com"),
    ] {
        api_only.create_user(name, email).await;
        eventually(&format!("{name}'s event relayed"), async || {
            (api_only.outbox_unsent().await == 0).then_some(())
        })
        .await;
    }
    relay_only.stop().await;
    api_only.stop().await;
}

#[tokio::test]
async fn a_message_waiting_for_a_retry_survives_a_restart() {
    let (app, store) = spawn_with_store().await;
    store.fail_next_upserts(1);
    let user = app.create_user("Grace Hopper", "grace@example.com").await;
    app.relay.drain().await.unwrap();
    assert!(matches!(
        next_outcome(&app).await,
        Outcome::Retried { attempt: 1, .. }
    ));
    let storage = app.stop().await;

    let restarted = spawn(Spawn {
        roles: Roles::ALL,
        storage: Some(storage),
        ..Spawn::default()
    })
    .await;
    let uuid = user["uuid"].as_str().unwrap();
    restarted
        .wait_for_ok(&format!("/users/enriched/{uuid}"))
        .await;
    restarted.stop().await;
}

#[tokio::test]
async fn many_users_created_concurrently_are_each_enriched_once() {
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        roles: Roles::ALL,
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    let app_ref = &app;
    let creates = (0..40).map(|i| async move {
        app_ref
            .post_user(&format!("Person {i:02}"), &format!("p{i}@example.com"))
            .await
    });
    let mut uuids = Vec::new();
    for response in futures_util::future::join_all(creates).await {
        assert_eq!(response.status(), StatusCode::CREATED);
        let user: Value = response.json().await.unwrap();
        uuids.push(user["uuid"].as_str().unwrap().to_owned());
    }
    for uuid in &uuids {
        app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    }
    assert_eq!(app.outbox_unsent().await, 0);
    // A profile is readable once stored, a moment before its message is acknowledged.
    eventually("every message acknowledged", async || {
        (app.bus().pending(BINDING.queue).await.unwrap() == 0).then_some(())
    })
    .await;
    let sent = app.count("SELECT COUNT(*) FROM outbox").await;
    assert_eq!(sent, 40, "one event per user");
    let upserts = store.upsert_attempts.lock().unwrap().len();
    assert_eq!(upserts, 40, "each event handled once");
    app.stop().await;
}

#[tokio::test]
async fn a_dead_letter_can_be_listed_and_replayed_once_the_store_recovers() {
    let (app, store) = spawn_with_store().await;
    store.fail_next_upserts(u32::MAX);
    let user = app.create_user("Grace Hopper", "grace@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    app.relay.drain().await.unwrap();
    while !matches!(next_outcome(&app).await, Outcome::DeadLettered { .. }) {}

    let listed: Vec<Value> = app.get_json("/admin/dead-letters").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["attempts"], 3);
    assert_eq!(listed[0]["queue"], BINDING.queue);
    assert_eq!(listed[0]["headers"]["event_version"], "1");
    let id = listed[0]["id"].as_str().unwrap().to_owned();

    store.fail_next_upserts(0);
    let replay = app
        .client
        .post(app.url(&format!("/admin/dead-letters/{id}/replay")))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    assert_eq!(next_outcome(&app).await, Outcome::Acked);

    let profile: Value = app.get_json(&format!("/api/users/{uuid}/profile")).await;
    assert_eq!(
        profile["enrichment"]["status"], "completed",
        "failed turns completed"
    );
    let listed: Vec<Value> = app.get_json("/admin/dead-letters").await;
    assert!(listed.is_empty(), "a replayed letter is no longer listed");
    let again = app
        .client
        .post(app.url(&format!("/admin/dead-letters/{id}/replay")))
        .send()
        .await
        .unwrap();
    assert_problem(again, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn dead_letters_are_paged_with_a_link() {
    let app = spawn_app().await;
    for _ in 0..5 {
        let poison = Envelope::new("user.created", "not json".into(), Default::default());
        app.bus().publish(&poison).await.unwrap();
    }
    app.deliver_all().await;
    let mut seen = Vec::new();
    let mut next = Some("/admin/dead-letters?limit=2".to_owned());
    while let Some(path) = next.take() {
        let response = app.get(&path).await;
        assert_eq!(response.status(), StatusCode::OK);
        next = response.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            l[1..l.find('>').unwrap()].to_owned()
        });
        let page: Vec<Value> = response.json().await.unwrap();
        seen.extend(
            page.into_iter()
                .map(|d| d["id"].as_str().unwrap().to_owned()),
        );
        assert!(seen.len() <= 5);
    }
    assert_eq!(seen.len(), 5);
    let response = app.get("/admin/dead-letters?limit=0").await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn an_api_relay_process_and_a_worker_process_form_a_working_system() {
    let front = spawn(Spawn {
        roles: Roles {
            api: true,
            relay: true,
            worker: false,
        },
        ..Spawn::default()
    })
    .await;
    let worker = spawn(Spawn {
        roles: Roles {
            api: false,
            relay: false,
            worker: true,
        },
        storage: Some(front.storage.clone()),
        ..Spawn::default()
    })
    .await;
    // The worker process serves operations routes only.
    assert_eq!(worker.get("/health").await.status(), StatusCode::OK);
    assert_problem(worker.get("/api/users").await, StatusCode::NOT_FOUND).await;

    let user = front.create_user("Ada Lovelace", "ada@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    let enriched = front.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    assert_eq!(enriched["github"], "github.com/adalovelace");
    worker.stop().await;
    front.stop().await;
}

#[tokio::test]
async fn a_store_outage_pauses_the_consumer_and_loses_no_message_to_the_dead_letters() {
    use std::sync::atomic::Ordering;
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        roles: Roles::ALL,
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    store.set_down(true);
    let mut uuids = Vec::new();
    for i in 0..10 {
        let user = app
            .create_user(
                &format!("Outage User{i}"),
                &format!("outage{i}@example.com"),
            )
            .await;
        uuids.push(user["uuid"].as_str().unwrap().to_owned());
    }

    // A failed upsert followed by a failed ping: the store is down, the message
    // waits with its attempts untouched. Three of those open the breaker; from then
    // on the consumer only pings, once per cool-down (200 ms in tests).
    let opened_after = eventually("the store's breaker opens", async || {
        let metrics = app.get("/metrics").await.text().await.unwrap();
        metrics
            .contains("userhub_circuit_breaker_state{dependency=\"profile_store\"} 2")
            .then(|| store.failed_pings.load(Ordering::SeqCst))
    })
    .await;
    // Three failed trials: over half a second in which, unpaused, every message would
    // have spent its 3 attempts (backoff 20–200 ms).
    eventually("the paused consumer probes the store", async || {
        (store.failed_pings.load(Ordering::SeqCst) >= opened_after + 3).then_some(())
    })
    .await;
    let upserts_while_down = store.upsert_attempts.lock().unwrap().len();
    assert!(
        upserts_while_down <= 10,
        "no message was tried again while the store was down ({upserts_while_down} upserts)"
    );
    assert!(app.bus().dead_letters(10, None).await.unwrap().is_empty());
    // Readers are told to come back, at once and without an internal error.
    let response = app.get(&format!("/users/enriched/{}", uuids[0])).await;
    assert_eq!(response.headers()["retry-after"], "5");
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;

    store.set_down(false);
    for uuid in &uuids {
        app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    }
    assert!(app.bus().dead_letters(10, None).await.unwrap().is_empty());
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let requeued = metrics
        .lines()
        .find(|l| l.starts_with("userhub_deliveries_total") && l.contains("unavailable"))
        .expect("requeued deliveries are counted");
    assert!(!requeued.ends_with(" 0"), "{requeued}");
    assert!(
        metrics.contains("userhub_circuit_breaker_state{dependency=\"profile_store\"} 0"),
        "the breaker closed again"
    );
    app.stop().await;
}

#[tokio::test]
async fn dead_letters_are_replayed_in_bulk_by_filter() {
    let (app, store) = spawn_with_store().await;
    store.fail_next_upserts(u32::MAX);
    let mut uuids = Vec::new();
    for i in 0..3 {
        let user = app
            .create_user(&format!("Bulk User{i}"), &format!("bulk{i}@example.com"))
            .await;
        uuids.push(user["uuid"].as_str().unwrap().to_owned());
    }
    let poison = Envelope::new("user.created", "{not json".into(), Default::default());
    app.bus().publish(&poison).await.unwrap();
    app.relay.drain().await.unwrap();
    let mut dead = 0;
    while dead < 4 {
        if let Outcome::DeadLettered { .. } = next_outcome(&app).await {
            dead += 1;
        }
    }

    let post = |body: Value| {
        let app = &app;
        async move {
            app.client
                .post(app.url("/admin/dead-letters/replay"))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    assert_problem(
        post(serde_json::json!({"queue": BINDING.queue, "eror": "typo"})).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    // An array is not a filter, though serde would read the struct's fields from one.
    assert_problem(
        post(serde_json::json!([null, null])).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let none = post(serde_json::json!({"queue": "no.such.queue"})).await;
    assert_eq!(none.status(), StatusCode::ACCEPTED);
    assert_eq!(none.json::<Value>().await.unwrap()["replayed"], 0);

    store.fail_next_upserts(0);
    let replayed = post(serde_json::json!({"error_contains": "upsert refused"})).await;
    assert_eq!(replayed.status(), StatusCode::ACCEPTED);
    assert_eq!(replayed.json::<Value>().await.unwrap()["replayed"], 3);
    for _ in 0..3 {
        assert_eq!(next_outcome(&app).await, Outcome::Acked);
    }
    for uuid in &uuids {
        app.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    }
    let left: Vec<Value> = app.get_json("/admin/dead-letters").await;
    assert_eq!(
        left.len(),
        1,
        "the malformed message was not chosen: {left:?}"
    );
    assert!(left[0]["error"].as_str().unwrap().contains("malformed"));

    let all = post(serde_json::json!({})).await;
    assert_eq!(all.json::<Value>().await.unwrap()["replayed"], 1);
}
