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
