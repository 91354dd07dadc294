//! Ingest over real JetStream and Postgres with two service copies sharing the durable consumer: a
//! report delivered twice (even past the stream's own `Nats-Msg-Id` dedupe) is logged once under its
//! own event id; a malformed report and a report about an unknown node are terminated and counted,
//! and the reports after them are still processed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use deepnode_bus::jetstream::publish_with_id;
use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_reputation::Stats;
use deepnode_testkit::TestDb;
use serde_json::json;
use uuid::Uuid;

fn report(event_id: Uuid, node: &str, outcome: &str) -> Bytes {
    Bytes::from(
        json!({
            "event_id": event_id, "request_id": format!("r-{event_id}"), "model_id": "m1",
            "node_id": node, "outcome": outcome, "latency_ms": 12,
            "occurred_at": "2024-05-01T12:00:00Z"
        })
        .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_append_once_and_bad_reports_are_terminated() {
    let db = TestDb::new().await;
    let subjects = Subjects::random();
    let policy = PolicyConfig::default();
    let (oa, ob) = (common::options(), common::options());
    let (sa, sb) = (oa.stats.clone(), ob.stats.clone());
    let a = common::start(&db, &subjects, &policy, oa).await;
    let b = common::start(&db, &subjects, &policy, ob).await;
    common::register(&a.ctx, "n1").await;
    let (js, subject) = (&a.ctx.js, subjects.ingest_execution());

    let e1 = Uuid::new_v4();
    let e2 = Uuid::new_v4();
    let ghost = Uuid::new_v4();
    // e1 twice: once as published, once as a publisher retry outside the stream's dedupe window
    publish_with_id(js, &subject, &e1.to_string(), report(e1, "n1", "success"))
        .await
        .unwrap();
    publish_with_id(js, &subject, "retry-of-e1", report(e1, "n1", "success"))
        .await
        .unwrap();
    publish_with_id(js, &subject, "garbage-1", Bytes::from_static(b"{nope"))
        .await
        .unwrap();
    publish_with_id(
        js,
        &subject,
        &ghost.to_string(),
        report(ghost, "ghost", "error"),
    )
    .await
    .unwrap();
    publish_with_id(js, &subject, &e2.to_string(), report(e2, "n1", "timeout"))
        .await
        .unwrap();

    let total = |f: fn(&deepnode_reputation::Stats) -> &std::sync::atomic::AtomicU64| {
        Stats::get(f(&sa)) + Stats::get(f(&sb))
    };
    let what = "all five reports handled";
    deepnode_testkit::eventually(what, Duration::from_secs(20), || async {
        total(|s| &s.ingested) + total(|s| &s.ingest_duplicates) + total(|s| &s.ingest_terminated)
            >= 5
    })
    .await;
    assert_eq!(total(|s| &s.ingested), 2);
    assert_eq!(total(|s| &s.ingest_duplicates), 1);
    assert_eq!(total(|s| &s.ingest_terminated), 2);

    // Two copies ingest concurrently, so the log's order of the two reports is either way round.
    let reported = common::of_type(&a.ctx.store, "ExecutionReported").await;
    let mut ids: Vec<Uuid> = reported.iter().map(|e| e.event_id).collect();
    ids.sort();
    let mut expected = vec![e1, e2];
    expected.sort();
    assert_eq!(ids, expected, "each report once, under its own event id");
    let by_id = |id: Uuid| reported.iter().find(|e| e.event_id == id).unwrap();
    assert_eq!(by_id(e2).payload.to_value()["outcome"], "timeout");
    assert_eq!(
        by_id(e2).payload.to_value()["reported_occurred_at"],
        "2024-05-01T12:00:00Z"
    );
    assert_eq!(by_id(e1).stream_id, format!("report-r-{e1}"));

    // everything was acknowledged one way or another: nothing pending redelivery
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("reputation-ingest", &subjects.ingest_stream())
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);

    a.stop().await;
    b.stop().await;
}
