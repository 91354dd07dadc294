//! The outbox relay against real PostgreSQL and NATS JetStream: every committed event reaches
//! `DEEPNODE_EVENTS` exactly once, in global order, with `Nats-Msg-Id = event_id`, while two relays
//! compete for the lease and the active one is killed mid-way.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use async_nats::jetstream;
use deepnode_bus::jetstream::{ensure_streams, Retention};
use deepnode_bus::subjects::Subjects;
use deepnode_runtime::relay::{self, RelayOptions};
use deepnode_runtime::{wire, Shutdown};
use deepnode_store::{EventStore, ExpectedVersion, StreamId};
use deepnode_testkit::{event, nats_url, TestDb};
use serde_json::json;

async fn append(store: &EventStore, from: usize, to: usize) {
    for i in from..to {
        let s = StreamId::parse(&format!("node-n{}", i % 4)).unwrap();
        store
            .append(
                &s,
                ExpectedVersion::Any,
                vec![event("Tick", json!({"i": i}))],
            )
            .await
            .unwrap();
    }
}

async fn wait_for_messages(js: &jetstream::Context, stream: &str, n: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let count = js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages;
        if count >= n || tokio::time::Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_relay(
    store: &EventStore,
    js: &jetstream::Context,
    subjects: &Subjects,
) -> (tokio::task::JoinHandle<()>, Shutdown) {
    let shutdown = Shutdown::new();
    let options = RelayOptions {
        lease_retry: Duration::from_millis(100),
        poll: Duration::from_millis(100),
        ..RelayOptions::default()
    };
    let task = tokio::spawn(relay::run(
        store.clone(),
        js.clone(),
        subjects.clone(),
        options,
        shutdown.clone(),
    ));
    (task, shutdown)
}

/// The backend holding the relay lease in this database, if any.
async fn lease_holder(pool: &sqlx::PgPool) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks
          WHERE locktype = 'advisory' AND granted AND objsubid = 1
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(relay::RELAY_LOCK_KEY)
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_is_published_once_in_order_across_a_lease_takeover() {
    let db = TestDb::new().await;
    let subjects = Subjects::random();
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = jetstream::new(client);
    let store = db.store().await;
    ensure_streams(&js, &subjects, &Retention::default())
        .await
        .unwrap();
    append(&store, 0, 50).await;

    // One relay takes the lease and publishes; a second copy waits as a standby.
    let (a, _) = start_relay(&db.store().await, &js, &subjects);
    let stream = subjects.events_stream();
    assert_eq!(wait_for_messages(&js, &stream, 50).await, 50);
    let first = lease_holder(store.pool())
        .await
        .expect("the relay holds the lease");
    let (b, b_stop) = start_relay(&db.store().await, &js, &subjects);

    // Kill the holder abruptly (its lease connection dies with it), keep appending: the standby
    // takes the lease over and publishes the rest.
    a.abort();
    assert!(a.await.unwrap_err().is_cancelled());
    append(&store, 50, 80).await;
    assert_eq!(wait_for_messages(&js, &stream, 80).await, 80);
    let second = lease_holder(store.pool())
        .await
        .expect("the lease was taken over");
    assert_ne!(first, second, "another backend holds the lease");
    b_stop.cancel();
    b.await.unwrap();

    // Restarting from the stored position republishes nothing new.
    let (c, c_stop) = start_relay(&db.store().await, &js, &subjects);
    append(&store, 80, 85).await;
    assert_eq!(wait_for_messages(&js, &stream, 85).await, 85);
    c_stop.cancel();
    c.await.unwrap();

    let s = js.get_stream(&stream).await.unwrap();
    let logged = store.read_all(0, 1_000).await.unwrap();
    assert_eq!(logged.len(), 85);
    for (seq, expected) in (1u64..).zip(&logged) {
        let message = s.get_raw_message(seq).await.unwrap();
        let published = wire::from_slice(&message.payload).unwrap();
        assert_eq!(
            &published, expected,
            "message {seq} is the event at that position, byte for byte"
        );
        assert_eq!(message.subject.as_str(), subjects.events("Tick"));
        let msg_id = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned());
        assert_eq!(msg_id, Some(expected.event_id.to_string()));
    }
    assert_eq!(
        deepnode_store::checkpoint(store.pool(), relay::RELAY_CHECKPOINT)
            .await
            .unwrap(),
        85
    );
    js.delete_stream(&stream).await.unwrap();
    let _ = js.delete_stream(subjects.ingest_stream()).await;
    let _ = js.delete_stream(subjects.checkpoints_stream()).await;
}
