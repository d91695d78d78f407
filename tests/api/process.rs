//! The binary itself: SIGTERM stops it cleanly.

use std::time::{Duration, Instant};

use crate::split::Process;

#[tokio::test]
async fn sigterm_stops_the_server_and_its_workers_cleanly() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("userhub.db").display());
    let mut process = Process::start(
        "api,relay,worker",
        &[
            ("APP__DATABASE__URL", url.clone()),
            ("APP__DOCUMENTS__URL", url),
        ],
    );
    process.wait_until_ready().await;
    let user = process
        .api
        .create_user("Ada Lovelace", "ada@example.com")
        .await;
    process
        .api
        .wait_for_ok(&format!(
            "/users/enriched/{}",
            user["uuid"].as_str().unwrap()
        ))
        .await;

    let pid = process.child.id().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still running after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    let log = process.log.lock().unwrap();
    let messages: Vec<&str> = log.iter().filter_map(|e| e["message"].as_str()).collect();
    for expected in [
        "shutdown signal received",
        "outbox relay stopped",
        "consumer stopped",
        "userhub stopped",
    ] {
        assert!(
            messages.contains(&expected),
            "no {expected:?} in {messages:?}"
        );
    }
}

#[tokio::test]
async fn userhub_reenrich_rebuilds_a_lost_profile_store() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("userhub.db").display());
    let env = [
        ("APP__DATABASE__URL", url.clone()),
        ("APP__DOCUMENTS__URL", url.clone()),
    ];
    let process = Process::start("api,relay,worker", &env);
    process.wait_until_ready().await;
    let mut uuids = Vec::new();
    for i in 0..3 {
        let user = process
            .api
            .create_user(&format!("Person {i}"), &format!("p{i}@example.com"))
            .await;
        uuids.push(user["uuid"].as_str().unwrap().to_owned());
    }
    for uuid in &uuids {
        process
            .api
            .wait_for_ok(&format!("/users/enriched/{uuid}"))
            .await;
    }

    // The profile store is lost (derived data: it is rebuilt, not restored).
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("DELETE FROM enriched_profiles")
        .execute(&pool)
        .await
        .unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_userhub"))
        .args(["reenrich", "--all"])
        .env("APP_ENV", "test")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.trim(), "queued 3 users for re-enrichment");
    // The running server's relay and worker deliver what the command queued.
    for uuid in &uuids {
        process
            .api
            .wait_for_ok(&format!("/users/enriched/{uuid}"))
            .await;
    }

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_userhub"))
        .args(["reenrich"])
        .env("APP_ENV", "test")
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a selection is required");
}
