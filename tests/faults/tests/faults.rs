//! The fault suite (issue 5, "Faults"): real services as child processes over real Postgres and
//! NATS, steady exec traffic and ingest reports while a fault happens, then `common::verify`'s
//! checks (acknowledged = recorded with the same outcome, nothing recorded or charged twice, every
//! dispatch classified once, no event missing or duplicated, audit clean, the events stream holding
//! every event exactly once). Tests run one at a time: nextest runs each test in its own process,
//! and `.config/nextest.toml` puts them in the test group `faults` (max-threads 1); figures are
//! printed with `--nocapture` and copied into docs/RELIABILITY.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use deepnode_sim::{Behaviour, Latency, SimNode};
use deepnode_testkit::{given, node_id as node};
use serde_json::json;

const PACE: Duration = Duration::from_millis(40);
const WORKERS: usize = 4;

async fn standard(c: &mut Cluster) -> (ServiceProc, ServiceProc, ServiceProc) {
    let rep = c.spawn("reputation");
    let rot = c.spawn("rotation");
    let sched = c.spawn("scheduler");
    c.wait_answers("reputation").await;
    c.wait_answers("rotation").await;
    c.wait_answers("scheduler").await;
    (rep, rot, sched)
}

/// 1. `kill -9` the scheduler mid-traffic and restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_killed_mid_traffic() {
    let mut c = Cluster::new(None, None).await;
    let (_rep, _rot, sched) = standard(&mut c).await;
    let sim = c.start_fleet(4).await;
    c.deploy("m-1").await;
    let traffic = Traffic::start(&c, &["m-1"], WORKERS, PACE, &FLEET_NODES);
    traffic.wait_more_ok(100, "traffic before the kill").await;

    let killed_at = Instant::now();
    sched.kill9();
    let sched = c.spawn("scheduler");
    let back = traffic
        .wait_ok_after(killed_at, "a success after the restart")
        .await;
    let recovery = back - killed_at;
    traffic.wait_more_ok(100, "traffic after the restart").await;
    let mut record = traffic.stop().await;

    // Retry every call that got no final answer, with the same request id: the recorded answer,
    // or (for an execution the kill cut short) `conflict` — never a second record.
    let unanswered: Vec<Call> = record
        .calls
        .iter()
        .filter(|c| c.acknowledged().is_none())
        .cloned()
        .collect();
    let exec_subject = c.subjects.cmd_exec();
    let retries = futures::future::join_all(unanswered.iter().map(|call| {
        exec_within(
            &c.client,
            &exec_subject,
            &call.request_id,
            &call.model_id,
            Duration::from_secs(10),
        )
    }))
    .await;
    let mut recovered = 0;
    let mut cut_short = 0;
    for retry in &retries {
        if retry.acknowledged().is_some() {
            recovered += 1;
        } else {
            assert_eq!(
                retry.code().as_deref(),
                Some("conflict"),
                "retry of {} saw {:?}",
                retry.request_id,
                retry.seen
            );
            cut_short += 1;
        }
    }
    // A sample of acknowledged calls, retried: byte-for-byte the recorded answer.
    let acked: Vec<Call> = record
        .calls
        .iter()
        .filter(|c| c.acknowledged().is_some())
        .take(50)
        .cloned()
        .collect();
    for call in &acked {
        let again = exec(
            &c.client,
            &c.subjects.cmd_exec(),
            &call.request_id,
            &call.model_id,
        )
        .await;
        assert_eq!(
            again.acknowledged(),
            call.acknowledged(),
            "{} answered differently",
            call.request_id
        );
    }
    // Retries that got a final answer count as acknowledged calls too (the `conflict` ones waited
    // out the scheduler's bounded wait and are not final answers).
    record
        .calls
        .extend(retries.into_iter().filter(|r| r.acknowledged().is_some()));
    let f = verify(&c, &record, true).await;
    assert!(
        f.orphans <= cut_short,
        "an execution left unfinished that no retry reported"
    );
    report(
        "scheduler_kill9",
        &format!(
            "unanswered at kill {}, recovered on retry {recovered}, cut short (conflict) {cut_short}, recovery {:?}",
            unanswered.len(),
            recovery
        ),
        &f,
    );
    drop(sched);
    sim.stop().await;
    c.cleanup().await;
}

/// 2 and 6. Two copies of every service; `kill -9` one reputation, one rotation and the relay holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_copies_take_over() {
    let mut c = Cluster::new(None, None).await;
    // The first scheduler copy starts alone, so its relay takes the lease.
    let sched_a = c.spawn("scheduler");
    eventually(
        "the first relay to take the lease",
        Duration::from_secs(30),
        || async { c.relay_holder().await.is_some() },
    )
    .await;
    let holder = c.relay_holder().await.unwrap();
    let rep_a = c.spawn("reputation");
    let rot_a = c.spawn("rotation");
    let mut rep_b = c.spawn("reputation");
    let mut rot_b = c.spawn("rotation");
    let mut sched_b = c.spawn("scheduler");
    for s in ["reputation", "rotation", "scheduler"] {
        c.wait_answers(s).await;
    }
    let sim = c.start_fleet(4).await;
    c.deploy("m-1").await;
    let traffic = Traffic::start(&c, &["m-1"], WORKERS, PACE, &FLEET_NODES);
    traffic.wait_more_ok(100, "traffic before the kills").await;

    let killed_at = Instant::now();
    let head_at_kill = c.head().await;
    sched_a.kill9();
    rep_a.kill9();
    rot_a.kill9();
    let takeover = eventually(
        "another relay to take the lease",
        Duration::from_secs(30),
        || async { matches!(c.relay_holder().await, Some(pid) if pid != holder) },
    )
    .await;
    eventually(
        "the new relay to pass the kill's head",
        Duration::from_secs(30),
        || async { c.checkpoint("relay").await >= head_at_kill },
    )
    .await;
    let back = traffic
        .wait_ok_after(killed_at, "a success after the kills")
        .await;
    traffic
        .wait_more_ok(100, "traffic on the surviving copies")
        .await;
    // The killed copies restart and resume from the shared checkpoints.
    let sched_a = c.spawn("scheduler");
    let rep_a = c.spawn("reputation");
    let rot_a = c.spawn("rotation");
    traffic
        .wait_more_ok(60, "traffic with the restarted copies")
        .await;
    let record = traffic.stop().await;
    let f = verify(&c, &record, true).await;
    for p in [&mut rep_b, &mut rot_b, &mut sched_b] {
        assert!(p.alive(), "a surviving {} copy died", p.service);
    }
    report(
        "second_copies",
        &format!(
            "lease takeover {takeover:?}, first success after kills {:?}",
            back - killed_at
        ),
        &f,
    );
    drop((sched_a, rep_a, rot_a));
    sim.stop().await;
    c.cleanup().await;
}

/// 3. `pg_ctl restart -m fast` of a private cluster under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load() {
    let pg = PrivatePg::start();
    let mut c = Cluster::new(Some(pg.url("deepnode_fault")), None).await;
    let (mut rep, mut rot, mut sched) = standard(&mut c).await;
    let sim = c.start_fleet(4).await;
    c.deploy("m-1").await;
    let traffic = Traffic::start(&c, &["m-1"], WORKERS, PACE, &FLEET_NODES);
    traffic
        .wait_more_ok(100, "traffic before the restart")
        .await;

    let restarted_at = Instant::now();
    let down_for = pg.restart().await;
    let back = traffic
        .wait_ok_after(restarted_at + down_for, "a success after the restart")
        .await;
    traffic.wait_more_ok(100, "traffic after the restart").await;
    let record = traffic.stop().await;
    for p in [&mut rep, &mut rot, &mut sched] {
        assert!(p.alive(), "{} exited after the Postgres restart", p.service);
    }
    let during: Vec<&Call> = record
        .calls
        .iter()
        .filter(|c| c.at >= restarted_at && c.at <= back)
        .collect();
    for call in &during {
        if let Some(code) = call.code() {
            assert!(
                call.acknowledged().is_some() || transient(&code),
                "{}: {code} during the restart",
                call.request_id
            );
        }
    }
    let f = verify(&c, &record, true).await;
    report(
        "postgres_restart",
        &format!(
            "pg_ctl restart took {down_for:?}; first success {:?} after it began; calls during {}",
            back - restarted_at,
            during.len()
        ),
        &f,
    );
    sim.stop().await;
    c.cleanup().await;
    drop((rep, rot, sched));
    drop(c);
    drop(pg);
}

/// 4. Restart a private NATS server under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_under_load() {
    let mut nats = PrivateNats::start().await;
    let mut c = Cluster::new(None, Some(nats.url())).await;
    let (mut rep, mut rot, mut sched) = standard(&mut c).await;
    let sim = c.start_fleet(4).await;
    c.deploy("m-1").await;
    let traffic = Traffic::start(&c, &["m-1"], WORKERS, PACE, &FLEET_NODES);
    traffic
        .wait_more_ok(100, "traffic before the restart")
        .await;

    let relay_before = c.checkpoint("relay").await;
    let restarted_at = Instant::now();
    let down_for = nats.restart().await;
    let back = traffic
        .wait_ok_after(restarted_at + down_for, "a success after the restart")
        .await;
    traffic.wait_more_ok(100, "traffic after the restart").await;
    let record = traffic.stop().await;
    for p in [&mut rep, &mut rot, &mut sched] {
        assert!(p.alive(), "{} exited after the NATS restart", p.service);
    }
    let f = verify(&c, &record, true).await;
    assert!(f.reports_logged > 0);
    // Our outage is not the nodes' fault: every node is healthy, so no attempt failed and no node
    // was ejected, though requests were caught in the restart.
    let held_against_nodes: Vec<(String, serde_json::Value, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as(
            "SELECT event_type, payload, recorded_at FROM events WHERE event_type IN ('AttemptFailed', 'NodeEjected')",
        )
        .fetch_all(c.store.pool())
        .await
        .unwrap();
    assert!(
        held_against_nodes.is_empty(),
        "attempts lost to our own outage were held against nodes: {held_against_nodes:?}"
    );
    let relay_resumes = c.log_count("relay lost its footing");
    report(
        "nats_restart",
        &format!("NATS away {down_for:?}; first success {:?} after the stop; relay checkpoint at stop {relay_before}; relay resumed from its checkpoint {relay_resumes} times", back - restarted_at),
        &f,
    );
    sim.stop().await;
    c.cleanup().await;
    drop((rep, rot, sched));
    drop(c);
}

/// 5. Requests caught in a NATS outage are not held against the healthy nodes serving them
/// (issue 12 item 7): their attempts are left unjudged, nothing is recorded for them, and a caller
/// that hears back is told `unavailable`, retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_caught_in_a_nats_outage_are_not_held_against_nodes() {
    let mut nats = PrivateNats::start().await;
    let mut c = Cluster::new(None, Some(nats.url())).await;
    let (mut rep, mut rot, mut sched) = standard(&mut c).await;
    // given healthy nodes that take 600 ms to answer (the attempt timeout is 1 s)
    let sim = c
        .start_fleet_of(4, Behaviour::healthy(Latency::fixed_ms(600)))
        .await;
    c.deploy("m-1").await;
    let before = sim.totals().requests;

    // when NATS goes away for 1.5 s while the nodes work on 8 requests
    let subject = c.subjects.cmd_exec();
    let ids: Vec<String> = (0..8).map(|i| format!("caught-{i}")).collect();
    let calls =
        futures::future::join_all(ids.iter().map(|id| exec(&c.client, &subject, id, "m-1")));
    let outage = async {
        eventually(
            "the nodes to hold the 8 requests",
            Duration::from_secs(10),
            || async { sim.totals().requests >= before + 8 },
        )
        .await;
        nats.stop().await;
        tokio::time::sleep(Duration::from_millis(1_500)).await; // the outage itself
        nats.start_again().await;
    };
    let (calls, ()) = tokio::join!(calls, outage);

    // then each of the 8 attempts is left unjudged: not a failure, no ejection, nothing recorded
    eventually(
        "the scheduler to settle the 8 attempts",
        Duration::from_secs(20),
        || async { c.log_count("attempt not held against the node") >= 8 },
    )
    .await;
    let caught: Vec<(String, String)> = sqlx::query_as(
        "SELECT stream_id, event_type FROM events
          WHERE stream_id LIKE 'exec-caught-%' OR event_type IN ('AttemptFailed', 'NodeEjected')",
    )
    .fetch_all(c.store.pool())
    .await
    .unwrap();
    assert!(caught.is_empty(), "{caught:?}");
    for call in &calls {
        if let Seen::Reply(reply) = &call.seen {
            assert_eq!(reply["error"]["code"], json!("unavailable"), "{reply}");
            assert_eq!(reply["retryable"], json!(true), "{reply}");
            assert_eq!(reply["charged"], json!(false), "{reply}");
        }
    }
    // and once the nodes are back, sending a caught request again runs it (nothing was recorded
    // for it, so the retry is its one story)
    eventually(
        "a caught request to run when sent again",
        Duration::from_secs(20),
        || async {
            matches!(exec(&c.client, &subject, "caught-0", "m-1").await.seen,
            Seen::Reply(r) if r["ok"] == json!(true))
        },
    )
    .await;
    for p in [&mut rep, &mut rot, &mut sched] {
        assert!(p.alive(), "{} exited after the NATS outage", p.service);
    }
    sim.stop().await;
    c.cleanup().await;
    drop((rep, rot, sched));
    drop(c);
}

/// 6. Nodes that hang forever, answer twice, answer after their timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_nodes_classified_once() {
    let mut c = Cluster::new(None, None).await;
    let healthy = Behaviour::healthy(Latency::fixed_ms(2));
    let nodes = vec![
        SimNode::new(node("n-hang"), "text").with_behaviour(Behaviour::always_timeout()),
        SimNode::new(node("n-twice"), "text").with_behaviour(Behaviour {
            answers_twice: true,
            ..healthy.clone()
        }),
        SimNode::new(node("n-late"), "text").with_behaviour(Behaviour {
            answers_late: Some(Duration::from_millis(EXEC_TIMEOUT_MS + 300)),
            ..healthy.clone()
        }),
        SimNode::new(node("n-good"), "text").with_behaviour(healthy),
    ];
    let given = given(&c.store);
    for n in &nodes {
        given.node(n.node_id.as_str(), 64).await;
    }
    let models: [(&str, &[&str]); 4] = [
        ("m-hang", &["n-hang"]),
        ("m-twice", &["n-twice"]),
        ("m-late", &["n-late"]),
        ("m-mix", &["n-hang", "n-late", "n-good"]),
    ];
    for (model, on) in models {
        given.deployment(model, on).await;
    }
    let sim = c.start_nodes(nodes).await;
    let sched = c.spawn("scheduler");
    c.wait_answers("scheduler").await;
    let traffic = Traffic::start(
        &c,
        &["m-hang", "m-twice", "m-late", "m-mix"],
        WORKERS,
        Duration::from_millis(20),
        &[],
    );
    eventually(
        "every misbehaviour to be exercised",
        Duration::from_secs(60),
        || async {
            let t = sim.totals();
            t.late >= 5 && t.duplicates >= 5 && t.timeouts >= 5 && traffic.calls().len() >= 80
        },
    )
    .await;
    let record = traffic.stop().await;
    let totals = sim.totals();
    sim.stop().await;

    // Per node: every dispatch to the hanging or late node is classified `timeout`, exactly once;
    // the twice-answering node's attempts succeed once each.
    let outcomes: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT payload->>'node_id', CASE event_type WHEN 'AttemptSucceeded' THEN 'success' ELSE payload->>'outcome' END, count(*)
           FROM events WHERE event_type IN ('AttemptSucceeded','AttemptFailed') GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(c.store.pool())
    .await
    .unwrap();
    let dispatched: Vec<(String, i64)> = sqlx::query_as(
        "SELECT payload->>'node_id', count(*) FROM events WHERE event_type = 'AttemptDispatched' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(c.store.pool())
    .await
    .unwrap();
    for (n, d) in &dispatched {
        let settled: i64 = outcomes
            .iter()
            .filter(|(m, _, _)| m == n)
            .map(|(_, _, k)| k)
            .sum();
        assert_eq!(
            settled, *d,
            "{n}: {settled} classifications for {d} dispatches"
        );
    }
    for (n, outcome, _) in &outcomes {
        match n.as_str() {
            "n-hang" | "n-late" => assert_eq!(outcome, "timeout", "{n}"),
            "n-twice" => assert_eq!(outcome, "success", "{n}"),
            _ => {}
        }
    }
    for call in &record.calls {
        if call.model_id == "m-twice" {
            assert!(
                call.acknowledged()
                    .map(|v| v["ok"] == json!(true))
                    .unwrap_or(false),
                "m-twice: {:?}",
                call.seen
            );
        }
        if call.model_id == "m-hang" || call.model_id == "m-late" {
            assert_eq!(
                call.code().as_deref(),
                Some("all_replicas_failed"),
                "{}: {:?}",
                call.model_id,
                call.seen
            );
        }
    }
    let f = verify(&c, &record, false).await;
    report(
        "misbehaving_nodes",
        &format!(
            "node answers: late {}, duplicate {}, never {}; classifications {outcomes:?}",
            totals.late, totals.duplicates, totals.timeouts
        ),
        &f,
    );
    drop(sched);
    c.cleanup().await;
}
