//! The split deployment: an `api,relay` process and a `worker` process (the real
//! binary, twice) on PostgreSQL, MongoDB, Redis and RabbitMQ form a working system.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{Api, MongoTestDatabase, PgTestDatabase, RabbitTestPrefix, RedisTestPrefix};
use crate::services::{AMQP, MONGO, POSTGRES, REDIS, service_url};

const USERS: usize = 200;

/// A `userhub serve` child process, killed when dropped; its JSON log lines are kept.
pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) api: Api,
    pub(crate) log: Arc<Mutex<Vec<Value>>>,
}

impl Process {
    pub(crate) fn start(roles: &str, env: &[(&str, String)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // Everything that can panic comes before the spawn, so no child is orphaned.
        let api = Api::new(format!("http://127.0.0.1:{port}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_userhub"))
            .args(["serve", "--roles", roles])
            .env("APP_ENV", "test")
            .env("APP__SERVER__PORT", port.to_string())
            .env("APP__LOG__FORMAT", "json")
            .env("APP__LOG__LEVEL", "info")
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("userhub starts");
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            panic!("the child's stdout is not piped");
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(entry) = serde_json::from_str(&line) {
                        log.lock().unwrap().push(entry);
                    }
                }
            }
        });
        Self { child, api, log }
    }

    /// The port the process serves on.
    pub(crate) fn port(&self) -> u16 {
        self.api
            .address
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("the API address ends with its port")
    }

    pub(crate) async fn wait_until_ready(&self) {
        let started = Instant::now();
        loop {
            if let Ok(response) = self
                .api
                .client
                .get(self.api.url("/health/ready"))
                .send()
                .await
                && response.status() == StatusCode::OK
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "process never ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn an_api_relay_process_and_a_worker_process_enrich_200_users_exactly_once() {
    let (Some(_), Some(_), Some(_), Some(amqp)) = (
        service_url(POSTGRES),
        service_url(MONGO),
        service_url(REDIS),
        service_url(AMQP),
    ) else {
        return;
    };
    let postgres = PgTestDatabase::create().await;
    let mongo = MongoTestDatabase::new();
    let redis = RedisTestPrefix::new();
    let rabbit = RabbitTestPrefix::new();
    let env = [
        ("APP__DATABASE__URL", postgres.url.clone()),
        ("APP__DOCUMENTS__URL", mongo.url.clone()),
        ("APP__CACHE__URL", redis.url.clone()),
        ("APP__CACHE__KEY_PREFIX", redis.prefix.clone()),
        ("APP__BUS__URL", amqp),
        ("APP__BUS__PREFIX", rabbit.prefix.clone()),
    ];
    let front = Process::start("api,relay", &env);
    front.wait_until_ready().await;
    let worker = Process::start("worker", &env);
    worker.wait_until_ready().await;
    assert_eq!(
        worker.api.get("/api/users").await.status(),
        StatusCode::NOT_FOUND,
        "a worker serves no API"
    );

    let started = Instant::now();
    let uuids: Vec<String> = futures_util::stream::iter(0..USERS)
        .map(|i| {
            let api = &front.api;
            async move {
                let user = api
                    .create_user(&format!("Person {i:03}"), &format!("person{i}@example.com"))
                    .await;
                user["uuid"].as_str().unwrap().to_owned()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let created = started.elapsed();
    for uuid in &uuids {
        let enriched = front
            .api
            .wait_for_ok(&format!("/users/enriched/{uuid}"))
            .await;
        assert!(
            enriched["github"]
                .as_str()
                .unwrap()
                .starts_with("github.com/person")
        );
    }
    eprintln!(
        "{USERS} users created in {created:?}, all enriched {:?} after the first POST",
        started.elapsed()
    );

    // Exactly once: the worker logged one "profile enriched" per user, no more. The
    // line is written after the store write the API reads, and reaches this process
    // through a pipe: the last ones may still be on their way.
    let per_user = |worker: &Process| {
        let log = worker.log.lock().unwrap();
        let mut per_user: HashMap<String, usize> = HashMap::new();
        for entry in log.iter().filter(|e| e["message"] == "profile enriched") {
            *per_user
                .entry(entry["user"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        per_user
    };
    let logged = Instant::now();
    while per_user(&worker).len() < USERS && logged.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let per_user = per_user(&worker);
    assert_eq!(per_user.len(), USERS, "every user enriched by the worker");
    assert!(
        per_user.values().all(|n| *n == 1),
        "none twice: {per_user:?}"
    );
    let front_enriched = front
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["message"] == "profile enriched")
        .count();
    assert_eq!(front_enriched, 0, "the api,relay process consumes nothing");
    drop(worker);
    drop(front);
}
