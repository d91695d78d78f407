//! One trace from the HTTP request through the outbox and the bus to the worker's store
//! write, exported over OTLP/HTTP by the real `userhub` binary to a receiver the test
//! runs (see otlp.rs). The spans are read after SIGTERM, which also proves that the
//! spans still queued are exported before the process exits.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::RabbitTestPrefix;
use crate::otlp::{ExportedSpan, OtlpReceiver};
use crate::services::{AMQP, service_url};
use crate::split::Process;

/// The trace the client says it is part of.
const CLIENT_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

fn telemetry_env(receiver: &OtlpReceiver, database: &str) -> Vec<(&'static str, String)> {
    vec![
        ("APP__DATABASE__URL", database.to_owned()),
        ("APP__DOCUMENTS__URL", database.to_owned()),
        ("APP__TELEMETRY__OTLP_ENDPOINT", receiver.endpoint.clone()),
        ("APP__TELEMETRY__SERVICE_NAME", "userhub-test".to_owned()),
    ]
}

/// Creates a user as part of the client's trace and waits until it is enriched.
/// Returns the user's uuid.
async fn create_traced_user(api: &crate::helpers::Api, email: &str) -> String {
    let traceparent = format!("00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01");
    let response = api
        .client
        .post(api.url("/api/users"))
        .header("traceparent", &traceparent)
        .header("tracestate", "client=1")
        .json(&json!({"name": "Trace Tester", "email": email}))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), StatusCode::CREATED);
    let returned = response
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .expect("the response carries a traceparent")
        .to_owned();
    let parts: Vec<&str> = returned.split('-').collect();
    assert_eq!(parts.len(), 4, "{returned}");
    assert_eq!(
        parts[1], CLIENT_TRACE_ID,
        "the request joined the client's trace"
    );
    assert_ne!(
        parts[2], CLIENT_SPAN_ID,
        "the response names the server's span"
    );
    assert_eq!(
        response
            .headers()
            .get("tracestate")
            .and_then(|v| v.to_str().ok()),
        Some("client=1"),
        "the trace state is kept"
    );
    let user: serde_json::Value = response.json().await.expect("user JSON");
    let uuid = user["uuid"].as_str().expect("uuid").to_owned();
    api.wait_for_ok(&format!("/users/enriched/{uuid}")).await;
    uuid
}

/// A request without a traceparent starts a trace of its own and says which.
async fn assert_new_trace_without_traceparent(api: &crate::helpers::Api) {
    let response = api.get("/api/users?limit=1").await;
    assert_eq!(response.status(), StatusCode::OK);
    let returned = response
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .expect("a traceparent without one in the request")
        .to_owned();
    let parts: Vec<&str> = returned.split('-').collect();
    assert_eq!(parts.len(), 4, "{returned}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_ne!(parts[1], CLIENT_TRACE_ID);
    assert_ne!(parts[1], "0".repeat(32));
}

/// Sends SIGTERM and waits for a clean exit.
async fn stop(process: &mut Process) {
    let pid = process.child.id().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(signalled.success());
    let started = Instant::now();
    loop {
        if let Some(status) = process.child.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still running after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn one<'a>(spans: &'a [ExportedSpan], name: &str) -> &'a ExportedSpan {
    let found: Vec<&ExportedSpan> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one {name:?} span in {:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

/// Checks the spans of the client's trace: who produced them, their attributes and
/// their parent links, from the client's span down to the store write.
fn assert_one_trace(spans: &[ExportedSpan], messaging_system: &str, email: &str) {
    let trace: Vec<ExportedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == CLIENT_TRACE_ID)
        .cloned()
        .collect();
    let print = || {
        trace
            .iter()
            .map(|s| format!("{} {} <- {}", s.name, s.span_id, s.parent_span_id))
            .collect::<Vec<_>>()
            .join("\n")
    };
    eprintln!("exported trace {CLIENT_TRACE_ID}:\n{}", print());
    for span in &trace {
        assert_eq!(
            span.service, "userhub-test",
            "service.name of {}",
            span.name
        );
        for value in span.attributes.values() {
            assert!(!value.contains(email), "{} carries the e-mail", span.name);
        }
    }

    // api: the request, the registration and its database write.
    let request = one(&trace, "POST /api/users");
    assert_eq!(
        request.parent_span_id, CLIENT_SPAN_ID,
        "child of the client"
    );
    assert_eq!(request.kind, SERVER);
    assert_eq!(request.attribute("http.request.method"), Some("POST"));
    assert_eq!(request.attribute("http.route"), Some("/api/users"));
    assert_eq!(request.attribute("url.path"), Some("/api/users"));
    assert_eq!(request.attribute("http.response.status_code"), Some("201"));
    let register = one(&trace, "register");
    assert_eq!(register.parent_span_id, request.span_id);
    let insert = one(&trace, "INSERT users");
    assert_eq!(insert.parent_span_id, register.span_id);
    assert_eq!(insert.kind, CLIENT);
    assert_eq!(insert.attribute("db.system.name"), Some("sqlite"));
    assert_eq!(insert.attribute("db.operation.name"), Some("INSERT"));
    assert_eq!(insert.attribute("db.collection.name"), Some("users"));

    // relay: the publish, parented by the context stored with the outbox row.
    let send = one(&trace, "send user.created");
    assert_eq!(send.parent_span_id, register.span_id);
    assert_eq!(send.kind, PRODUCER);
    assert_eq!(send.attribute("messaging.system"), Some(messaging_system));
    assert_eq!(send.attribute("messaging.operation.type"), Some("send"));
    assert_eq!(
        send.attribute("messaging.destination.name"),
        Some("user.created")
    );

    // worker: the delivery, parented by the publish through the message headers, and
    // the store write inside it.
    let process = one(&trace, "process enrichment.users");
    assert_eq!(process.parent_span_id, send.span_id);
    assert_eq!(process.kind, CONSUMER);
    assert_eq!(
        process.attribute("messaging.system"),
        Some(messaging_system)
    );
    assert_eq!(
        process.attribute("messaging.operation.type"),
        Some("process")
    );
    assert_eq!(
        process.attribute("messaging.message.id"),
        send.attribute("messaging.message.id")
    );
    let upsert = one(&trace, "INSERT enriched_profiles");
    assert_eq!(upsert.parent_span_id, process.span_id);
    assert_eq!(upsert.kind, CLIENT);
    assert_eq!(upsert.attribute("db.system.name"), Some("sqlite"));
    assert_eq!(
        upsert.attribute("db.collection.name"),
        Some("enriched_profiles")
    );

    // Every span hangs off another span of the trace, or off the client's.
    let ids: Vec<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    for span in &trace {
        assert!(
            span.parent_span_id == CLIENT_SPAN_ID || ids.contains(&span.parent_span_id.as_str()),
            "{} has a parent outside the trace:\n{}",
            span.name,
            print()
        );
    }
}

/// JSON log lines of the request carry its trace and span ids.
fn assert_logs_carry_trace_ids(process: &Process) {
    let log = process.log.lock().unwrap();
    let line = log
        .iter()
        .find(|e| e["message"] == "request completed" && e["trace_id"] == CLIENT_TRACE_ID)
        .unwrap_or_else(|| panic!("no log line of the traced request in {log:#?}"));
    let span_id = line["span_id"].as_str().expect("span_id");
    assert_eq!(span_id.len(), 16, "{line}");
}

#[tokio::test]
async fn one_post_is_one_trace_across_api_relay_and_worker_on_the_in_process_bus() {
    let receiver = OtlpReceiver::start();
    let dir = tempfile::TempDir::new().unwrap();
    let database = format!("sqlite://{}", dir.path().join("userhub.db").display());
    let mut process = Process::start("api,relay,worker", &telemetry_env(&receiver, &database));
    process.wait_until_ready().await;

    let email = "trace.tester@example.com";
    create_traced_user(&process.api, email).await;
    assert_new_trace_without_traceparent(&process.api).await;
    stop(&mut process).await;

    let spans = receiver.spans();
    assert_one_trace(&spans, "userhub_in_process", email);
    assert_logs_carry_trace_ids(&process);
    assert!(
        !spans
            .iter()
            .any(|s| s.attribute("url.path") == Some("/health/ready")),
        "readiness probes start no exported trace"
    );
}

#[tokio::test]
async fn one_post_is_one_trace_across_an_api_process_and_a_worker_process_on_rabbitmq() {
    let Some(broker) = service_url(AMQP) else {
        return;
    };
    let rabbit = RabbitTestPrefix::new();
    let receiver = OtlpReceiver::start();
    let dir = tempfile::TempDir::new().unwrap();
    let database = format!("sqlite://{}", dir.path().join("userhub.db").display());
    let mut env = telemetry_env(&receiver, &database);
    env.push(("APP__BUS__URL", broker));
    env.push(("APP__BUS__PREFIX", rabbit.prefix.clone()));
    let mut api = Process::start("api,relay", &env);
    api.wait_until_ready().await;
    let mut worker = Process::start("worker", &env);
    worker.wait_until_ready().await;

    let email = "trace.rabbit@example.com";
    create_traced_user(&api.api, email).await;
    stop(&mut api).await;
    stop(&mut worker).await;

    let spans = receiver.spans();
    assert_one_trace(&spans, "rabbitmq", email);
    let process = one(
        &spans
            .iter()
            .filter(|s| s.trace_id == CLIENT_TRACE_ID)
            .cloned()
            .collect::<Vec<_>>(),
        "process enrichment.users",
    )
    .clone();
    assert_eq!(
        process.attribute("messaging.destination.name"),
        Some(format!("{}enrichment.users", rabbit.prefix).as_str())
    );
    drop(rabbit);
}
