//! Test harness: runs the reputation service in-process against a
//! per-test database and a random subject prefix, and offers small helpers to wait on the log.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::Duration;

use chrono::Utc;
use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::events::{AttemptFailed, DomainEvent, Failure, Metadata};
use deepnode_domain::ids::{NodeId, RequestId};
use deepnode_reputation::ReputationOptions;
use deepnode_runtime::ServiceContext;
use deepnode_store::{EventStore, ExpectedVersion, RecordedEvent};
use deepnode_testkit::{answering, nats_url, Services, TestDb};
use serde_json::Value;
use uuid::Uuid;

/// One running copy of the service.
pub struct Running {
    pub ctx: ServiceContext,
    service: Services,
}

impl Running {
    /// Stops the copy and asserts it stopped cleanly.
    pub async fn stop(mut self) {
        let stopped = self.service.stop().await;
        stopped.expect("the reputation copy stops cleanly");
    }
}

/// Connections for one test.
pub async fn context(db: &TestDb, subjects: &Subjects, policy: &PolicyConfig) -> ServiceContext {
    let store = db.store().await;
    let nats = async_nats::connect(nats_url()).await.unwrap();
    let ctx = ServiceContext::new(
        store,
        nats,
        subjects.clone(),
        policy.clone(),
        "reputation-test",
    );
    deepnode_bus::jetstream::ensure_streams(&ctx.js, subjects, &Default::default())
        .await
        .unwrap();
    ctx
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
    let mut service = Services::default();
    let running = ctx.clone();
    service.start("reputation", |stop| {
        deepnode_reputation::run(running, options, stop)
    });
    // The command subjects are served once a request finds a responder.
    answering(
        &ctx.nats,
        &subjects.cmd_node_deregister(),
        Duration::from_secs(10),
    )
    .await;
    Running { ctx, service }
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

/// Logs, as "the scheduler" would, a failed attempt of `request` on `node`; returns its event id.
pub async fn log_failed_attempt(store: &EventStore, node: &str, request: &str) -> Uuid {
    let request_id = RequestId::parse(request).unwrap();
    let event = DomainEvent::AttemptFailed(AttemptFailed {
        request_id: request_id.clone(),
        node_id: NodeId::parse(node).unwrap(),
        outcome: Failure::Error,
        latency_ms: 5,
        detail: "boom".into(),
    });
    let id = Uuid::new_v4();
    let new = event.to_new_event(
        id,
        Metadata::new("scheduler-test", request_id.as_str()),
        Utc::now(),
    );
    store
        .append(&event.stream_id(), ExpectedVersion::Any, vec![new])
        .await
        .unwrap();
    id
}
