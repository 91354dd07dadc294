//! A subscription that follows a [`LogTail`] against a real PostgreSQL: whatever the tail is fed —
//! duplicates, a gap, nothing at all — the reader sees every committed event exactly once, in
//! order, reading the database only for what the tail does not hold.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use deepnode_store::{EventStore, ExpectedVersion, LogTail, Offered, StreamId};
use deepnode_testkit::{event, TestDb};

use crate::next_positions;
use serde_json::json;

async fn append(store: &EventStore, n: usize) {
    for i in 0..n {
        let stream = StreamId::parse(&format!("tail-{i}")).unwrap();
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![event("Tick", json!({"i": i}))],
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_tail_reader_sees_every_event_once_in_order_through_duplicates_gaps_and_silence() {
    // given a log of 10 events and a store following a tail (poll 200 ms as the safety net)
    let db = TestDb::new().await;
    let writer = db.store().await;
    append(&writer, 10).await;
    let tail = LogTail::new(64);
    let reader = db.store().await.with_tail(tail.clone());
    let mut sub = reader.subscribe_all(0, Duration::from_millis(200));

    // when it catches up (from the database: the tail holds nothing yet)
    assert_eq!(
        next_positions(&mut sub, 10).await,
        (1..=10).collect::<Vec<_>>()
    );

    // and 10 more commit, of which the tail is fed 11-13 twice, then (a lost message) 15-20
    append(&writer, 10).await;
    let committed = writer.read_all(10, 100).await.unwrap();
    for e in committed.iter().take(3) {
        assert_eq!(tail.offer(e.clone()), Offered::Appended);
        assert_eq!(tail.offer(e.clone()), Offered::Duplicate);
    }
    assert_eq!(tail.offer(committed[4].clone()), Offered::Restarted);
    tail.offer_all(committed[5..].iter().cloned());

    // then the reader still gets 11..=20 once each, in order (14 from the database)
    assert_eq!(
        next_positions(&mut sub, 10).await,
        (11..=20).collect::<Vec<_>>()
    );

    // and when the tail is fed nothing at all, a new commit still arrives (the poll reads it)
    append(&writer, 1).await;
    assert_eq!(next_positions(&mut sub, 1).await, vec![21]);
}
