//! Retention: what holds personal data is deleted once its period is over, and only
//! then; what has not served yet (unsent events) is kept whatever its age.

use reqwest::{Method, StatusCode};
use serde_json::json;
use userhub::bus::{Envelope, EventBus};
use userhub::enrichment::BINDING;

use crate::helpers::{Spawn, spawn};

#[tokio::test]
async fn a_pass_deletes_what_has_served_its_time_and_keeps_the_rest() {
    // Batches of two: a pass must loop until nothing old is left. Whatever is
    // "old" below was dated back to 2000, beyond any retention period.
    let app = spawn(Spawn {
        configure: Box::new(|settings| settings.retention.batch_size = 2),
        ..Spawn::default()
    })
    .await;
    for i in 0..5 {
        let body = json!({"name": format!("Old User{i}"), "email": format!("old{i}@example.com")});
        let key = format!("\"old-{i}\"");
        let created = app
            .send(
                Method::POST,
                "/api/users",
                &[("idempotency-key", key.as_str())],
                Some(&body),
            )
            .await;
        assert_eq!(created.status(), StatusCode::CREATED);
    }
    app.relay.drain().await.unwrap();
    app.execute("UPDATE outbox SET sent_at = '2000-01-01T00:00:00.000Z'")
        .await;
    app.execute("UPDATE idempotency_keys SET expires_at_ms = 0")
        .await;
    // What is recent stays: a sent event, an unexpired key, an unsent event.
    let body = json!({"name": "New User", "email": "new@example.com"});
    app.send(
        Method::POST,
        "/api/users",
        &[("idempotency-key", "\"new\"")],
        Some(&body),
    )
    .await;
    app.relay.drain().await.unwrap();
    app.execute(
        "INSERT INTO outbox (event_id, routing_key, payload, headers, occurred_at, subject)
         VALUES ('0193a0c0-0000-7000-8000-000000000001', 'user.created', '{}', '{}',
                 '2000-01-01T00:00:00.000Z', NULL)",
    )
    .await;
    // Dead letters: three old, one recent.
    for _ in 0..4 {
        let poison = Envelope::new("user.created", "{not json".into(), Default::default());
        app.bus().publish(&poison).await.unwrap();
    }
    while app
        .bus()
        .process_next(&BINDING, app.handler.as_ref())
        .await
        .unwrap()
        .is_some()
    {}
    app.execute(
        "UPDATE dead_letters SET created_at = '2000-01-01T00:00:00.000Z'
          WHERE id IN (SELECT id FROM dead_letters ORDER BY id LIMIT 3)",
    )
    .await;

    let pass = app.retention.run_once().await;
    let deleted: Vec<_> = pass
        .into_iter()
        .map(|(what, result)| (what, result.expect("the pass succeeds")))
        .collect();
    assert_eq!(
        deleted,
        [("outbox", 5), ("dead_letters", 3), ("idempotency_keys", 5)]
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM outbox").await, 2);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
            .await,
        1,
        "an event never sent is kept, however old"
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM dead_letters").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM idempotency_keys").await, 1);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM users").await,
        6,
        "users stay"
    );

    let metrics = app.get("/metrics").await.text().await.unwrap();
    for line in [
        "userhub_retention_deleted_total{what=\"outbox\"} 5",
        "userhub_retention_deleted_total{what=\"dead_letters\"} 3",
        "userhub_retention_deleted_total{what=\"idempotency_keys\"} 5",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let again = app.retention.run_once().await;
    assert!(
        again.iter().all(|(_, result)| result == &Ok(0)),
        "{again:?}"
    );
}
