//! What is particular to the MongoDB profile store, against a real server
//! (`USERHUB_TEST_MONGO_URL`): the documents' shape, the index, connecting. What every
//! profile store must do is in profile_store.rs. Each test works in a database of its
//! own and drops it at the end.

use std::time::{Duration, Instant};

use mongodb::bson::{Bson, Document, doc};
use userhub::enrichment::{EnrichedProfile, MongoProfileStore, ProfileStore, Write};
use uuid::Uuid;

use crate::services;

/// A database of the test's own on the test server, with the store connected to it.
pub struct TestDatabase {
    name: String,
    url: String,
    client: mongodb::Client,
    pub store: MongoProfileStore,
}

impl TestDatabase {
    /// `None` when the tests run without a MongoDB (skipped, said on stderr).
    pub async fn create() -> Option<Self> {
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

    pub async fn remove(self) {
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
        1,
    )
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
    assert_eq!(raw.get_i64("version").ok(), Some(1));
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
async fn an_erased_profile_is_a_tombstone_without_personal_data() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let profile = profile("Ada Lovelace");
    db.store.upsert(&profile).await.expect("upsert");
    let erased = db
        .store
        .erase(profile.uuid, 2, Uuid::now_v7())
        .await
        .expect("erase");
    assert_eq!(erased, Write::Applied);

    let raw = db.raw(profile.uuid).await.expect("tombstone kept");
    assert_eq!(raw.get_str("status").ok(), Some("deleted"), "{raw}");
    assert_eq!(raw.get_i64("version").ok(), Some(2), "{raw}");
    for field in [
        "name",
        "email",
        "linkedin",
        "github",
        "error",
        "enriched_at",
    ] {
        assert!(raw.get(field).is_none(), "{field} left in {raw}");
    }
    assert!(!raw.to_string().contains("joao.silva"), "{raw}");
    assert_eq!(db.count(profile.uuid).await, 1);
    db.remove().await;
}

#[tokio::test]
async fn prepare_creates_a_unique_index_on_uuid_idempotently() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    db.store.prepare().await.expect("prepared");
    // Another instance (or a restart) finds the index there already.
    let again = MongoProfileStore::connect(&db.url)
        .await
        .expect("connects again");
    again.prepare().await.expect("prepared again");
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
async fn a_store_on_a_closed_port_starts_and_its_calls_fail_within_seconds() {
    // Not skipped: this needs no server, only a port where none listens.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.local_addr().expect("address").port()
    };
    // A process that only reads profiles must start while MongoDB is down.
    let store = MongoProfileStore::connect(&format!(
        "mongodb://127.0.0.1:{port}/userhub_unreachable?directConnection=true"
    ))
    .await
    .expect("connect does not wait for the server");
    let profile = profile("Nobody Home");
    for (what, outcome) in [
        ("ping", store.ping().await.map(drop)),
        ("upsert", store.upsert(&profile).await.map(drop)),
        ("get", store.get(profile.uuid).await.map(drop)),
    ] {
        assert!(outcome.is_err(), "{what}: nothing listens on {port}");
    }
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(20), store.prepare())
        .await
        .expect("gives up by itself");
    assert!(outcome.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
