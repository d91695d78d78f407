//! PostgreSQL-only guarantees of the outbox relay: concurrent relays share the outbox
//! without publishing a row twice or skipping one, a NOTIFY sent after the commit (not
//! by it) wakes a relay in another process at once, and notifications that pile up
//! during a batch cost one more batch, not one each. And of the pool: a connection cut
//! while idle is replaced, not handed out.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use userhub::bus::{Binding, BusError, DeadLetter, Envelope, EventBus, EventHandler, ReplayFilter};
use userhub::config::Settings;
use userhub::db::Database;
use userhub::outbox::{NOTIFY_CHANNEL, OutboxRelay, OutboxSignal, notify_relays};
use userhub::users::{Email, NewUser, SqlUserRepository, UserName, UserRepository};

use crate::helpers::{DEADLINE, PgTestDatabase, eventually};
use crate::services::{POSTGRES, service_url};

/// A bus that records what it is given: every envelope's id, and the size of every
/// batch, empty ones included. Publishing yields so relays interleave. A holding bus
/// keeps its first batch with rows until the test adds a permit to `held`.
struct RecordingBus {
    published: Mutex<Vec<uuid::Uuid>>,
    sizes: Mutex<Vec<usize>>,
    hold_first: bool,
    held: tokio::sync::Semaphore,
}

impl RecordingBus {
    fn new(hold_first: bool) -> Self {
        Self {
            published: Mutex::default(),
            sizes: Mutex::default(),
            hold_first,
            held: tokio::sync::Semaphore::new(0),
        }
    }

    fn ids(&self) -> Vec<uuid::Uuid> {
        self.published.lock().unwrap().clone()
    }

    fn sizes(&self) -> Vec<usize> {
        self.sizes.lock().unwrap().clone()
    }
}

#[async_trait]
impl EventBus for RecordingBus {
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.published.lock().unwrap().push(envelope.id);
        Ok(())
    }

    async fn publish_all(&self, batch: &[(Envelope, tracing::Span)]) -> (usize, Option<BusError>) {
        let first_with_rows = {
            let mut sizes = self.sizes.lock().unwrap();
            sizes.push(batch.len());
            !batch.is_empty() && sizes.iter().filter(|n| **n > 0).count() == 1
        };
        if self.hold_first && first_with_rows {
            self.held.acquire().await.unwrap().forget();
        }
        for (envelope, _) in batch {
            self.publish(envelope).await.unwrap();
        }
        (batch.len(), None)
    }

    async fn consume(&self, _: &Binding, _: Arc<dyn EventHandler>, shutdown: CancellationToken) {
        shutdown.cancelled().await;
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn dead_letters(&self, _: u32, _: Option<&str>) -> Result<Vec<DeadLetter>, BusError> {
        Ok(Vec::new())
    }

    async fn replay(&self, _: &str) -> Result<bool, BusError> {
        Ok(false)
    }

    async fn replay_all(&self, _: &ReplayFilter) -> Result<u64, BusError> {
        Ok(0)
    }
}

async fn migrated(test_db: &PgTestDatabase) -> (Database, sqlx::PgPool) {
    let settings = Settings::load_for("test").unwrap().database;
    let database = Database::connect(&test_db.url, &settings).await.unwrap();
    database.migrate().await.unwrap();
    let Database::Postgres(pool) = database.clone() else {
        unreachable!("a postgres URL gives a PostgreSQL database")
    };
    (database, pool)
}

/// The backend of a relay's LISTEN connection.
const LISTENER: &str = "SELECT pid FROM pg_stat_activity
                         WHERE datname = current_database() AND query LIKE 'LISTEN%'";

/// Runs a relay that only NOTIFY can wake in time: no in-process signal, and a poll
/// far beyond the deadline. Cancel the token, then await the handle.
fn run_notified_relay(
    database: Database,
    bus: Arc<RecordingBus>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let relay = OutboxRelay::new(
        database,
        bus,
        OutboxSignal::default(),
        100,
        Duration::from_secs(600),
    );
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    (shutdown, running)
}

async fn create_users(pool: &sqlx::PgPool, range: std::ops::Range<usize>) {
    let repository = SqlUserRepository::new(Database::Postgres(pool.clone()));
    for i in range {
        let user = NewUser {
            name: UserName::parse(&format!("Person {i}")).unwrap(),
            email: Email::parse(&format!("p{i}@example.com")).unwrap(),
        };
        repository
            .create(&user, BTreeMap::new(), None)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn two_relays_publish_every_row_exactly_once() {
    if service_url(POSTGRES).is_none() {
        return;
    }
    let test_db = PgTestDatabase::create().await;
    let (database, pool) = migrated(&test_db).await;
    create_users(&pool, 0..300).await;

    let bus = Arc::new(RecordingBus::new(false));
    let relay = |batch| {
        OutboxRelay::new(
            database.clone(),
            bus.clone(),
            OutboxSignal::default(),
            batch,
            Duration::from_secs(60),
        )
    };
    let (first, second) = (relay(10), relay(10));
    let (a, b) = tokio::join!(first.drain(), second.drain());
    let (a, b) = (a.unwrap(), b.unwrap());
    // A relay stops when it sees a short batch, which rows locked by the other can
    // cause: one more pass picks up anything left.
    let rest = first.drain().await.unwrap();
    eprintln!("relay 1 sent {a}, relay 2 sent {b}, a last pass {rest}");

    let ids = bus.ids();
    assert_eq!(ids.len(), 300, "every row published");
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        300,
        "no row twice"
    );
    assert_eq!(a + b + rest, 300);
    let unsent: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(unsent, 0);
    pool.close().await;
}

#[tokio::test]
async fn a_commit_in_another_process_wakes_the_relay_through_notify() {
    if service_url(POSTGRES).is_none() {
        return;
    }
    let test_db = PgTestDatabase::create().await;
    let (database, pool) = migrated(&test_db).await;
    create_users(&pool, 0..1).await;

    let bus = Arc::new(RecordingBus::new(false));
    let (shutdown, running) = run_notified_relay(database, bus.clone());
    let wait_for = async |n: usize| {
        let started = Instant::now();
        while bus.ids().len() < n {
            assert!(started.elapsed() < DEADLINE, "relay not woken");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    };
    wait_for(1).await;
    // Written through another pool, as another process would, whose signal sends the
    // NOTIFY after the commit.
    let stop_notifying = CancellationToken::new();
    let other_process = OutboxSignal::notifying(pool.clone(), stop_notifying.clone());
    create_users(&pool, 1..2).await;
    other_process.notify();
    let took = wait_for(2).await;
    assert!(took < Duration::from_secs(5), "woken after {took:?}");

    // The LISTEN connection dies (a failover, an idle-connection reaper): the relay
    // listens again on a new one, and is still woken at once.
    let pid: i32 = sqlx::query_scalar(LISTENER).fetch_one(&pool).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&pool)
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let pids: Vec<i32> = sqlx::query_scalar(LISTENER).fetch_all(&pool).await.unwrap();
        if pids.iter().any(|p| *p != pid) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the relay did not listen again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    create_users(&pool, 2..3).await;
    other_process.notify();
    let took = wait_for(3).await;
    assert!(took < Duration::from_secs(5), "woken after {took:?}");
    stop_notifying.cancel();
    shutdown.cancel();
    running.await.unwrap();
    pool.close().await;
}

#[tokio::test]
async fn a_commit_that_writes_outbox_rows_does_not_notify() {
    if service_url(POSTGRES).is_none() {
        return;
    }
    let test_db = PgTestDatabase::create().await;
    let (_database, pool) = migrated(&test_db).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(NOTIFY_CHANNEL).await.unwrap();
    create_users(&pool, 0..3).await;
    // Notifications arrive in commit order: had a create notified (and so taken
    // PostgreSQL's commit lock for notifying transactions), it would come first.
    sqlx::query("SELECT pg_notify($1, 'after the creates')")
        .bind(NOTIFY_CHANNEL)
        .execute(&pool)
        .await
        .unwrap();
    let first = tokio::time::timeout(DEADLINE, listener.recv())
        .await
        .expect("no notification at all")
        .unwrap();
    assert_eq!(first.payload(), "after the creates");
    // The listener holds one of the pool's connections, which `close` waits for.
    drop(listener);
    pool.close().await;
}

#[tokio::test]
async fn notifications_that_pile_up_during_a_batch_cost_one_more_batch() {
    if service_url(POSTGRES).is_none() {
        return;
    }
    let test_db = PgTestDatabase::create().await;
    let (database, pool) = migrated(&test_db).await;
    let bus = Arc::new(RecordingBus::new(true));
    let (shutdown, running) = run_notified_relay(database, bus.clone());
    let batches = async |n: usize| {
        eventually(&format!("{n} batches"), async || {
            let sizes = bus.sizes();
            (sizes.len() >= n).then_some(sizes)
        })
        .await
    };
    // The batch at start finds nothing. The relay sent its LISTEN before it; wait until
    // the server shows it too.
    batches(1).await;
    eventually("the relay listening", async || {
        sqlx::query_scalar::<_, i32>(LISTENER)
            .fetch_optional(&pool)
            .await
            .unwrap()
    })
    .await;
    // Each create is followed by the NOTIFY its process's signal would send.
    create_users(&pool, 0..1).await;
    notify_relays(&pool).await.unwrap();
    batches(2).await;
    // While that batch is held, 50 notifications arrive, as 50 commits of other
    // processes would send them (their rows are already in the held batch's read or
    // the next one's): distinct payloads, so PostgreSQL folds none of them.
    sqlx::query("SELECT pg_notify('userhub_outbox', g::text) FROM generate_series(1, 50) g")
        .execute(&pool)
        .await
        .unwrap();
    bus.held.add_permits(1);
    // One batch answers them all, and finds nothing.
    assert_eq!(batches(3).await, [0, 1, 0]);
    // The relay is idle again: the next commit gets the next batch.
    create_users(&pool, 1..2).await;
    notify_relays(&pool).await.unwrap();
    assert_eq!(batches(4).await, [0, 1, 0, 1]);
    shutdown.cancel();
    running.await.unwrap();
    assert_eq!(
        bus.sizes(),
        [0, 1, 0, 1],
        "no batch for a notification already answered"
    );
    pool.close().await;
}

#[tokio::test]
async fn a_pooled_connection_cut_while_idle_is_replaced_not_handed_out() {
    if service_url(POSTGRES).is_none() {
        return;
    }
    let test_db = PgTestDatabase::create().await;
    let (_database, pool) = migrated(&test_db).await;
    sqlx::query("SELECT 1").execute(&pool).await.unwrap();
    // Every connection of the pool cut from outside, as a restart or an
    // idle-connection reaper would.
    let admin = sqlx::PgPool::connect(&test_db.url).await.unwrap();
    let cut: Vec<i32> = sqlx::query_scalar(
        "WITH others AS MATERIALIZED (
             SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid())
         SELECT pid FROM others WHERE pg_terminate_backend(pid)",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(!cut.is_empty(), "the pool had connections to cut");
    // Idle past the window in which a pooled connection is used without a ping:
    // this wait is the condition under test, not a synchronisation.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("a live connection, not a cut one");
    assert!(!cut.contains(&pid));
    admin.close().await;
    pool.close().await;
}
