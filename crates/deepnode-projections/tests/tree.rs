//! The log's Merkle tree in PostgreSQL (issue 14): the `merkle` projection stores exactly the
//! subtrees of the log's tree, proofs put together from them verify against the root computed from
//! the events themselves, checkpoints are taken when due and signed, and the table of checkpoints is
//! append-only.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use chrono::{Duration, Utc};
use deepnode_domain::merkle::{self, Frontier};
use deepnode_domain::note::{Checkpoint, NoteSigner, SignedNote};
use deepnode_projections::tree::{self, Cadence, TreeProjection, TREE_PROJECTION};
use deepnode_store::{EventStore, ExpectedVersion, ProjectionRunner, StreamId};
use deepnode_testkit::{event, TestDb};
use serde_json::json;

/// Appends `n` events, in appends of up to 7, to a few streams.
async fn append(store: &EventStore, n: usize) {
    let mut done = 0;
    while done < n {
        let batch = (n - done).min(7);
        let stream = StreamId::parse(&format!("s-{}", done % 5)).unwrap();
        let events = (0..batch)
            .map(|i| event("Thing", json!({"n": done + i})))
            .collect();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
        done += batch;
    }
}

/// The tree computed from the events themselves, read back from the log.
async fn from_the_log(store: &EventStore) -> (Frontier, Vec<merkle::Hash>) {
    let (mut frontier, mut leaves) = (Frontier::new(), Vec::new());
    let mut after = 0;
    loop {
        let page = store.read_all(after, 500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.global_position;
        for e in &page {
            let leaf = tree::leaf_of(e);
            leaves.push(leaf);
            frontier.push(leaf);
        }
    }
    (frontier, leaves)
}

#[tokio::test]
async fn the_stored_tree_is_the_logs_and_its_proofs_verify() {
    let db = TestDb::new().await;
    let store = db.store().await;
    append(&store, 300).await;
    let mut runner =
        ProjectionRunner::new(store.pool().clone(), TreeProjection::new()).with_batch(64);
    assert_eq!(runner.run_to_head().await.unwrap(), 300);
    append(&store, 77).await;
    assert_eq!(runner.run_to_head().await.unwrap(), 377);

    let (frontier, leaves) = from_the_log(&store).await;
    assert_eq!(frontier.size(), 377);
    let pool = store.pool();
    assert_eq!(tree::tree_size(pool).await.unwrap(), 377);
    for size in [1, 2, 64, 255, 256, 300, 377] {
        let mut prefix = Frontier::new();
        for leaf in &leaves[..size as usize] {
            prefix.push(*leaf);
        }
        assert_eq!(
            tree::root_at(pool, size).await.unwrap(),
            Some(prefix.root()),
            "root at {size}"
        );
    }
    let root = frontier.root();
    for index in [0u64, 1, 100, 255, 256, 376] {
        let ranges = merkle::inclusion_ranges(index, 377).unwrap();
        let proof = tree::range_hashes(pool, &ranges).await.unwrap().unwrap();
        merkle::verify_inclusion(index, 377, &leaves[index as usize], &proof, &root).unwrap();
    }
    let old = tree::root_at(pool, 300).await.unwrap().unwrap();
    let ranges = merkle::consistency_ranges(300, 377).unwrap();
    let proof = tree::range_hashes(pool, &ranges).await.unwrap().unwrap();
    merkle::verify_consistency(300, 377, &old, &root, &proof).unwrap();
    // a tree not built that far has no root to give
    assert_eq!(tree::root_at(pool, 378).await.unwrap(), None);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM merkle_subtrees")
        .fetch_one(pool)
        .await
        .unwrap();
    // only subtrees of 16 leaves and up are rows: an eighth of every level's
    assert!(stored <= 377 / 8, "{stored} subtrees for 377 leaves");
}

#[tokio::test]
async fn checkpoints_are_taken_when_due_signed_and_never_rewritten() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let pool = store.pool();
    let key = NoteSigner::from_seed("deepnode.test/log", [5; 32]).unwrap();
    let cadence = Cadence {
        every_events: 100,
        every: Duration::seconds(10),
    };
    let mut runner = ProjectionRunner::new(pool.clone(), TreeProjection::new());
    let now = Utc::now();

    // an empty log: nothing to take
    assert_eq!(
        tree::take_checkpoint(pool, "deepnode.test/log", Some(&key), cadence, now)
            .await
            .unwrap(),
        None
    );
    append(&store, 40).await;
    runner.run_to_head().await.unwrap();
    let first = tree::take_checkpoint(pool, "deepnode.test/log", Some(&key), cadence, now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.tree_size, 40);
    let note = SignedNote::parse(&first.note).unwrap();
    note.verify(&key.verifier()).unwrap();
    let cp = Checkpoint::parse(&note.text).unwrap();
    assert_eq!(
        (cp.size, cp.root),
        (40, from_the_log(&store).await.0.root())
    );

    // 30 more events, 1 s later: not due (fewer than 100, less than 10 s)
    append(&store, 30).await;
    runner.run_to_head().await.unwrap();
    let later = now + Duration::seconds(1);
    assert_eq!(
        tree::take_checkpoint(pool, "deepnode.test/log", Some(&key), cadence, later)
            .await
            .unwrap(),
        None
    );
    // 10 s after the first: due
    let due = now + Duration::seconds(10);
    let second = tree::take_checkpoint(pool, "deepnode.test/log", Some(&key), cadence, due)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.tree_size, 70);
    // nothing new: never due, however late
    let idle = now + Duration::seconds(3_600);
    assert_eq!(
        tree::take_checkpoint(pool, "deepnode.test/log", Some(&key), cadence, idle)
            .await
            .unwrap(),
        None
    );
    // 100 more events: due at once
    append(&store, 100).await;
    runner.run_to_head().await.unwrap();
    let third = tree::take_checkpoint(pool, "deepnode.test/log", None, cadence, due)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((third.tree_size, third.signed), (170, false));
    assert!(
        Checkpoint::parse(&third.note).is_ok(),
        "unsigned: the text alone"
    );

    let sizes: Vec<u64> = tree::checkpoints(pool)
        .await
        .unwrap()
        .iter()
        .map(|c| c.tree_size)
        .collect();
    assert_eq!(sizes, [40, 70, 170]);
    for statement in [
        "UPDATE log_checkpoints SET tree_size = 1",
        "DELETE FROM log_checkpoints",
        "TRUNCATE log_checkpoints",
    ] {
        let refused = sqlx::query(statement).execute(pool).await;
        assert!(refused.is_err(), "{statement} was allowed");
    }
    assert_eq!(
        deepnode_store::checkpoint(pool, TREE_PROJECTION)
            .await
            .unwrap(),
        170
    );
}
