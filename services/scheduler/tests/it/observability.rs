//! Observability against real Postgres and NATS: after exec traffic the scraped `/metrics` counters
//! agree with the `executions` projection (folded here with the same `BookProjection` the reputation
//! service hosts); the correlation id of a request reaches the node's infer request and every event's
//! metadata; the admin views (V4) return their documented columns on that populated database; and
//! `/readyz` turns 503 while the database refuses connections (or lags, or misses a migration) and
//! 200 again after.
//!
//! The Prometheus recorder is process-wide, so only one test in this binary sends exec traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{node, test_policy, Harness};
use deepnode_bus::rpc::CORRELATION_HEADER;
use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_projections::BookProjection;
use deepnode_runtime::observability::{self, ObservabilityOptions};
use deepnode_runtime::{ServiceContext, Shutdown};
use deepnode_sim::{Behaviour, Latency, SimNode};
use deepnode_store::{EventStore, ProjectionRunner};
use deepnode_testkit::{base_database_url, nats_url, with_database, TestDb};
use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::{Column, Connection, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on the listener: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap();
    (status, body)
}

/// Sum of every sample of `name` whose labels contain all of `labels` (`k="v"` pairs).
pub(crate) fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn context(
    store: EventStore,
    nats: async_nats::Client,
    subjects: Subjects,
    policy: PolicyConfig,
) -> ServiceContext {
    ServiceContext::new(store, nats, subjects, policy, "observability-test")
}

async fn start_listener(ctx: &ServiceContext, gate_on: &[&str], shutdown: &Shutdown) -> SocketAddr {
    let options = ObservabilityOptions::on("127.0.0.1:0".parse().unwrap(), gate_on);
    observability::start(ctx, options, shutdown.clone())
        .await
        .unwrap()
        .local_addr
        .unwrap()
}

fn sim(id: &str, behaviour: Behaviour) -> SimNode {
    SimNode::new(node(id), "text").with_behaviour(behaviour)
}

/// The columns README.md's "Admin views" section documents, in order.
fn documented_columns() -> BTreeMap<&'static str, Vec<&'static str>> {
    BTreeMap::from([
        (
            "v_node_ranking",
            vec![
                "rank",
                "node_id",
                "domain",
                "score",
                "tier",
                "deployments",
                "status",
                "in_flight",
                "capacity",
                "load",
                "failure_rate",
                "observations",
                "stake",
                "slashed_amount",
                "updated_at",
            ],
        ),
        (
            "v_model_health",
            vec![
                "model_id",
                "node_id",
                "tier",
                "assigned_at",
                "status",
                "score",
                "serving",
                "replicas",
                "serving_replicas",
                "last_failure_at",
                "last_failure_outcome",
                "last_failure_detail",
            ],
        ),
        (
            "v_charges_by_hour",
            vec![
                "hour",
                "model_id",
                "charged",
                "not_charged",
                "executions",
                "not_charged_ratio",
            ],
        ),
        (
            "v_recent_decisions",
            vec![
                "global_position",
                "occurred_at",
                "request_id",
                "model_id",
                "attempt",
                "role",
                "dispatched_to",
                "candidate",
                "candidate_rank",
                "healthy",
                "score",
                "reputation",
                "load",
                "failure_rate",
                "stake",
                "in_flight",
                "weights",
                "stake_enabled",
                "emergency_replacement",
                "config_hash",
                "correlation_id",
            ],
        ),
    ])
}

#[tokio::test]
async fn metrics_match_the_executions_table_and_views_answer() {
    let mut h = Harness::new().await;
    // m-ok: both healthy. m-fall: the primary errors, the backup answers. m-bad: both fail.
    // m-twice: its nodes answer every request twice (the second answer is late: ignored, counted).
    for (model, first, second) in [
        ("m-ok", "a", "b"),
        ("m-fall", "c", "d"),
        ("m-bad", "e", "f"),
        ("m-twice", "t1", "t2"),
    ] {
        h.given().node(first, 64).await;
        h.given().node(second, 64).await;
        h.given().deployment(model, &[first, second]).await;
        h.boost(first, 5).await;
    }
    let healthy = || Behaviour::healthy(Latency::fixed_ms(0));
    h.start_sim(vec![
        sim("a", healthy()),
        sim("b", healthy()),
        sim("c", Behaviour::always_error()),
        sim("d", healthy()),
        sim("e", Behaviour::always_error()),
        sim("f", Behaviour::always_invalid()),
        sim(
            "t1",
            Behaviour {
                answers_twice: true,
                ..healthy()
            },
        ),
        sim(
            "t2",
            Behaviour {
                answers_twice: true,
                ..healthy()
            },
        ),
    ])
    .await;
    let shutdown = Shutdown::new();
    let nats = async_nats::connect(nats_url()).await.unwrap();
    let ctx = context(h.db.store().await, nats, h.subjects.clone(), test_policy());
    let addr = start_listener(&ctx, &[], &shutdown).await;
    h.start_scheduler(test_policy(), "scheduler").await;

    let mut n = 0;
    for (model, count) in [("m-ok", 6), ("m-fall", 4), ("m-bad", 3), ("m-twice", 2)] {
        for _ in 0..count {
            n += 1;
            h.exec(json!({"request_id": format!("r-{n}"), "model_id": model, "input": {"n": n}}))
                .await;
        }
    }
    // A repeated request id and a malformed request: neither is a new execution.
    h.exec(json!({"request_id": "r-1", "model_id": "m-ok", "input": {"n": 1}}))
        .await;
    h.exec(json!({"model_id": "m-ok"})).await;

    // Fold the log into the executions table, as the reputation service does.
    ProjectionRunner::new(h.store.pool().clone(), BookProjection::new(&test_policy()))
        .run_to_head()
        .await
        .unwrap();
    let (succeeded, failed, attempts, fallbacks): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'succeeded' AND charged),
                count(*) FILTER (WHERE status = 'failed' AND NOT charged),
                COALESCE(sum(attempts), 0)::bigint,
                count(*) FILTER (WHERE attempts = 2)
           FROM executions WHERE request_id LIKE 'r-%'",
    )
    .fetch_one(h.store.pool())
    .await
    .unwrap();
    assert_eq!(succeeded + failed, 15, "every request recorded once");
    assert!(succeeded > 0 && failed > 0 && fallbacks > 0);

    // Each m-twice request got a second answer after its attempt had been settled. (The repeated
    // r-1 asks its node too, and may add one: a node slower than the scheduler's log check is
    // abandoned when the check finds the recorded answer, so its answer finds no one waiting.)
    let what = "two late answers counted on /metrics";
    let (status, text) = deepnode_testkit::until_some(what, Duration::from_secs(5), || async {
        let (status, text) = get(addr, "/metrics").await;
        (sample_sum(&text, "deepnode_exec_late_answers_total", &[]) >= 2.0)
            .then_some((status, text))
    })
    .await;
    assert_eq!(status, 200);
    let late = sample_sum(&text, "deepnode_exec_late_answers_total", &[]) as i64;
    assert!((2..=3).contains(&late), "late answers counted: {late}");
    let metric = |name: &str, labels: &[(&str, &str)]| sample_sum(&text, name, labels) as i64;
    assert_eq!(
        metric("deepnode_exec_requests_total", &[("outcome", "charged")]),
        succeeded
    );
    assert_eq!(
        metric(
            "deepnode_exec_requests_total",
            &[("outcome", "not_charged")]
        ),
        failed
    );
    assert_eq!(metric("deepnode_exec_not_charged_total", &[]), failed);
    assert_eq!(
        metric("deepnode_exec_requests_total", &[("outcome", "replayed")]),
        1
    );
    assert_eq!(
        metric(
            "deepnode_exec_requests_total",
            &[("outcome", "bad_request")]
        ),
        1
    );
    // The repeated r-1's attempt counts when its node answered before the log check (then its
    // record conflicts and returns the recorded answer), not when the check abandoned it.
    let counted = metric("deepnode_exec_attempts_total", &[]);
    assert!(
        counted == attempts || counted == attempts + 1,
        "attempts counted {counted}, recorded {attempts}"
    );
    assert_eq!(metric("deepnode_exec_fallbacks_total", &[]), fallbacks);
    // Per node and outcome too (c, m-fall's failing primary, may be ejected after a few failures).
    let c_errors: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'AttemptFailed'
            AND payload->>'node_id' = 'c' AND payload->>'outcome' = 'error'",
    )
    .fetch_one(h.store.pool())
    .await
    .unwrap();
    assert!(c_errors > 0);
    assert_eq!(
        metric(
            "deepnode_exec_attempts_total",
            &[("node_id", "c"), ("outcome", "error")]
        ),
        c_errors
    );
    // The latency histogram counts every request it timed; appends were measured.
    assert_eq!(metric("deepnode_exec_latency_seconds_count", &[]), 17);
    assert!(text.contains("deepnode_exec_latency_seconds_bucket{outcome=\"charged\",le=\"0.005\"}"));
    assert!(metric("deepnode_store_append_seconds_count", &[]) > 0);
    assert!(metric("deepnode_store_append_batch_events_count", &[]) > 0);

    // The correlation id travels: request header → node infer header → every event's metadata.
    h.given().node("g", 64).await;
    h.given().node("k", 64).await;
    h.given().deployment("m-corr", &["g", "k"]).await;
    h.boost("g", 5).await;
    // The scheduler folds the log asynchronously: wait until it ranks both new replicas.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let decision = h.schedule(json!({"model_id": "m-corr"})).await;
        if decision["candidates"].as_array().map_or(0, Vec::len) == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "scheduler never saw both replicas: {decision}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut infer = h
        .client
        .subscribe(h.subjects.node_infer(&node("g")))
        .await
        .unwrap();
    let mut k_infer = h
        .client
        .subscribe(h.subjects.node_infer(&node("k")))
        .await
        .unwrap();
    let node_side = {
        let client = h.client.clone();
        tokio::spawn(async move {
            let msg = tokio::select! {
                m = infer.next() => m.unwrap(),
                m = k_infer.next() => m.unwrap(),
            };
            client
                .publish(msg.reply.clone().unwrap(), r#"{"output":"ok"}"#.into())
                .await
                .unwrap();
            client.flush().await.unwrap();
            msg.headers
                .and_then(|h| h.get(CORRELATION_HEADER).map(|v| v.as_str().to_owned()))
        })
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(CORRELATION_HEADER, "corr-obs-1");
    let reply = h
        .client
        .request_with_headers(
            h.subjects.cmd_exec(),
            headers,
            json!({"request_id": "corr-1", "model_id": "m-corr", "input": {}})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let seen = tokio::time::timeout(Duration::from_secs(5), node_side)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.as_deref(), Some("corr-obs-1"));
    let events = h.stream("corr-1").await;
    assert_eq!(events.len(), 4);
    for (event_type, _, metadata) in &events {
        assert_eq!(metadata["correlation_id"], "corr-obs-1", "{event_type}");
    }

    // The admin views answer with their documented columns on this populated database.
    ProjectionRunner::new(h.store.pool().clone(), BookProjection::new(&test_policy()))
        .run_to_head()
        .await
        .unwrap();
    for (view, columns) in documented_columns() {
        let rows = sqlx::query(&format!("SELECT * FROM {view} LIMIT 5"))
            .fetch_all(h.store.pool())
            .await
            .unwrap();
        assert!(!rows.is_empty(), "{view} has rows");
        let names: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
        assert_eq!(names, columns, "{view}");
    }
    let (charged, not_charged): (i64, i64) = sqlx::query_as(
        "SELECT sum(charged)::bigint, sum(not_charged)::bigint FROM v_charges_by_hour",
    )
    .fetch_one(h.store.pool())
    .await
    .unwrap();
    assert_eq!((charged, not_charged), (succeeded + 1, failed));
    let (rank, tier, load): (i64, Option<String>, f64) =
        sqlx::query_as("SELECT rank, tier, load FROM v_node_ranking WHERE node_id = 'a'")
            .fetch_one(h.store.pool())
            .await
            .unwrap();
    assert!(rank >= 1);
    assert_eq!(tier.as_deref(), Some("top"));
    assert_eq!(load, 0.0);
    let (outcome, serving): (Option<String>, i64) = sqlx::query_as(
        "SELECT last_failure_outcome, serving_replicas FROM v_model_health
          WHERE model_id = 'm-fall' AND node_id = 'c'",
    )
    .fetch_one(h.store.pool())
    .await
    .unwrap();
    assert_eq!(outcome.as_deref(), Some("error"));
    assert_eq!(serving, 2);
    let candidates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM v_recent_decisions
          WHERE request_id = 'corr-1' AND correlation_id = 'corr-obs-1' AND score > 0",
    )
    .fetch_one(h.store.pool())
    .await
    .unwrap();
    assert_eq!(candidates, 2, "one row per ranked candidate");

    shutdown.cancel();
    h.stop().await;
}

async fn admin() -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&with_database(&base_database_url(), "postgres"))
        .await
        .unwrap()
}

async fn wait_status(addr: SocketAddr, want: u16) -> Value {
    let mut last = (0, String::new());
    for _ in 0..100 {
        last = get(addr, "/readyz").await;
        if last.0 == want {
            return serde_json::from_str(&last.1).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered {want}; last {} {}", last.0, last.1);
}

#[tokio::test]
async fn readyz_follows_postgres_migrations_and_lag() {
    let db = TestDb::new().await;
    let nats = async_nats::connect(nats_url()).await.unwrap();
    let store = db.store().await;
    let ctx = context(
        store.clone(),
        nats,
        Subjects::random(),
        PolicyConfig::default(),
    );
    let shutdown = Shutdown::new();
    let addr = start_listener(&ctx, &["relay"], &shutdown).await;

    assert_eq!(get(addr, "/healthz").await.0, 200);
    let ready = wait_status(addr, 200).await;
    assert_eq!(ready["ready"], true);
    assert_eq!(get(addr, "/nope").await.0, 404);

    // Postgres refuses connections (as if stopped): unready, naming Postgres; alive all the same.
    let mut admin = admin().await;
    sqlx::query(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS false",
        db.name()
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    db.kill_connections().await;
    let unready = wait_status(addr, 503).await;
    assert_eq!(unready["ready"], false);
    assert_eq!(unready["checks"]["postgres"]["ok"], false, "{unready}");
    assert!(
        unready["reason"].as_str().unwrap().starts_with("postgres:"),
        "{unready}"
    );
    assert_eq!(get(addr, "/healthz").await.0, 200);

    sqlx::query(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS true",
        db.name()
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    wait_status(addr, 200).await;

    // A database behind this binary's migrations is not ready.
    let latest = deepnode_store::latest_known_version();
    sqlx::query("DELETE FROM refinery_schema_history WHERE version = $1")
        .bind(latest)
        .execute(store.pool())
        .await
        .unwrap();
    let behind = wait_status(addr, 503).await;
    assert_eq!(behind["checks"]["migrations"]["ok"], false, "{behind}");

    // A gated checkpoint lagging beyond the bound is not ready either.
    let options = ObservabilityOptions {
        max_lag: 0,
        ..ObservabilityOptions::on("127.0.0.1:0".parse().unwrap(), &["relay"])
    };
    let strict = observability::start(&ctx, options, shutdown.clone())
        .await
        .unwrap()
        .local_addr
        .unwrap();
    let event = deepnode_testkit::event("NodeDeregistered", json!({"node_id": "x", "reason": "t"}));
    store
        .append(
            &deepnode_store::StreamId::parse("node-x").unwrap(),
            deepnode_store::ExpectedVersion::Any,
            vec![event],
        )
        .await
        .unwrap();
    let lagging = wait_status(strict, 503).await;
    assert_eq!(lagging["checks"]["lag"]["ok"], false, "{lagging}");

    shutdown.cancel();
}
