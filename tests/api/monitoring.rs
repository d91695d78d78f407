//! The dashboard and the alert rules against what `/metrics` really exposes: every
//! metric named in a PromQL expression of deploy/grafana/userhub.json or
//! deploy/prometheus/alerts.yml must be in a scrape of the running binary. Nothing is
//! listed by hand: the names come from the expressions, the exposed ones from the scrape.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use userhub::startup::Roles;

use crate::helpers::{ControlledStore, DEADLINE, Spawn, TestApp, eventually, spawn, spawn_app};
use crate::services::{AMQP, service_url};
use crate::split::Process;

/// Series Prometheus makes itself rather than scraping them.
const SYNTHETIC: [&str; 1] = ["up"];

/// PromQL words that look like metric names but are not.
const KEYWORDS: [&str; 28] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Keywords followed by a parenthesised list of label names, not expressions.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Skips from the opening `open` at `i` to just past its matching `close`, stepping
/// over quoted strings (a label value may hold any bracket).
fn skip_group(chars: &[char], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i),
            c if c == open => {
                depth += 1;
                i += 1;
            }
            c if c == close => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    i
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names an expression selects: identifiers that are not functions,
/// aggregations, keywords, label names (in `{…}` or after `by`/`on`/…), durations,
/// numbers, strings or Grafana variables (`$instance`, `$__rate_interval`).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_group(&chars, i, '{', '}');
        } else if c == '[' {
            i = skip_group(&chars, i, '[', ']');
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A variable, or a number or duration (0.99, 1e3, 5m).
            i += 1;
            while i < chars.len() && (is_name_char(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_name_start(c) {
            let start = i;
            while i < chars.len() && is_name_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) {
                if call {
                    i = skip_group(&chars, next, '(', ')');
                }
            } else if !call && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every `expr` of the dashboard (panel targets) and the metric of each
/// `label_values(metric, label)` variable.
fn dashboard_expressions(dashboard: &Value) -> Vec<String> {
    fn walk(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", Value::String(expr)) => found.push(expr.clone()),
                        ("definition", Value::String(query)) => {
                            if let Some(inner) = query
                                .strip_prefix("label_values(")
                                .and_then(|q| q.split(',').next())
                            {
                                found.push(inner.trim().to_owned());
                            }
                        }
                        _ => walk(value, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(dashboard, &mut found);
    found
}

/// The `expr:` values of a Prometheus rule file (single-line, or `|`/`>` blocks), and
/// the names its recording rules define.
fn rule_expressions(rules: &str) -> (Vec<String>, BTreeSet<String>) {
    let lines: Vec<&str> = rules.lines().collect();
    let mut expressions = Vec::new();
    let mut recorded = BTreeSet::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        if let Some(name) = trimmed.strip_prefix("record:") {
            recorded.insert(name.trim().to_owned());
        }
        if let Some(value) = trimmed.strip_prefix("expr:") {
            let value = value.trim();
            if value.starts_with('|') || value.starts_with('>') {
                let indent = line.len() - line.trim_start().len();
                let mut block = Vec::new();
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty()
                        || lines[i + 1].len() - lines[i + 1].trim_start().len() > indent)
                {
                    i += 1;
                    block.push(lines[i].trim());
                }
                expressions.push(block.join(" "));
            } else {
                expressions.push(value.trim_matches(|c| c == '\'' || c == '"').to_owned());
            }
        }
        i += 1;
    }
    (expressions, recorded)
}

/// The sample names of a Prometheus text exposition (`_bucket`, `_sum`, `_count`
/// included, as they appear).
fn exposed_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn metric_names_skip_functions_labels_keywords_and_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (le, route) (rate(userhub_http_request_duration_seconds_bucket{instance=~"$instance",status=~"5.."}[$__rate_interval]))) / ignoring(state) max without (x) (userhub_db_connections_max offset 5m) > bool 14.4 * userhub:http_errors:ratio_rate1h and on(instance) up == 0 or time() - process_start_time_seconds"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "process_start_time_seconds",
            "up",
            "userhub:http_errors:ratio_rate1h",
            "userhub_db_connections_max",
            "userhub_http_request_duration_seconds_bucket",
        ]
    );
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exposed_by_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/userhub.json"))
            .expect("deploy/grafana/userhub.json"),
    )
    .expect("the dashboard is JSON");
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml"))
        .expect("deploy/prometheus/alerts.yml");
    let (rule_exprs, recorded) = rule_expressions(&rules);
    let dashboard_exprs = dashboard_expressions(&dashboard);
    assert!(
        dashboard_exprs.len() >= 30,
        "only {} dashboard expressions found",
        dashboard_exprs.len()
    );
    assert!(
        rule_exprs.len() >= 17,
        "only {} rule expressions found",
        rule_exprs.len()
    );

    // The real binary, with a Redis cache that is down (a closed port): a dependency
    // with a circuit breaker, so the breaker's metric exists; reads fall back to the
    // database as they would in production.
    let dir = tempfile::TempDir::new().unwrap();
    let database = format!("sqlite://{}", dir.path().join("userhub.db").display());
    let process = Process::start(
        "api,relay,worker",
        &[
            ("APP__DATABASE__URL", database.clone()),
            ("APP__DOCUMENTS__URL", database),
            ("APP__CACHE__URL", "redis://127.0.0.1:1".to_owned()),
        ],
    );
    process.wait_until_ready().await;
    // Exercise what only exists once used: a request per route class, a delivery (lag,
    // handler duration, create-to-enriched latency), cache lookups.
    let user = process
        .api
        .create_user("Dash Board", "dash.board@example.com")
        .await;
    let uuid = user["uuid"].as_str().expect("uuid");
    process
        .api
        .wait_for_ok(&format!("/users/enriched/{uuid}"))
        .await;
    process.api.get(&format!("/api/users/{uuid}")).await;
    let scrape = process
        .api
        .get("/metrics")
        .await
        .text()
        .await
        .expect("a scrape");
    let exposed = exposed_names(&scrape);

    let mut missing = Vec::new();
    let mut checked = BTreeSet::new();
    for (source, expr) in dashboard_exprs
        .iter()
        .map(|e| ("deploy/grafana/userhub.json", e))
        .chain(
            rule_exprs
                .iter()
                .map(|e| ("deploy/prometheus/alerts.yml", e)),
        )
    {
        for name in metric_names(expr) {
            if recorded.contains(&name) || SYNTHETIC.contains(&name.as_str()) {
                continue;
            }
            checked.insert(name.clone());
            if !exposed.contains(&name) {
                missing.push(format!("{source}: {name} in {expr}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named but not exposed by /metrics:\n{}\n\nexposed:\n{exposed:#?}",
        missing.join("\n")
    );
    assert!(
        checked.len() >= 15,
        "suspiciously few metrics checked: {checked:?}"
    );
    eprintln!(
        "{} metric names of the dashboard and the alerts are exposed: {checked:?}",
        checked.len()
    );
}

/// The value of one series in a scrape, e.g. `userhub_ready` or
/// `userhub_dead_letters{queue="enrichment.users"}` (labels in name order, as
/// the encoder writes them).
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn scrape(app: &TestApp) -> String {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("a scrape")
}

fn value(scrape: &str, series: &str) -> f64 {
    sample(scrape, series).unwrap_or_else(|| panic!("no {series} in\n{scrape}"))
}

const QUEUE: &str = r#"queue="enrichment.users""#;

#[tokio::test]
async fn the_outbox_gauges_show_an_event_waiting_and_then_relayed() {
    let app = spawn_app().await;
    app.create_user("Olga Outbox", "olga@example.com").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let waiting = scrape(&app).await;
    assert_eq!(value(&waiting, "userhub_outbox_backlog"), 1.0);
    let age = value(&waiting, "userhub_outbox_oldest_unsent_age_seconds");
    assert!(age > 0.0 && age < DEADLINE.as_secs_f64(), "{age}");

    assert_eq!(
        value(&waiting, &format!("userhub_queue_messages{{{QUEUE}}}")),
        0.0
    );

    app.relay.drain().await.expect("relayed");
    let relayed = scrape(&app).await;
    assert_eq!(value(&relayed, "userhub_outbox_backlog"), 0.0);
    assert_eq!(
        value(&relayed, &format!("userhub_queue_messages{{{QUEUE}}}")),
        1.0,
        "on the bus, not yet consumed"
    );
    assert_eq!(
        value(&relayed, "userhub_outbox_oldest_unsent_age_seconds"),
        0.0
    );
    assert_eq!(value(&relayed, "userhub_ready"), 1.0);
    assert_eq!(
        value(&relayed, r#"userhub_dependency_up{dependency="database"}"#),
        1.0
    );
    assert!(value(&relayed, "userhub_db_connections_max") >= 1.0);
    assert!(value(&relayed, r#"userhub_db_connections{state="in_use"}"#) >= 0.0);
    assert_eq!(
        value(
            &relayed,
            &format!(
                r#"userhub_build_info{{revision="unknown",version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(value(&relayed, "process_resident_memory_bytes") > 0.0);
}

/// Dead letters, delivery outcomes, consumer lag and create-to-enriched latency, as
/// the real workers of `app` (built with `store`) move two users: one whose store
/// writes fail until it is dead-lettered, one enriched.
async fn delivery_metrics_follow_the_users(app: &TestApp, store: &ControlledStore) {
    // On RabbitMQ the bus connects in the background.
    eventually("readiness", async || {
        (app.get("/health/ready").await.status() == StatusCode::OK).then_some(())
    })
    .await;
    store.fail_next_upserts(u32::MAX);
    let failed = app.create_user("Dora Deadletter", "dora@example.com").await;
    let letter: Value = eventually("a dead letter", async || {
        let listed: Vec<Value> = app.get_json("/admin/dead-letters").await;
        listed.into_iter().next()
    })
    .await;
    let after_failure = eventually("the dead-letter gauge", async || {
        let text = scrape(app).await;
        (sample(&text, &format!("userhub_dead_letters{{{QUEUE}}}")) == Some(1.0)).then_some(text)
    })
    .await;
    let outcome = |text: &str, outcome: &str| {
        value(
            text,
            &format!(r#"userhub_deliveries_total{{outcome="{outcome}",{QUEUE}}}"#),
        )
    };
    assert_eq!(outcome(&after_failure, "dead_lettered"), 1.0);
    assert_eq!(
        outcome(&after_failure, "transient"),
        3.0,
        "3 attempts failed"
    );
    assert_eq!(outcome(&after_failure, "ok"), 0.0);
    assert_eq!(
        value(
            &after_failure,
            &format!("userhub_delivery_lag_seconds_count{{{QUEUE}}}")
        ),
        3.0,
        "one lag observation per delivery"
    );
    assert_eq!(
        value(
            &after_failure,
            "userhub_user_enriched_latency_seconds_count"
        ),
        0.0
    );

    store.fail_next_upserts(0);
    let enriched = app.create_user("Eve Enriched", "eve@example.com").await;
    app.wait_for_ok(&format!(
        "/users/enriched/{}",
        enriched["uuid"].as_str().unwrap()
    ))
    .await;
    let after_success = eventually("the enriched latency", async || {
        let text = scrape(app).await;
        (sample(&text, "userhub_user_enriched_latency_seconds_count") == Some(1.0)).then_some(text)
    })
    .await;
    let latency = value(&after_success, "userhub_user_enriched_latency_seconds_sum");
    assert!(
        latency > 0.0 && latency < DEADLINE.as_secs_f64(),
        "{latency}"
    );
    assert_eq!(outcome(&after_success, "ok"), 1.0);

    // Replayed, the letter leaves the gauge.
    let id = letter["id"].as_str().unwrap();
    let replay = app
        .client
        .post(app.url(&format!("/admin/dead-letters/{id}/replay")))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    app.wait_for_ok(&format!(
        "/users/enriched/{}",
        failed["uuid"].as_str().unwrap()
    ))
    .await;
    eventually("the dead-letter and queue gauges back at 0", async || {
        let text = scrape(app).await;
        (sample(&text, &format!("userhub_dead_letters{{{QUEUE}}}")) == Some(0.0)
            && sample(&text, &format!("userhub_queue_messages{{{QUEUE}}}")) == Some(0.0))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn delivery_metrics_follow_the_users_on_the_in_process_bus() {
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        roles: Roles::ALL,
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    delivery_metrics_follow_the_users(&app, &store).await;
    app.stop().await;
}

#[tokio::test]
async fn delivery_metrics_follow_the_users_on_rabbitmq() {
    let Some(broker) = service_url(AMQP) else {
        return;
    };
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        roles: Roles::ALL,
        store: Some(store.clone()),
        amqp: Some(broker),
        ..Spawn::default()
    })
    .await;
    delivery_metrics_follow_the_users(&app, &store).await;
    app.stop().await;
}

#[tokio::test]
async fn an_open_breaker_and_a_down_cache_show_in_the_metrics_while_the_app_stays_ready() {
    let app = spawn(Spawn {
        configure: Box::new(|settings| {
            settings.cache.url = "redis://127.0.0.1:1".to_owned().into()
        }),
        ..Spawn::default()
    })
    .await;
    let breaker = r#"userhub_circuit_breaker_state{dependency="redis"}"#;
    assert_eq!(value(&scrape(&app).await, breaker), 0.0, "closed at start");
    let user = app.create_user("Cora Cache", "cora@example.com").await;
    let path = format!("/api/users/{}", user["uuid"].as_str().unwrap());
    // Each read misses (a failed GET) and writes back (a failed SET): 5 failures in a
    // row open the breaker.
    for _ in 0..3 {
        assert_eq!(app.get(&path).await.status(), StatusCode::OK);
    }
    let text = scrape(&app).await;
    assert_eq!(value(&text, breaker), 2.0, "open");
    assert_eq!(
        value(&text, r#"userhub_dependency_up{dependency="cache"}"#),
        0.0
    );
    assert_eq!(
        value(&text, "userhub_ready"),
        1.0,
        "the cache is not required"
    );
}
