//! Profile store adapter for MongoDB (`documents.url = mongodb://…`): one document per
//! user in `enriched_users`, fields at the top level, the uuid as its hyphenated string.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::Deserialize;
use uuid::Uuid;

use super::domain::{EnrichedProfile, EnrichmentStatus};
use super::store::{ProfileStore, StoreError};

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
/// An upsert goes round again when another writer completed the profile between its two
/// steps; the second round always settles it, the rest is a safety margin.
const UPSERT_ROUNDS: usize = 3;
const DUPLICATE_KEY: i32 = 11000;

pub struct MongoProfileStore {
    database: Database,
    profiles: Collection<ProfileDocument>,
}

impl MongoProfileStore {
    /// Connects to `url` (database from its path, `userhub` when it has none) and makes
    /// sure the unique index on `uuid` exists. Fails within seconds when no server answers.
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
        let profiles = database.collection::<ProfileDocument>(COLLECTION);

        // The default name (`uuid_1`) on purpose: creating an index whose keys and
        // options match an existing one is a no-op, so a restart, or a collection an
        // operator indexed by hand, is fine.
        let index = IndexModel::builder()
            .keys(doc! { "uuid": 1 })
            .options(IndexOptions::builder().unique(true).build())
            .build();
        let collection = profiles.clone();
        bounded("create the unique index on uuid", async move {
            collection.create_index(index).await
        })
        .await
        .with_context(|| format!("cannot prepare {database_name}.{COLLECTION}"))?;
        Ok(Self { database, profiles })
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
#[derive(Deserialize)]
struct ProfileDocument {
    uuid: String,
    name: String,
    email: String,
    linkedin: Option<String>,
    github: Option<String>,
    status: String,
    error: Option<String>,
    source_event_id: String,
    enriched_at: Option<bson::DateTime>,
    updated_at: bson::DateTime,
}

impl TryFrom<ProfileDocument> for EnrichedProfile {
    type Error = StoreError;

    fn try_from(document: ProfileDocument) -> Result<Self, StoreError> {
        let status = match document.status.as_str() {
            "completed" => EnrichmentStatus::Completed,
            "failed" => EnrichmentStatus::Failed,
            other => return Err(StoreError::Backend(format!("unknown status {other:?}"))),
        };
        let parse = |field: &str, value: &str| {
            Uuid::parse_str(value)
                .map_err(|error| StoreError::Backend(format!("{field} {value:?}: {error}")))
        };
        Ok(Self {
            uuid: parse("uuid", &document.uuid)?,
            name: document.name,
            email: document.email,
            linkedin: document.linkedin,
            github: document.github,
            status,
            error: document.error,
            source_event_id: parse("source_event_id", &document.source_event_id)?,
            enriched_at: document.enriched_at.map(bson::DateTime::to_chrono),
            updated_at: document.updated_at.to_chrono(),
        })
    }
}

fn uuid_key(uuid: Uuid) -> String {
    uuid.hyphenated().to_string()
}

#[async_trait]
impl ProfileStore for MongoProfileStore {
    #[tracing::instrument(name = "profiles.upsert", skip_all, fields(otel.kind = "client", otel.name = "findAndModify enriched_users", db.system.name = "mongodb", db.operation.name = "findAndModify", db.collection.name = "enriched_users"))]
    async fn upsert(&self, p: &EnrichedProfile) -> Result<EnrichedProfile, StoreError> {
        // Two conditional steps rather than one pipeline-style update, which needs
        // MongoDB 4.2+ and which not every MongoDB-compatible server has: plain `$set`s
        // that together do what the SQLite adapter's ON CONFLICT … CASE does.
        // `updated_at` is the server's clock, as in SQLite.
        let uuid = uuid_key(p.uuid);
        let rewritten = doc! {
            "name": &p.name,
            "email": &p.email,
            "linkedin": p.linkedin.as_deref(),
            "github": p.github.as_deref(),
            "status": EnrichmentStatus::Completed.as_str(),
            "error": Bson::Null,
            "source_event_id": uuid_key(p.source_event_id),
        };
        for _ in 0..UPSERT_ROUNDS {
            // 1. Already completed (a redelivery): rewrite it, keeping the first
            //    enriched_at so redelivery is invisible to readers.
            let profiles = self.profiles.clone();
            let filter = doc! { "uuid": &uuid, "status": EnrichmentStatus::Completed.as_str() };
            let update = doc! {
                "$set": rewritten.clone(),
                "$currentDate": { "updated_at": true },
            };
            let kept = bounded("update the completed profile", async move {
                profiles
                    .find_one_and_update(filter, update)
                    .return_document(ReturnDocument::After)
                    .await
            })
            .await?;
            if let Some(document) = kept {
                return document.try_into();
            }

            // 2. Missing or failed: write the whole profile. Should another writer
            //    complete it after step 1, this filter no longer matches, the upsert's
            //    insert hits the unique index, and the next round's step 1 takes over.
            let profiles = self.profiles.clone();
            let filter = doc! {
                "uuid": &uuid,
                "status": { "$ne": EnrichmentStatus::Completed.as_str() },
            };
            let mut set = rewritten.clone();
            set.insert(
                "enriched_at",
                p.enriched_at.map(bson::DateTime::from_chrono),
            );
            let update = doc! {
                "$set": set,
                // Server time cannot go into $setOnInsert without a pipeline update.
                "$setOnInsert": { "created_at": bson::DateTime::now() },
                "$currentDate": { "updated_at": true },
            };
            let written = bounded("upsert the profile", async move {
                match profiles
                    .find_one_and_update(filter, update)
                    .upsert(true)
                    .return_document(ReturnDocument::After)
                    .await
                {
                    Err(error) if is_duplicate_key(&error) => Ok(None),
                    other => other,
                }
            })
            .await?;
            match written {
                Some(document) => return document.try_into(),
                None => {
                    tracing::debug!(user = %p.uuid, "profile completed concurrently; going round again")
                }
            }
        }
        Err(StoreError::Backend(format!(
            "upsert of {uuid} kept conflicting with concurrent writers"
        )))
    }

    #[tracing::instrument(name = "profiles.mark_failed", skip_all, fields(otel.kind = "client", otel.name = "update enriched_users", db.system.name = "mongodb", db.operation.name = "update", db.collection.name = "enriched_users"))]
    async fn mark_failed(&self, p: &EnrichedProfile) -> Result<(), StoreError> {
        // Never over a completed profile: the filter skips it, and the upsert's insert
        // then hits the unique index, which here means "nothing to do".
        let profiles = self.profiles.clone();
        let filter = doc! {
            "uuid": uuid_key(p.uuid),
            "status": { "$ne": EnrichmentStatus::Completed.as_str() },
        };
        let update = doc! {
            "$set": {
                "status": EnrichmentStatus::Failed.as_str(),
                "error": p.error.as_deref(),
                "source_event_id": uuid_key(p.source_event_id),
            },
            "$setOnInsert": {
                "name": &p.name,
                "email": &p.email,
                "linkedin": Bson::Null,
                "github": Bson::Null,
                "enriched_at": Bson::Null,
                "created_at": bson::DateTime::now(),
            },
            "$currentDate": { "updated_at": true },
        };
        bounded("record the failed enrichment", async move {
            match profiles.update_one(filter, update).upsert(true).await {
                Err(error) if is_duplicate_key(&error) => Ok(()),
                other => other.map(drop),
            }
        })
        .await
    }

    #[tracing::instrument(name = "profiles.get", skip_all, fields(otel.kind = "client", otel.name = "find enriched_users", db.system.name = "mongodb", db.operation.name = "find", db.collection.name = "enriched_users"))]
    async fn get(&self, uuid: Uuid) -> Result<Option<EnrichedProfile>, StoreError> {
        let profiles = self.profiles.clone();
        let filter = doc! { "uuid": uuid_key(uuid) };
        bounded("read the profile", async move {
            profiles.find_one(filter).await
        })
        .await?
        .map(EnrichedProfile::try_from)
        .transpose()
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
