//! The book projection, replay and audit against a real PostgreSQL, on a realistic synthetic history
//! (registrations, deployments, executions with successes, failovers, errors, timeouts and invalid
//! outputs, reports, status changes, slashes, revocations, deregistrations): the tables equal the
//! in-memory fold, a rebuild reproduces them bit for bit, replay shows the past, audit names every
//! difference, and an event the binary cannot read stops everything at its position.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use deepnode_domain::book::{DeploymentRow, ExecutionRow, NodeBook, NodeRow};
use deepnode_domain::config::PolicyConfig;
use deepnode_projections::synthetic::{History, Spec};
use deepnode_projections::{
    audit, load_deployments, load_executions, load_nodes, replay, BookProjection, DifferenceKind,
    Error, Until, BOOK_PROJECTION,
};
use deepnode_store::{EventStore, ExpectedVersion, ProjectionRunner, StreamId};
use deepnode_testkit::{at, event, TestDb};
use serde_json::json;

async fn append_history(store: &EventStore, executions: usize) {
    let spec = Spec {
        nodes: 12,
        models: 6,
        executions,
        seed: 7,
        start: at(0),
    };
    for append in History::new(spec).unwrap() {
        let append = append.unwrap();
        store
            .append(&append.stream, ExpectedVersion::Any, append.events)
            .await
            .unwrap();
    }
}

struct Tables {
    nodes: Vec<NodeRow>,
    deployments: Vec<DeploymentRow>,
    executions: Vec<ExecutionRow>,
}

async fn tables(store: &EventStore) -> Tables {
    Tables {
        nodes: load_nodes(store.pool()).await.unwrap(),
        deployments: load_deployments(store.pool()).await.unwrap(),
        executions: load_executions(store.pool()).await.unwrap(),
    }
}

/// Row equality with floats compared bit for bit.
fn assert_same_nodes(a: &[NodeRow], b: &[NodeRow]) {
    assert_eq!(a, b);
    for (x, y) in a.iter().zip(b) {
        for (f, g) in [
            (x.stake, y.stake),
            (x.score, y.score),
            (x.recent_failure_rate, y.recent_failure_rate),
            (x.slashed_amount, y.slashed_amount),
        ] {
            assert_eq!(f.to_bits(), g.to_bits(), "float of {} differs", x.node_id);
        }
    }
}

/// Every execution's row as the fold of the whole log hands them out (the book keeps only those in
/// flight), in request id order.
async fn folded_executions(store: &EventStore, config: &PolicyConfig) -> Vec<ExecutionRow> {
    let mut book = NodeBook::new(config);
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_all(after, 1_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.global_position;
        for event in &page {
            rows.extend(book.evolve(event).unwrap().ended);
        }
    }
    rows.extend(book.execution_rows());
    rows.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    rows
}

async fn assert_tables_equal_fold(
    t: &Tables,
    book: &NodeBook,
    store: &EventStore,
    config: &PolicyConfig,
) {
    let executions = folded_executions(store, config).await;
    assert_same_nodes(&t.nodes, &book.node_rows().collect::<Vec<_>>());
    assert_eq!(t.deployments, book.deployment_rows().collect::<Vec<_>>());
    assert_eq!(t.executions, executions);
}

async fn project(store: &EventStore, config: &PolicyConfig) -> i64 {
    let mut runner =
        ProjectionRunner::new(store.pool().clone(), BookProjection::new(config)).with_batch(97);
    runner.run_to_head().await.unwrap()
}

#[tokio::test]
async fn projection_equals_the_fold_and_a_rebuild_reproduces_it_exactly() {
    // given a realistic history in the log
    let db = TestDb::new().await;
    let store = db.store().await;
    let config = PolicyConfig::default();
    append_history(&store, 700).await;
    let head = store.head_position().await.unwrap();

    // when the projection runs to the head in small batches
    assert_eq!(project(&store, &config).await, head);

    // then the tables equal the in-memory fold of the whole log
    let book = replay(&store, Until::Head, &config, |_| {}).await.unwrap();
    let stored = tables(&store).await;
    assert_tables_equal_fold(&stored, &book, &store, &config).await;

    // and the history is the realistic kind: every outcome, statuses, slashes, revocations
    let sum = |f: fn(&NodeRow) -> i64| stored.nodes.iter().map(f).sum::<i64>();
    assert!(sum(|r| r.successes) > 0 && sum(|r| r.errors) > 0 && sum(|r| r.timeouts) > 0);
    assert!(sum(|r| r.invalid_outputs) > 0);
    assert!(stored.nodes.iter().any(|r| r.slashed_amount > 0.0));
    assert!(stored.nodes.iter().any(|r| r.status != "probation"));
    for status in ["succeeded", "failed", "in_flight"] {
        assert!(
            stored.executions.iter().any(|e| e.status == status),
            "{status}"
        );
    }
    let revoked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'DeploymentRevoked'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert!(revoked > 0);
    assert_eq!(stored.deployments.len(), 12, "revoked replicas are deleted");

    // and an audit finds nothing
    let report = audit(&store, &config, |_| {}).await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.checkpoint, head);

    // when the projection is rebuilt from position 0
    let mut runner = ProjectionRunner::new(store.pool().clone(), BookProjection::new(&config));
    assert_eq!(runner.rebuild().await.unwrap(), head);

    // then every row is reproduced exactly, floats included
    let rebuilt = tables(&store).await;
    assert_same_nodes(&rebuilt.nodes, &stored.nodes);
    assert_eq!(rebuilt.deployments, stored.deployments);
    assert_eq!(rebuilt.executions, stored.executions);
}

#[tokio::test]
async fn the_projection_keeps_up_with_appends_in_several_runs() {
    // given a projection that ran over part of the log
    let db = TestDb::new().await;
    let store = db.store().await;
    let config = PolicyConfig::default();
    append_history(&store, 200).await;
    project(&store, &config).await;

    // when more events arrive and a fresh runner (new process) continues
    let node = json!({"node_id": "n00003", "domain": "d1", "stake": 0.1, "capacity": 3});
    let stream = StreamId::parse("node-n00003").unwrap();
    let mut registered = event("NodeRegistered", node);
    registered.schema_version = 2;
    registered.occurred_at = at(10_000_000);
    store
        .append(&stream, ExpectedVersion::Any, vec![registered])
        .await
        .unwrap();
    project(&store, &config).await;

    // then the tables still equal the fold of the whole log
    let book = replay(&store, Until::Head, &config, |_| {}).await.unwrap();
    assert_tables_equal_fold(&tables(&store).await, &book, &store, &config).await;
    assert!(audit(&store, &config, |_| {}).await.unwrap().is_clean());
}

#[tokio::test]
async fn replay_shows_the_state_as_it_was_at_a_position_or_an_instant() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let config = PolicyConfig::default();
    append_history(&store, 400).await;
    let head = store.head_position().await.unwrap();
    let middle = head / 2;

    // when replaying up to the middle of the log
    let book = replay(&store, Until::Position(middle), &config, |_| {})
        .await
        .unwrap();

    // then it equals a fold of exactly the first `middle` events
    let events = store.read_all(0, middle).await.unwrap();
    let mut expected = NodeBook::new(&config);
    for e in &events {
        expected.evolve(e).unwrap();
    }
    assert_eq!(book, expected);
    assert_eq!(book.last_position(), middle);
    let now = replay(&store, Until::Head, &config, |_| {}).await.unwrap();
    assert_ne!(book, now, "the past differs from the present");

    // when replaying up to the instant the middle event occurred
    let t = events.last().unwrap().occurred_at;
    let by_time = replay(&store, Until::Time(t), &config, |_| {})
        .await
        .unwrap();
    let mut expected = NodeBook::new(&config);
    for e in store.read_all(0, head).await.unwrap() {
        if e.occurred_at <= t {
            expected.evolve(&e).unwrap();
        }
    }
    assert_eq!(by_time, expected);

    // and before the first event there is nothing
    let empty = replay(&store, Until::Time(at(-1)), &config, |_| {})
        .await
        .unwrap();
    assert_eq!(empty.nodes().len(), 0);
}

#[tokio::test]
async fn an_unknown_event_type_or_newer_schema_stops_replay_and_projection_at_its_position() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let config = PolicyConfig::default();
    append_history(&store, 20).await;
    let stream = StreamId::parse("node-x").unwrap();
    let unknown = store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![event("NodeTeleported", json!({"node_id": "x"}))],
        )
        .await
        .unwrap();
    let position = *unknown.positions.first().unwrap();

    // replay stops there, naming the position
    let err = replay(&store, Until::Head, &config, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Decode { position: p, .. } if p == position));
    assert!(err.to_string().contains(&format!("position {position}")));
    assert!(err.to_string().contains("NodeTeleported"));
    // but the past before it still replays
    assert!(
        replay(&store, Until::Position(position - 1), &config, |_| {})
            .await
            .is_ok()
    );

    // the projection stops there too, its checkpoint just before it
    let mut runner = ProjectionRunner::new(store.pool().clone(), BookProjection::new(&config));
    let err = runner.run_to_head().await.unwrap_err();
    assert!(
        matches!(err, deepnode_store::Error::Decode { position: p, .. } if p == position),
        "{err}"
    );
    let checkpoint = deepnode_store::checkpoint(store.pool(), BOOK_PROJECTION)
        .await
        .unwrap();
    assert!(checkpoint < position);

    // and the audit reports the unreadable position
    let report = audit(&store, &config, |_| {}).await.unwrap();
    assert!(report.is_clean(), "checkpoint is before the unknown event");

    // a newer schema version of a known type is refused the same way
    let db = TestDb::new().await;
    let store = db.store().await;
    let mut newer = event(
        "NodeRegistered",
        json!({"node_id": "n1", "domain": "d", "stake": 1.0, "capacity": 1}),
    );
    newer.schema_version = 3;
    store
        .append(
            &StreamId::parse("node-n1").unwrap(),
            ExpectedVersion::Any,
            vec![newer],
        )
        .await
        .unwrap();
    let err = replay(&store, Until::Head, &config, |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.position(), Some(1));
    assert!(err.to_string().contains("schema_version 3"), "{err}");
}

#[tokio::test]
async fn audit_names_each_tampered_row_and_column() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let config = PolicyConfig::default();
    append_history(&store, 300).await;
    project(&store, &config).await;
    let pool = store.pool();

    // given tampered projection rows: a changed score, a deleted deployment, an invented execution
    sqlx::query("UPDATE node_reputation SET score = 0.99 WHERE node_id = 'n00002'")
        .execute(pool)
        .await
        .unwrap();
    let (model, node): (String, String) =
        sqlx::query_as("SELECT model_id, node_id FROM deployments ORDER BY 1, 2 LIMIT 1")
            .fetch_one(pool)
            .await
            .unwrap();
    sqlx::query("DELETE FROM deployments WHERE model_id = $1 AND node_id = $2")
        .bind(&model)
        .bind(&node)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO executions VALUES ('forged', 'm0000', 'succeeded', 'n00001', 1, true, now(), now())",
    )
    .execute(pool)
    .await
    .unwrap();

    // when auditing
    let report = audit(&store, &config, |_| {}).await.unwrap();

    // then each difference is named, and nothing else
    assert!(!report.is_clean());
    assert!(report.chain.first_break.is_none());
    assert_eq!(report.differences_total, 3, "{:#?}", report.differences);
    let score = &report.differences[0];
    assert_eq!(
        (score.table, score.key.as_str(), score.column, score.kind),
        ("node_reputation", "n00002", "score", DifferenceKind::Value)
    );
    assert_eq!(score.stored.as_deref(), Some("0.99"));
    let missing = &report.differences[1];
    assert_eq!(
        (missing.table, missing.kind),
        ("deployments", DifferenceKind::Missing)
    );
    assert_eq!(missing.key, format!("{model}/{node}"));
    let extra = &report.differences[2];
    assert_eq!(
        (extra.table, extra.key.as_str(), extra.kind),
        ("executions", "forged", DifferenceKind::Extra)
    );
    assert!(score
        .to_string()
        .contains("node_reputation key=n00002 column=score"));
}

#[tokio::test]
async fn audit_names_the_position_of_a_tampered_event() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let config = PolicyConfig::default();
    append_history(&store, 100).await;
    project(&store, &config).await;

    // given a superuser rewrote one event's payload behind the triggers' back
    let mut conn = store.pool().acquire().await.unwrap();
    for sql in [
        "ALTER TABLE events DISABLE TRIGGER events_no_update_delete",
        "UPDATE events SET payload = jsonb_set(payload, '{latency_ms}', '1') WHERE global_position = 40",
        "ALTER TABLE events ENABLE TRIGGER events_no_update_delete",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    drop(conn);

    // then the audit names that position
    let report = audit(&store, &config, |_| {}).await.unwrap();
    assert!(!report.is_clean());
    let broken = report.chain.first_break.unwrap();
    assert_eq!(broken.position, 40);
    assert_eq!(report.chain.verified, 39);
}
