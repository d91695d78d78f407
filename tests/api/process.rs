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
    create_an_enriched_user(&process).await;

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

/// Runs the binary's `probe` against `port`; true when it exits 0.
fn probe(port: u16, path: &str) -> bool {
    std::process::Command::new(env!("CARGO_BIN_EXE_userhub"))
        .args(["probe", "--path", path])
        .env("APP_ENV", "test")
        .env("APP__SERVER__PORT", port.to_string())
        .output()
        .unwrap()
        .status
        .success()
}

fn sqlite_env(dir: &tempfile::TempDir) -> Vec<(&'static str, String)> {
    let url = format!("sqlite://{}", dir.path().join("userhub.db").display());
    vec![
        ("APP__DATABASE__URL", url.clone()),
        ("APP__DOCUMENTS__URL", url),
    ]
}

/// After SIGTERM, readiness answers 503 `draining` for `server.drain_secs` while
/// requests are still served, so a load balancer stops sending them before the server
/// stops accepting; then it stops cleanly. `userhub probe` (the container's health
/// check) sees both.
#[tokio::test]
async fn sigterm_first_drains_then_stops() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut env = sqlite_env(&dir);
    env.push(("APP__SERVER__DRAIN_SECS", "3".into()));
    let mut process = Process::start("api,relay,worker", &env);
    process.wait_until_ready().await;
    let port = process.port();
    assert!(probe(port, "/health"), "alive");
    assert!(probe(port, "/health/ready"), "ready");

    let pid = process.child.id().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let started = Instant::now();
    loop {
        let response = process.api.get("/health/ready").await;
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["status"], "draining", "{body}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "never draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still serving, and alive: only readiness is down.
    process
        .api
        .create_user("Late Arrival", "late@example.com")
        .await;
    assert!(probe(port, "/health"), "alive while draining");
    assert!(!probe(port, "/health/ready"), "not ready while draining");

    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still running after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "stopped before the drain period"
    );
    assert!(!probe(port, "/health"), "gone");
}

/// SQLite is for one process: a second server on the same file refuses to start
/// instead of sharing it (two relays, two consumers on one embedded bus).
#[tokio::test]
async fn a_second_server_on_the_same_sqlite_file_refuses_to_start() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut env = sqlite_env(&dir);
    // The lock is taken in production only: tests and development may share a file.
    env.extend([
        ("APP_ENV", "production".to_string()),
        ("APP__SERVER__HOST", "127.0.0.1".to_string()),
        ("APP__SERVER__DRAIN_SECS", "0".to_string()),
        (
            "APP__AUTH__HS256_SECRET",
            "a-production-secret-of-at-least-32-bytes".to_string(),
        ),
        (
            "APP__CONSOLE__SESSION_KEY",
            "a-production-session-key-of-at-least-32-bytes".to_string(),
        ),
    ]);
    let first = Process::start("api,relay,worker", &env);
    first.wait_until_ready().await;
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_userhub"))
        .args(["serve"])
        .env("APP__SERVER__PORT", "0")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another userhub process serves the SQLite database"),
        "{stderr}"
    );
    // The first one is untouched.
    first.wait_until_ready().await;
}

/// Store URLs can come from files (secrets mounted by Kubernetes or compose), never
/// from the environment, where they would show in `ps e` and crash dumps.
#[tokio::test]
async fn store_urls_are_read_from_files() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("userhub.db").display());
    let secret = dir.path().join("database-url");
    std::fs::write(&secret, format!("{url}\n")).unwrap();
    let path = secret.display().to_string();
    let process = Process::start(
        "api,relay,worker",
        &[
            (
                "APP__DATABASE__URL",
                "postgres://nobody@127.0.0.1:1/wrong".into(),
            ),
            ("APP__DATABASE__URL_FILE", path.clone()),
            ("APP__DOCUMENTS__URL_FILE", path),
        ],
    );
    process.wait_until_ready().await;
    create_an_enriched_user(&process).await;
    assert!(
        dir.path().join("userhub.db").exists(),
        "the file's URL was used"
    );

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_userhub"))
        .args(["serve"])
        .env("APP_ENV", "test")
        .env(
            "APP__DATABASE__URL_FILE",
            dir.path().join("nope").display().to_string(),
        )
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("database.url_file"), "{stderr}");
}

/// Creates a user through `process` and waits until its profile is enriched.
async fn create_an_enriched_user(process: &Process) {
    let user = process
        .api
        .create_user("Ada Lovelace", "ada@example.com")
        .await;
    let uuid = user["uuid"].as_str().unwrap();
    process
        .api
        .wait_for_ok(&format!("/users/enriched/{uuid}"))
        .await;
}
