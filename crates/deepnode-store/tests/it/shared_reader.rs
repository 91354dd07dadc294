//! One reader of the log per process ([`EventStore::with_shared_reader`]) against a real PostgreSQL:
//! every subscription and follower of the store gets every event once, in order, from one listening
//! connection; a `wait_for` makes the shared reader read at once; a reader left behind its window
//! catches up from the database.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use deepnode_store::{EventStore, Follower, Urgency};
use deepnode_testkit::{eventually, TestDb};

use crate::{commit_one_by_one, next_positions};

const HOUR: Duration = Duration::from_secs(3_600);

/// Sessions of `db` whose last statement was a LISTEN (a listening connection runs nothing else).
async fn listening_sessions(db: &TestDb, admin: &EventStore) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'LISTEN%'",
    )
    .bind(db.name())
    .fetch_one(admin.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn every_reader_of_the_process_follows_one_shared_reader() {
    // given a log of 5 events and a process's store with a shared reader (lingering 20 ms, polling
    // once an hour), followed by a follower, a subscription and the relay's kind of subscription
    let db = TestDb::new().await;
    let writer = db.store().await;
    commit_one_by_one(&writer, 5).await;
    let store = db
        .store()
        .await
        .with_shared_reader(Duration::from_millis(20), HOUR, 64)
        .await
        .unwrap();
    let follower = Follower::start_lingering(
        &store,
        Vec::new(),
        HOUR,
        |seen: &mut Vec<i64>, e| -> Result<(), String> {
            seen.push(e.global_position);
            Ok(())
        },
    );
    let mut sub = store.subscribe_all(0, HOUR);
    let mut relay = store.subscribe_database(0, HOUR);
    assert_eq!(
        next_positions(&mut sub, 5).await,
        (1..=5).collect::<Vec<_>>()
    );
    assert_eq!(
        next_positions(&mut relay, 5).await,
        (1..=5).collect::<Vec<_>>()
    );

    // when 10 more commit, one by one
    let last = commit_one_by_one(&writer, 10).await;

    // then each reader gets 6..=15 once, in order — though none of them listens or polls: the
    // follower's linger is an hour and it never asked (no wait_for), so the shared reader's reads
    // are what reached it
    assert_eq!(
        next_positions(&mut sub, 10).await,
        (6..=15).collect::<Vec<_>>()
    );
    assert_eq!(
        next_positions(&mut relay, 10).await,
        (6..=15).collect::<Vec<_>>()
    );
    eventually(
        "the follower folded the head",
        Duration::from_secs(10),
        || {
            let at = follower.position();
            async move { at == last }
        },
    )
    .await;
    assert_eq!(*follower.read(), (1..=15).collect::<Vec<_>>());
    // and the database saw one listening connection for the three of them
    assert_eq!(listening_sessions(&db, &writer).await, 1);
}

#[tokio::test]
async fn a_wait_for_makes_the_shared_reader_read_now() {
    // given a shared reader that would read a commit an hour after it notifies
    let db = TestDb::new().await;
    let store = db
        .store()
        .await
        .with_shared_reader(HOUR, HOUR, 64)
        .await
        .unwrap();
    let follower =
        Follower::start_lingering(&store, 0, HOUR, |n: &mut i64, _| -> Result<(), String> {
            *n += 1;
            Ok(())
        });

    // when an event commits and someone needs it (read-your-writes)
    let position = commit_one_by_one(&store, 1).await;

    // then the follower has it well before the hour: its urgency reached the shared reader
    follower
        .wait_for(position, Duration::from_secs(10))
        .await
        .expect("wait_for does not wait for the shared reader's linger");
    assert_eq!(*follower.read(), 1);
}

#[tokio::test]
async fn a_reader_behind_the_window_catches_up_from_the_database() {
    // given a shared reader whose tail holds 4 events, and a subscription at the head
    let db = TestDb::new().await;
    let store = db
        .store()
        .await
        .with_shared_reader(Duration::ZERO, HOUR, 4)
        .await
        .unwrap();
    let mut sub = store
        .subscribe_all(0, HOUR)
        .linger(HOUR, Urgency::default());
    commit_one_by_one(&store, 1).await;
    assert_eq!(next_positions(&mut sub, 1).await, vec![1]);

    // when 20 commit while it reads nothing, and the shared reader has read them all
    let last = commit_one_by_one(&store, 20).await;
    let tail = store.tail().unwrap().clone();
    eventually(
        "the shared reader read the head",
        Duration::from_secs(10),
        || {
            let at = tail.last();
            async move { at == last }
        },
    )
    .await;

    // then it still gets 2..=21 once each, in order (read from the database: the tail no longer
    // holds 2)
    assert_eq!(
        next_positions(&mut sub, 20).await,
        (2..=21).collect::<Vec<_>>()
    );
}
