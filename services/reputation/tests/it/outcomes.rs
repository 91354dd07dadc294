//! The outcome consumer reads only what it needs of each message on the events stream; what it
//! cannot read (not a stored event, or a version this build does not know) is terminated — neither
//! assessed nor redelivered — and the outcomes after it are assessed as usual.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use deepnode_bus::jetstream::publish_with_id;
use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_reputation::Stats;
use deepnode_testkit::{eventually, TestDb};
use serde_json::json;
use uuid::Uuid;

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
        || async {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                .get_consumer_from_stream("reputation-outcomes", &subjects.events_stream())
                .await
                .unwrap();
            let info = consumer.info().await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        },
    )
    .await;
    // ... the logged outcome alone was assessed: the two before it were terminated
    assert_eq!(Stats::get(&stats.outcomes_assessed), 1);

    relay_stop.cancel();
    relay.await.unwrap();
    a.stop().await;
}
