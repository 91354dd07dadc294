//! Lingering readers against a real PostgreSQL: a subscription that lingers reads the commits of its
//! interval in one read, and a follower's `wait_for` never waits for the linger (read-your-writes).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use deepnode_store::{Follower, Urgency};
use deepnode_testkit::TestDb;

use crate::commit_one_by_one;

/// The reader's next batch of positions.
async fn next(batches: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<i64>>) -> Vec<i64> {
    tokio::time::timeout(Duration::from_secs(20), batches.recv())
        .await
        .expect("a batch within 20 s")
        .unwrap()
}

#[tokio::test]
async fn a_lingering_subscription_reads_the_commits_of_its_interval_at_once() {
    // given a subscription that lingers 1 s after a commit notifies it (and would poll only once
    // an hour), handing each batch it reads to the test
    let db = TestDb::new().await;
    let store = db.store().await;
    let mut sub = store
        .subscribe_all(0, Duration::from_secs(3_600))
        .linger(Duration::from_secs(1), Urgency::default());
    let (tx, mut batches) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(batch) = sub.next_batch().await {
            let positions: Vec<i64> = batch.iter().map(|e| e.global_position).collect();
            if tx.send(positions).is_err() {
                return;
            }
        }
    });
    // and it is listening at the head: it has read two commits, each after the one before
    commit_one_by_one(&store, 1).await;
    assert_eq!(next(&mut batches).await, vec![1]);
    commit_one_by_one(&store, 1).await;
    assert_eq!(next(&mut batches).await, vec![2]);

    // when five commits follow one another
    commit_one_by_one(&store, 5).await;

    // then its next batch holds all five: one read after the linger, not one per commit
    assert_eq!(next(&mut batches).await, vec![3, 4, 5, 6, 7]);
}

#[tokio::test]
async fn a_followers_wait_for_cuts_its_linger_short() {
    // given a follower that would fold a commit an hour after it
    let db = TestDb::new().await;
    let store = db.store().await;
    let follower = Follower::start_lingering(
        &store,
        Vec::new(),
        Duration::from_secs(3_600),
        |seen: &mut Vec<i64>, e| -> Result<(), String> {
            seen.push(e.global_position);
            Ok(())
        },
    );
    // and it is listening at the head: it has folded two commits, each after the one before
    for _ in 0..2 {
        let position = commit_one_by_one(&store, 1).await;
        follower
            .wait_for(position, Duration::from_secs(10))
            .await
            .unwrap();
    }

    // when one more event commits and someone needs it (read-your-writes)
    let position = commit_one_by_one(&store, 1).await;
    follower
        .wait_for(position, Duration::from_secs(10))
        .await
        .expect("wait_for does not wait for the linger");

    // then it has been folded
    assert_eq!(*follower.read(), vec![1, 2, 3]);
}

#[tokio::test]
async fn a_linger_cut_off_by_a_dropped_call_still_reads_the_commit_it_was_waiting_for() {
    // given a subscription listening at the head, lingering 1 s (and polling once an hour)
    let db = TestDb::new().await;
    let store = db.store().await;
    let mut sub = store
        .subscribe_all(0, Duration::from_secs(3_600))
        .linger(Duration::from_secs(1), Urgency::default());
    for expected in 1..=2 {
        commit_one_by_one(&store, 1).await;
        let batch = tokio::time::timeout(Duration::from_secs(20), sub.next_batch())
            .await
            .expect("a batch within 20 s")
            .unwrap();
        assert_eq!(batch.last().unwrap().global_position, expected);
    }

    // when a commit notifies it and the caller drops its call in the middle of the linger
    commit_one_by_one(&store, 1).await;
    let dropped = tokio::time::timeout(Duration::from_millis(300), sub.next_batch()).await;
    assert!(
        dropped.is_err(),
        "the linger holds the read back: {dropped:?}"
    );

    // then the next call reads the commit after the linger, without waiting for another commit
    let batch = tokio::time::timeout(Duration::from_secs(10), sub.next_batch())
        .await
        .expect("the notified commit is read without another one")
        .unwrap();
    assert_eq!(batch.last().unwrap().global_position, 3);
}
