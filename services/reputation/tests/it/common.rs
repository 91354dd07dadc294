//! Test harness: runs the reputation service (and, where needed, the relay) in-process against a
//! per-test database and a random subject prefix, and offers small helpers to wait on the log.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_reputation::ReputationOptions;
use deepnode_runtime::relay::{self, RelayOptions};
use deepnode_runtime::{ServiceContext, Shutdown};
use deepnode_store::{EventStore, RecordedEvent};
use deepnode_testkit::{nats_url, TestDb};
use serde_json::Value;
use tokio::task::JoinHandle;

/// One running copy of the service.
pub struct Running {
    pub ctx: ServiceContext,
    pub shutdown: Shutdown,
    pub task: JoinHandle<Result<(), deepnode_reputation::Error>>,
}

impl Running {
    /// Stops the copy and asserts it stopped cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("service stops in time")
            .unwrap()
            .unwrap();
    }
}

/// Connections for one test.
pub async fn context(db: &TestDb, subjects: &Subjects, policy: &PolicyConfig) -> ServiceContext {
    let store = db.store().await;
    let nats = async_nats::connect(nats_url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    deepnode_bus::jetstream::ensure_streams(&js, subjects)
        .await
        .unwrap();
    ServiceContext {
        store,
        nats,
        js,
        subjects: subjects.clone(),
        policy: Arc::new(policy.clone()),
        producer: "reputation-test".to_owned(),
    }
}

/// Fast options for tests (offline detection effectively off unless a test shortens it).
pub fn options() -> ReputationOptions {
    ReputationOptions {
        offline_after: Duration::from_secs(600),
        tick: Duration::from_millis(100),
        nak_delay: Duration::from_millis(200),
        ..ReputationOptions::default()
    }
}

/// Starts one copy of the service.
pub async fn start(
    db: &TestDb,
    subjects: &Subjects,
    policy: &PolicyConfig,
    options: ReputationOptions,
) -> Running {
    let ctx = context(db, subjects, policy).await;
    let shutdown = Shutdown::new();
    let task = tokio::spawn(deepnode_reputation::run(
        ctx.clone(),
        options,
        shutdown.clone(),
    ));
    // The command subjects are served once a request finds a responder.
    let (client, subject) = (&ctx.nats, subjects.cmd_node_deregister());
    let what = "the reputation service answering its command subjects";
    deepnode_testkit::eventually(what, Duration::from_secs(10), || async {
        let empty = bytes::Bytes::from_static(b"{}");
        deepnode_bus::request_bytes(client, &subject, empty, Duration::from_millis(500))
            .await
            .is_ok()
    })
    .await;
    Running {
        ctx,
        shutdown,
        task,
    }
}

/// Starts the log → bus relay; stop it with the returned signal.
pub fn start_relay(ctx: &ServiceContext) -> (JoinHandle<()>, Shutdown) {
    let shutdown = Shutdown::new();
    let options = RelayOptions {
        lease_retry: Duration::from_millis(100),
        poll: Duration::from_millis(50),
        ..RelayOptions::default()
    };
    let task = tokio::spawn(relay::run(
        ctx.store.clone(),
        ctx.js.clone(),
        ctx.subjects.clone(),
        options,
        shutdown.clone(),
    ));
    (
        tokio::spawn(async move {
            task.await.unwrap().unwrap();
        }),
        shutdown,
    )
}

/// Sends a JSON command and returns the reply envelope as JSON.
pub async fn command(ctx: &ServiceContext, subject: &str, body: Value) -> Value {
    deepnode_bus::request_json(&ctx.nats, subject, &body, Duration::from_secs(10))
        .await
        .unwrap()
}

/// Every event in the log.
pub async fn log(store: &EventStore) -> Vec<RecordedEvent> {
    store.read_all(0, 100_000).await.unwrap()
}

/// Events of one type in the log.
pub async fn of_type(store: &EventStore, event_type: &str) -> Vec<RecordedEvent> {
    log(store)
        .await
        .into_iter()
        .filter(|e| e.event_type == event_type)
        .collect()
}

/// Registers a node and asserts it worked.
pub async fn register(ctx: &ServiceContext, node: &str) {
    let reply = command(
        ctx,
        &ctx.subjects.cmd_node_register(),
        serde_json::json!({"node_id": node, "domain": "text", "stake": 100.0, "capacity": 4}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
}
