//! Appending against a real PostgreSQL: atomicity, optimistic concurrency, idempotency by event id,
//! refusal of bad input, and the database-enforced immutability of the log.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use deepnode_store::{Error, EventStore, ExpectedVersion, StreamId};
use deepnode_testkit::{event, TestDb};
use rand::SeedableRng;
use serde_json::json;
use uuid::Uuid;

fn stream(s: &str) -> StreamId {
    StreamId::parse(s).unwrap()
}

async fn count(store: &EventStore) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn appends_are_atomic_ordered_and_versioned() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let s = stream("node-n1");

    let first = store
        .append(
            &s,
            ExpectedVersion::NoStream,
            vec![
                event("NodeRegistered", json!({"n": 1})),
                event("NodeRegistered", json!({"n": 2})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(first.positions, vec![1, 2]);
    assert_eq!(first.stream_version, 2);
    assert!(!first.duplicate);

    let second = store
        .append(
            &s,
            ExpectedVersion::Exact(2),
            vec![event("NodeDeregistered", json!({}))],
        )
        .await
        .unwrap();
    assert_eq!(second.positions, vec![3]);
    assert_eq!(second.stream_version, 3);

    let other = store
        .append(
            &stream("node-n2"),
            ExpectedVersion::Any,
            vec![event("NodeRegistered", json!({}))],
        )
        .await
        .unwrap();
    assert_eq!(
        (other.positions.clone(), other.stream_version),
        (vec![4], 1)
    );

    let events = store.read_stream(&s, 1).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(events[1].payload, json!({"n": 2}).into());
    assert_eq!(store.read_stream(&s, 3).await.unwrap().len(), 1);
    assert_eq!(store.head_position().await.unwrap(), 4);
}

#[tokio::test]
async fn wrong_expected_version_is_a_typed_conflict_naming_both_versions() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let s = stream("model-m1");
    store
        .append(
            &s,
            ExpectedVersion::NoStream,
            vec![event("ModelDeployed", json!({}))],
        )
        .await
        .unwrap();

    let err = store
        .append(
            &s,
            ExpectedVersion::Exact(5),
            vec![event("ModelDeployed", json!({}))],
        )
        .await
        .unwrap_err();
    match err {
        Error::Conflict {
            stream,
            expected,
            actual,
        } => {
            assert_eq!(stream, "model-m1");
            assert_eq!(expected, ExpectedVersion::Exact(5));
            assert_eq!(actual, 1);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let err = store
        .append(
            &s,
            ExpectedVersion::NoStream,
            vec![event("ModelDeployed", json!({}))],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { actual: 1, .. }), "{err}");
    assert!(
        err.to_string().contains("expected no stream, actual 1"),
        "{err}"
    );
    assert_eq!(count(&store).await, 1, "a refused append writes nothing");

    // Two writers racing on the same expected version: exactly one wins.
    let (a, b) = tokio::join!(
        store.append(
            &s,
            ExpectedVersion::Exact(1),
            vec![event("DeploymentAssigned", json!({"w": "a"}))]
        ),
        store.append(
            &s,
            ExpectedVersion::Exact(1),
            vec![event("DeploymentAssigned", json!({"w": "b"}))]
        ),
    );
    assert_eq!([a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(), 1);
    assert_eq!(count(&store).await, 2);
}

#[tokio::test]
async fn reappending_the_same_ids_returns_the_original_positions_and_writes_nothing() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let s = stream("exec-r1");
    let batch = vec![
        event("ExecutionRequested", json!({"a": 1})),
        event("AttemptDispatched", json!({"b": [1, 2]})),
    ];
    let original = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    store
        .append(
            &stream("exec-r2"),
            ExpectedVersion::Any,
            vec![event("ExecutionRequested", json!({}))],
        )
        .await
        .unwrap();

    // Even with an expectation that would now conflict, the replay is recognised first.
    let again = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert_eq!(again.positions, original.positions);
    assert_eq!(again.stream_version, 2);
    assert!(again.duplicate);
    assert_eq!(count(&store).await, 3);

    // Same id, different body: refused.
    let mut altered = batch[0].clone();
    altered.payload = json!({"a": 2});
    let err = store
        .append(&s, ExpectedVersion::Any, vec![altered])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::EventIdReused { event_id } if event_id == batch[0].event_id),
        "{err}"
    );

    // Same id on another stream: refused.
    let err = store
        .append(
            &stream("exec-r9"),
            ExpectedVersion::Any,
            vec![batch[0].clone()],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EventIdReused { .. }), "{err}");

    // Some ids old, some new: refused as a whole.
    let err = store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![batch[1].clone(), event("AttemptSucceeded", json!({}))],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EventIdReused { .. }), "{err}");

    // The same id twice in one append.
    let e = event("AttemptSucceeded", json!({}));
    let err = store
        .append(&s, ExpectedVersion::Any, vec![e.clone(), e])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateInAppend { .. }), "{err}");
    assert_eq!(count(&store).await, 3);
}

/// A writer places appends it can decide from memory (the head it wrote, the stream versions it saw)
/// and writes them without lookups; what another writer changed behind its back is caught by the
/// database and decided by lookup, with the same answers a lookup alone gives.
#[tokio::test]
async fn a_writer_places_what_it_knows_and_looks_up_what_another_writer_moved() {
    let db = TestDb::new().await;
    // Two stores = two writers with their own memory, like two processes.
    let (a, b) = (db.store().await, db.store().await);
    let s = stream("node-n1");
    let stats = |store: &EventStore| {
        let stats = store.writer_stats();
        (stats.placed(), stats.looked_up())
    };
    // Appends one event of type `t`: (positions, stream version, duplicate).
    let append = |store: &EventStore, s: &StreamId, expected, t: &str| {
        let (store, s, t) = (store.clone(), s.clone(), t.to_owned());
        async move {
            let events = vec![event(&t, json!({"t": t}))];
            let r = store.append(&s, expected, events).await?;
            Ok::<_, Error>((r.positions, r.stream_version, r.duplicate))
        }
    };

    // A new stream, then the version `a` itself wrote: both placed.
    let first = append(&a, &s, ExpectedVersion::NoStream, "A1").await;
    assert_eq!(first.unwrap(), (vec![1], 1, false));
    let second = append(&a, &s, ExpectedVersion::Exact(1), "A2").await;
    assert_eq!(second.unwrap(), (vec![2], 2, false));
    assert_eq!(stats(&a), (2, 0));

    // `b` has never seen the stream: an exact expectation is looked up.
    let by_b = append(&b, &s, ExpectedVersion::Exact(2), "B3").await;
    assert_eq!(by_b.unwrap(), (vec![3], 3, false));
    assert_eq!(stats(&b), (0, 1));

    // `a` still believes the stream is at 2: its placement collides with B3, and the lookup reports
    // the actual version.
    let err = append(&a, &s, ExpectedVersion::Exact(2), "A3")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { actual: 3, .. }), "{err}");
    assert_eq!(stats(&a), (2, 1));

    // Learned from the conflict: placed again, after the head `b` moved.
    let learned = append(&a, &s, ExpectedVersion::Exact(3), "A4").await;
    assert_eq!(learned.unwrap(), (vec![4], 4, false));
    // `b` moves the head again; `a`'s next placement finds it moved, re-places and lands after it.
    append(&b, &stream("node-n2"), ExpectedVersion::NoStream, "B1")
        .await
        .unwrap();
    let again = event("A5", json!({}));
    let moved = a
        .append(&s, ExpectedVersion::Any, vec![again.clone()])
        .await;
    assert_eq!(
        moved.map(|r| (r.positions, r.stream_version)).unwrap(),
        (vec![6], 5)
    );
    assert_eq!(stats(&a), (4, 1));

    // Re-appending A5's id is placed, collides on the id, and is answered as the duplicate it is.
    let r = a
        .append(&s, ExpectedVersion::Any, vec![again])
        .await
        .unwrap();
    assert_eq!(
        (r.positions, r.stream_version, r.duplicate),
        (vec![6], 5, true)
    );
    assert_eq!(stats(&a), (4, 2));

    assert_eq!(count(&a).await, 6);
    let report = a.verify_chain(1, None).await.unwrap();
    assert_eq!((report.verified, report.first_break), (6, None));
}

#[tokio::test]
async fn concurrent_duplicates_in_one_group_commit_are_written_once() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let e = event("ExecutionReported", json!({"x": 1}));
    let s = stream("report-a");
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            let (s, e) = (s.clone(), e.clone());
            tokio::spawn(async move { store.append(&s, ExpectedVersion::Any, vec![e]).await })
        })
        .collect();
    let mut positions = Vec::new();
    for t in tasks {
        positions.push(t.await.unwrap().unwrap().positions);
    }
    assert!(positions.iter().all(|p| p == &vec![1]), "{positions:?}");
    assert_eq!(count(&store).await, 1);
}

/// The table's own CHECKs (migration V6) hold the stream id and event type to CONTRACT §1's shapes
/// for any writer, not only for this crate's validation: the boundaries pass, one step past refuses.
#[tokio::test]
async fn the_database_checks_stream_ids_and_event_types_itself() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let insert = |stream_id: String, event_type: String| {
        let pool = store.pool().clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let result = sqlx::query(
                "INSERT INTO events (global_position, event_id, stream_id, stream_version, event_type,
                                     schema_version, payload, metadata, occurred_at, recorded_at,
                                     prev_hash, hash)
                 VALUES (1, gen_random_uuid(), $1, 1, $2, 1, '{}', '{}', now(), now(),
                         decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'))",
            )
            .bind(stream_id)
            .bind(event_type)
            .execute(&mut *tx)
            .await;
            tx.rollback().await.unwrap();
            match result {
                Ok(_) => Ok(()),
                Err(sqlx::Error::Database(e)) => Err(e.constraint().unwrap_or_default().to_owned()),
                Err(e) => panic!("{e}"),
            }
        }
    };
    let ok_type = || "NodeRegistered".to_owned();
    let ok_stream = || "node-n1".to_owned();
    for stream_id in ["a".to_owned(), "A-z_0.9:x".to_owned(), "s".repeat(200)] {
        assert_eq!(insert(stream_id, ok_type()).await, Ok(()));
    }
    for stream_id in [
        String::new(),
        "s".repeat(201),
        "a b".into(),
        "a/b".into(),
        "é".into(),
    ] {
        let refused = insert(stream_id.clone(), ok_type()).await;
        assert_eq!(
            refused,
            Err("events_stream_id_check".into()),
            "{stream_id:?}"
        );
    }
    for event_type in ["A".to_owned(), format!("N{}", "x9".repeat(63) + "y")] {
        assert_eq!(insert(ok_stream(), event_type).await, Ok(()));
    }
    for event_type in [
        String::new(),
        "nodeRegistered".into(),
        "Node_Registered".into(),
        format!("N{}", "x".repeat(128)),
        "Nodé".into(),
    ] {
        let refused = insert(ok_stream(), event_type.clone()).await;
        assert_eq!(
            refused,
            Err("events_event_type_check".into()),
            "{event_type:?}"
        );
    }
    assert_eq!(count(&store).await, 0);
}

#[tokio::test]
async fn bad_input_is_refused_with_a_typed_error_and_nothing_is_written() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let s = stream("node-n1");

    let mut huge = event("NodeRegistered", json!({"blob": "x".repeat(1024 * 1024)}));
    let err = store
        .append(&s, ExpectedVersion::Any, vec![huge.clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid(deepnode_domain::log::LogError::TooLarge { .. })
        ),
        "{err}"
    );

    huge.payload = json!(["not", "an", "object"]);
    let err = store
        .append(&s, ExpectedVersion::Any, vec![huge.clone()])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("payload must be a JSON object"),
        "{err}"
    );

    huge.payload = json!({"nul": "a\u{0}b"});
    assert!(store
        .append(&s, ExpectedVersion::Any, vec![huge.clone()])
        .await
        .is_err());

    huge.payload = json!({});
    huge.event_type = "not pascal".into();
    assert!(store
        .append(&s, ExpectedVersion::Any, vec![huge])
        .await
        .is_err());

    assert!(store
        .append(&s, ExpectedVersion::Any, vec![])
        .await
        .is_err());
    assert!(StreamId::parse("").is_err());
    assert!(StreamId::parse(&"s".repeat(201)).is_err());
    assert!(StreamId::parse("node n1").is_err());

    // A good append in the same breath is unaffected.
    store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![event("NodeRegistered", json!({}))],
        )
        .await
        .unwrap();
    assert_eq!(count(&store).await, 1);
}

#[tokio::test]
async fn negative_zero_round_trips_through_jsonb_without_breaking_the_chain() {
    let db = TestDb::new().await;
    let store = db.store().await;
    store
        .append(
            &stream("s-1"),
            ExpectedVersion::Any,
            vec![event(
                "Numbers",
                json!({"z": -0.0, "f": 0.1, "big": 1e21, "tiny": 5e-324, "i": -7}),
            )],
        )
        .await
        .unwrap();
    // Floats whose shortest form needs all 17 digits must parse back to the same bits
    // (serde_json's `float_roundtrip`), or the read-back row would not hash as appended.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let floats: Vec<f64> = (0..500)
        .map(|_| f64::from_bits(rand::Rng::gen::<u64>(&mut rng) >> 2) * 1e-200)
        .chain([110.96000000000001, 0.1 + 0.2])
        .collect();
    store
        .append(
            &stream("s-2"),
            ExpectedVersion::Any,
            vec![event("Numbers", json!({"f": floats}))],
        )
        .await
        .unwrap();
    let report = store.verify_chain(1, None).await.unwrap();
    assert_eq!(report.first_break, None);
    assert_eq!(report.verified, 2);
}

#[tokio::test]
async fn the_database_refuses_update_delete_and_truncate_on_events() {
    let db = TestDb::new().await;
    let store = db.store().await;
    store
        .append(
            &stream("node-n1"),
            ExpectedVersion::Any,
            vec![event("NodeRegistered", json!({"a": 1}))],
        )
        .await
        .unwrap();
    let pool = store.pool();

    for sql in [
        "UPDATE events SET payload = '{\"a\": 2}' WHERE global_position = 1",
        "DELETE FROM events WHERE global_position = 1",
        "TRUNCATE events",
        "TRUNCATE log_head",
        "DELETE FROM log_head",
    ] {
        let err = sqlx::query(sql).execute(pool).await.unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some("42501"), "{sql}: {db_err}");
        assert!(db_err.message().contains("append-only"), "{sql}: {db_err}");
    }

    // The service role has no such grants in the first place, but may insert and read.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE deepnode_service")
        .execute(&mut *tx)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 1);
    for sql in [
        "UPDATE events SET event_type = 'X'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        sqlx::query("SAVEPOINT s").execute(&mut *tx).await.unwrap();
        let err = sqlx::query(sql).execute(&mut *tx).await.unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert!(
            db_err
                .message()
                .contains("permission denied for table events"),
            "{sql}: {db_err}"
        );
        sqlx::query("ROLLBACK TO SAVEPOINT s")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.rollback().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE deepnode_reader")
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = sqlx::query("INSERT INTO log_head (id, position, hash) VALUES (false, 0, '')")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    tx.rollback().await.unwrap();

    assert_eq!(count(&store).await, 1);
}

#[tokio::test]
async fn appending_inside_a_caller_transaction_commits_or_rolls_back_with_it() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let s = stream("node-n1");

    let mut tx = store.pool().begin().await.unwrap();
    EventStore::append_in(
        &mut tx,
        &s,
        ExpectedVersion::NoStream,
        vec![event("NodeRegistered", json!({}))],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&store).await, 0);

    let mut tx = store.pool().begin().await.unwrap();
    let r = EventStore::append_in(
        &mut tx,
        &s,
        ExpectedVersion::NoStream,
        vec![event("NodeRegistered", json!({}))],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(r.positions, vec![1], "a rolled-back append leaves no gap");
    assert_eq!(store.verify_chain(1, None).await.unwrap().first_break, None);
    let _ = Uuid::nil();
}

#[tokio::test]
async fn an_old_schema_version_is_upcast_when_read_back_and_unknown_types_are_named() {
    use deepnode_domain::events::{DecodeError, DomainEvent};
    let db = TestDb::new().await;
    let store = db.store().await;
    let s = stream("node-n1");
    // A NodeRegistered written by an older binary, before `capacity` existed.
    let mut v1 = event(
        "NodeRegistered",
        json!({"node_id": "n1", "domain": "text", "stake": 2.5}),
    );
    v1.schema_version = 1;
    let mut unknown = event("NodeTeleported", json!({"node_id": "n1"}));
    unknown.schema_version = 1;
    store
        .append(&s, ExpectedVersion::NoStream, vec![v1, unknown])
        .await
        .unwrap();

    let stored = store.read_stream(&s, 1).await.unwrap();
    assert_eq!(
        stored[0].schema_version, 1,
        "the log keeps what was written"
    );
    match DomainEvent::decode(&stored[0]).unwrap() {
        DomainEvent::NodeRegistered(e) => {
            assert_eq!(
                (e.node_id.as_str(), e.domain.as_str(), e.stake, e.capacity),
                ("n1", "text", 2.5, 1)
            );
        }
        other => panic!("expected NodeRegistered, got {other:?}"),
    }
    let err = DomainEvent::decode(&stored[1]).unwrap_err();
    assert!(
        matches!(err, DecodeError::UnknownEventType { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("NodeTeleported"), "{err}");
}
