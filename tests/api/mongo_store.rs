//! The MongoDB profile store against a real server (`USERHUB_TEST_MONGO_URL`): each test
//! works in a database of its own and drops it at the end.

use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use mongodb::bson::{Bson, Document, doc};
use userhub::enrichment::{EnrichedProfile, EnrichmentStatus, MongoProfileStore, ProfileStore};
use uuid::Uuid;

use crate::services;

/// A database of the test's own on the test server, with the store connected to it.
struct TestDatabase {
    name: String,
    url: String,
    client: mongodb::Client,
    store: MongoProfileStore,
}

impl TestDatabase {
    /// `None` when the tests run without a MongoDB (skipped, said on stderr).
    async fn create() -> Option<Self> {
        let base = services::service_url(services::MONGO)?;
        let name = services::unique_name("userhub_test");
        let url = services::mongo_url_with_database(&base, &name);
        let store = MongoProfileStore::connect(&url)
            .await
            .expect("the store connects");
        let client = mongodb::Client::with_uri_str(&base)
            .await
            .expect("inspection client");
        Some(Self {
            name,
            url,
            client,
            store,
        })
    }

    fn collection(&self) -> mongodb::Collection<Document> {
        self.client
            .database(&self.name)
            .collection("enriched_users")
    }

    /// The stored document, as an operator would see it.
    async fn raw(&self, uuid: Uuid) -> Option<Document> {
        self.collection()
            .find_one(doc! { "uuid": uuid.to_string() })
            .await
            .expect("raw read")
    }

    async fn count(&self, uuid: Uuid) -> u64 {
        self.collection()
            .count_documents(doc! { "uuid": uuid.to_string() })
            .await
            .expect("count")
    }

    async fn remove(self) {
        self.client
            .database(&self.name)
            .drop()
            .await
            .expect("test database dropped");
    }
}

#[test]
fn mongo_url_with_database_replaces_only_the_path() {
    assert_eq!(
        services::mongo_url_with_database("mongodb://127.0.0.1:27017/?directConnection=true", "t1"),
        "mongodb://127.0.0.1:27017/t1?directConnection=true"
    );
    assert_eq!(
        services::mongo_url_with_database("mongodb://u:p@h1,h2/other", "t1"),
        "mongodb://u:p@h1,h2/t1"
    );
    assert_eq!(
        services::mongo_url_with_database("mongodb://h:1", "t1"),
        "mongodb://h:1/t1"
    );
}

fn profile(name: &str) -> EnrichedProfile {
    EnrichedProfile::derive(
        Uuid::now_v7(),
        name,
        "joao.silva+work@example.com",
        Uuid::now_v7(),
    )
}

fn millis_ago(ms: i64) -> DateTime<Utc> {
    (Utc::now() - chrono::Duration::milliseconds(ms)).trunc_subsecs(3)
}

#[tokio::test]
async fn upsert_then_get_round_trips() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let profile = profile("João Silva");

    let stored = db.store.upsert(&profile).await.expect("upsert");
    assert_eq!(stored.uuid, profile.uuid);
    assert_eq!(stored.name, "João Silva");
    assert_eq!(stored.email, profile.email);
    assert_eq!(
        stored.linkedin.as_deref(),
        Some("linkedin.com/in/joaosilva")
    );
    assert_eq!(stored.github.as_deref(), Some("github.com/joaosilva"));
    assert_eq!(stored.status, EnrichmentStatus::Completed);
    assert_eq!(stored.error, None);
    assert_eq!(stored.source_event_id, profile.source_event_id);
    assert_eq!(stored.enriched_at, profile.enriched_at);

    let read = db.store.get(profile.uuid).await.expect("get");
    assert_eq!(read, Some(stored), "get answers what upsert returned");
    assert_eq!(db.store.get(Uuid::now_v7()).await.expect("get"), None);
    db.remove().await;
}

#[tokio::test]
async fn documents_have_top_level_fields_a_string_uuid_and_bson_dates() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let profile = profile("Ada Lovelace");
    db.store.upsert(&profile).await.expect("upsert");

    let raw = db.raw(profile.uuid).await.expect("document stored");
    assert_eq!(
        raw.get("uuid"),
        Some(&Bson::String(profile.uuid.hyphenated().to_string())),
        "{raw}"
    );
    assert_eq!(raw.get_str("name").ok(), Some("Ada Lovelace"));
    assert_eq!(raw.get_str("email").ok(), Some(profile.email.as_str()));
    assert_eq!(
        raw.get_str("linkedin").ok(),
        Some("linkedin.com/in/adalovelace")
    );
    assert_eq!(raw.get_str("github").ok(), Some("github.com/adalovelace"));
    assert_eq!(raw.get_str("status").ok(), Some("completed"));
    assert_eq!(raw.get("error"), Some(&Bson::Null));
    assert_eq!(
        raw.get_str("source_event_id").ok(),
        Some(profile.source_event_id.to_string().as_str())
    );
    for field in ["enriched_at", "updated_at", "created_at"] {
        assert!(
            matches!(raw.get(field), Some(Bson::DateTime(_))),
            "{field} is a BSON date: {raw}"
        );
    }
    let enriched_at = raw.get_datetime("enriched_at").expect("date").to_chrono();
    assert_eq!(Some(enriched_at), profile.enriched_at);
    assert!(
        !raw.values().any(|value| matches!(value, Bson::Document(_))),
        "no nested documents: {raw}"
    );
    db.remove().await;
}

#[tokio::test]
async fn a_second_upsert_keeps_the_first_enriched_at_in_one_document() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let mut first = profile("João Silva");
    first.enriched_at = Some(millis_ago(60_000));
    let stored_first = db.store.upsert(&first).await.expect("first upsert");

    // The redelivered event re-derives the profile later, with a later time.
    let mut again = first.clone();
    again.source_event_id = Uuid::now_v7();
    again.enriched_at = Some(millis_ago(0));
    let stored_again = db.store.upsert(&again).await.expect("second upsert");

    assert_eq!(stored_again.enriched_at, first.enriched_at, "first kept");
    assert_eq!(stored_again.source_event_id, again.source_event_id);
    assert!(stored_again.updated_at >= stored_first.updated_at);
    assert_eq!(
        db.store.get(first.uuid).await.expect("get"),
        Some(stored_again)
    );
    assert_eq!(db.count(first.uuid).await, 1);
    db.remove().await;
}

#[tokio::test]
async fn concurrent_upserts_of_a_new_user_leave_one_document() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    // Several users, so that at least some pairs really race to insert (one of them then
    // loses on the unique index and must go round again, not fail).
    for _ in 0..8 {
        let first = profile("Grace Hopper");
        let mut second = first.clone();
        second.source_event_id = Uuid::now_v7();

        let (a, b) = tokio::join!(db.store.upsert(&first), db.store.upsert(&second));
        let (a, b) = (a.expect("one upsert"), b.expect("the other upsert"));
        assert_eq!(a.enriched_at, first.enriched_at);
        assert_eq!(b.enriched_at, first.enriched_at);
        assert_eq!(db.count(first.uuid).await, 1);
    }
    db.remove().await;
}

#[tokio::test]
async fn mark_failed_never_downgrades_a_completed_profile() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let completed = profile("Alan Turing");
    let stored = db.store.upsert(&completed).await.expect("upsert");
    let raw_before = db.raw(completed.uuid).await.expect("document");

    let failed = EnrichedProfile::failed(
        completed.uuid,
        "Alan Turing",
        &completed.email,
        Uuid::now_v7(),
        "gave up",
    );
    db.store.mark_failed(&failed).await.expect("mark_failed");

    assert_eq!(
        db.store.get(completed.uuid).await.expect("get"),
        Some(stored)
    );
    assert_eq!(db.raw(completed.uuid).await, Some(raw_before), "untouched");
    db.remove().await;
}

#[tokio::test]
async fn mark_failed_on_a_missing_profile_records_it_and_a_later_upsert_completes_it() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let uuid = Uuid::now_v7();
    let failed =
        EnrichedProfile::failed(uuid, "李小龍", "bruce@example.hk", Uuid::now_v7(), "boom");
    db.store.mark_failed(&failed).await.expect("mark_failed");

    let read = db.store.get(uuid).await.expect("get").expect("recorded");
    assert_eq!(read.status, EnrichmentStatus::Failed);
    assert_eq!(read.error.as_deref(), Some("boom"));
    assert_eq!(read.name, "李小龍");
    assert_eq!(read.source_event_id, failed.source_event_id);
    assert_eq!(
        (read.linkedin, read.github, read.enriched_at),
        (None, None, None)
    );
    let raw = db.raw(uuid).await.expect("document");
    assert_eq!(raw.get("enriched_at"), Some(&Bson::Null), "{raw}");
    assert!(
        matches!(raw.get("created_at"), Some(Bson::DateTime(_))),
        "{raw}"
    );

    // Failing again updates the record, still one document.
    let mut again = failed.clone();
    again.error = Some("boom again".into());
    db.store
        .mark_failed(&again)
        .await
        .expect("mark_failed again");
    let read = db.store.get(uuid).await.expect("get").expect("recorded");
    assert_eq!(read.error.as_deref(), Some("boom again"));
    assert_eq!(db.count(uuid).await, 1);

    // A failed profile is not "first enriched": the upsert's enriched_at wins.
    let completed = EnrichedProfile::derive(uuid, "李小龍", "bruce@example.hk", Uuid::now_v7());
    let stored = db.store.upsert(&completed).await.expect("upsert");
    assert_eq!(stored.status, EnrichmentStatus::Completed);
    assert_eq!(stored.error, None);
    assert_eq!(stored.enriched_at, completed.enriched_at);
    assert_eq!(stored.github.as_deref(), Some("github.com/bruce"));
    assert_eq!(db.count(uuid).await, 1);
    db.remove().await;
}

#[tokio::test]
async fn connect_creates_a_unique_index_on_uuid_idempotently() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    // A second connect (a restart, another instance) finds the index there already.
    let again = MongoProfileStore::connect(&db.url)
        .await
        .expect("connects again");
    again.ping().await.expect("ping");

    let mut cursor = db.collection().list_indexes().await.expect("indexes");
    let mut unique_on_uuid = 0;
    while cursor.advance().await.expect("next index") {
        let index = cursor.deserialize_current().expect("index model");
        let unique = index
            .options
            .as_ref()
            .and_then(|options| options.unique)
            .unwrap_or(false);
        if index.keys == doc! { "uuid": 1 } && unique {
            unique_on_uuid += 1;
        }
    }
    assert_eq!(unique_on_uuid, 1);

    // The database enforces it, not just the adapter.
    let duplicate = doc! { "uuid": "00000000-0000-0000-0000-000000000001" };
    db.collection()
        .insert_one(duplicate.clone())
        .await
        .expect("first insert");
    assert!(db.collection().insert_one(duplicate).await.is_err());
    db.remove().await;
}

#[tokio::test]
async fn ping_answers() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    db.store.ping().await.expect("ping");
    db.remove().await;
}

#[tokio::test]
async fn connect_to_a_closed_port_fails_within_seconds() {
    // Not skipped: this needs no server, only a port where none listens.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.local_addr().expect("address").port()
    };
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        MongoProfileStore::connect(&format!(
            "mongodb://127.0.0.1:{port}/userhub_unreachable?directConnection=true"
        )),
    )
    .await
    .expect("connect gives up by itself");
    assert!(outcome.is_err(), "nothing listens on {port}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
