//! The SQL projection across copies: one copy writes it, holding the projection lease; another
//! takes over when that copy stops.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_projections::BOOK_PROJECTION;
use deepnode_reputation::{ReputationOptions, PROJECTION_LOCK_KEY};
use deepnode_store::EventStore;
use deepnode_testkit::{eventually, TestDb};

use crate::common;

/// The backend sessions holding the projection lease.
async fn lease_holders(store: &EventStore) -> Vec<i32> {
    // A bigint advisory key is stored as classid = its high 32 bits, objid = its low 32 bits.
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
            AND classid = ($1 >> 32)::oid AND objid = ($1 & 4294967295)::oid
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(PROJECTION_LOCK_KEY)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// Waits until the projection's checkpoint is at the log's head.
async fn projected_to_head(store: &EventStore, what: &str) {
    eventually(what, Duration::from_secs(20), || async {
        let head = store.head_position().await.unwrap();
        head > 0 && store.checkpoint(BOOK_PROJECTION).await.unwrap() == head
    })
    .await;
}

async fn reputation_rows(store: &EventStore) -> Vec<String> {
    sqlx::query_scalar("SELECT node_id FROM node_reputation ORDER BY node_id")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn one_copy_writes_the_projection_and_another_takes_over_when_it_stops() {
    // given one copy that has projected the log, and a second copy started after it
    let db = TestDb::new().await;
    let subjects = Subjects::random();
    let policy = PolicyConfig::default();
    let options = || ReputationOptions {
        lease_retry: Duration::from_millis(50),
        ..common::options()
    };
    let a = common::start(&db, &subjects, &policy, options()).await;
    common::register(&a.ctx, "first").await;
    let store = db.store().await;
    projected_to_head(&store, "the first copy projects the log").await;
    let b = common::start(&db, &subjects, &policy, options()).await;
    common::register(&b.ctx, "second").await;
    projected_to_head(&store, "the holder projects the second copy's command").await;
    // then one session holds the lease (the first copy's: the second stands by)
    let holders = lease_holders(&store).await;
    assert_eq!(holders.len(), 1, "projection lease holders: {holders:?}");

    // when the first copy stops and more is logged
    a.stop().await;
    common::register(&b.ctx, "third").await;

    // then the second copy takes the lease and projects it
    projected_to_head(&store, "the second copy takes over the projection").await;
    let now = lease_holders(&store).await;
    assert_eq!(now.len(), 1, "projection lease holders: {now:?}");
    assert_ne!(now, holders, "the lease moved to the second copy");
    assert_eq!(reputation_rows(&store).await, ["first", "second", "third"]);
    b.stop().await;
}
