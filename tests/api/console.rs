//! The web console over HTTP: where `/` leads, sessions and their cookie, the three
//! ways in (pasted token, development sign-in; OIDC is in console_oidc.rs), the
//! role-dependent views, the create form with the API's own field errors, editing and
//! deleting a user (field errors, stale versions), CSRF and cross-site refusals, keyset
//! paging and search, the live status stream, dead-letter replay, the HTML error pages,
//! and what production refuses.

use reqwest::StatusCode;
use serde_json::json;
use userhub::config::DEVELOPMENT_CONSOLE_SESSION_KEY;
use userhub::startup::Roles;

use crate::auth::start_error;
use crate::helpers::{
    ConsoleClient, ControlledStore, DEADLINE, Page, Spawn, TestApp, eventually, hs256_token, spawn,
    spawn_app, test_claims, token_with_roles,
};

const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

#[tokio::test]
async fn the_root_leads_to_the_console_which_asks_to_sign_in() {
    let app = spawn_app().await;
    let console = ConsoleClient::new(&app);
    let root = console.get("/").await;
    assert_eq!(root.status, StatusCode::FOUND);
    assert_eq!(root.header("location"), "/console/");
    assert_eq!(
        console.get("/console").await.header("location"),
        "/console/"
    );

    // No session: to the sign-in page, coming back here afterwards.
    let list = console.get("/console/?q=ada").await;
    assert_eq!(list.status, StatusCode::SEE_OTHER);
    assert_eq!(
        list.header("location"),
        "/console/sign-in?next=%2Fconsole%2F%3Fq%3Dada&notice=required"
    );

    let page = console.get(list.header("location")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(page.header("content-security-policy"), CONSOLE_CSP);
    assert_eq!(page.header("cache-control"), "no-store");
    assert_eq!(page.header("referrer-policy"), "same-origin");
    assert!(
        page.body
            .contains("<title>Sign in · userhub console</title>")
    );
    assert!(page.body.contains("Sign in to use the console."));
    assert!(
        page.body.contains(r#"href="/swagger-ui/""#),
        "links Swagger UI"
    );
    assert!(page.body.contains("Development sign-in"));
    assert!(!page.body.contains("Single sign-on"), "no OIDC configured");
    assert!(!page.body.contains("style="), "no inline style");
    assert!(!page.body.contains("<script>"), "no inline script");
    // A session for the form's CSRF token, in a cookie only the console gets.
    let cookie = &page.set_cookies()[0];
    for attribute in [
        "userhub_console=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
    ] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "no TLS here: {cookie}");
}

#[tokio::test]
async fn console_pages_are_html_outside_the_api_document_and_its_bearer_checks() {
    let app = spawn_app().await;
    let console = ConsoleClient::new(&app);
    let document = app
        .get("/api-docs/openapi.json")
        .await
        .text()
        .await
        .unwrap();
    assert!(!document.contains("/console"), "the console is not API");

    console.sign_in_as("admin").await;
    // An unknown console page: the console's own 404 page, not problem+json.
    let missing = console.get("/console/nowhere").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(missing.header("content-security-policy"), CONSOLE_CSP);
    assert!(missing.body.contains("<h1>Not found</h1>"));
    for path in [
        "/console/users/not-a-uuid",
        "/console/users/00000000-0000-0000-0000-000000000000",
    ] {
        let page = console.get(path).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}");
        assert!(page.body.contains("<h1>Not found</h1>"), "{path}");
    }
    // The API's errors stay problem+json.
    let api = app
        .get("/api/users/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(api.headers()["content-type"], "application/problem+json");
    // The assets: hashed names, a year in caches, the right types.
    let list = console.get("/console/").await;
    let css = asset_path(&list.body, ".css");
    let js = asset_path(&list.body, ".js");
    let style = console.get(&css).await;
    assert_eq!(style.status, StatusCode::OK);
    assert_eq!(style.header("content-type"), "text/css; charset=utf-8");
    assert!(style.header("cache-control").contains("immutable"));
    let script = console.get(&js).await;
    assert_eq!(
        script.header("content-type"),
        "text/javascript; charset=utf-8"
    );
    assert!(script.body.contains("EventSource"));
    let stale = console.get("/console/assets/console.000000000000.js").await;
    assert_eq!(stale.status, StatusCode::NOT_FOUND);
}

fn asset_path(html: &str, extension: &str) -> String {
    html.split('"')
        .find(|part| part.starts_with("/console/assets/") && part.ends_with(extension))
        .expect("an asset link")
        .to_owned()
}

#[tokio::test]
async fn each_role_sees_what_the_api_would_let_it_do_and_no_more() {
    let app = spawn_app().await;
    app.create_user("Ada Lovelace", "ada@example.com").await;

    let reader = ConsoleClient::new(&app);
    reader.sign_in_as("reader").await;
    let list = reader.get("/console/").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.body.contains("Ada Lovelace"));
    assert!(list.body.contains("dev-reader"));
    assert!(
        !list.body.contains("/console/users/new"),
        "no create form for readers"
    );
    assert!(!list.body.contains("/console/dead-letters"));
    let form = reader.get("/console/users/new").await;
    assert_eq!(form.status, StatusCode::FORBIDDEN);
    assert!(form.body.contains("users:write"), "{}", form.body);
    // Hiding is not the only guard: a reader's POST is refused as the API would.
    let posted = reader
        .post_form(
            "/console/users",
            &[
                ("csrf", &list.csrf()),
                ("name", "Eve Intruder"),
                ("email", "eve@example.com"),
            ],
            &[],
        )
        .await;
    assert_eq!(posted.status, StatusCode::FORBIDDEN);
    assert_eq!(app.count("SELECT COUNT(*) FROM users").await, 1);
    assert_eq!(
        reader.get("/console/dead-letters").await.status,
        StatusCode::FORBIDDEN
    );

    let writer = ConsoleClient::new(&app);
    writer.sign_in_as("writer").await;
    let list = writer.get("/console/").await;
    assert!(list.body.contains("/console/users/new"));
    assert!(!list.body.contains("/console/dead-letters"));
    assert_eq!(
        writer.get("/console/users/new").await.status,
        StatusCode::OK
    );
    assert_eq!(
        writer.get("/console/dead-letters").await.status,
        StatusCode::FORBIDDEN
    );

    let admin = ConsoleClient::new(&app);
    admin.sign_in_as("admin").await;
    let list = admin.get("/console/").await;
    assert!(list.body.contains("/console/users/new"));
    assert!(list.body.contains("/console/dead-letters"));
    assert_eq!(
        admin.get("/console/dead-letters").await.status,
        StatusCode::OK
    );

    // A token without any role signs in, and is shown what it lacks.
    let nobody = ConsoleClient::new(&app);
    let signed = nobody.sign_in_with_token(&token_with_roles(&[])).await;
    assert_eq!(signed.status, StatusCode::SEE_OTHER);
    let page = nobody.get("/console/").await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page.body.contains("users:read"));
}

#[tokio::test]
async fn the_create_form_shows_the_api_errors_beside_the_fields_and_keeps_the_input() {
    let app = spawn_app().await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("writer").await;
    let csrf = console.get("/console/users/new").await.csrf();

    let invalid = console
        .post_form(
            "/console/users",
            &[("csrf", &csrf), ("name", "Al"), ("email", "not-an-address")],
            &[],
        )
        .await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    let body = &invalid.body;
    assert!(body.contains(r#"<p class="error-message" id="name-error">Name must be at least 3 characters long</p>"#), "{body}");
    assert!(
        body.contains(
            r#"<p class="error-message" id="email-error">E-mail must be a valid e-mail address</p>"#
        ),
        "{body}"
    );
    assert!(body.contains(r#"value="Al""#) && body.contains(r#"value="not-an-address""#));
    assert!(body.contains(r#"aria-invalid="true""#));
    assert!(body.contains(r#"aria-describedby="name-hint name-error""#));

    app.create_user("Ada Lovelace", "ada@example.com").await;
    let taken = console
        .post_form(
            "/console/users",
            &[
                ("csrf", &csrf),
                ("name", "Ada Again"),
                ("email", "ADA@example.com"),
            ],
            &[],
        )
        .await;
    assert_eq!(taken.status, StatusCode::CONFLICT);
    assert!(
        taken
            .body
            .contains(r#"id="email-error">The email has already been taken.</p>"#),
        "{}",
        taken.body
    );
    assert!(taken.body.contains(r#"value="Ada Again""#));

    let created = console
        .post_form(
            "/console/users",
            &[
                ("csrf", &csrf),
                ("name", "  João Silva "),
                ("email", "joao@example.com"),
            ],
            &[],
        )
        .await;
    assert_eq!(created.status, StatusCode::SEE_OTHER, "{}", created.body);
    let location = created.header("location").to_owned();
    assert!(location.starts_with("/console/users/") && location.ends_with("?created=1"));
    let detail = console.get(&location).await;
    assert!(detail.body.contains("<h1>João Silva</h1>"));
    assert!(detail.body.contains("User created."));
    assert!(detail.body.contains(r#"data-status="pending""#));

    app.deliver_all().await;
    let detail = console.get(&location).await;
    assert!(detail.body.contains(r#"data-status="completed""#));
    assert!(detail.body.contains("linkedin.com/in/joaosilva"));
}

#[tokio::test]
async fn forged_and_cross_site_posts_are_refused() {
    let app = spawn_app().await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("admin").await;
    let csrf = console.get("/console/users/new").await.csrf();
    let post = async |csrf: &str, extra: &[(&str, &str)]| {
        let form = [
            ("csrf", csrf),
            ("name", "Mallory"),
            ("email", "mallory@example.com"),
        ];
        console.post_form("/console/users", &form, extra).await
    };

    // No token, a wrong one, another session's: the session cookie alone is not enough.
    for forged in ["", "forged", "a".repeat(43).as_str()] {
        let refused = post(forged, &[]).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{forged:?}");
        assert!(refused.body.contains("Form expired"));
    }
    // The right token, but sent from another site's page.
    let origin = post(&csrf, &[("origin", "http://evil.example")]).await;
    assert_eq!(origin.status, StatusCode::FORBIDDEN);
    assert!(origin.body.contains("sent from another site"));
    let site = post(&csrf, &[("sec-fetch-site", "cross-site")]).await;
    assert_eq!(site.status, StatusCode::FORBIDDEN);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM users").await,
        0,
        "nothing was created"
    );

    // From the console's own page: accepted.
    let own = [
        ("origin", app.address.as_str()),
        ("sec-fetch-site", "same-origin"),
    ];
    let accepted = post(&csrf, &own).await;
    assert_eq!(accepted.status, StatusCode::SEE_OTHER, "{}", accepted.body);

    // Sign-out is a form too.
    let signed_out = console
        .post_form("/console/sign-out", &[("csrf", "forged")], &[])
        .await;
    assert_eq!(signed_out.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_pasted_token_signs_in_until_it_expires_and_a_bad_one_is_refused_beside_the_field() {
    let app = spawn(Spawn {
        configure: Box::new(|settings| settings.auth.leeway_secs = 0),
        ..Spawn::default()
    })
    .await;
    let console = ConsoleClient::new(&app);

    let mut expired = test_claims("someone", &["users:read"]);
    expired["exp"] = json!(chrono::Utc::now().timestamp() - 60);
    let refused = console.sign_in_with_token(&hs256_token(&expired)).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused
            .body
            .contains(r#"id="token-error">The API refuses this token: The token has expired.</p>"#),
        "{}",
        refused.body
    );
    let garbage = console.sign_in_with_token("not a token").await;
    assert!(garbage.body.contains("The bearer token is malformed"));

    // A token that lives two more seconds: the session ends with it.
    let mut short = test_claims("brief", &["users:read"]);
    short["exp"] = json!(chrono::Utc::now().timestamp() + 2);
    let signed_in = console
        .sign_in_with_token(&format!("Bearer {}", hs256_token(&short)))
        .await;
    assert_eq!(
        signed_in.status,
        StatusCode::SEE_OTHER,
        "{}",
        signed_in.body
    );
    let cookie = signed_in.set_cookies().join("\n");
    let max_age: i64 = cookie
        .split("Max-Age=")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("Max-Age");
    assert!(
        max_age <= 2,
        "the cookie does not outlive the token: {cookie}"
    );
    let list = console.get("/console/").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.body.contains("brief"));
    // Once the token has expired, the next page goes to the sign-in page. (The client
    // keeps the cookie past its Max-Age, as a careless browser could.)
    let cookies = console.cookies.lock().unwrap().clone();
    let redirect = eventually("the expired session ends", async || {
        *console.cookies.lock().unwrap() = cookies.clone();
        let page = console.get("/console/").await;
        (page.status == StatusCode::SEE_OTHER).then_some(page)
    })
    .await;
    let location = redirect.header("location");
    assert!(
        location.ends_with("notice=expired") || location.ends_with("notice=required"),
        "{location}"
    );
}

#[tokio::test]
async fn paging_goes_both_ways_newest_first_and_keeps_the_search() {
    let app = spawn_app().await;
    for i in 1..=7 {
        app.create_user(&format!("Person {i}"), &format!("p{i}@example.com"))
            .await;
    }
    app.create_user("Someone Else", "else@elsewhere.org").await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("reader").await;

    let names = |body: &str| -> Vec<String> {
        body.split("<td data-label=\"Name\"><a href=\"/console/users/")
            .skip(1)
            .map(|rest| {
                let start = rest.find('>').unwrap() + 1;
                rest[start..rest.find("</a>").unwrap()].to_owned()
            })
            .collect()
    };
    let link = |body: &str, rel: &str| -> Option<String> {
        let marker = format!("<a rel=\"{rel}\" href=\"");
        body.find(&marker).map(|at| {
            let rest = &body[at + marker.len()..];
            rest[..rest.find('"').unwrap()]
                .replace("&#38;", "&")
                .replace("&amp;", "&")
        })
    };

    let first = console.get("/console/?q=PERSON&limit=3").await;
    assert_eq!(names(&first.body), ["Person 7", "Person 6", "Person 5"]);
    assert!(
        first.body.contains("Showing 1–3 matching “PERSON”"),
        "{}",
        first.body
    );
    assert!(link(&first.body, "prev").is_none());
    let second = console.get(&link(&first.body, "next").unwrap()).await;
    assert_eq!(names(&second.body), ["Person 4", "Person 3", "Person 2"]);
    assert!(second.body.contains("Showing 4–6"));
    let third = console.get(&link(&second.body, "next").unwrap()).await;
    assert_eq!(names(&third.body), ["Person 1"]);
    assert!(third.body.contains("Showing 7–7"));
    assert!(link(&third.body, "next").is_none());
    let back = console.get(&link(&third.body, "prev").unwrap()).await;
    assert_eq!(names(&back.body), ["Person 4", "Person 3", "Person 2"]);
    assert!(back.body.contains("Showing 4–6"));
    let front = console.get(&link(&back.body, "prev").unwrap()).await;
    assert_eq!(names(&front.body), ["Person 7", "Person 6", "Person 5"]);
    assert!(front.body.contains("Showing 1–3"));
    assert!(link(&front.body, "prev").is_none());
    assert!(link(&front.body, "next").unwrap().contains("q=PERSON"));

    let none = console.get("/console/?q=nobody").await;
    assert!(none.body.contains("No users match “nobody”."));
    let all = console.get("/console/").await;
    assert_eq!(names(&all.body).len(), 8);
}

#[tokio::test]
async fn an_empty_registry_invites_to_create_a_user() {
    let app = spawn_app().await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("writer").await;
    let page = console.get("/console/").await;
    assert!(page.body.contains("No users yet"), "{}", page.body);
    assert!(
        page.body
            .contains(r#"<a href="/console/users/new">create one</a>"#)
    );
}

#[tokio::test]
async fn the_status_stream_sends_the_status_as_it_changes_and_ends_when_final() {
    let app = spawn_app().await;
    let user = app.create_user("Grace Hopper", "grace@example.com").await;
    let uuid = user["uuid"].as_str().unwrap();
    let console = ConsoleClient::new(&app);
    console.sign_in_as("reader").await;

    let cookie = console
        .cookies
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut stream = reqwest::Client::new()
        .get(app.url(&format!("/console/users/{uuid}/status")))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut received = String::new();
    let mut read_until = async |needle: &str, received: &mut String| {
        tokio::time::timeout(DEADLINE, async {
            while !received.contains(needle) {
                match stream.chunk().await.unwrap() {
                    Some(chunk) => received.push_str(&String::from_utf8_lossy(&chunk)),
                    None => break,
                }
            }
        })
        .await
        .expect("the stream answers in time");
        assert!(received.contains(needle), "{received}");
    };
    read_until("\"status\":\"pending\"", &mut received).await;
    assert!(received.starts_with("retry: 2000\nevent: status\ndata: {"));

    app.deliver_all().await;
    read_until("\"status\":\"completed\"", &mut received).await;
    assert!(received.contains("github.com/gracehopper"));
    // Final: the stream ends.
    let rest = tokio::time::timeout(DEADLINE, stream.chunk())
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_none(), "the stream ends after a final status");

    // Without a session there is no stream.
    let anonymous = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(app.url(&format!("/console/users/{uuid}/status")))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn an_admin_replays_a_dead_letter_after_confirming_and_the_user_gets_enriched() {
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    let user = app.create_user("Alan Turing", "alan@example.com").await;
    let uuid = user["uuid"].as_str().unwrap().to_owned();
    store.fail_next_upserts(100);
    eventually("the event is dead-lettered", async || {
        app.deliver_all().await;
        (app.count("SELECT COUNT(*) FROM dead_letters").await == 1).then_some(())
    })
    .await;
    store.fail_next_upserts(0);

    let admin = ConsoleClient::new(&app);
    admin.sign_in_as("admin").await;
    let detail = admin.get(&format!("/console/users/{uuid}")).await;
    assert!(detail.body.contains(r#"data-status="failed""#));
    assert!(
        detail.body.contains("upsert refused (test)"),
        "admins see the error"
    );
    let reader = ConsoleClient::new(&app);
    reader.sign_in_as("reader").await;
    let detail = reader.get(&format!("/console/users/{uuid}")).await;
    assert!(detail.body.contains("Enrichment failed after retries"));
    assert!(!detail.body.contains("upsert refused"), "readers do not");

    let list = admin.get("/console/dead-letters").await;
    assert!(list.body.contains("user.created"));
    assert!(list.body.contains("upsert refused (test)"));
    let id = list
        .body
        .split("/console/dead-letters/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("a replay form")
        .to_owned();
    let forged = admin
        .post_form(
            &format!("/console/dead-letters/{id}/replay"),
            &[("csrf", "x")],
            &[],
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let replayed = admin
        .post_form(
            &format!("/console/dead-letters/{id}/replay"),
            &[("csrf", &list.csrf())],
            &[],
        )
        .await;
    assert_eq!(replayed.status, StatusCode::SEE_OTHER);
    assert_eq!(
        replayed.header("location"),
        format!("/console/dead-letters?replayed={id}")
    );
    let after = admin.get(replayed.header("location")).await;
    assert!(after.body.contains("is back on its queue"));
    assert!(after.body.contains("No dead letters"));
    let again = admin
        .post_form(
            &format!("/console/dead-letters/{id}/replay"),
            &[("csrf", &list.csrf())],
            &[],
        )
        .await;
    assert_eq!(
        again.header("location"),
        format!("/console/dead-letters?gone={id}")
    );

    app.deliver_all().await;
    let detail = admin.get(&format!("/console/users/{uuid}")).await;
    assert!(detail.body.contains(r#"data-status="completed""#));
}

#[tokio::test]
async fn signing_out_ends_the_session() {
    let app = spawn_app().await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("reader").await;
    let csrf = console.get("/console/").await.csrf();
    let out = console
        .post_form("/console/sign-out", &[("csrf", &csrf)], &[])
        .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(out.header("location"), "/console/sign-in?notice=signed-out");
    assert!(console.cookies.lock().unwrap().is_empty());
    assert_eq!(console.get("/console/").await.status, StatusCode::SEE_OTHER);
    assert!(
        console
            .get(out.header("location"))
            .await
            .body
            .contains("You have signed out.")
    );
}

#[tokio::test]
async fn console_posts_are_rate_limited_like_any_write() {
    let app = spawn(Spawn {
        configure: Box::new(|settings| {
            let limits = &mut settings.rate_limit;
            limits.write_per_minute = std::num::NonZeroU32::new(1).unwrap();
            limits.write_burst = std::num::NonZeroU32::new(2).unwrap();
        }),
        ..Spawn::default()
    })
    .await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("writer").await; // the first write
    let csrf = console.get("/console/users/new").await.csrf();
    let form = [
        ("csrf", csrf.as_str()),
        ("name", "Ada Lovelace"),
        ("email", "ada@example.com"),
    ];
    assert_eq!(
        console.post_form("/console/users", &form, &[]).await.status,
        StatusCode::SEE_OTHER
    );
    let limited = console.post_form("/console/users", &form, &[]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(!limited.header("retry-after").is_empty());
}

#[tokio::test]
async fn production_has_no_development_sign_in() {
    let app = spawn(Spawn {
        // Every role: production refuses embedded stores split across processes.
        roles: Roles::ALL,
        configure: Box::new(|settings| settings.environment = "production".into()),
        ..Spawn::default()
    })
    .await;
    let console = ConsoleClient::new(&app);
    let page = console.get("/console/sign-in").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("Development sign-in"));
    let csrf = page.csrf();
    let dev = console
        .post_form(
            "/console/sign-in/dev",
            &[("csrf", &csrf), ("role", "admin")],
            &[],
        )
        .await;
    assert_eq!(dev.status, StatusCode::NOT_FOUND);
    assert!(
        console.cookies.lock().unwrap().len() == 1,
        "no session was started"
    );
    // A pasted token still works.
    let token = console
        .sign_in_with_token(&token_with_roles(&["users:read"]))
        .await;
    assert_eq!(token.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn production_refuses_the_development_session_key_and_short_ones() {
    // With no HS256 secret to derive it from (tokens from an OIDC provider only).
    let error = start_error(|settings| {
        settings.environment = "production".into();
        settings.console.session_key = DEVELOPMENT_CONSOLE_SESSION_KEY.into();
        settings.auth.hs256_secret = String::new().into();
        settings.auth.jwks_url = "http://127.0.0.1:9/jwks".into();
    })
    .await;
    assert!(
        error.contains("console.session_key is the development key"),
        "{error}"
    );
    // With one, the key is derived from it: the start goes on (and fails later, on
    // the database).
    let error = start_error(|settings| {
        settings.environment = "production".into();
        settings.console.session_key = DEVELOPMENT_CONSOLE_SESSION_KEY.into();
        settings.database.url = "nosuch://x".to_owned().into();
    })
    .await;
    assert!(error.contains("database.url"), "{error}");
    let error = start_error(|settings| {
        settings.environment = "production".into();
        settings.console.session_key = "short".into();
    })
    .await;
    assert!(error.contains("shorter than 32 bytes"), "{error}");
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, format!("{}\n", "k".repeat(40))).unwrap();
    let path = file.display().to_string();
    // A key file of 40 bytes is accepted (the refusal comes later, from the database).
    let error = start_error(move |settings| {
        settings.environment = "production".into();
        settings.console.session_key = DEVELOPMENT_CONSOLE_SESSION_KEY.into();
        settings.console.session_key_file = path;
        settings.database.url = "nosuch://x".to_owned().into();
    })
    .await;
    assert!(error.contains("database.url"), "{error}");
}

#[tokio::test]
async fn a_store_that_is_down_is_an_html_error_page_not_a_stack_trace() {
    let store = ControlledStore::new();
    let app = spawn(Spawn {
        store: Some(store.clone()),
        ..Spawn::default()
    })
    .await;
    let user = app.create_user("Ada Lovelace", "ada@example.com").await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("reader").await;
    store.set_down(true);
    let page = console
        .get(&format!(
            "/console/users/{}",
            user["uuid"].as_str().unwrap()
        ))
        .await;
    assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(page.header("retry-after"), "5");
    assert!(page.body.contains("<h1>Temporarily unavailable</h1>"));
    assert!(page.body.contains("The profile store is unavailable"));
    assert!(
        !page.body.contains("store is down (test)"),
        "no internals shown"
    );
}

/// The routing keys of the outbox, oldest first.
async fn routing_keys(app: &TestApp) -> Vec<String> {
    userhub::with_pool!(&app.db, |pool| sqlx::query_scalar(
        "SELECT routing_key FROM outbox ORDER BY id"
    )
    .fetch_all(pool)
    .await)
    .expect("outbox query")
}

/// The value of the hidden field `name` of the page's form.
fn hidden(page: &Page, name: &str) -> String {
    let marker = format!(r#"name="{name}" value=""#);
    let start = page
        .body
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} field in {}", page.body))
        + marker.len();
    let end = page.body[start..].find('"').expect("end of the value");
    page.body[start..start + end].to_owned()
}

/// Creates a user through the API; its uuid.
async fn user_uuid(app: &TestApp, name: &str, email: &str) -> String {
    let user = app.create_user(name, email).await;
    user["uuid"].as_str().expect("a uuid").to_owned()
}

/// Sends the edit form as read from `form` (its CSRF token and version), with `name`
/// and `email` typed in.
async fn send_edit(
    console: &ConsoleClient,
    uuid: &str,
    form: &Page,
    name: &str,
    email: &str,
) -> Page {
    let fields = [
        ("csrf", form.csrf()),
        ("version", hidden(form, "version")),
        ("name", name.to_owned()),
        ("email", email.to_owned()),
    ];
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    console
        .post_form(&format!("/console/users/{uuid}/edit"), &fields, &[])
        .await
}

#[tokio::test]
async fn a_writer_edits_a_user_through_the_form_and_the_change_is_announced() {
    let app = spawn_app().await;
    let uuid = user_uuid(&app, "Ada Lovelace", "ada@example.com").await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("writer").await;

    let detail = console.get(&format!("/console/users/{uuid}")).await;
    assert!(
        detail
            .body
            .contains(&format!(r#"href="/console/users/{uuid}/edit""#))
    );
    assert!(
        detail
            .body
            .contains(&format!(r#"href="/console/users/{uuid}/delete""#))
    );
    let form = console.get(&format!("/console/users/{uuid}/edit")).await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(
        form.body.contains("<h1>Edit Ada Lovelace</h1>"),
        "{}",
        form.body
    );
    assert!(form.body.contains(r#"value="Ada Lovelace""#));
    assert!(form.body.contains(r#"value="ada@example.com""#));
    assert_eq!(hidden(&form, "version"), "1");
    assert!(!form.body.contains("style="), "no inline style");

    let saved = send_edit(&console, &uuid, &form, "  Ada King ", "ada@example.com").await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    assert_eq!(
        saved.header("location"),
        format!("/console/users/{uuid}?updated=1")
    );
    let detail = console.get(saved.header("location")).await;
    assert!(detail.body.contains("<h1>Ada King</h1>"), "{}", detail.body);
    assert!(detail.body.contains("Changes saved."));
    let user: serde_json::Value = app.get_json(&format!("/api/users/{uuid}")).await;
    assert_eq!(user["name"], "Ada King", "trimmed like the API's");
    assert_eq!(routing_keys(&app).await, ["user.created", "user.updated"]);

    // Sent again unchanged: back to the user page, nothing written, nothing announced.
    let form = console.get(&format!("/console/users/{uuid}/edit")).await;
    assert_eq!(hidden(&form, "version"), "2");
    let unchanged = send_edit(&console, &uuid, &form, "Ada King", "ada@example.com").await;
    assert_eq!(unchanged.status, StatusCode::SEE_OTHER);
    assert_eq!(
        unchanged.header("location"),
        format!("/console/users/{uuid}")
    );
    assert_eq!(routing_keys(&app).await, ["user.created", "user.updated"]);
    let user: serde_json::Value = app.get_json(&format!("/api/users/{uuid}")).await;
    assert_eq!(user["name"], "Ada King");
}

#[tokio::test]
async fn the_edit_form_shows_400_and_409_beside_the_fields_and_keeps_what_was_typed() {
    let app = spawn_app().await;
    let uuid = user_uuid(&app, "Ada Lovelace", "ada@example.com").await;
    app.create_user("Grace Hopper", "grace@example.com").await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("writer").await;
    let form = console.get(&format!("/console/users/{uuid}/edit")).await;

    let invalid = send_edit(&console, &uuid, &form, "Al", "not-an-address").await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    let body = &invalid.body;
    assert!(
        body.contains(
            r#"<p class="error-message" id="name-error">Name must be at least 3 characters long</p>"#
        ),
        "{body}"
    );
    assert!(
        body.contains(
            r#"<p class="error-message" id="email-error">E-mail must be a valid e-mail address</p>"#
        ),
        "{body}"
    );
    assert!(body.contains(r#"value="Al""#) && body.contains(r#"value="not-an-address""#));
    assert!(body.contains(r#"aria-describedby="name-hint name-error""#));
    assert!(body.contains("The changes were not saved"));
    assert_eq!(hidden(&invalid, "version"), "1", "still the version read");

    let taken = send_edit(&console, &uuid, &form, "Ada Again", "GRACE@example.com").await;
    assert_eq!(taken.status, StatusCode::CONFLICT);
    assert!(
        taken
            .body
            .contains(r#"id="email-error">The email has already been taken.</p>"#),
        "{}",
        taken.body
    );
    assert!(taken.body.contains(r#"value="Ada Again""#));
    assert!(taken.body.contains(r#"value="GRACE@example.com""#));
    assert!(!taken.body.contains("name-error"));

    let user: serde_json::Value = app.get_json(&format!("/api/users/{uuid}")).await;
    assert_eq!(user["name"], "Ada Lovelace", "nothing changed");
    assert_eq!(routing_keys(&app).await, ["user.created", "user.created"]);
}

#[tokio::test]
async fn an_edit_of_a_version_changed_meanwhile_is_refused_and_shows_the_current_one() {
    let app = spawn_app().await;
    let uuid = user_uuid(&app, "Ada Lovelace", "ada@example.com").await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("writer").await;
    let form = console.get(&format!("/console/users/{uuid}/edit")).await;

    // Someone changes the user through the API while the form is open.
    let patched = app
        .patch_json(
            &format!("/api/users/{uuid}"),
            &json!({"name": "Ada Byron", "email": "byron@example.com"}),
        )
        .await;
    assert_eq!(patched.status(), StatusCode::OK);

    let stale = send_edit(&console, &uuid, &form, "Ada King", "ada@example.com").await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    let body = &stale.body;
    assert!(
        body.contains("This user was changed meanwhile; here is the current version"),
        "{body}"
    );
    assert!(
        body.contains(r#"<dd id="current-name">Ada Byron</dd>"#),
        "{body}"
    );
    assert!(body.contains("byron@example.com"));
    assert!(
        body.contains(r#"value="Ada King""#),
        "what was typed is kept"
    );
    assert_eq!(hidden(&stale, "version"), "2", "the current version now");
    let user: serde_json::Value = app.get_json(&format!("/api/users/{uuid}")).await;
    assert_eq!(user["name"], "Ada Byron", "not overwritten");

    // Sent again from the refreshed form: accepted.
    let saved = send_edit(&console, &uuid, &stale, "Ada King", "ada@example.com").await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let user: serde_json::Value = app.get_json(&format!("/api/users/{uuid}")).await;
    assert_eq!(user["name"], "Ada King");
    assert_eq!(user["email"], "ada@example.com");
}

#[tokio::test]
async fn readers_neither_see_nor_may_use_edit_and_delete() {
    let app = spawn_app().await;
    let uuid = user_uuid(&app, "Ada Lovelace", "ada@example.com").await;
    let reader = ConsoleClient::new(&app);
    reader.sign_in_as("reader").await;
    let detail = reader.get(&format!("/console/users/{uuid}")).await;
    assert_eq!(detail.status, StatusCode::OK);
    assert!(!detail.body.contains(r#"/edit""#), "{}", detail.body);
    assert!(!detail.body.contains(r#"/delete""#), "{}", detail.body);
    for page in ["edit", "delete"] {
        let form = reader.get(&format!("/console/users/{uuid}/{page}")).await;
        assert_eq!(form.status, StatusCode::FORBIDDEN, "{page}");
    }
    // Hiding is not the only guard: the reader's posts are refused with the 403 page.
    let csrf = detail.csrf();
    let edit = reader
        .post_form(
            &format!("/console/users/{uuid}/edit"),
            &[
                ("csrf", &csrf),
                ("version", "1"),
                ("name", "Eve Intruder"),
                ("email", "eve@example.com"),
            ],
            &[],
        )
        .await;
    assert_eq!(edit.status, StatusCode::FORBIDDEN);
    assert!(edit.body.contains("<h1>Not allowed</h1>"), "{}", edit.body);
    assert!(edit.body.contains("users:write"));
    let delete = reader
        .post_form(
            &format!("/console/users/{uuid}/delete"),
            &[("csrf", &csrf), ("version", "1")],
            &[],
        )
        .await;
    assert_eq!(delete.status, StatusCode::FORBIDDEN);
    assert!(delete.body.contains("<h1>Not allowed</h1>"));
    let user: serde_json::Value = app.get_json(&format!("/api/users/{uuid}")).await;
    assert_eq!(user["name"], "Ada Lovelace");
    assert_eq!(routing_keys(&app).await, ["user.created"]);
}

#[tokio::test]
async fn forged_edit_and_delete_posts_are_refused() {
    let app = spawn_app().await;
    let uuid = user_uuid(&app, "Ada Lovelace", "ada@example.com").await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("admin").await;
    let csrf = console
        .get(&format!("/console/users/{uuid}/edit"))
        .await
        .csrf();
    for forged in ["", "forged"] {
        let edit = console
            .post_form(
                &format!("/console/users/{uuid}/edit"),
                &[
                    ("csrf", forged),
                    ("version", "1"),
                    ("name", "Mallory"),
                    ("email", "mallory@example.com"),
                ],
                &[],
            )
            .await;
        assert_eq!(edit.status, StatusCode::FORBIDDEN, "{forged:?}");
        assert!(edit.body.contains("Form expired"));
        let delete = console
            .post_form(
                &format!("/console/users/{uuid}/delete"),
                &[("csrf", forged), ("version", "1")],
                &[],
            )
            .await;
        assert_eq!(delete.status, StatusCode::FORBIDDEN, "{forged:?}");
        assert!(delete.body.contains("Form expired"));
    }
    // The right token from another site's page.
    let cross = console
        .post_form(
            &format!("/console/users/{uuid}/delete"),
            &[("csrf", &csrf), ("version", "1")],
            &[("origin", "http://evil.example")],
        )
        .await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN);
    assert!(cross.body.contains("sent from another site"));
    let user: serde_json::Value = app.get_json(&format!("/api/users/{uuid}")).await;
    assert_eq!(user["name"], "Ada Lovelace", "nothing changed");
    assert_eq!(routing_keys(&app).await, ["user.created"]);
}

#[tokio::test]
async fn a_writer_deletes_a_user_after_confirming_and_it_is_gone_everywhere() {
    let app = spawn_app().await;
    let uuid = user_uuid(&app, "Ada Lovelace", "ada@example.com").await;
    app.create_user("Grace Hopper", "grace@example.com").await;
    app.deliver_all().await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("writer").await;

    let confirm = console.get(&format!("/console/users/{uuid}/delete")).await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(
        confirm.body.contains("<h1>Delete Ada Lovelace?</h1>"),
        "{}",
        confirm.body
    );
    assert!(
        confirm
            .body
            .contains("This erases the user and its profile everywhere; it cannot be undone.")
    );
    assert_eq!(hidden(&confirm, "version"), "1");
    let deleted = console
        .post_form(
            &format!("/console/users/{uuid}/delete"),
            &[("csrf", &confirm.csrf()), ("version", "1")],
            &[],
        )
        .await;
    assert_eq!(deleted.status, StatusCode::SEE_OTHER, "{}", deleted.body);
    let location = deleted.header("location");
    assert_eq!(location, "/console/?deleted=1", "no name in the URL");
    let list = console.get(location).await;
    assert!(
        list.body
            .contains(r#"<p class="notice" role="status">Deleted Ada Lovelace.</p>"#),
        "{}",
        list.body
    );
    assert!(!list.body.contains(&uuid), "not listed any more");
    assert!(list.body.contains("Grace Hopper"));
    // The flash is shown once.
    let again = console.get(location).await;
    assert!(!again.body.contains("Ada Lovelace"), "{}", again.body);
    assert!(again.body.contains("The user was deleted."));

    assert_eq!(
        app.get(&format!("/api/users/{uuid}")).await.status(),
        StatusCode::NOT_FOUND
    );
    let page = console.get(&format!("/console/users/{uuid}")).await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    assert!(page.body.contains("<h1>Not found</h1>"));
    for path in ["edit", "delete"] {
        let page = console.get(&format!("/console/users/{uuid}/{path}")).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(
        routing_keys(&app).await,
        ["user.created", "user.created", "user.deleted"]
    );
    // Enrichment erases the profile too.
    app.deliver_all().await;
    assert_eq!(
        app.get(&format!("/users/enriched/{uuid}")).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn a_delete_of_a_version_changed_meanwhile_is_refused_and_shows_the_current_one() {
    let app = spawn_app().await;
    let uuid = user_uuid(&app, "Ada Lovelace", "ada@example.com").await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("writer").await;
    let confirm = console.get(&format!("/console/users/{uuid}/delete")).await;
    let patched = app
        .patch_json(&format!("/api/users/{uuid}"), &json!({"name": "Ada Byron"}))
        .await;
    assert_eq!(patched.status(), StatusCode::OK);

    let form = [
        ("csrf", confirm.csrf()),
        ("version", hidden(&confirm, "version")),
    ];
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stale = console
        .post_form(&format!("/console/users/{uuid}/delete"), &form, &[])
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert!(
        stale
            .body
            .contains("This user was changed meanwhile; here is the current version"),
        "{}",
        stale.body
    );
    assert!(stale.body.contains("Nothing was deleted."));
    assert!(stale.body.contains("<h1>Delete Ada Byron?</h1>"));
    assert_eq!(hidden(&stale, "version"), "2");
    assert_eq!(
        app.get(&format!("/api/users/{uuid}")).await.status(),
        StatusCode::OK,
        "still there"
    );

    // Confirmed again, for the current version.
    let deleted = console
        .post_form(
            &format!("/console/users/{uuid}/delete"),
            &[("csrf", &stale.csrf()), ("version", "2")],
            &[],
        )
        .await;
    assert_eq!(deleted.status, StatusCode::SEE_OTHER);
    let list = console.get(deleted.header("location")).await;
    assert!(list.body.contains("Deleted Ada Byron."), "{}", list.body);
}

#[tokio::test]
async fn the_status_stream_of_a_user_that_gets_deleted_ends() {
    let app = spawn_app().await;
    let uuid = user_uuid(&app, "Grace Hopper", "grace@example.com").await;
    let console = ConsoleClient::new(&app);
    console.sign_in_as("reader").await;
    let cookie = console
        .cookies
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let status_url = app.url(&format!("/console/users/{uuid}/status"));
    let mut stream = reqwest::Client::new()
        .get(&status_url)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);

    let mut received = String::new();
    let ended = tokio::time::timeout(DEADLINE, async {
        let mut deleted = false;
        while let Some(chunk) = stream.chunk().await.unwrap() {
            received.push_str(&String::from_utf8_lossy(&chunk));
            // Pending (no enrichment delivered): deleted through the API now.
            if !deleted && received.contains("\"status\":\"pending\"") {
                deleted = true;
                let response = app.delete(&format!("/api/users/{uuid}")).await;
                assert_eq!(response.status(), StatusCode::NO_CONTENT);
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends: {received}");
    assert!(received.contains("\"status\":\"deleted\""), "{received}");
    assert!(received.contains("\"final\":true"), "{received}");
    assert!(
        received.contains("This user has been deleted."),
        "{received}"
    );

    // And no new stream opens for it: a 404, which the browser does not retry.
    let again = reqwest::Client::new()
        .get(&status_url)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
}
