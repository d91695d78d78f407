//! Profile store adapter for MongoDB (`documents.url = mongodb://…`): one document per
//! user in `enriched_users`, fields at the top level, the uuid as its hyphenated string.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use futures_util::future::join_all;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{ErrorKind, InsertManyError, WriteFailure};
use mongodb::options::{ClientOptions, CollectionOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::Deserialize;
use tokio::sync::OnceCell;
use uuid::Uuid;

use super::domain::{EnrichedProfile, EnrichmentStatus, Write};
use super::group::{GroupCommit, Pending};
use super::store::{DELETED, ProfileStore, StoreError, status_of};

/// Used when the URL names no database (`mongodb://host:27017/`).
const DEFAULT_DATABASE: &str = "userhub";
const COLLECTION: &str = "enriched_users";
/// Defaults for a URL that sets neither `connectTimeoutMS` nor
/// `serverSelectionTimeoutMS`: the driver's own (10 s and 30 s) would keep a worker or a
/// readiness probe waiting on a dead server for far too long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest any one call to the server may take, server selection included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
const DUPLICATE_KEY: i32 = 11000;

pub struct MongoProfileStore {
    database: Database,
    profiles: Collection<ProfileDocument>,
    /// Set once the unique index on `uuid` is known to exist.
    indexed: OnceCell<()>,
    /// Profile upserts are written in groups: see [`MongoProfileStore::write_group`].
    group: GroupCommit<EnrichedProfile>,
}

impl MongoProfileStore {
    /// Sets up a client for `url` (database from its path, `userhub` when it has
    /// none) without waiting for the server: a process that only reads profiles, or
    /// none at all, starts while MongoDB is down. The unique index on `uuid` is made
    /// sure of before the first write ([`ProfileStore::prepare`]). Writes are
    /// acknowledged by a majority of the replica set.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let url = url.to_owned();
        let mut options = bounded("parse the MongoDB URL", async move {
            ClientOptions::parse(url).await
        })
        .await?;
        options.connect_timeout.get_or_insert(CONNECT_TIMEOUT);
        options
            .server_selection_timeout
            .get_or_insert(SERVER_SELECTION_TIMEOUT);
        options.app_name.get_or_insert_with(|| "userhub".into());
        let database_name = database_name(&options);
        let client = Client::with_options(options).context("cannot set up the MongoDB client")?;
        let database = client.database(&database_name);
        let profiles = database.collection_with_options::<ProfileDocument>(
            COLLECTION,
            CollectionOptions::builder()
                .write_concern(WriteConcern::majority())
                .build(),
        );
        Ok(Self {
            database,
            profiles,
            indexed: OnceCell::new(),
            group: GroupCommit::default(),
        })
    }

    /// Creates the unique index on `uuid` once per process (retried until it works).
    /// Every write relies on it: two concurrent first writes of a user must not insert
    /// two documents.
    async fn ensure_index(&self) -> Result<(), StoreError> {
        self.indexed
            .get_or_try_init(|| async {
                // The default name (`uuid_1`) on purpose: creating an index whose keys
                // and options match an existing one is a no-op, so a restart, or a
                // collection an operator indexed by hand, is fine.
                let index = IndexModel::builder()
                    .keys(doc! { "uuid": 1 })
                    .options(IndexOptions::builder().unique(true).build())
                    .build();
                let collection = self.profiles.clone();
                bounded("create the unique index on uuid", async move {
                    collection.create_index(index).await.map(drop)
                })
                .await
            })
            .await
            .map(drop)
    }
}

fn database_name(options: &ClientOptions) -> String {
    options
        .default_database
        .clone()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE.to_owned())
}

/// Runs one driver call with a deadline. The driver's futures must not be dropped half
/// way (it can leave a pooled connection in a bad state, RUST-937), and callers do drop
/// ours (the worker's handler timeout, the readiness probe's): so the call runs in a
/// task of its own and only the wait for it is bounded.
async fn bounded<T, F>(what: &str, operation: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = mongodb::error::Result<T>> + Send + 'static,
{
    match tokio::time::timeout(OPERATION_TIMEOUT, tokio::spawn(operation)).await {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(error))) => Err(StoreError::Backend(format!("cannot {what}: {error}"))),
        Ok(Err(join_error)) => Err(StoreError::Backend(format!("cannot {what}: {join_error}"))),
        Err(_) => Err(StoreError::Backend(format!(
            "cannot {what}: no answer within {OPERATION_TIMEOUT:?}"
        ))),
    }
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    match error.kind.as_ref() {
        ErrorKind::Command(command) => command.code == DUPLICATE_KEY,
        ErrorKind::Write(WriteFailure::WriteError(write)) => write.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// A stored document as read back; `_id` and `created_at` are not part of the profile.
/// A tombstone has no name or e-mail; a document written before versions existed has
/// no `version` (it counts as 0, older than any event).
#[derive(Deserialize)]
struct ProfileDocument {
    uuid: String,
    name: Option<String>,
    email: Option<String>,
    linkedin: Option<String>,
    github: Option<String>,
    status: String,
    error: Option<String>,
    source_event_id: String,
    #[serde(default)]
    version: i64,
    enriched_at: Option<bson::DateTime>,
    updated_at: bson::DateTime,
}

impl ProfileDocument {
    /// `None` for a tombstone.
    fn into_profile(self) -> Result<Option<EnrichedProfile>, StoreError> {
        let Some(status) = status_of(&self.status)? else {
            return Ok(None);
        };
        let parse = |field: &str, value: &str| {
            Uuid::parse_str(value)
                .map_err(|error| StoreError::Backend(format!("{field} {value:?}: {error}")))
        };
        Ok(Some(EnrichedProfile {
            uuid: parse("uuid", &self.uuid)?,
            name: self.name.unwrap_or_default(),
            email: self.email.unwrap_or_default(),
            linkedin: self.linkedin,
            github: self.github,
            status,
            error: self.error,
            source_event_id: parse("source_event_id", &self.source_event_id)?,
            version: u64::try_from(self.version).unwrap_or(0),
            enriched_at: self.enriched_at.map(bson::DateTime::to_chrono),
            updated_at: self.updated_at.to_chrono(),
        }))
    }
}

fn uuid_key(uuid: Uuid) -> String {
    uuid.hyphenated().to_string()
}

fn version_param(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

/// Stored documents older than `version`: a lower version, or none at all (written
/// before versions existed).
fn older_than(version: u64) -> Document {
    doc! { "$or": [
        { "version": { "$lt": version_param(version) } },
        { "version": { "$exists": false } },
    ] }
}

/// One conditional upsert: `filter` names the user and the condition under which
/// `update` may apply. When the user's document exists but fails the condition, the
/// upsert's insert hits the unique index on `uuid`: that means "stale", not an error.
/// One round trip either way, whatever other writers do meanwhile.
async fn conditional_upsert(
    profiles: Collection<ProfileDocument>,
    what: &'static str,
    filter: Document,
    update: Document,
) -> Result<Write, StoreError> {
    bounded(what, async move {
        match profiles.update_one(filter, update).upsert(true).await {
            Ok(_) => Ok(Write::Applied),
            Err(error) if is_duplicate_key(&error) => Ok(Write::Stale),
            Err(error) => Err(error),
        }
    })
    .await
}

/// The fields a completed profile sets, whether it inserts the user's document or
/// updates it.
fn completed_fields(p: &EnrichedProfile) -> Document {
    doc! {
        "name": &p.name,
        "email": &p.email,
        "linkedin": p.linkedin.as_deref(),
        "github": p.github.as_deref(),
        "status": EnrichmentStatus::Completed.as_str(),
        "error": Bson::Null,
        "source_event_id": uuid_key(p.source_event_id),
        "version": version_param(p.version),
        "enriched_at": p.enriched_at.map(bson::DateTime::from_chrono),
        "updated_at": bson::DateTime::from_chrono(p.updated_at),
    }
}

/// The document of a user the store holds nothing of: what the conditional upsert
/// would insert.
fn new_profile_document(p: &EnrichedProfile) -> Document {
    let mut document = doc! { "uuid": uuid_key(p.uuid) };
    document.extend(completed_fields(p));
    document.insert("created_at", bson::DateTime::from_chrono(p.updated_at));
    document
}

/// The conditional upsert of a completed profile: not over a tombstone, over an older
/// version, or over the same version unless it holds this event's profile already.
async fn upsert_completed(
    profiles: Collection<ProfileDocument>,
    p: &EnrichedProfile,
) -> Result<Write, StoreError> {
    let event = uuid_key(p.source_event_id);
    let filter = doc! {
        "uuid": uuid_key(p.uuid),
        "status": { "$ne": DELETED },
        "$or": [
            older_than(p.version),
            // The same version again: a failed attempt, or a re-enrichment (another
            // event); not a redelivery of the event already applied.
            { "version": version_param(p.version), "$or": [
                { "status": { "$ne": EnrichmentStatus::Completed.as_str() } },
                { "source_event_id": { "$ne": &event } },
            ] },
        ],
    };
    let update = doc! {
        "$set": completed_fields(p),
        "$setOnInsert": { "created_at": bson::DateTime::from_chrono(p.updated_at) },
    };
    conditional_upsert(profiles, "upsert the profile", filter, update).await
}

/// What an unordered `insert_many` did to one of its documents, when it did not insert
/// it.
enum NotInserted {
    /// The user has a document already.
    Exists,
    Failed(String),
}

/// The documents an `insert_many` did not insert, by index, when the server answered
/// for each; an error when it failed as a whole (unreachable, timed out, or its write
/// concern was not met), and any of them may or may not have been written.
fn not_inserted(
    outcome: mongodb::error::Result<()>,
) -> mongodb::error::Result<HashMap<usize, NotInserted>> {
    let error = match outcome {
        Ok(()) => return Ok(HashMap::new()),
        Err(error) => error,
    };
    match error.kind.as_ref() {
        ErrorKind::InsertMany(InsertManyError {
            write_errors: Some(write_errors),
            write_concern_error: None,
            ..
        }) => Ok(write_errors
            .iter()
            .map(|failure| {
                let outcome = if failure.code == DUPLICATE_KEY {
                    NotInserted::Exists
                } else {
                    NotInserted::Failed(format!(
                        "cannot insert the profile: {} ({})",
                        failure.message, failure.code
                    ))
                };
                (failure.index, outcome)
            })
            .collect()),
        _ => Err(error),
    }
}

impl MongoProfileStore {
    /// Writes a group of completed profiles. Most are a new user's first: they are
    /// inserted together, in one unordered `insert_many` (one round trip, one write
    /// concern wait). Those whose user has a document already then take the
    /// conditional upsert, each on its own.
    async fn write_group(&self, group: Vec<Pending<EnrichedProfile>>) {
        let documents: Vec<Document> = group
            .iter()
            .map(|pending| new_profile_document(&pending.item))
            .collect();
        let collection = self.profiles.clone_with_type::<Document>();
        let inserted = bounded("insert the profiles", async move {
            not_inserted(
                collection
                    .insert_many(documents)
                    .ordered(false)
                    .await
                    .map(drop),
            )
        })
        .await;
        let mut not_inserted = match inserted {
            Ok(not_inserted) => not_inserted,
            Err(error) => {
                // Whatever was written is found by the retry (a stale write).
                for pending in group {
                    pending.answer(Err(error.clone()));
                }
                return;
            }
        };
        let mut existing = Vec::new();
        for (index, pending) in group.into_iter().enumerate() {
            match not_inserted.remove(&index) {
                None => pending.answer(Ok(Write::Applied)),
                Some(NotInserted::Failed(message)) => {
                    pending.answer(Err(StoreError::Backend(message)));
                }
                Some(NotInserted::Exists) => existing.push(pending),
            }
        }
        join_all(existing.into_iter().map(|pending| async move {
            let outcome = upsert_completed(self.profiles.clone(), &pending.item).await;
            pending.answer(outcome);
        }))
        .await;
    }
}

#[async_trait]
impl ProfileStore for MongoProfileStore {
    #[tracing::instrument(name = "profiles.upsert", skip_all, fields(otel.kind = "client", otel.name = "update enriched_users", db.system.name = "mongodb", db.operation.name = "update", db.collection.name = "enriched_users"))]
    async fn upsert(&self, p: &EnrichedProfile) -> Result<Write, StoreError> {
        // Before any insert: the unique index is what turns a second document for the
        // user into a duplicate-key error.
        self.ensure_index().await?;
        self.group
            .submit(p.clone(), |group| self.write_group(group))
            .await
    }

    #[tracing::instrument(name = "profiles.mark_failed", skip_all, fields(otel.kind = "client", otel.name = "update enriched_users", db.system.name = "mongodb", db.operation.name = "update", db.collection.name = "enriched_users"))]
    async fn mark_failed(&self, p: &EnrichedProfile) -> Result<Write, StoreError> {
        let filter = doc! {
            "uuid": uuid_key(p.uuid),
            "status": { "$ne": DELETED },
            "$or": [
                older_than(p.version),
                {
                    "version": version_param(p.version),
                    "status": { "$ne": EnrichmentStatus::Completed.as_str() },
                },
            ],
        };
        let now = bson::DateTime::now();
        let update = doc! {
            "$set": {
                "name": &p.name,
                "email": &p.email,
                "status": EnrichmentStatus::Failed.as_str(),
                "error": p.error.as_deref(),
                "source_event_id": uuid_key(p.source_event_id),
                "version": version_param(p.version),
                "updated_at": now,
            },
            "$setOnInsert": {
                "linkedin": Bson::Null,
                "github": Bson::Null,
                "enriched_at": Bson::Null,
                "created_at": now,
            },
        };
        self.ensure_index().await?;
        conditional_upsert(
            self.profiles.clone(),
            "record the failed enrichment",
            filter,
            update,
        )
        .await
    }

    #[tracing::instrument(name = "profiles.erase", skip_all, fields(otel.kind = "client", otel.name = "update enriched_users", db.system.name = "mongodb", db.operation.name = "update", db.collection.name = "enriched_users"))]
    async fn erase(
        &self,
        uuid: Uuid,
        version: u64,
        source_event_id: Uuid,
    ) -> Result<Write, StoreError> {
        let filter = doc! {
            "uuid": uuid_key(uuid),
            "$or": [
                older_than(version),
                { "version": version_param(version), "status": { "$ne": DELETED } },
            ],
        };
        let now = bson::DateTime::now();
        let update = doc! {
            "$set": {
                "status": DELETED,
                "source_event_id": uuid_key(source_event_id),
                "version": version_param(version),
                "updated_at": now,
            },
            // Every field that can hold personal data goes.
            "$unset": {
                "name": "", "email": "", "linkedin": "", "github": "", "error": "",
                "enriched_at": "",
            },
            "$setOnInsert": { "created_at": now },
        };
        self.ensure_index().await?;
        conditional_upsert(self.profiles.clone(), "erase the profile", filter, update).await
    }

    #[tracing::instrument(name = "profiles.get", skip_all, fields(otel.kind = "client", otel.name = "find enriched_users", db.system.name = "mongodb", db.operation.name = "find", db.collection.name = "enriched_users"))]
    async fn get(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        let profiles = self.profiles.clone();
        let filter = doc! { "uuid": uuid_key(uuid) };
        bounded("read the profile", async move {
            profiles.find_one(filter).await
        })
        .await?
        .map(ProfileDocument::into_profile)
        .transpose()
        .map(Option::flatten)
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        self.ensure_index().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let database = self.database.clone();
        bounded("ping MongoDB", async move {
            database
                .run_command(doc! { "ping": 1 })
                .await
                .map(drop::<Document>)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn name_for(url: &str) -> String {
        database_name(&ClientOptions::parse(url).await.expect("valid URL"))
    }

    #[tokio::test]
    async fn database_comes_from_the_url_path() {
        assert_eq!(
            name_for("mongodb://db.example:27017/profiles").await,
            "profiles"
        );
        assert_eq!(
            name_for("mongodb://u:p@db.example/profiles?authSource=admin").await,
            "profiles"
        );
    }

    #[tokio::test]
    async fn database_defaults_to_userhub() {
        assert_eq!(name_for("mongodb://db.example:27017").await, "userhub");
        assert_eq!(
            name_for("mongodb://127.0.0.1:27017/?directConnection=true").await,
            "userhub"
        );
    }
}
