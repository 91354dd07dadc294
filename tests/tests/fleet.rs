//! End to end over real Postgres and NATS: the relay, reputation, rotation and two scheduler copies
//! in-process on a fresh database and a random prefix; eight simulated nodes registered through
//! `cmd.node.register` (one never answers, one answers garbage); models placed through
//! `cmd.model.deploy`; 500 `cmd.exec` requests. Then: every request answered; a failed primary
//! served by the backup; both replicas failing answers `all_replicas_failed`, `charged: false`, and
//! `executions.charged = false`; the bad nodes end below the good ones in `node_reputation`; a
//! repeated `request_id` and a repeated ingest `event_id` add nothing; no request is recorded twice
//! by the two scheduler copies; and the audit (chain + every projection recomputed) is clean.
//!
//! Both replicas failing is produced deterministically with `timeout_ms: 1` against nodes that take
//! at least 5 ms, because placement (the rotation service's choice) decides which nodes share a
//! model; the always-bad nodes still fail whenever routing picks them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::ids::NodeId;
use deepnode_e2e::Cluster;
use deepnode_sim::{Behaviour, Latency, Sim, SimConfig, SimNode};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

const GOOD: [&str; 6] = ["n-0", "n-1", "n-2", "n-3", "n-4", "n-5"];
const TIMEOUT_NODE: &str = "n-timeout";
const INVALID_NODE: &str = "n-invalid";
const REQUESTS: usize = 500;
/// Requests at the end with `timeout_ms: 1`: both replicas time out.
const DOOMED: usize = 5;

fn fleet() -> SimConfig {
    let healthy = Behaviour::healthy(Latency::Uniform {
        min: Duration::from_millis(5),
        max: Duration::from_millis(15),
    });
    let mut nodes: Vec<SimNode> = GOOD
        .iter()
        .map(|id| SimNode::new(NodeId::parse(id).unwrap(), "text").with_behaviour(healthy.clone()))
        .collect();
    nodes.push(
        SimNode::new(NodeId::parse(TIMEOUT_NODE).unwrap(), "text")
            .with_behaviour(Behaviour::always_timeout()),
    );
    nodes.push(
        SimNode::new(NodeId::parse(INVALID_NODE).unwrap(), "text")
            .with_behaviour(Behaviour::always_invalid()),
    );
    for node in &mut nodes {
        node.capacity = 64;
    }
    SimConfig {
        nodes,
        seed: 11,
        register: true,
        register_timeout: Duration::from_secs(20),
        ..SimConfig::default()
    }
}

fn attempts(reply: &Value) -> Vec<Value> {
    reply["attempts"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_of_eight_end_to_end() {
    let mut cluster = Cluster::new(PolicyConfig::default()).await.unwrap();
    cluster.start_reputation().await.unwrap();
    cluster.start_rotation().await.unwrap();
    cluster.start_scheduler("scheduler-a").await.unwrap();
    cluster.start_scheduler("scheduler-b").await.unwrap();

    // Eight nodes, registered through the command subject; registering again is a conflict (fine).
    let sim = Sim::start(cluster.client.clone(), cluster.subjects.clone(), fleet())
        .await
        .unwrap();
    let again = cluster
        .request(
            &cluster.subjects.cmd_node_register(),
            &json!({"node_id": "n-0", "domain": "text", "stake": 100.0, "capacity": 64}),
        )
        .await
        .unwrap();
    assert_eq!(again["error"]["code"], "conflict", "{again}");

    // Models placed by the rotation service: one on every node, two on a pair each.
    let mut placed = BTreeMap::new();
    for (model, replicas) in [("m-all", 8), ("m-a", 2), ("m-b", 2)] {
        let reply = cluster
            .request(
                &cluster.subjects.cmd_model_deploy(),
                &json!({"model_id": model, "domain": "text", "replicas": replicas}),
            )
            .await
            .unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
        let nodes: Vec<String> = reply["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["node_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(nodes.len(), replicas, "{reply}");
        placed.insert(model, nodes);
    }

    // 500 requests, 32 at a time, over both scheduler copies; the last few doomed.
    let subject = cluster.subjects.cmd_exec();
    let requests: Vec<(String, Value)> = (0..REQUESTS)
        .map(|i| {
            let model = ["m-all", "m-all", "m-all", "m-a", "m-b"][i % 5];
            let id = format!("e2e-{i:04}");
            let body =
                json!({"request_id": id, "model_id": model, "input": {"n": i}, "timeout_ms": 200});
            (id, body)
        })
        .collect();
    let (normal, doomed) = requests.split_at(REQUESTS - DOOMED);
    let client = cluster.client.clone();
    let mut replies: BTreeMap<String, Value> = stream::iter(normal.iter().cloned())
        .map(|(id, body)| {
            let (client, subject) = (client.clone(), subject.clone());
            async move {
                let reply =
                    deepnode_bus::request_json(&client, &subject, &body, Duration::from_secs(30))
                        .await
                        .unwrap_or_else(|e| panic!("{id} not answered: {e}"));
                (id, reply)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    // A fresh second of retry budget (the schedulers' clock moved on), then requests that no
    // replica can answer in 1 ms.
    cluster.clock.advance(Duration::from_millis(1_100));
    for (id, body) in doomed {
        let mut body = body.clone();
        body["model_id"] = json!("m-all");
        body["timeout_ms"] = json!(1);
        let reply = cluster.request(&subject, &body).await.unwrap();
        replies.insert(id.clone(), reply);
    }

    // Every request answered with a well-formed envelope.
    assert_eq!(replies.len(), REQUESTS);
    for (id, reply) in &replies {
        assert!(reply["ok"].is_boolean(), "{id}: {reply}");
    }
    let succeeded = replies.values().filter(|r| r["ok"] == true).count();
    assert!(succeeded >= REQUESTS / 2, "only {succeeded} succeeded");

    // A failed primary served by the backup.
    let fallback = replies.values().find(|r| {
        let a = attempts(r);
        r["ok"] == true
            && a.len() == 2
            && a[0]["role"] == "primary"
            && a[0]["outcome"] != "success"
            && a[1]["role"] == "backup"
            && a[1]["outcome"] == "success"
    });
    let fallback = fallback.unwrap_or_else(|| {
        panic!(
            "no request was served by the backup; placement {placed:?}; sample {:?}",
            replies.values().take(3).collect::<Vec<_>>()
        )
    });
    assert_eq!(fallback["charged"], true);
    assert_eq!(fallback["node_id"], attempts(fallback)[1]["node_id"]);

    // Both replicas failing: all_replicas_failed, not charged.
    let both_failed: Vec<(&String, &Value)> = replies
        .iter()
        .filter(|(_, r)| r["ok"] == false && attempts(r).len() == 2)
        .collect();
    assert!(
        !both_failed.is_empty(),
        "no request failed on both replicas"
    );
    for (id, reply) in &both_failed {
        assert_eq!(
            reply["error"]["code"], "all_replicas_failed",
            "{id}: {reply}"
        );
        assert_eq!(reply["charged"], false, "{id}: {reply}");
    }
    for (_, reply) in replies.iter().filter(|(_, r)| r["ok"] == false) {
        assert_eq!(reply["charged"], false, "{reply}");
    }

    // A repeated request_id returns the recorded answer and appends nothing.
    let (dup_id, dup_body) = &normal[0];
    let stream_len = |id: String| {
        let pool = cluster.store.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE stream_id = $1")
                .bind(format!("exec-{id}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = stream_len(dup_id.clone()).await;
    let repeated = cluster.request(&subject, dup_body).await.unwrap();
    assert_eq!(repeated["ok"], replies[dup_id]["ok"], "{repeated}");
    assert_eq!(
        repeated["node_id"], replies[dup_id]["node_id"],
        "{repeated}"
    );
    assert_eq!(stream_len(dup_id.clone()).await, before);

    // A repeated ingest event_id is logged once: twice with the same Nats-Msg-Id (the stream drops
    // the copy) and once more under another message id (the service must see it is the same event).
    let event_id = uuid::Uuid::new_v4();
    let report = json!({
        "event_id": event_id, "request_id": "outside-1", "model_id": "m-all", "node_id": "n-0",
        "outcome": "success", "latency_ms": 12, "occurred_at": chrono::Utc::now().to_rfc3339(),
    });
    let payload = Bytes::from(report.to_string());
    let ingest = cluster.subjects.ingest_execution();
    let js = async_nats::jetstream::new(cluster.client.clone());
    for msg_id in [
        event_id.to_string(),
        event_id.to_string(),
        uuid::Uuid::new_v4().to_string(),
    ] {
        deepnode_bus::jetstream::publish_with_id(&js, &ingest, &msg_id, payload.clone())
            .await
            .unwrap();
    }
    let stats = cluster.reputation_stats.clone();
    let handled = || {
        deepnode_reputation::Stats::get(&stats.ingested)
            + deepnode_reputation::Stats::get(&stats.ingest_duplicates)
    };
    deepnode_testkit::eventually(
        "ingest handled both reports",
        Duration::from_secs(20),
        || std::future::ready(handled() >= 2),
    )
    .await;
    let reported: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(cluster.store.pool())
        .await
        .unwrap();
    assert_eq!(
        reported, 1,
        "the ingested event must be logged exactly once"
    );

    // Let penalties land and the projection reach the head.
    cluster.settle(Duration::from_secs(60)).await.unwrap();

    // Two scheduler copies: each request recorded once, and settled once.
    let pool = cluster.store.pool();
    let twice: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stream_id, count(*) FROM events WHERE stream_id LIKE 'exec-%' AND event_type IN ('ExecutionRequested', 'ExecutionCompleted', 'ExecutionFailed') GROUP BY stream_id HAVING count(*) <> 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        twice.is_empty(),
        "requests not recorded exactly once: {twice:?}"
    );
    let producers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT metadata->>'producer' FROM events WHERE event_type = 'ExecutionRequested' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        producers,
        ["scheduler-a", "scheduler-b"],
        "both copies served"
    );

    // The executions projection agrees with the replies.
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT request_id, status, charged FROM executions WHERE request_id LIKE 'e2e-%'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), REQUESTS);
    for (id, status, charged) in &rows {
        let ok = replies[id]["ok"] == true;
        assert_eq!(*charged, ok, "{id}: executions.charged vs reply");
        assert_eq!(status, if ok { "succeeded" } else { "failed" }, "{id}");
    }
    for (id, _) in &both_failed {
        assert!(rows.iter().any(|(r, _, charged)| r == *id && !charged));
    }

    // The bad nodes end below every good one.
    let scores: BTreeMap<String, (f64, i64)> = sqlx::query_as::<_, (String, f64, i64)>(
        "SELECT node_id, score, successes + errors + timeouts + invalid_outputs FROM node_reputation",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, score, seen)| (id, (score, seen)))
    .collect();
    assert_eq!(scores.len(), 8, "{scores:?}");
    let worst_good = GOOD
        .iter()
        .map(|n| scores[*n].0)
        .fold(f64::INFINITY, f64::min);
    // Routing explores by seeded tie-breaks only while scores are equal, so which of `m-all`'s eight
    // replicas get early traffic depends on when outcomes reach each scheduler copy's view: a bad
    // node may never be routed to (it then keeps its prior, 0.5). Each bad node that was tried ends
    // below every good one, and routing tried at least one.
    let tried: Vec<&str> = [TIMEOUT_NODE, INVALID_NODE]
        .into_iter()
        .filter(|bad| scores[*bad].1 > 0)
        .collect();
    assert!(!tried.is_empty(), "no bad node was ever tried: {scores:?}");
    for bad in tried {
        let (score, _) = scores[bad];
        assert!(
            score < worst_good,
            "{bad} ({score}) not below every good node ({worst_good}): {scores:?}"
        );
    }

    sim.stop().await;
    cluster.settle(Duration::from_secs(30)).await.unwrap();
    cluster.stop().await.unwrap();

    // The audit: chain intact, every projection equal to the fold of the log.
    let report = deepnode_projections::audit(&cluster.store, &cluster.policy, |_| {})
        .await
        .unwrap();
    assert!(report.is_clean(), "audit found differences: {report:?}");
}

/// POLICY "Ejection": a model whose only eligible replica keeps failing gets an emergency
/// re-placement now, not at the next rotation epoch (the rotation service here runs no periodic
/// rounds at all, so only the scheduler's request can start one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_left_with_one_failing_replica_is_re_placed_at_once() {
    let mut cluster = Cluster::with_services(PolicyConfig::default())
        .await
        .unwrap();
    let node = |id: &str, behaviour: Behaviour| {
        let mut n = SimNode::new(NodeId::parse(id).unwrap(), "text").with_behaviour(behaviour);
        n.capacity = 8;
        n
    };
    let config = |nodes| SimConfig {
        nodes,
        seed: 3,
        register: true,
        register_timeout: Duration::from_secs(20),
        ..SimConfig::default()
    };
    let healthy = || Behaviour::healthy(Latency::fixed_ms(1));

    // given m-1 on `a` and `b` only, then a spare `c`
    let pair = Sim::start(
        cluster.client.clone(),
        cluster.subjects.clone(),
        config(vec![
            node("a", healthy()),
            node("b", Behaviour::always_error()),
        ]),
    )
    .await
    .unwrap();
    let deploy = json!({"model_id": "m-1", "domain": "text", "replicas": 2});
    let reply = cluster
        .request(&cluster.subjects.cmd_model_deploy(), &deploy)
        .await
        .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let spare = Sim::start(
        cluster.client.clone(),
        cluster.subjects.clone(),
        config(vec![node("c", healthy())]),
    )
    .await
    .unwrap();
    // and `a` leaving the network: `b`, which fails every request, is the only eligible replica
    let reply = cluster
        .request(
            &cluster.subjects.cmd_node_deregister(),
            &json!({"node_id": "a", "reason": "maintenance"}),
        )
        .await
        .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");

    // when requests keep failing on `b` (which may not be ejected: it is the last healthy replica)
    let replicas = |cluster: &Cluster| {
        let pool = cluster.store.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT node_id FROM deployments WHERE model_id = 'm-1' ORDER BY node_id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while !replicas(&cluster).await.contains(&"c".to_owned()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "m-1 was not re-placed: {:?}",
            replicas(&cluster).await
        );
        let body = json!({"request_id": format!("em-{i}"), "model_id": "m-1", "input": i});
        cluster
            .request(&cluster.subjects.cmd_exec(), &body)
            .await
            .unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // then rotation moved `a`'s replica to `c`, and requests are served again
    assert_eq!(replicas(&cluster).await, ["b", "c"]);
    let served = loop {
        let body = json!({"request_id": format!("em-{i}"), "model_id": "m-1", "input": i});
        let reply = cluster
            .request(&cluster.subjects.cmd_exec(), &body)
            .await
            .unwrap();
        i += 1;
        if reply["ok"] == true || tokio::time::Instant::now() > deadline {
            break reply;
        }
    };
    assert_eq!(served["node_id"], "c", "{served}");

    pair.stop().await;
    spare.stop().await;
    cluster.stop().await.unwrap();
}
