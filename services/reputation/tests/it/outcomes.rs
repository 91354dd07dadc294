//! The outcome assessment follows the log from its stored position (checkpoint
//! `reputation-outcomes`) under a lease: it assesses each outcome once, passes over events that are
//! no outcome, and a copy that takes over resumes where the last holder stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use chrono::Utc;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::events::{DomainEvent, ExecutionRequested, Metadata, ModelDeployed};
use deepnode_domain::ids::{ModelId, RequestId};
use deepnode_domain::log::ExpectedVersion;
use deepnode_reputation::{Stats, OUTCOMES_CHECKPOINT};
use deepnode_store::EventStore;
use deepnode_testkit::{eventually, TestDb};
use uuid::Uuid;

/// Waits until the assessment's stored position has reached the log's head as it is now.
async fn assessed_to_the_head(store: &EventStore) {
    let head = store.head_position().await.unwrap();
    eventually(
        "the assessment stored the head",
        Duration::from_secs(20),
        || async { store.checkpoint(OUTCOMES_CHECKPOINT).await.unwrap() >= head },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_that_are_no_outcome_are_passed_over() {
    let db = TestDb::new().await;
    let subjects = deepnode_bus::Subjects::random();
    let options = common::options();
    let stats = options.stats.clone();
    let a = common::start(&db, &subjects, &PolicyConfig::default(), options).await;
    common::register(&a.ctx, "n1").await;

    // given events that name no node (a model and an execution's request) logged before an outcome
    let model = DomainEvent::ModelDeployed(ModelDeployed {
        model_id: ModelId::parse("m1").unwrap(),
        domain: "text".into(),
        replicas: 2,
    });
    let requested = DomainEvent::ExecutionRequested(ExecutionRequested {
        request_id: RequestId::parse("r1").unwrap(),
        model_id: ModelId::parse("m1").unwrap(),
        timeout_ms: 1_000,
    });
    for event in [model, requested] {
        let new = event.to_new_event(Uuid::new_v4(), Metadata::new("test", "c1"), Utc::now());
        a.ctx
            .store
            .append(&event.stream_id(), ExpectedVersion::Any, vec![new])
            .await
            .unwrap();
    }
    common::log_failed_attempt(&a.ctx.store, "n1", "r1").await;

    // then the outcome alone was assessed
    assessed_to_the_head(&a.ctx.store).await;
    assert_eq!(Stats::get(&stats.outcomes_assessed), 1);

    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_that_takes_over_resumes_where_the_last_holder_stopped() {
    let db = TestDb::new().await;
    let subjects = deepnode_bus::Subjects::random();
    let policy = PolicyConfig::default();
    let (oa, ob) = (common::options(), common::options());
    let (sa, sb) = (oa.stats.clone(), ob.stats.clone());

    // given one copy that assessed three outcomes and stopped
    let a = common::start(&db, &subjects, &policy, oa).await;
    common::register(&a.ctx, "n1").await;
    for i in 0..3 {
        common::log_failed_attempt(&a.ctx.store, "n1", &format!("r{i}")).await;
    }
    assessed_to_the_head(&a.ctx.store).await;
    assert_eq!(Stats::get(&sa.outcomes_assessed), 3);
    a.stop().await;

    // when two more are logged and another copy starts
    let store = db.store().await;
    for i in 3..5 {
        common::log_failed_attempt(&store, "n1", &format!("r{i}")).await;
    }
    let b = common::start(&db, &subjects, &policy, ob).await;

    // then it assesses the two it had not, and not the three before them again
    assessed_to_the_head(&b.ctx.store).await;
    assert_eq!(Stats::get(&sb.outcomes_assessed), 2);

    b.stop().await;
}
