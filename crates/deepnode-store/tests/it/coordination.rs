//! Leases, locks and named positions: what the services ask of PostgreSQL besides the log.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use deepnode_testkit::TestDb;

#[tokio::test]
async fn a_lease_has_one_holder_until_it_is_released() {
    // given two stores on one database, the first holding lease 42
    let db = TestDb::new().await;
    let (a, b) = (db.store().await, db.store().await);
    let mut held = a
        .try_lease(42)
        .await
        .unwrap()
        .expect("a free lease is taken");
    // then nobody else takes it, and the holder sees it still held
    assert!(b.try_lease(42).await.unwrap().is_none());
    held.check().await.unwrap();
    // when it is released, the other store takes it
    held.release().await;
    assert!(b.try_lease(42).await.unwrap().is_some());
}

#[tokio::test]
async fn a_standby_waits_for_a_lease_and_takes_it_when_released() {
    // given lease 43 held by one store, and another store waiting for it
    let db = TestDb::new().await;
    let (a, b) = (db.store().await, db.store().await);
    let held = a
        .try_lease(43)
        .await
        .unwrap()
        .expect("a free lease is taken");
    let waiting = tokio::spawn(async move { b.take_lease(43, Duration::from_millis(20)).await });
    // then the wait goes on while the lease is held (several retries' worth)
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "a held lease was taken");
    // when the holder releases it, the waiting store holds it (and a third cannot take it)
    held.release().await;
    let mut taken = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the released lease is taken")
        .unwrap()
        .unwrap();
    taken.check().await.unwrap();
    assert!(a.try_lease(43).await.unwrap().is_none());
}

#[tokio::test]
async fn a_holder_hears_its_lease_lost_with_its_connection() {
    // given lease 44 held, its holder watching it
    let db = TestDb::new().await;
    let store = db.store().await;
    let mut held = store
        .try_lease(44)
        .await
        .unwrap()
        .expect("a free lease is taken");
    let watching = tokio::spawn(async move { held.lost(Duration::from_millis(20)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!watching.is_finished(), "a held lease was reported lost");
    // when its connection is cut
    assert!(db.kill_connections().await > 0);
    // then the watch returns, and the lease is free for others
    tokio::time::timeout(Duration::from_secs(10), watching)
        .await
        .expect("the lost lease is noticed")
        .unwrap();
    let other = db.store().await;
    assert!(other.try_lease(44).await.unwrap().is_some());
}

#[tokio::test]
async fn a_lock_is_exclusive_until_released() {
    // given lock 7 taken
    let db = TestDb::new().await;
    let store = db.store().await;
    let lock = store
        .try_lock(7)
        .await
        .unwrap()
        .expect("a free lock is taken");
    // then a second attempt is refused at once
    assert!(store.try_lock(7).await.unwrap().is_none());
    // and once released it can be taken again
    lock.release().await.unwrap();
    assert!(store.try_lock(7).await.unwrap().is_some());
}

#[tokio::test]
async fn a_named_position_only_moves_forward_and_shows_its_lag() {
    // given a log of three events and a position `relay` at 3
    let db = TestDb::new().await;
    let store = db.store().await;
    for i in 0..3 {
        let stream = deepnode_store::StreamId::parse(&format!("s-{i}")).unwrap();
        let e = deepnode_testkit::event("Thing", serde_json::json!({"i": i}));
        store
            .append(&stream, deepnode_store::ExpectedVersion::NoStream, vec![e])
            .await
            .unwrap();
    }
    assert_eq!(store.checkpoint("relay").await.unwrap(), 0);
    store.advance_checkpoint("relay", 3).await.unwrap();
    // when a slower writer tries to move it back
    store.advance_checkpoint("relay", 1).await.unwrap();
    // then it stays, and it is at the head
    assert_eq!(store.checkpoint("relay").await.unwrap(), 3);
    let (head, lags) = store.lags().await.unwrap();
    assert_eq!(head, 3);
    assert_eq!(lags.get("relay"), Some(&0));
    // and the database answers, migrated to this build's latest version
    store.ping().await.unwrap();
    assert_eq!(
        store.applied_migration().await.unwrap(),
        deepnode_store::latest_known_version()
    );
}
