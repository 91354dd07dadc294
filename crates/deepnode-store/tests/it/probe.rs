//! `EventStore::stream_exists`: questions asked together are answered each for its own stream, and
//! a prober whose connection died answers from a new one.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use deepnode_store::{ExpectedVersion, StreamId};
use deepnode_testkit::{event, TestDb};
use futures::future::join_all;
use serde_json::json;

fn stream(s: &str) -> StreamId {
    StreamId::parse(s).unwrap()
}

#[tokio::test]
async fn questions_asked_together_are_answered_each_for_its_own_stream() {
    let db = TestDb::new().await;
    let store = db.store().await;
    for s in ["exec-a", "exec-b"] {
        let e = event("ExecutionRequested", json!({"n": 1}));
        store
            .append(&stream(s), ExpectedVersion::NoStream, vec![e])
            .await
            .unwrap();
    }
    let asked: Vec<String> = (0..60)
        .map(|i| ["exec-a", "exec-b", "exec-c"][i % 3].to_owned() + &"-x".repeat(i / 30))
        .collect();
    let answers = join_all(asked.iter().map(|s| {
        let store = store.clone();
        async move { store.stream_exists(&stream(s)).await.unwrap() }
    }))
    .await;
    for (s, answer) in asked.iter().zip(answers) {
        assert_eq!(answer, s == "exec-a" || s == "exec-b", "{s}");
    }
}

#[tokio::test]
async fn a_prober_whose_connection_was_killed_answers_from_a_new_one() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let s = stream("exec-r1");
    assert!(!store.stream_exists(&s).await.unwrap());
    let e = event("ExecutionRequested", json!({"n": 1}));
    store
        .append(&s, ExpectedVersion::NoStream, vec![e])
        .await
        .unwrap();
    assert!(db.kill_connections().await > 0);
    assert!(store.stream_exists(&s).await.unwrap());
}
