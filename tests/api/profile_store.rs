//! What every profile store must do, run against each adapter: SQLite always, MongoDB
//! when `USERHUB_TEST_MONGO_URL` is set. Writes are conditional on the user's version,
//! so events applied in any order leave the newest state.

use std::sync::Arc;

use tempfile::TempDir;
use userhub::config::Settings;
use userhub::db::Database;
use userhub::enrichment::{
    EnrichedProfile, EnrichmentStatus, ProfileStore, SqliteProfileStore, Write,
};
use uuid::Uuid;

use crate::mongo_store::TestDatabase;

fn derived(uuid: Uuid, name: &str, version: u64) -> EnrichedProfile {
    EnrichedProfile::derive(uuid, name, "ada@example.com", Uuid::now_v7(), version)
}

fn failed(uuid: Uuid, version: u64, error: &str) -> EnrichedProfile {
    EnrichedProfile::failed(
        uuid,
        "Ada",
        "ada@example.com",
        Uuid::now_v7(),
        version,
        error,
    )
}

async fn upsert_then_get_round_trips(store: &dyn ProfileStore) {
    let profile = derived(Uuid::now_v7(), "João Silva", 1);
    assert_eq!(store.upsert(&profile).await.unwrap(), Write::Applied);
    let read = store.get(profile.uuid).await.unwrap().expect("stored");
    assert_eq!(read.name, "João Silva");
    assert_eq!(read.linkedin.as_deref(), Some("linkedin.com/in/joaosilva"));
    assert_eq!(read.github.as_deref(), Some("github.com/joaosilva"));
    assert_eq!(read.status, EnrichmentStatus::Completed);
    assert_eq!(read.source_event_id, profile.source_event_id);
    assert_eq!(read.version, 1);
    assert_eq!(read.enriched_at, profile.enriched_at);
    assert_eq!(store.get(Uuid::now_v7()).await.unwrap(), None);
}

async fn a_redelivered_event_changes_nothing(store: &dyn ProfileStore) {
    let profile = derived(Uuid::now_v7(), "Ada Lovelace", 1);
    assert_eq!(store.upsert(&profile).await.unwrap(), Write::Applied);
    let first = store.get(profile.uuid).await.unwrap();
    // The same event, derived again a moment later.
    let mut again = derived(profile.uuid, "Ada Lovelace", 1);
    again.source_event_id = profile.source_event_id;
    assert_eq!(store.upsert(&again).await.unwrap(), Write::Stale);
    assert_eq!(store.get(profile.uuid).await.unwrap(), first, "first kept");
}

async fn events_applied_out_of_order_leave_the_newest(store: &dyn ProfileStore) {
    let uuid = Uuid::now_v7();
    let v3 = derived(uuid, "Third Name", 3);
    assert_eq!(store.upsert(&v3).await.unwrap(), Write::Applied);
    for late in [
        derived(uuid, "Second Name", 2),
        derived(uuid, "First Name", 1),
    ] {
        assert_eq!(store.upsert(&late).await.unwrap(), Write::Stale);
    }
    assert_eq!(
        store.mark_failed(&failed(uuid, 2, "late")).await.unwrap(),
        Write::Stale
    );
    let read = store.get(uuid).await.unwrap().unwrap();
    assert_eq!((read.name.as_str(), read.version), ("Third Name", 3));
    assert_eq!(
        store
            .upsert(&derived(uuid, "Fourth Name", 4))
            .await
            .unwrap(),
        Write::Applied
    );
    assert_eq!(store.get(uuid).await.unwrap().unwrap().name, "Fourth Name");
}

async fn the_same_version_from_another_event_is_a_reenrichment(store: &dyn ProfileStore) {
    let uuid = Uuid::now_v7();
    assert_eq!(
        store.upsert(&derived(uuid, "Ada", 2)).await.unwrap(),
        Write::Applied
    );
    let rebuilt = derived(uuid, "Ada", 2);
    assert_eq!(store.upsert(&rebuilt).await.unwrap(), Write::Applied);
    let read = store.get(uuid).await.unwrap().unwrap();
    assert_eq!(read.source_event_id, rebuilt.source_event_id);
}

async fn a_failure_never_downgrades_a_completed_profile(store: &dyn ProfileStore) {
    let uuid = Uuid::now_v7();
    store
        .upsert(&derived(uuid, "Alan Turing", 1))
        .await
        .unwrap();
    let before = store.get(uuid).await.unwrap();
    assert_eq!(
        store
            .mark_failed(&failed(uuid, 1, "gave up"))
            .await
            .unwrap(),
        Write::Stale
    );
    assert_eq!(store.get(uuid).await.unwrap(), before);
}

async fn a_failure_is_recorded_then_completed_by_a_later_success(store: &dyn ProfileStore) {
    let uuid = Uuid::now_v7();
    assert_eq!(
        store.mark_failed(&failed(uuid, 1, "boom")).await.unwrap(),
        Write::Applied
    );
    let read = store.get(uuid).await.unwrap().expect("recorded");
    assert_eq!(read.status, EnrichmentStatus::Failed);
    assert_eq!(read.error.as_deref(), Some("boom"));
    assert_eq!(
        (read.linkedin, read.github, read.enriched_at),
        (None, None, None)
    );
    // Failing again (a replay that failed too) updates the record.
    assert_eq!(
        store
            .mark_failed(&failed(uuid, 1, "boom again"))
            .await
            .unwrap(),
        Write::Applied
    );
    let read = store.get(uuid).await.unwrap().unwrap();
    assert_eq!(read.error.as_deref(), Some("boom again"));
    // The replay that succeeds completes it, at the same version.
    let completed = derived(uuid, "Ada", 1);
    assert_eq!(store.upsert(&completed).await.unwrap(), Write::Applied);
    let read = store.get(uuid).await.unwrap().unwrap();
    assert_eq!(read.status, EnrichmentStatus::Completed);
    assert_eq!(read.error, None);
    assert_eq!(read.enriched_at, completed.enriched_at);
}

async fn an_erased_user_stays_erased(store: &dyn ProfileStore) {
    let uuid = Uuid::now_v7();
    store
        .upsert(&derived(uuid, "Grace Hopper", 2))
        .await
        .unwrap();
    assert_eq!(
        store.erase(uuid, 3, Uuid::now_v7()).await.unwrap(),
        Write::Applied
    );
    assert_eq!(store.get(uuid).await.unwrap(), None);
    // Late events of the erased user, and the deletion again, change nothing.
    for late in [
        derived(uuid, "Grace Hopper", 1),
        derived(uuid, "Grace H.", 2),
    ] {
        assert_eq!(store.upsert(&late).await.unwrap(), Write::Stale);
    }
    assert_eq!(
        store.mark_failed(&failed(uuid, 2, "late")).await.unwrap(),
        Write::Stale
    );
    assert_eq!(
        store.erase(uuid, 3, Uuid::now_v7()).await.unwrap(),
        Write::Stale
    );
    assert_eq!(store.get(uuid).await.unwrap(), None);
    // A deletion can arrive before anything else of the user.
    let unseen = Uuid::now_v7();
    assert_eq!(
        store.erase(unseen, 2, Uuid::now_v7()).await.unwrap(),
        Write::Applied
    );
    assert_eq!(
        store
            .upsert(&derived(unseen, "Never Seen", 1))
            .await
            .unwrap(),
        Write::Stale
    );
    assert_eq!(store.get(unseen).await.unwrap(), None);
}

async fn concurrent_deliveries_of_one_event_apply_once(store: &dyn ProfileStore) {
    // Several users, so that some pairs really race to insert (one loses on the unique
    // key and must report it as stale, not fail).
    for _ in 0..8 {
        let profile = derived(Uuid::now_v7(), "Twin", 1);
        let (a, b) = tokio::join!(store.upsert(&profile), store.upsert(&profile));
        let mut outcomes = [a.unwrap(), b.unwrap()];
        outcomes.sort_by_key(|w| *w == Write::Stale);
        assert_eq!(outcomes, [Write::Applied, Write::Stale]);
        assert!(store.get(profile.uuid).await.unwrap().is_some());
    }
}

/// A consumer hands over many messages at once (and the stores write the upserts that
/// meet as one group): each caller gets its own answer.
async fn many_concurrent_upserts_each_get_their_own_answer(store: &dyn ProfileStore) {
    let newer: Vec<EnrichedProfile> = (0..48)
        .map(|i| derived(Uuid::now_v7(), &format!("User {i}"), 2))
        .collect();
    // The same users at an older version, mixed in: those must lose.
    let older: Vec<EnrichedProfile> = newer
        .iter()
        .take(16)
        .map(|p| derived(p.uuid, "Old Name", 1))
        .collect();
    for p in &newer[..16] {
        assert_eq!(store.upsert(p).await.unwrap(), Write::Applied);
    }
    let writes =
        futures_util::future::join_all(older.iter().chain(&newer[16..]).map(|p| store.upsert(p)))
            .await;
    let (stale, applied) = writes.split_at(16);
    assert!(
        stale.iter().all(|w| matches!(w, Ok(Write::Stale))),
        "{stale:?}"
    );
    assert!(
        applied.iter().all(|w| matches!(w, Ok(Write::Applied))),
        "{applied:?}"
    );
    for p in &newer {
        let read = store.get(p.uuid).await.unwrap().expect("stored");
        assert_eq!((read.name.as_str(), read.version), (p.name.as_str(), 2));
    }
}

/// Versions of a new user that arrive together (a consumer catching up on a backlog)
/// may be written in one group: whichever is written first, the newest stays.
async fn versions_of_a_new_user_written_together_leave_the_newest(store: &dyn ProfileStore) {
    for _ in 0..4 {
        let uuid = Uuid::now_v7();
        let versions = [2, 1, 3].map(|v| derived(uuid, &format!("Version {v}"), v));
        let writes = futures_util::future::join_all(versions.iter().map(|p| store.upsert(p))).await;
        assert!(matches!(writes[2], Ok(Write::Applied)), "{writes:?}");
        assert!(writes.iter().all(Result::is_ok), "{writes:?}");
        let read = store.get(uuid).await.unwrap().expect("stored");
        assert_eq!((read.name.as_str(), read.version), ("Version 3", 3));
    }
}

/// A migrated SQLite profile store in a temporary folder.
async fn sqlite() -> (Arc<dyn ProfileStore>, TempDir) {
    let dir = TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("profiles.db").display());
    let settings = Settings::load_for("test").unwrap().database;
    let db = Database::connect(&url, &settings).await.unwrap();
    db.migrate().await.unwrap();
    let Database::Sqlite(pool) = db else {
        unreachable!("a sqlite URL gives SQLite")
    };
    (Arc::new(SqliteProfileStore::new(pool)), dir)
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _dir) = super::sqlite().await;
                    super::$name(store.as_ref()).await;
                }
            )*
        }
        mod mongo {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(db) = super::TestDatabase::create().await else {
                        return;
                    };
                    super::$name(&db.store).await;
                    db.remove().await;
                }
            )*
        }
    };
}

contract!(
    upsert_then_get_round_trips,
    a_redelivered_event_changes_nothing,
    events_applied_out_of_order_leave_the_newest,
    the_same_version_from_another_event_is_a_reenrichment,
    a_failure_never_downgrades_a_completed_profile,
    a_failure_is_recorded_then_completed_by_a_later_success,
    an_erased_user_stays_erased,
    concurrent_deliveries_of_one_event_apply_once,
    many_concurrent_upserts_each_get_their_own_answer,
    versions_of_a_new_user_written_together_leave_the_newest,
);
