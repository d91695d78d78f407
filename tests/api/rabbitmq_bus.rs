//! The RabbitMQ adapter of the event bus against a real broker
//! (`USERHUB_TEST_AMQP_URL`): delivery, retries through the TTL queues, dead letters
//! and replay, poison messages, idempotent topology, reconnection, broker down.
//!
//! Each test declares its topology under its own prefix and deletes it at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use userhub::bus::{
    BusError, DeliveryPolicy, Envelope, EventBus, EventHandler, HandlerError, RabbitBus, headers,
};
use userhub::enrichment::BINDING;
use userhub::resilience::Backoff;

use crate::helpers::{DEADLINE, eventually, init_tracing};
use crate::services::{self, AMQP};

/// Tiny backoff: retry 1 waits 20 ms in its TTL queue, retry 2 waits 40 ms.
fn policy() -> DeliveryPolicy {
    DeliveryPolicy {
        max_attempts: 3,
        backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(200)),
        handler_timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(50),
        concurrency: 4,
        delivery_limit: 20,
        dead_letter_ttl: Duration::from_secs(3600),
    }
}

/// A broker URL and a prefix of our own, or `None` when the test is skipped.
fn broker() -> Option<(String, String, Cleanup)> {
    init_tracing();
    let url = services::service_url(AMQP)?;
    let prefix = format!("{}.", services::unique_name("rabbit"));
    let cleanup = Cleanup {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    Some((url, prefix, cleanup))
}

/// Deletes the test's topology when the test fails halfway; a passing test deletes
/// it itself ([`remove`]), so the broker is left as it was either way.
struct Cleanup {
    url: String,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        // The test's runtime is unwinding: clean up from a runtime of our own.
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let bus = RabbitBus::connect(&url, &prefix, vec![BINDING], policy())
                    .await
                    .ok()?;
                let started = Instant::now();
                while bus.ping().await.is_err() && started.elapsed() < DEADLINE {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let deleted = bus.delete_topology().await.ok();
                bus.close().await;
                deleted
            })
        })
        .join();
        if !matches!(cleaned, Ok(Some(()))) {
            eprintln!(
                "could not delete the RabbitMQ topology under {}",
                self.prefix
            );
        }
    }
}

async fn connected_bus(url: &str, prefix: &str) -> Arc<RabbitBus> {
    let bus = RabbitBus::connect(url, prefix, vec![BINDING], policy())
        .await
        .expect("bus starts");
    eventually("the bus connects", async || bus.ping().await.ok()).await;
    Arc::new(bus)
}

async fn remove(bus: Arc<RabbitBus>) {
    bus.delete_topology().await.expect("topology deleted");
    bus.close().await;
}

fn envelope(payload: &str) -> Envelope {
    let mut headers = BTreeMap::new();
    headers.insert(headers::EVENT_VERSION.to_owned(), "1".to_owned());
    headers.insert(headers::REQUEST_ID.to_owned(), "req-42".to_owned());
    headers.insert("traceparent".to_owned(), "00-abc-def-01".to_owned());
    Envelope::new(BINDING.routing_keys[0], payload.to_owned(), headers)
}

/// What a scripted handler answers to the `n`-th delivery (1-based) of a message.
type Script = fn(&Envelope, usize) -> Result<(), HandlerError>;

#[derive(Clone)]
struct Call {
    at: Instant,
    envelope: Envelope,
    ok: bool,
}

/// A handler that records every delivery and answers from a script.
struct Recorder {
    script: Script,
    calls: Mutex<Vec<Call>>,
    dead: Mutex<Vec<(Envelope, String)>>,
}

impl Recorder {
    fn new(script: Script) -> Arc<Self> {
        Arc::new(Self {
            script,
            calls: Mutex::new(Vec::new()),
            dead: Mutex::new(Vec::new()),
        })
    }

    fn calls_for(&self, id: uuid::Uuid) -> Vec<Call> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.envelope.id == id)
            .cloned()
            .collect()
    }

    fn succeeded(&self, id: uuid::Uuid) -> bool {
        self.calls_for(id).iter().any(|c| c.ok)
    }

    fn dead_letters(&self) -> Vec<(Envelope, String)> {
        self.dead.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl EventHandler for Recorder {
    async fn handle(&self, envelope: &Envelope) -> Result<(), HandlerError> {
        let mut calls = self.calls.lock().unwrap();
        let n = calls
            .iter()
            .filter(|c| c.envelope.id == envelope.id)
            .count()
            + 1;
        let result = (self.script)(envelope, n);
        calls.push(Call {
            at: Instant::now(),
            envelope: envelope.clone(),
            ok: result.is_ok(),
        });
        result
    }

    async fn on_dead_letter(&self, envelope: &Envelope, error: &str) {
        self.dead
            .lock()
            .unwrap()
            .push((envelope.clone(), error.to_owned()));
    }
}

/// `consume` running in a task, as the worker role runs it.
struct Consumer {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Consumer {
    fn start(bus: &Arc<RabbitBus>, handler: &Arc<Recorder>) -> Self {
        let shutdown = CancellationToken::new();
        let (bus, handler, token) = (bus.clone(), handler.clone(), shutdown.clone());
        let task = tokio::spawn(async move { bus.consume(&BINDING, handler, token).await });
        Self { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("consumer stops on shutdown")
            .expect("consumer task joins");
    }
}

/// A plain lapin channel for looking behind the adapter's back.
pub(crate) async fn raw_channel(url: &str) -> (Connection, Channel) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = connection.create_channel().await.expect("raw channel");
    (connection, channel)
}

/// Ready messages in `queue`.
pub(crate) async fn depth(url: &str, queue: &str) -> u32 {
    let (connection, channel) = raw_channel(url).await;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .expect("queue exists");
    connection.close(200, "done".into()).await.ok();
    declared.message_count()
}

fn header<'a>(properties: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(key)
}

fn text(value: Option<&AMQPValue>) -> String {
    match value {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("expected a string header, got {other:?}"),
    }
}

#[tokio::test]
async fn a_published_envelope_is_delivered_unchanged_and_acknowledged() {
    let Some((url, prefix, _cleanup)) = broker() else {
        return;
    };
    let bus = connected_bus(&url, &prefix).await;
    let handler = Recorder::new(|_, _| Ok(()));
    let consumer = Consumer::start(&bus, &handler);

    let sent = envelope(r#"{"uuid":"u-1","name":"Ada"}"#);
    bus.publish(&sent).await.expect("published and confirmed");
    eventually("the envelope is handled", async || {
        handler.succeeded(sent.id).then_some(())
    })
    .await;
    consumer.stop().await;

    let calls = handler.calls_for(sent.id);
    assert_eq!(calls.len(), 1, "delivered once");
    // Id, routing key, payload, headers and occurred_at (to the millisecond).
    assert_eq!(calls[0].envelope, sent);
    assert_eq!(depth(&url, &format!("{prefix}{}", BINDING.queue)).await, 0);
    assert!(bus.dead_letters(10, None).await.unwrap().is_empty());
    remove(bus).await;
}

#[tokio::test]
async fn transient_failures_are_retried_through_the_ttl_queues_then_acknowledged() {
    let Some((url, prefix, _cleanup)) = broker() else {
        return;
    };
    let bus = connected_bus(&url, &prefix).await;
    let handler = Recorder::new(|_, n| {
        if n < 3 {
            Err(HandlerError::Transient("store is down".into()))
        } else {
            Ok(())
        }
    });
    let consumer = Consumer::start(&bus, &handler);

    let sent = envelope(r#"{"uuid":"u-2"}"#);
    bus.publish(&sent).await.unwrap();
    eventually("the third attempt succeeds", async || {
        handler.succeeded(sent.id).then_some(())
    })
    .await;
    consumer.stop().await;

    let calls = handler.calls_for(sent.id);
    assert_eq!(calls.len(), 3);
    for call in &calls {
        assert_eq!(call.envelope, sent, "each retry carries the same envelope");
    }
    // Each copy waited out its retry queue's TTL: the backoff ceilings, 20 then 40 ms.
    let first_gap = calls[1].at - calls[0].at;
    let second_gap = calls[2].at - calls[1].at;
    assert!(first_gap >= Duration::from_millis(20), "{first_gap:?}");
    assert!(second_gap >= Duration::from_millis(40), "{second_gap:?}");

    let work = format!("{prefix}{}", BINDING.queue);
    assert_eq!(depth(&url, &work).await, 0);
    assert_eq!(depth(&url, &format!("{work}.retry.20ms")).await, 0);
    assert_eq!(depth(&url, &format!("{work}.retry.40ms")).await, 0);
    assert!(bus.dead_letters(10, None).await.unwrap().is_empty());
    assert!(handler.dead_letters().is_empty());
    remove(bus).await;
}

#[tokio::test]
async fn a_message_that_keeps_failing_is_dead_lettered_listed_and_replayed() {
    let Some((url, prefix, _cleanup)) = broker() else {
        return;
    };
    let bus = connected_bus(&url, &prefix).await;
    // Three failures dead-letter it; after the replay it fails once more (so a retry
    // proves the attempt count was reset) and then succeeds.
    let handler = Recorder::new(|_, n| match n {
        1..=4 => Err(HandlerError::Transient("store is down".into())),
        _ => Ok(()),
    });
    let consumer = Consumer::start(&bus, &handler);

    let first = envelope(r#"{"uuid":"u-3"}"#);
    let second = envelope(r#"{"uuid":"u-4"}"#);
    bus.publish(&first).await.unwrap();
    bus.publish(&second).await.unwrap();
    eventually("both are given up on", async || {
        (handler.dead_letters().len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        handler.calls_for(first.id).len(),
        3,
        "max_attempts deliveries"
    );
    assert_eq!(handler.dead_letters()[0].1, "store is down");

    // The raw dead letter carries the transport headers.
    let dlq = format!("{prefix}{}.dlq", BINDING.queue);
    let (connection, channel) = raw_channel(&url).await;
    let raw = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a dead letter");
    let properties = &raw.delivery.properties;
    assert_eq!(text(header(properties, "x-error")), "store is down");
    assert_eq!(
        header(properties, "x-attempts"),
        Some(&AMQPValue::LongLongInt(3))
    );
    assert_eq!(
        text(header(properties, "x-original-routing-key")),
        "user.created"
    );
    assert_eq!(text(header(properties, "x-original-queue")), BINDING.queue);
    assert_eq!(*properties.delivery_mode(), Some(2));
    // Closing the channel puts the unacknowledged dead letter back.
    connection.close(200, "done".into()).await.unwrap();

    let dead = bus.dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let letter = &dead[0];
    assert_eq!(letter.id, first.id.to_string());
    assert_eq!(letter.message_id, first.id);
    assert_eq!(letter.queue, BINDING.queue);
    assert_eq!(letter.routing_key, "user.created");
    assert_eq!(letter.payload, first.payload);
    assert_eq!(letter.headers, first.headers);
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.error, "store is down");
    assert_eq!(dead[1].id, second.id.to_string());

    // Listing loses nothing, and pages continue after the given id.
    assert_eq!(bus.dead_letters(10, None).await.unwrap(), dead);
    assert_eq!(bus.dead_letters(1, None).await.unwrap(), dead[..1]);
    assert_eq!(
        bus.dead_letters(10, Some(&dead[0].id)).await.unwrap(),
        dead[1..]
    );
    assert!(
        bus.dead_letters(10, Some(&dead[1].id))
            .await
            .unwrap()
            .is_empty()
    );

    assert!(bus.replay(&letter.id).await.unwrap(), "replayed");
    eventually("the replayed message succeeds", async || {
        handler.succeeded(first.id).then_some(())
    })
    .await;
    consumer.stop().await;
    let calls = handler.calls_for(first.id);
    assert_eq!(
        calls.len(),
        5,
        "one failed retry after the replay, then success"
    );
    assert_eq!(calls[4].envelope, first);
    assert!(
        calls[4].at - calls[3].at >= Duration::from_millis(20),
        "the retry after the replay went through the first retry queue"
    );
    assert_eq!(handler.dead_letters().len(), 2, "not dead-lettered again");

    let left = bus.dead_letters(10, None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, second.id.to_string());
    assert!(!bus.replay(&letter.id).await.unwrap(), "already replayed");
    assert!(!bus.replay("no-such-message").await.unwrap());
    assert_eq!(bus.dead_letters(10, None).await.unwrap(), left);
    remove(bus).await;
}

#[tokio::test]
async fn poison_goes_straight_to_the_dead_letters_without_blocking_later_messages() {
    let Some((url, prefix, _cleanup)) = broker() else {
        return;
    };
    let bus = connected_bus(&url, &prefix).await;
    let handler = Recorder::new(|envelope, _| {
        if envelope.payload.starts_with('{') && !envelope.payload.ends_with('}') {
            Err(HandlerError::Permanent("payload is not JSON".into()))
        } else {
            Ok(())
        }
    });
    let consumer = Consumer::start(&bus, &handler);

    // A body that is not UTF-8 never reaches the handler.
    let binary_id = uuid::Uuid::now_v7();
    let (connection, channel) = raw_channel(&url).await;
    channel
        .basic_publish(
            format!("{prefix}userhub.events").as_str().into(),
            BINDING.routing_keys[0].into(),
            BasicPublishOptions::default(),
            &[0xff, 0xfe, 0x00],
            BasicProperties::default()
                .with_message_id(binary_id.to_string().into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    let refused = envelope("{not json");
    bus.publish(&refused).await.unwrap();
    let good = envelope(r#"{"uuid":"u-5"}"#);
    bus.publish(&good).await.unwrap();

    eventually("the good message is handled", async || {
        handler.succeeded(good.id).then_some(())
    })
    .await;
    eventually("both poison messages are reported", async || {
        (handler.dead_letters().len() == 2).then_some(())
    })
    .await;
    consumer.stop().await;

    assert!(handler.calls_for(binary_id).is_empty());
    assert_eq!(handler.calls_for(refused.id).len(), 1, "no retry");
    let dead = bus.dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let binary = dead.iter().find(|d| d.message_id == binary_id).unwrap();
    assert_eq!(binary.attempts, 1);
    assert!(binary.error.contains("UTF-8"), "{}", binary.error);
    let refused_letter = dead.iter().find(|d| d.message_id == refused.id).unwrap();
    assert_eq!(refused_letter.attempts, 1);
    assert_eq!(refused_letter.error, "payload is not JSON");
    assert_eq!(refused_letter.payload, "{not json");
    remove(bus).await;
}

#[tokio::test]
async fn declaring_the_same_topology_twice_is_harmless() {
    let Some((url, prefix, _cleanup)) = broker() else {
        return;
    };
    let publisher = connected_bus(&url, &prefix).await;
    let worker = connected_bus(&url, &prefix).await;
    let handler = Recorder::new(|_, _| Ok(()));
    let consumer = Consumer::start(&worker, &handler);

    let sent = envelope(r#"{"uuid":"u-6"}"#);
    publisher.publish(&sent).await.unwrap();
    eventually("the other bus delivers it", async || {
        handler.succeeded(sent.id).then_some(())
    })
    .await;
    consumer.stop().await;
    publisher.close().await;
    remove(worker).await;
}

#[tokio::test]
async fn consuming_and_publishing_resume_after_the_connection_is_lost() {
    let Some((url, prefix, _cleanup)) = broker() else {
        return;
    };
    let proxy = Proxy::start(&url).await;
    let bus = connected_bus(&proxy.url, &prefix).await;
    let handler = Recorder::new(|_, _| Ok(()));
    let consumer = Consumer::start(&bus, &handler);

    let before = envelope(r#"{"uuid":"u-7"}"#);
    bus.publish(&before).await.unwrap();
    eventually("delivered before the outage", async || {
        handler.succeeded(before.id).then_some(())
    })
    .await;

    proxy.cut();
    eventually("the bus notices the outage", async || {
        bus.ping().await.is_err().then_some(())
    })
    .await;
    let during = envelope(r#"{"uuid":"u-8"}"#);
    assert!(matches!(
        bus.publish(&during).await,
        Err(BusError::Unavailable(_))
    ));

    proxy.restore();
    eventually("the bus reconnects", async || bus.ping().await.ok()).await;
    bus.publish(&during).await.expect("publishing works again");
    eventually("the consumer resumed", async || {
        handler.succeeded(during.id).then_some(())
    })
    .await;
    consumer.stop().await;
    remove(bus).await;
    proxy.stop();
}

#[tokio::test]
async fn without_a_broker_the_bus_starts_reports_down_and_fails_fast() {
    init_tracing();
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");

    let started = Instant::now();
    let bus = RabbitBus::connect(&url, "absent.", vec![BINDING], policy())
        .await
        .expect("connect returns while the broker is down");
    assert!(bus.ping().await.is_err());
    let result = bus.publish(&envelope("{}")).await;
    assert!(
        matches!(result, Err(BusError::Unavailable(_))),
        "{result:?}"
    );
    assert!(matches!(
        bus.dead_letters(10, None).await,
        Err(BusError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1), "fails fast");

    // Consumers wait for a connection and still stop on shutdown.
    let bus = Arc::new(bus);
    let consumer = Consumer::start(&bus, &Recorder::new(|_, _| Ok(())));
    consumer.stop().await;
    tokio::time::timeout(Duration::from_secs(5), bus.close())
        .await
        .expect("closes promptly while reconnecting");
}

/// A TCP proxy in front of the broker that the test can cut and restore, to simulate
/// a broker outage without touching the shared broker.
struct Proxy {
    url: String,
    up: Arc<AtomicBool>,
    /// Cancelling it severs every proxied connection.
    sessions: Arc<Mutex<CancellationToken>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(broker_url: &str) -> Self {
        let uri: lapin::uri::AMQPUri = broker_url.parse().expect("AMQP URL");
        let upstream = format!("{}:{}", uri.authority.host, uri.authority.port);
        assert!(
            broker_url.contains(&upstream),
            "{AMQP} must spell out host:port for the proxy test"
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let url = broker_url.replacen(&upstream, &local.to_string(), 1);
        let up = Arc::new(AtomicBool::new(true));
        let sessions = Arc::new(Mutex::new(CancellationToken::new()));
        let (accept_up, accept_sessions) = (up.clone(), sessions.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accept_up.load(Ordering::SeqCst) {
                    continue; // dropped: the broker is "down"
                }
                let cut = accept_sessions.lock().unwrap().clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        });
        Self {
            url,
            up,
            sessions,
            task,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut sessions = self.sessions.lock().unwrap();
        sessions.cancel();
        *sessions = CancellationToken::new();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    fn stop(self) {
        self.sessions.lock().unwrap().cancel();
        self.task.abort();
    }
}
