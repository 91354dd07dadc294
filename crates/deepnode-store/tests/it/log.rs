//! The log as a whole against a real PostgreSQL: global order without skips under concurrent,
//! held-open and rolled-back writers; the hash chain and its tamper detection; concurrent migration;
//! and a subscription that survives its connections being killed.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::time::Duration;

use deepnode_store::{BreakKind, ChainBreak, EventStore, ExpectedVersion, StreamId};
use deepnode_testkit::{event, TestDb};
use rand::{Rng, SeedableRng};
use serde_json::json;
use uuid::Uuid;

fn stream(s: &str) -> StreamId {
    StreamId::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_sees_exactly_the_final_order_despite_held_open_and_rolled_back_writers() {
    let db = TestDb::new().await;
    // Three stores = three independent writers with their own pools, like three processes.
    let stores = [db.store().await, db.store().await, db.store().await];
    let follower_store = db.store().await;

    let follower = tokio::spawn(async move {
        let mut sub = follower_store.subscribe_all(0, Duration::from_millis(50));
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
                Ok(Ok(e)) => seen.push((e.global_position, e.event_id)),
                Ok(Err(e)) => panic!("subscription failed: {e}"),
                Err(_) => return seen, // quiet for 3 s: the writers are done
            }
        }
    });

    let mut writers = Vec::new();
    for (w, store) in stores.iter().enumerate() {
        for t in 0..6 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64((w * 100 + t) as u64);
                let mut committed = Vec::new();
                let mut rolled_back = Vec::new();
                for i in 0..40 {
                    let s = stream(&format!("s-{}", rng.gen_range(0..20)));
                    let events: Vec<_> = (0..rng.gen_range(1..4))
                        .map(|_| event("Tick", json!({"w": w, "t": t, "i": i})))
                        .collect();
                    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                    if i % 5 == 0 {
                        // A transaction held open for a while, then committed or rolled back.
                        let mut tx = store.pool().begin().await.unwrap();
                        EventStore::append_in(&mut tx, &s, ExpectedVersion::Any, events)
                            .await
                            .unwrap();
                        tokio::time::sleep(Duration::from_millis(rng.gen_range(1..15))).await;
                        if rng.gen_bool(0.5) {
                            tx.commit().await.unwrap();
                            committed.extend(ids);
                        } else {
                            tx.rollback().await.unwrap();
                            rolled_back.extend(ids);
                        }
                    } else {
                        store
                            .append(&s, ExpectedVersion::Any, events)
                            .await
                            .unwrap();
                        committed.extend(ids);
                    }
                }
                (committed, rolled_back)
            }));
        }
    }
    let mut committed = BTreeSet::new();
    let mut rolled_back = BTreeSet::new();
    for w in writers {
        let (c, r) = w.await.unwrap();
        committed.extend(c);
        rolled_back.extend(r);
    }
    let seen = follower.await.unwrap();

    let table: Vec<(i64, Uuid)> =
        sqlx::query_as("SELECT global_position, event_id FROM events ORDER BY global_position")
            .fetch_all(stores[0].pool())
            .await
            .unwrap();
    assert!(
        !rolled_back.is_empty() && committed.len() > 500,
        "the test exercised both paths"
    );
    assert_eq!(
        seen, table,
        "the follower saw exactly the final table order, nothing missed or repeated"
    );
    let positions: Vec<i64> = table.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        positions,
        (1..=table.len() as i64).collect::<Vec<_>>(),
        "no gaps"
    );
    let ids: BTreeSet<Uuid> = table.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, committed, "every acknowledged event, and only those");
    assert!(ids.is_disjoint(&rolled_back));
    assert_eq!(
        stores[0].verify_chain(1, None).await.unwrap().first_break,
        None
    );
}

#[tokio::test]
async fn verification_names_exactly_the_tampered_position() {
    let db = TestDb::new().await;
    let store = db.store().await;
    for i in 0..20 {
        store
            .append(
                &stream(&format!("node-n{}", i % 3)),
                ExpectedVersion::Any,
                vec![event("Tick", json!({"i": i}))],
            )
            .await
            .unwrap();
    }
    let clean = store.verify_chain(1, None).await.unwrap();
    assert_eq!((clean.verified, clean.first_break.clone()), (20, None));

    // A superuser disables the guard and edits one payload.
    let pool = store.pool();
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_no_update_delete")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE events SET payload = '{\"i\": 999}' WHERE global_position = 7")
        .execute(pool)
        .await
        .unwrap();

    let report = store.verify_chain(1, None).await.unwrap();
    assert_eq!(
        report.first_break,
        Some(ChainBreak {
            position: 7,
            kind: BreakKind::HashMismatch
        })
    );
    assert_eq!(report.verified, 6);
    assert_eq!(
        store.verify_chain(1, Some(6)).await.unwrap().first_break,
        None
    );

    // A cleverer forger also rewrites position 7's hash: the next link then breaks.
    let row: deepnode_store::RecordedEvent = store.read_all(6, 1).await.unwrap().remove(0);
    let forged = row.expected_hash(&row.prev_hash).to_vec();
    sqlx::query("UPDATE events SET hash = $1 WHERE global_position = 7")
        .bind(forged)
        .execute(pool)
        .await
        .unwrap();
    let report = store.verify_chain(1, None).await.unwrap();
    assert_eq!(
        report.first_break,
        Some(ChainBreak {
            position: 8,
            kind: BreakKind::PrevHashMismatch
        })
    );

    // Deleting a row leaves a gap, named by the position after it.
    sqlx::query("DELETE FROM events WHERE global_position = 15")
        .execute(pool)
        .await
        .unwrap();
    let report = store.verify_chain(9, None).await.unwrap();
    assert_eq!(
        report.first_break,
        Some(ChainBreak {
            position: 16,
            kind: BreakKind::Gap
        })
    );
    sqlx::query("ALTER TABLE events ENABLE TRIGGER events_no_update_delete")
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_both_succeed_and_create_the_database() {
    let db = TestDb::unmigrated();
    let (a, b, c) = tokio::join!(
        deepnode_store::migrate(db.url()),
        deepnode_store::migrate(db.url()),
        deepnode_store::migrate(db.url())
    );
    let mut applied: Vec<Vec<i32>> = vec![a.unwrap(), b.unwrap(), c.unwrap()];
    applied.sort();
    let latest = deepnode_store::latest_known_version();
    assert_eq!(applied[0], Vec::<i32>::new());
    assert_eq!(applied[1], Vec::<i32>::new());
    assert_eq!(
        applied[2],
        (1..=latest).collect::<Vec<_>>(),
        "exactly one process applied them all"
    );
    assert_eq!(
        deepnode_store::migrate(db.url()).await.unwrap(),
        Vec::<i32>::new()
    );
    let store = db.store().await;
    assert_eq!(store.head_position().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_resumes_after_its_connections_are_killed() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let reader = db.store().await;
    let mut sub = reader.subscribe_all(0, Duration::from_millis(200));
    let s = stream("s-1");
    for i in 0..5 {
        store
            .append(
                &s,
                ExpectedVersion::Any,
                vec![event("Tick", json!({"i": i}))],
            )
            .await
            .unwrap();
    }
    for expected in 1..=5 {
        let e = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.global_position, expected);
    }

    assert!(db.kill_connections().await > 0);
    for i in 5..10 {
        // The writer's own pool may hand out a dead connection once; the store reports it as
        // transient, and the caller retries.
        let e = event("Tick", json!({"i": i}));
        let mut attempts = 0;
        while let Err(err) = store
            .append(&s, ExpectedVersion::Any, vec![e.clone()])
            .await
        {
            assert!(err.is_transient(), "{err}");
            attempts += 1;
            assert!(attempts < 20);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for expected in 6..=10 {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.global_position, expected);
    }
    assert_eq!(sub.position(), 10);
}

#[tokio::test]
async fn reads_page_through_the_global_order_and_stream_the_whole_log() {
    let db = TestDb::new().await;
    let store = db.store().await;
    for i in 0..2_500 {
        let batch = (0..1).map(|_| event("Tick", json!({"i": i}))).collect();
        store
            .append(
                &stream(&format!("s-{}", i % 7)),
                ExpectedVersion::Any,
                batch,
            )
            .await
            .unwrap();
    }
    // Enough to span several of stream_all's chunks (20,000 positions each, read two at a time).
    for i in 0..90 {
        let batch = (0..500)
            .map(|j| event("Tick", json!({"i": i, "j": j})))
            .collect();
        store
            .append(&stream("s-bulk"), ExpectedVersion::Any, batch)
            .await
            .unwrap();
    }
    let page = store.read_all(100, 50).await.unwrap();
    assert_eq!(page.first().map(|e| e.global_position), Some(101));
    assert_eq!(page.len(), 50);

    let mut pages = store.stream_all(0, None);
    let mut next = 1;
    while let Some(page) = pages.recv().await {
        for e in page.unwrap() {
            assert_eq!(e.global_position, next);
            next += 1;
        }
    }
    assert_eq!(next, 47_501);
    for (after, until, expected) in [(10, 20, 10), (19_990, 40_010, 20_020), (0, 47_500, 47_500)] {
        let mut pages = store.stream_all(after, Some(until));
        let mut next = after + 1;
        while let Some(page) = pages.recv().await {
            for e in page.unwrap() {
                assert_eq!(e.global_position, next, "in order across chunk boundaries");
                next += 1;
            }
        }
        assert_eq!(next - after - 1, expected);
    }
}
