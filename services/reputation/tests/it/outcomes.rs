//! The outcome consumer reads only what it needs of each message on the events stream; what it
//! cannot read (not a stored event, or a version this build does not know) is terminated — neither
//! assessed nor redelivered — and the outcomes after it are assessed as usual. An event that is no
//! outcome (a server before 2.10 cannot filter the consumer to the outcomes, so it delivers every
//! event) is acknowledged on its type alone, not terminated.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use deepnode_bus::jetstream::publish_with_id;
use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::events::{DomainEvent, ExecutionRequested, Metadata, ModelDeployed};
use deepnode_domain::ids::{ModelId, RequestId};
use deepnode_domain::log::ExpectedVersion;
use deepnode_reputation::Stats;
use deepnode_testkit::{eventually, TestDb};
use serde_json::json;
use uuid::Uuid;

/// Whether the outcome consumer has nothing left to deliver and nothing waiting for an ack.
async fn settled(js: &async_nats::jetstream::Context, subjects: &Subjects) -> bool {
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("reputation-outcomes", &subjects.events_stream())
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    info.num_pending == 0 && info.num_ack_pending == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_outcome_messages_are_terminated_and_the_next_is_assessed() {
    let db = TestDb::new().await;
    let subjects = Subjects::random();
    let options = common::options();
    let stats = options.stats.clone();
    let a = common::start(&db, &subjects, &PolicyConfig::default(), options).await;
    common::register(&a.ctx, "n1").await;
    let (js, subject) = (&a.ctx.js, subjects.events("AttemptFailed"));

    // given, on an outcome subject, a message that is no stored event and one from a newer build
    publish_with_id(js, &subject, "garbage", Bytes::from_static(b"{nope"))
        .await
        .unwrap();
    let from_the_future = json!({
        "global_position": 1, "event_id": Uuid::new_v4(), "stream_id": "exec-r0",
        "stream_version": 1, "event_type": "AttemptFailed", "schema_version": 99,
        "payload": {"request_id": "r0", "node_id": "n1", "something_new": true},
        "metadata": {"producer": "a-newer-scheduler"},
        "occurred_at": "2026-11-30T12:00:00Z", "recorded_at": "2026-11-30T12:00:00Z",
        "prev_hash": "00", "hash": "00"
    });
    publish_with_id(
        js,
        &subject,
        "future",
        Bytes::from(from_the_future.to_string()),
    )
    .await
    .unwrap();

    // when a failed attempt is logged and relayed after them
    let (relay, relay_stop) = common::start_relay(&a.ctx);
    common::log_failed_attempt(&a.ctx.store, "n1", "r1").await;

    // then, once the relay has published the whole log after the two ...
    let logged = u64::try_from(a.ctx.store.head_position().await.unwrap()).unwrap();
    eventually("the log relayed", Duration::from_secs(20), || async {
        let mut stream = js.get_stream(subjects.events_stream()).await.unwrap();
        stream.info().await.unwrap().state.messages >= 2 + logged
    })
    .await;
    // ... and every message is settled (acknowledged or terminated, none waiting for redelivery) ...
    eventually(
        "every outcome message settled",
        Duration::from_secs(20),
        || settled(js, &subjects),
    )
    .await;
    // ... the logged outcome alone was assessed: the two before it were terminated
    assert_eq!(Stats::get(&stats.outcomes_assessed), 1);
    assert_eq!(Stats::get(&stats.outcomes_terminated), 2);

    relay_stop.cancel();
    relay.await.unwrap();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_that_are_no_outcome_are_acknowledged_not_terminated() {
    let db = TestDb::new().await;
    let subjects = Subjects::random();
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

    // when the relay publishes the log
    let (relay, relay_stop) = common::start_relay(&a.ctx);
    let js = &a.ctx.js;
    eventually(
        "every outcome message settled",
        Duration::from_secs(20),
        || async {
            let relayed = js
                .get_stream(subjects.events_stream())
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .state
                .last_sequence;
            let logged = u64::try_from(a.ctx.store.head_position().await.unwrap()).unwrap();
            relayed == logged && settled(js, &subjects).await
        },
    )
    .await;

    // then the outcome was assessed and nothing was terminated
    assert_eq!(Stats::get(&stats.outcomes_assessed), 1);
    assert_eq!(Stats::get(&stats.outcomes_terminated), 0);

    relay_stop.cancel();
    relay.await.unwrap();
    a.stop().await;
}
