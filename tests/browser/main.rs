//! The web console in a real browser: Debian's chromium, headless, driven by
//! chromiumoxide against the app spawned on port 0 with a temporary SQLite database.
//! `scripts/browser-deps.sh` installs chromium and axe-core; without them these tests
//! print `SKIPPED: …` and pass, unless `CI` is set.
//!
//! Covered: sign-in; creating a user and watching its status turn `completed` without a
//! reload; validation and 409 messages beside the fields; editing a user (with its field
//! errors and a change made meanwhile); deleting one through the confirmation, by
//! keyboard, and a page open on a user that gets deleted; search and paging; the
//! role-dependent views; a forged cross-site POST refused; a failed enrichment and the
//! dead-letter replay; axe-core on every page at 1280 and 390 px, screenshots, and no
//! sideways scrolling at 360 px.

mod harness;

use harness::{Harness, available};
use userhub::web::identity::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_a_user_and_watch_its_status_turn_completed_without_a_reload() {
    if !available() {
        return;
    }
    let h = Harness::start().await;
    h.sign_in_as("writer").await;
    h.click_and_wait("a.button[href='/console/users/new']")
        .await;
    h.store.hold();
    h.fill("#name", "João Silva").await;
    h.fill("#email", "joao.silva@example.com").await;
    h.click_and_wait("form[action='/console/users'] button[type=submit]")
        .await;
    assert!(h.path().await.starts_with("/console/users/"));
    assert_eq!(h.text("h1").await, "João Silva");
    assert_eq!(h.text(".badge").await, "pending");
    h.wait_for(
        "the page listens for changes",
        "document.getElementById('live-indicator').innerText.includes('Watching')",
    )
    .await;
    // A mark on this very document: a reload would wipe it.
    h.eval::<bool>("(window.__no_reload = true, true)").await;

    h.store.release();
    let took = h
        .wait_for(
            "the status turns completed",
            "document.querySelector('#enrichment-status .badge').innerText === 'completed'",
        )
        .await;
    println!("status shown as completed {took:?} after the enrichment was released");
    assert!(took.as_millis() < 1000, "took {took:?}");
    assert!(
        h.eval::<bool>("window.__no_reload === true").await,
        "no reload"
    );
    assert!(
        h.text("#enrichment-status")
            .await
            .contains("linkedin.com/in/joaosilva")
    );
    assert_eq!(
        h.eval::<String>("document.getElementById('enrichment-status').getAttribute('aria-live')")
            .await,
        "polite"
    );
    h.check_page("user-detail").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_and_conflict_messages_sit_beside_the_fields() {
    if !available() {
        return;
    }
    let h = Harness::start().await;
    h.seed_users(&[("Ada Lovelace", "ada@example.com")]).await;
    h.sign_in_as("admin").await;
    h.open("/console/users/new").await;
    h.check_page("new-user").await;

    h.fill("#name", "Al").await;
    h.fill("#email", "not-an-address").await;
    h.click_and_wait("form[action='/console/users'] button[type=submit]")
        .await;
    assert_eq!(
        h.text("#name-error").await,
        "Name must be at least 3 characters long"
    );
    assert_eq!(
        h.text("#email-error").await,
        "E-mail must be a valid e-mail address"
    );
    assert_eq!(
        h.eval::<String>("document.getElementById('name').value")
            .await,
        "Al"
    );
    assert_eq!(
        h.eval::<String>("document.activeElement.id").await,
        "error-summary",
        "focus moves to the error summary"
    );
    h.check_page("new-user-errors").await;

    h.fill("#name", "Ada Again").await;
    h.fill("#email", "ADA@example.com").await;
    h.click_and_wait("form[action='/console/users'] button[type=submit]")
        .await;
    assert_eq!(
        h.text("#email-error").await,
        "The email has already been taken."
    );
    assert!(h.text("#name-error").await.is_empty());
    assert_eq!(
        h.eval::<String>("document.getElementById('email').getAttribute('aria-invalid')")
            .await,
        "true"
    );
    assert_eq!(h.user_count().await, 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_paging_newest_first() {
    if !available() {
        return;
    }
    let h = Harness::start().await;
    let names: Vec<(String, String)> = (1..=12)
        .map(|i| (format!("Member {i:02}"), format!("member{i}@example.com")))
        .chain([("Grace Hopper".into(), "grace@navy.example".into())])
        .collect();
    let pairs: Vec<(&str, &str)> = names
        .iter()
        .map(|(n, e)| (n.as_str(), e.as_str()))
        .collect();
    h.seed_users(&pairs).await;
    h.sign_in_as("reader").await;
    h.open("/console/?limit=5").await;
    assert_eq!(h.text("#count").await, "Showing 1–5, newest first");
    assert_eq!(h.text("tbody tr:first-child td").await, "Grace Hopper");
    h.check_page("users").await;

    h.fill("#q", "member").await;
    h.click_and_wait("form[role=search] button").await;
    assert_eq!(
        h.text("#count").await,
        "Showing 1–12 matching “member”, newest first"
    );
    h.open("/console/?q=member&limit=5").await;
    assert_eq!(h.text("tbody tr:first-child td").await, "Member 12");
    h.click_and_wait("a[rel=next]").await;
    assert_eq!(
        h.text("#count").await,
        "Showing 6–10 matching “member”, newest first"
    );
    assert_eq!(h.text("tbody tr:first-child td").await, "Member 07");
    assert_eq!(
        h.eval::<String>("document.getElementById('q').value").await,
        "member"
    );
    h.click_and_wait("a[rel=next]").await;
    assert_eq!(
        h.text("#count").await,
        "Showing 11–12 matching “member”, newest first"
    );
    h.click_and_wait("a[rel=prev]").await;
    assert_eq!(h.text("tbody tr:first-child td").await, "Member 07");
    h.click_and_wait("a[rel=prev]").await;
    assert_eq!(
        h.text("#count").await,
        "Showing 1–5 matching “member”, newest first"
    );
    assert!(
        !h.eval::<bool>("!!document.querySelector('a[rel=prev]')")
            .await
    );

    h.fill("#q", "nobody").await;
    h.click_and_wait("form[role=search] button").await;
    assert!(h.text(".empty").await.contains("No users match “nobody”."));
    h.check_page("users-no-match").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_sees_only_what_it_may_use() {
    if !available() {
        return;
    }
    let h = Harness::start().await;
    h.sign_in_as("reader").await;
    let nav: String = h.text("header nav").await;
    assert!(nav.contains("Users") && nav.contains("API docs"), "{nav}");
    assert!(
        !nav.contains("New user") && !nav.contains("Dead letters"),
        "{nav}"
    );
    assert!(h.text(".empty").await.contains("No users yet"));
    assert!(
        !h.eval::<bool>("!!document.querySelector('a[href=\"/console/users/new\"]')")
            .await
    );
    h.check_page("users-empty-reader").await;
    h.open("/console/users/new").await;
    assert_eq!(h.text("h1").await, "Not allowed");
    h.check_page("forbidden").await;
    h.open("/console/no-such-page").await;
    assert_eq!(h.text("h1").await, "Not found");
    h.check_page("not-found").await;
    // The check itself works: an image without a text alternative is reported.
    h.eval::<bool>(
        "(document.querySelector('main').insertAdjacentHTML('beforeend', \
         '<img src=\"data:,\">'), true)",
    )
    .await;
    let violations = h.axe_violations().await;
    assert!(
        violations.iter().any(|v| v.id == "image-alt"),
        "{violations:?}"
    );

    h.sign_in_as("writer").await;
    let nav: String = h.text("header nav").await;
    assert!(
        nav.contains("New user") && !nav.contains("Dead letters"),
        "{nav}"
    );

    h.sign_in_as("admin").await;
    let nav: String = h.text("header nav").await;
    assert!(
        nav.contains("New user") && nav.contains("Dead letters"),
        "{nav}"
    );
    h.open("/console/dead-letters").await;
    assert!(h.text(".empty").await.contains("No dead letters"));
    h.check_page("dead-letters-empty").await;

    // Keyboard: the first Tab lands on the skip link, which leads to the content.
    h.open("/console/").await;
    h.page
        .find_element("body")
        .await
        .expect("body")
        .press_key("Tab")
        .await
        .expect("Tab");
    assert_eq!(
        h.eval::<String>("document.activeElement.className").await,
        "skip-link"
    );

    // Signing out, then the sign-in page itself.
    h.click_and_wait("form.who button").await;
    assert!(h.text(".notice").await.contains("You have signed out."));
    h.check_page("sign-in").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_post_from_another_site_is_refused() {
    if !available() {
        return;
    }
    let h = Harness::start().await;
    h.sign_in_as("admin").await;
    // Another site (another origin) with a form aimed at the console.
    let evil = wiremock::MockServer::start().await;
    let form = format!(
        "<!doctype html><title>Win a prize</title><form method=post action=\"{}\">\
         <input type=hidden name=csrf value=guessed><input type=hidden name=name value=Mallory>\
         <input type=hidden name=email value=mallory@example.com>\
         <button id=go>Claim</button></form>",
        h.url("/console/users")
    );
    wiremock::Mock::given(wiremock::matchers::method("GET"))
        .respond_with(
            wiremock::ResponseTemplate::new(200).set_body_raw(form, "text/html; charset=utf-8"),
        )
        .mount(&evil)
        .await;
    // `localhost` is another site than `127.0.0.1`.
    let evil_url = evil.uri().replace("127.0.0.1", "localhost");
    h.page.goto(evil_url).await.expect("the other site");
    h.click_and_wait("#go").await;
    assert_eq!(h.text("h1").await, "Refused");
    assert!(h.text("main").await.contains("sent from another site"));
    assert_eq!(h.user_count().await, 0, "nothing was created");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_enrichment_shows_its_error_and_an_admin_replays_it() {
    if !available() {
        return;
    }
    let h = Harness::start().await;
    h.store.fail_writes(true);
    h.sign_in_as("admin").await;
    h.open("/console/users/new").await;
    h.fill("#name", "Alan Turing").await;
    h.fill("#email", "alan@example.com").await;
    h.click_and_wait("form[action='/console/users'] button[type=submit]")
        .await;
    let user_page = h.path().await;
    h.wait_for(
        "the status turns failed, live",
        "document.querySelector('#enrichment-status .badge').innerText === 'failed'",
    )
    .await;
    let block = h.text("#enrichment-status").await;
    assert!(block.contains("Enrichment failed after retries"), "{block}");
    assert!(
        block.contains("the profile store refused the write (test)"),
        "{block}"
    );
    h.check_page("user-failed").await;

    h.store.fail_writes(false);
    h.click_and_wait("header a[href='/console/dead-letters']")
        .await;
    assert!(h.text(".letter").await.contains("user.created"));
    h.check_page("dead-letters").await;
    // The confirmation: a first click only opens it.
    h.page
        .find_element("details.confirm summary")
        .await
        .expect("Replay…")
        .click()
        .await
        .expect("click");
    h.wait_for(
        "the confirmation opens",
        "document.querySelector('details.confirm').open",
    )
    .await;
    h.click_and_wait("details.confirm button").await;
    assert!(h.text(".notice").await.contains("is back on its queue"));
    assert!(h.text(".empty").await.contains("No dead letters"));

    h.open(&user_page).await;
    h.wait_for(
        "the replayed event enriches the user",
        "document.querySelector('#enrichment-status .badge').innerText === 'completed'",
    )
    .await;
    h.stop().await;
}

/// Sends `method` to the API for `path` as a writer (a change made behind the page's
/// back); answers the status.
async fn api_change(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> reqwest::StatusCode {
    let token = h.token(vec![Role::UsersWrite]).await;
    let mut request = reqwest::Client::new()
        .request(method, h.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("API request").status()
}

/// The uuid in a user page's path (`/console/users/{uuid}…`).
fn uuid_of(path: &str) -> String {
    path.trim_start_matches("/console/users/")
        .split(['/', '?'])
        .next()
        .expect("a uuid")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_a_user_through_the_form_and_see_the_new_name() {
    if !available() {
        return;
    }
    let h = Harness::start().await;
    h.seed_users(&[
        ("Ada Lovelace", "ada@example.com"),
        ("Grace Hopper", "grace@example.com"),
    ])
    .await;
    h.sign_in_as("writer").await;
    h.click_and_wait("tbody tr:nth-child(2) a").await;
    assert_eq!(h.text("h1").await, "Ada Lovelace");
    let uuid = uuid_of(&h.path().await);
    h.click_and_wait(".page-actions a[href$='/edit']").await;
    assert_eq!(h.path().await, format!("/console/users/{uuid}/edit"));
    assert_eq!(h.text("h1").await, "Edit Ada Lovelace");
    assert_eq!(
        h.eval::<String>("document.getElementById('name').value")
            .await,
        "Ada Lovelace"
    );
    assert_eq!(
        h.eval::<String>("document.getElementById('email').value")
            .await,
        "ada@example.com"
    );
    h.check_page("edit-user").await;

    let submit = "form[action$='/edit'] button[type=submit]";
    h.fill("#name", "Al").await;
    h.fill("#email", "not-an-address").await;
    h.click_and_wait(submit).await;
    assert_eq!(
        h.text("#name-error").await,
        "Name must be at least 3 characters long"
    );
    assert_eq!(
        h.text("#email-error").await,
        "E-mail must be a valid e-mail address"
    );
    assert_eq!(
        h.eval::<String>("document.activeElement.id").await,
        "error-summary",
        "focus moves to the error summary"
    );
    h.check_page("edit-user-errors").await;

    h.fill("#name", "Ada Lovelace").await;
    h.fill("#email", "GRACE@example.com").await;
    h.click_and_wait(submit).await;
    assert_eq!(
        h.text("#email-error").await,
        "The email has already been taken."
    );
    assert_eq!(
        h.eval::<String>("document.getElementById('email').value")
            .await,
        "GRACE@example.com"
    );

    // Changed through the API while the form is open: refused, the current version
    // shown, what was typed kept.
    let patched = api_change(
        &h,
        reqwest::Method::PATCH,
        &format!("/api/users/{uuid}"),
        Some(serde_json::json!({"name": "Ada Byron"})),
    )
    .await;
    assert_eq!(patched, reqwest::StatusCode::OK);
    h.fill("#name", "Ada King").await;
    h.fill("#email", "ada@example.com").await;
    h.click_and_wait(submit).await;
    assert_eq!(h.text("h1").await, "Edit Ada Byron");
    assert!(
        h.text("#error-summary")
            .await
            .contains("This user was changed meanwhile; here is the current version"),
    );
    assert_eq!(h.text("#current-name").await, "Ada Byron");
    assert_eq!(
        h.eval::<String>("document.getElementById('name').value")
            .await,
        "Ada King"
    );
    h.check_page("edit-user-changed").await;

    h.click_and_wait(submit).await;
    assert_eq!(h.path().await, format!("/console/users/{uuid}?updated=1"));
    assert_eq!(h.text("h1").await, "Ada King");
    assert!(h.text(".notice").await.contains("Changes saved."));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_a_user_through_the_confirmation_and_land_on_the_list_without_it() {
    if !available() {
        return;
    }
    let h = Harness::start().await;
    h.seed_users(&[
        ("Ada Lovelace", "ada@example.com"),
        ("Grace Hopper", "grace@example.com"),
    ])
    .await;
    h.sign_in_as("writer").await;

    // A page open on a user that is deleted meanwhile says so, and stops watching.
    h.store.hold();
    h.seed_users(&[("Alan Turing", "alan@example.com")]).await;
    h.open("/console/").await;
    h.click_and_wait("tbody tr:first-child a").await;
    assert_eq!(h.text("h1").await, "Alan Turing");
    h.wait_for(
        "the page listens for changes",
        "document.getElementById('live-indicator').innerText.includes('Watching')",
    )
    .await;
    let alan = uuid_of(&h.path().await);
    let deleted = api_change(
        &h,
        reqwest::Method::DELETE,
        &format!("/api/users/{alan}"),
        None,
    )
    .await;
    assert_eq!(deleted, reqwest::StatusCode::NO_CONTENT);
    h.wait_for(
        "the page says the user is gone",
        "document.getElementById('enrichment-status').innerText.includes('This user has been deleted.')",
    )
    .await;
    h.wait_for(
        "the page stops watching",
        "document.getElementById('live-indicator').innerText === ''",
    )
    .await;
    h.store.release();

    h.open("/console/").await;
    h.click_and_wait("tbody tr:nth-child(2) a").await;
    assert_eq!(h.text("h1").await, "Ada Lovelace");
    let user_page = h.path().await;
    h.click_and_wait(".page-actions a[href$='/delete']").await;
    assert_eq!(h.text("h1").await, "Delete Ada Lovelace?");
    assert!(
        h.text("main")
            .await
            .contains("This erases the user and its profile everywhere; it cannot be undone.")
    );
    h.check_page("delete-user").await;

    // Keyboard: Tab reaches the confirmation's button, with a visible focus, then
    // Cancel; Enter on the button deletes.
    let tab_to_delete = async || {
        for _ in 0..20 {
            h.page
                .find_element("body")
                .await
                .expect("body")
                .press_key("Tab")
                .await
                .expect("Tab");
            if h.eval::<bool>("document.activeElement.matches(\"form[action$='/delete'] button\")")
                .await
            {
                return;
            }
        }
        panic!("Tab never reached the delete button");
    };
    tab_to_delete().await;
    assert_eq!(
        h.eval::<String>("document.activeElement.innerText").await,
        "Delete Ada Lovelace"
    );
    assert_ne!(
        h.eval::<String>("getComputedStyle(document.activeElement).outlineStyle")
            .await,
        "none",
        "focus is visible"
    );
    h.page
        .find_element("body")
        .await
        .expect("body")
        .press_key("Tab")
        .await
        .expect("Tab");
    assert_eq!(
        h.eval::<String>("document.activeElement.innerText").await,
        "Cancel"
    );
    h.open(&format!("{user_page}/delete")).await;
    tab_to_delete().await;
    h.eval::<bool>("(window.__stay = true, true)").await;
    h.page
        .find_element("body")
        .await
        .expect("body")
        .press_key("Enter")
        .await
        .expect("Enter");
    h.wait_for(
        "the list after the deletion",
        "window.__stay === undefined && document.readyState === 'complete'",
    )
    .await;
    assert_eq!(h.path().await, "/console/?deleted=1");
    assert_eq!(h.text(".notice").await, "Deleted Ada Lovelace.");
    let table = h.text("tbody").await;
    assert!(!table.contains("Ada Lovelace"), "{table}");
    assert!(table.contains("Grace Hopper"), "{table}");
    h.check_page("users-after-delete").await;
    assert_eq!(h.user_count().await, 1);

    h.open(&user_page).await;
    assert_eq!(h.text("h1").await, "Not found");
    h.stop().await;
}
