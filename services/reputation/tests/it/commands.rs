//! Node register/deregister over NATS against real Postgres: happy path, conflict, re-registration
//! after deregistering, idempotency keys, and a table of bad input that must append nothing and leave
//! the service up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_testkit::{until_some, TestDb};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_deregister_conflict_and_idempotency() {
    let db = TestDb::new().await;
    let subjects = Subjects::random();
    let policy = PolicyConfig::default();
    let svc = common::start(&db, &subjects, &policy, common::options()).await;
    let ctx = &svc.ctx;
    let reg = subjects.cmd_node_register();
    let dereg = subjects.cmd_node_deregister();

    // given a new node, when it registers, then it is in the log on its own stream
    let body = json!({"node_id": "n1", "domain": "text", "stake": 10.5, "capacity": 4});
    let reply = common::command(ctx, &reg, body.clone()).await;
    assert_eq!(reply, json!({"ok": true, "node_id": "n1"}));
    let registered = common::of_type(&ctx.store, "NodeRegistered").await;
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0].stream_id, "node-n1");
    assert_eq!(registered[0].payload.to_value()["capacity"], 4);
    assert_eq!(
        registered[0].metadata.to_value()["producer"],
        "reputation-test"
    );

    // registering it again is a conflict and appends nothing
    let reply = common::command(ctx, &reg, body).await;
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["error"]["code"], "conflict", "{reply}");

    // with an idempotency key, a retried command returns the original answer and appends once
    let keyed = json!({"node_id": "n2", "domain": "text", "stake": 0, "capacity": 1, "idempotency_key": "k-42"});
    for _ in 0..3 {
        let reply = common::command(ctx, &reg, keyed.clone()).await;
        assert_eq!(reply, json!({"ok": true, "node_id": "n2"}));
    }
    // the same key with a different body is refused
    let reused = json!({"node_id": "n2", "domain": "vision", "stake": 0, "capacity": 1, "idempotency_key": "k-42"});
    let reply = common::command(ctx, &reg, reused).await;
    assert_eq!(reply["error"]["code"], "conflict", "{reply}");
    assert_eq!(common::of_type(&ctx.store, "NodeRegistered").await.len(), 2);

    // deregistering: unknown node, then the real one, then again (idempotent, nothing appended)
    let reply = common::command(ctx, &dereg, json!({"node_id": "ghost", "reason": "bye"})).await;
    assert_eq!(reply["error"]["code"], "unknown_node", "{reply}");
    let reply = common::command(
        ctx,
        &dereg,
        json!({"node_id": "n1", "reason": "maintenance"}),
    )
    .await;
    assert_eq!(reply, json!({"ok": true}));
    let reply = common::command(ctx, &dereg, json!({"node_id": "n1", "reason": "again"})).await;
    assert_eq!(reply, json!({"ok": true, "already_deregistered": true}));
    let deregistered = common::of_type(&ctx.store, "NodeDeregistered").await;
    assert_eq!(deregistered.len(), 1);
    assert_eq!(deregistered[0].payload.to_value()["reason"], "maintenance");

    // a deregistered node may register again (same stream, next version)
    let back = json!({"node_id": "n1", "domain": "text", "stake": 5, "capacity": 2});
    let reply = common::command(ctx, &reg, back).await;
    assert_eq!(reply, json!({"ok": true, "node_id": "n1"}));
    let n1: Vec<_> = common::log(&ctx.store)
        .await
        .into_iter()
        .filter(|e| e.stream_id == "node-n1")
        .map(|e| (e.stream_version, e.event_type))
        .collect();
    assert_eq!(
        n1,
        vec![
            (1, "NodeRegistered".to_owned()),
            (2, "NodeDeregistered".to_owned()),
            (3, "NodeRegistered".to_owned())
        ]
    );

    // the hosted projection keeps node_reputation current
    let pool = ctx.store.pool();
    let what = "node_reputation to show the new capacity";
    let rows = until_some(what, Duration::from_secs(15), || async {
        let rows: Vec<(String, String, i32)> = sqlx::query_as(
            "SELECT node_id, status, capacity FROM node_reputation ORDER BY node_id",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        rows.first().is_some_and(|r| r.2 == 2).then_some(rows)
    })
    .await;
    assert_eq!(
        rows,
        vec![
            ("n1".to_owned(), "probation".to_owned(), 2),
            ("n2".to_owned(), "probation".to_owned(), 1)
        ]
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_the_right_code_appends_nothing_and_the_service_stays_up() {
    let db = TestDb::new().await;
    let subjects = Subjects::random();
    let policy = PolicyConfig::default();
    let svc = common::start(&db, &subjects, &policy, common::options()).await;
    let ctx = &svc.ctx;
    let reg = subjects.cmd_node_register();
    let dereg = subjects.cmd_node_deregister();
    let huge = format!(
        r#"{{"node_id":"n1","domain":"{}","stake":1,"capacity":1}}"#,
        "x".repeat(600 * 1024)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (&reg, "{not json".into(), "bad_request"),
        (&reg, "".into(), "bad_request"),
        (&reg, "[1,2]".into(), "bad_request"),
        (
            &reg,
            r#"{"node_id":"n1","domain":"d","stake":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":7,"domain":"d","stake":1,"capacity":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n1","domain":"d","stake":"1","capacity":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n 1","domain":"d","stake":1,"capacity":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n/1","domain":"d","stake":1,"capacity":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            format!(
                r#"{{"node_id":"{}","domain":"d","stake":1,"capacity":1}}"#,
                "a".repeat(129)
            ),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"","domain":"d","stake":1,"capacity":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n1","domain":"","stake":1,"capacity":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n1","domain":"d","stake":-1,"capacity":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n1","domain":"d","stake":NaN,"capacity":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n1","domain":"d","stake":1e999,"capacity":1}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n1","domain":"d","stake":1,"capacity":0}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n1","domain":"d","stake":1,"capacity":-3}"#.into(),
            "bad_request",
        ),
        (
            &reg,
            r#"{"node_id":"n1","domain":"d","stake":1,"capacity":2.5}"#.into(),
            "bad_request",
        ),
        (&reg, huge, "payload_too_large"),
        (&dereg, "{oops".into(), "bad_request"),
        (&dereg, r#"{"node_id":"n1"}"#.into(), "bad_request"),
        (
            &dereg,
            r#"{"node_id":"n1","reason":5}"#.into(),
            "bad_request",
        ),
        (
            &dereg,
            r#"{"node_id":"bad id","reason":"x"}"#.into(),
            "bad_request",
        ),
        (
            &dereg,
            r#"{"node_id":"nobody","reason":"x"}"#.into(),
            "unknown_node",
        ),
    ];
    for (subject, body, code) in &cases {
        let raw = deepnode_bus::request_bytes(
            &ctx.nats,
            subject,
            bytes::Bytes::from(body.clone()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(reply["ok"], false, "{body:.80}: {reply}");
        assert_eq!(reply["error"]["code"], *code, "{body:.80}: {reply}");
        assert!(reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    assert!(
        common::log(&ctx.store).await.is_empty(),
        "bad input appended something"
    );

    // and the service still works
    common::register(ctx, "n1").await;
    assert_eq!(common::log(&ctx.store).await.len(), 1);
    svc.stop().await;
}
