//! `cmd.exec` against real Postgres and NATS with simulated nodes: the happy path, failover for each
//! kind of primary failure, both replicas failing, duplicate request ids, two scheduler copies in
//! one queue group, late and duplicated node answers, ejection, and the store being away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{node, test_policy, Harness};
use deepnode_domain::events::{DomainEvent, Metadata};
use deepnode_domain::log::ExpectedVersion;
use deepnode_sim::{Behaviour, Latency, SimNode};
use serde_json::{json, Value};

fn sim(id: &str, behaviour: Behaviour) -> SimNode {
    SimNode::new(node(id), "text").with_behaviour(behaviour)
}

fn healthy() -> Behaviour {
    Behaviour::healthy(Latency::fixed_ms(0))
}

fn attempts(reply: &Value) -> Vec<(String, String, String)> {
    reply["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["node_id"].as_str().unwrap().to_owned(),
                a["role"].as_str().unwrap().to_owned(),
                a["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn att(node: &str, role: &str, outcome: &str) -> (String, String, String) {
    (node.into(), role.into(), outcome.into())
}

/// Two replicas of `model`: `first` ranks first (boosted), `second` is the backup.
async fn pair(h: &Harness, model: &str, first: &str, second: &str) {
    h.given().node(first, 64).await;
    h.given().node(second, 64).await;
    h.given().deployment(model, &[first, second]).await;
    h.boost(first, 5).await;
}

#[tokio::test]
async fn a_recorded_reply_carries_a_receipt_of_its_deciding_event_signed_by_the_log_key() {
    use deepnode_domain::merkle;
    use deepnode_domain::note::{receipt_text, NoteSigner};
    // given a scheduler holding the log key, and two models: one served, one whose replicas fail
    let mut h = Harness::new().await;
    let key = NoteSigner::from_seed("deepnode.test/log", [7; 32]).unwrap();
    h.options.log_key = Some(key.clone());
    pair(&h, "m-1", "a", "b").await;
    pair(&h, "m-bad", "c", "d").await;
    let failing = Behaviour {
        error_rate: 1.0,
        ..healthy()
    };
    h.start_sim(vec![
        sim("a", healthy()),
        sim("b", healthy()),
        sim("c", failing.clone()),
        sim("d", failing),
    ])
    .await;
    h.start_scheduler(test_policy(), "scheduler").await;

    for (id, model, ok) in [("r-1", "m-1", true), ("r-2", "m-bad", false)] {
        // when it records an execution
        let body = json!({"request_id": id, "model_id": model, "input": 1});
        let reply = h.exec(body.clone()).await;
        assert_eq!(reply["ok"], json!(ok), "{reply}");

        // then the reply's receipt names the execution's last event, its leaf, and is signed
        let stream = deepnode_store::StreamId::parse(&format!("exec-{id}")).unwrap();
        let deciding = h
            .store
            .read_stream(&stream, 1)
            .await
            .unwrap()
            .pop()
            .unwrap();
        let receipt = &reply["receipt"];
        assert_eq!(
            receipt["position"],
            json!(deciding.global_position),
            "{reply}"
        );
        let leaf = merkle::leaf_hash(&deciding.hash);
        assert_eq!(receipt["leaf_hash"], json!(hex::encode(leaf)));
        assert_eq!(receipt["origin"], json!("deepnode.test/log"));
        let position = u64::try_from(deciding.global_position).unwrap();
        let text = receipt_text("deepnode.test/log", position, &leaf);
        key.verifier()
            .verify(&text, receipt["signature"].as_str().unwrap())
            .unwrap();
        assert!(key
            .verifier()
            .verify(
                &receipt_text("deepnode.test/log", position + 1, &leaf),
                receipt["signature"].as_str().unwrap()
            )
            .is_err());
        // and a repeat of the request id gets the same receipt with the recorded answer
        let again = h.exec(body).await;
        assert_eq!(again["receipt"], reply["receipt"]);
    }
    h.stop().await;
}

#[tokio::test]
async fn happy_path_is_charged_once_with_one_attempt() {
    let mut h = Harness::new().await;
    pair(&h, "m-1", "a", "b").await;
    h.start_sim(vec![sim("a", healthy()), sim("b", healthy())])
        .await;
    h.start_scheduler(test_policy(), "scheduler").await;

    let reply = h
        .exec(json!({"request_id": "r-1", "model_id": "m-1", "input": {"prompt": "hi"}}))
        .await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(reply["charged"], json!(true));
    assert_eq!(reply["node_id"], json!("a"));
    assert!(reply["output"].is_object());
    assert_eq!(attempts(&reply), vec![att("a", "primary", "success")]);

    let stream = h.stream("r-1").await;
    let types: Vec<&str> = stream.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "ExecutionRequested",
            "AttemptDispatched",
            "AttemptSucceeded",
            "ExecutionCompleted"
        ]
    );
    let (_, completed, meta) = &stream[3];
    assert_eq!(completed["charged"], json!(true));
    assert_eq!(completed["attempts"], json!(1));
    assert_eq!(meta["producer"], json!("scheduler"));
    assert!(meta["correlation_id"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    // The dispatch carries the full, self-checking decision record.
    let decision: deepnode_domain::scoring::RouteDecision =
        serde_json::from_value(stream[1].1["decision"].clone()).unwrap();
    assert!(decision.verify());
    assert_eq!(decision.primary, node("a"));
    h.stop().await;
}

#[tokio::test]
async fn a_failing_primary_is_served_by_the_backup() {
    let mut h = Harness::new().await;
    let cases = [
        ("m-e", "bad-e", "good-e", Behaviour::always_error(), "error"),
        (
            "m-t",
            "bad-t",
            "good-t",
            Behaviour::always_timeout(),
            "timeout",
        ),
        (
            "m-i",
            "bad-i",
            "good-i",
            Behaviour::always_invalid(),
            "invalid_output",
        ),
    ];
    let mut nodes = Vec::new();
    for (model, bad, good, behaviour, _) in &cases {
        pair(&h, model, bad, good).await;
        nodes.push(sim(bad, behaviour.clone()));
        nodes.push(sim(good, healthy()));
    }
    h.start_sim(nodes).await;
    h.start_scheduler(test_policy(), "scheduler").await;

    for (model, bad, good, _, outcome) in &cases {
        let request_id = format!("r-{model}");
        let reply = h
            .exec(json!({"request_id": request_id, "model_id": model, "input": "x", "timeout_ms": 300}))
            .await;
        assert_eq!(reply["ok"], json!(true), "{reply}");
        assert_eq!(reply["charged"], json!(true));
        assert_eq!(reply["node_id"], json!(good));
        assert_eq!(
            attempts(&reply),
            vec![att(bad, "primary", outcome), att(good, "backup", "success")]
        );
        assert_eq!(h.count("AttemptDispatched", &request_id).await, 2);
        assert_eq!(h.count("AttemptFailed", &request_id).await, 1);
        assert_eq!(h.count("ExecutionCompleted", &request_id).await, 1);
        assert_eq!(h.count("ExecutionFailed", &request_id).await, 0);
        let stream = h.stream(&request_id).await;
        let failed = stream
            .iter()
            .find(|(t, _, _)| t == "AttemptFailed")
            .unwrap();
        assert_eq!(failed.1["outcome"], json!(outcome));
    }
    if let Some(latency) = h
        .exec(json!({"request_id": "r-lat", "model_id": "m-t", "input": "x", "timeout_ms": 300}))
        .await["attempts"][0]["latency_ms"]
        .as_u64()
    {
        // The timed-out attempt took about its timeout, not the 5 s default.
        assert!((300..1_000).contains(&latency), "{latency}");
    }
    h.stop().await;
}

#[tokio::test]
async fn both_replicas_failing_is_all_replicas_failed_and_not_charged() {
    let mut h = Harness::new().await;
    pair(&h, "m-1", "x", "y").await;
    h.start_sim(vec![
        sim("x", Behaviour::always_error()),
        sim("y", Behaviour::always_timeout()),
    ])
    .await;
    h.start_scheduler(test_policy(), "scheduler").await;

    let reply = h
        .exec(json!({"request_id": "r-1", "model_id": "m-1", "input": 1, "timeout_ms": 200}))
        .await;
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["error"]["code"], json!("all_replicas_failed"));
    assert_eq!(
        reply["retryable"],
        json!(false),
        "a recorded outcome is final: {reply}"
    );
    assert_eq!(reply["charged"], json!(false));
    assert_eq!(
        attempts(&reply),
        vec![att("x", "primary", "error"), att("y", "backup", "timeout")]
    );
    assert_eq!(h.count("AttemptFailed", "r-1").await, 2);
    assert_eq!(h.count("ExecutionFailed", "r-1").await, 1);
    assert_eq!(h.count("ExecutionCompleted", "r-1").await, 0);
    let stream = h.stream("r-1").await;
    let (_, failed, _) = stream.last().unwrap();
    assert_eq!(failed["charged"], json!(false));
    assert_eq!(failed["attempts"], json!(2));
    h.stop().await;
}

#[tokio::test]
async fn a_repeated_request_id_returns_the_recorded_answer_and_appends_nothing() {
    let mut h = Harness::new().await;
    pair(&h, "m-1", "a", "b").await;
    pair(&h, "m-2", "x", "y").await;
    h.start_sim(vec![
        sim("a", healthy()),
        sim("b", healthy()),
        sim("x", Behaviour::always_error()),
        sim("y", Behaviour::always_invalid()),
    ])
    .await;
    h.start_scheduler(test_policy(), "scheduler").await;

    for (request_id, model) in [("ok-1", "m-1"), ("fail-1", "m-2")] {
        let body = json!({"request_id": request_id, "model_id": model, "input": {"n": 1}});
        let first = h.exec(body.clone()).await;
        let head = h.head().await;
        let again = h.exec(body).await;
        assert_eq!(first, again, "the repeat must return the original answer");
        // Even with another model and input, the id is the key.
        let other = h
            .exec(json!({"request_id": request_id, "model_id": "m-1", "input": 2}))
            .await;
        assert_eq!(first, other);
        assert_eq!(h.head().await, head, "a repeat appends nothing");
        assert_eq!(h.count("ExecutionRequested", request_id).await, 1);
    }
    h.stop().await;
}

#[tokio::test]
async fn a_repeat_on_a_slow_node_is_answered_from_the_log_without_waiting_for_it() {
    let mut h = Harness::new().await;
    pair(&h, "m-1", "a", "b").await;
    let slow = || Behaviour::healthy(Latency::fixed_ms(600));
    h.start_sim(vec![sim("a", slow()), sim("b", slow())]).await;
    h.start_scheduler(test_policy(), "scheduler").await;

    // given an execution recorded after its node took 600 ms
    let body = json!({"request_id": "slow-1", "model_id": "m-1", "input": 1});
    let first = h.exec(body.clone()).await;
    assert_eq!(first["ok"], json!(true), "{first}");
    let head = h.head().await;
    // when it is repeated
    let started = std::time::Instant::now();
    let again = h.exec(body).await;
    let took = started.elapsed();
    // then the log answers it, long before the node could have, and nothing is appended
    assert_eq!(first, again);
    assert!(
        took < Duration::from_millis(300),
        "the repeat took {took:?}"
    );
    assert_eq!(h.head().await, head);
    h.stop().await;
}

#[tokio::test]
async fn two_copies_in_one_queue_group_record_each_request_once() {
    let mut h = Harness::new().await;
    // Room for the whole burst: at capacity a request waits for a slot (tested elsewhere), and
    // this test is about deduplication, not admission.
    h.given().node("a", 1_024).await;
    h.given().node("b", 1_024).await;
    h.given().deployment("m-1", &["a", "b"]).await;
    h.boost("a", 5).await;
    h.start_sim(vec![sim("a", healthy()), sim("b", healthy())])
        .await;
    h.start_scheduler(test_policy(), "copy-1").await;
    h.start_scheduler(test_policy(), "copy-2").await;

    // 200 request ids, each sent twice at once: both copies may ask a node, one records the
    // execution and the other answers with that record.
    let replies = futures::future::join_all((0..400).map(|i| {
        let h = &h;
        async move {
            let id = format!("r-{}", i / 2);
            (
                id.clone(),
                h.exec(json!({"request_id": id, "model_id": "m-1", "input": i / 2}))
                    .await,
            )
        }
    }))
    .await;
    for pair in replies.chunks(2) {
        assert_eq!(pair[0].1["ok"], json!(true), "{}", pair[0].1);
        assert_eq!(
            pair[0].1, pair[1].1,
            "both copies of {} got one answer",
            pair[0].0
        );
    }
    let per_stream: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stream_id, count(*) FILTER (WHERE event_type = 'ExecutionRequested')
           FROM events WHERE stream_id LIKE 'exec-r-%' GROUP BY stream_id",
    )
    .fetch_all(h.store.pool())
    .await
    .unwrap();
    assert_eq!(per_stream.len(), 200);
    assert!(per_stream.iter().all(|(_, n)| *n == 1), "{per_stream:?}");
    let completed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'ExecutionCompleted' AND stream_id LIKE 'exec-r-%'",
    )
    .fetch_one(h.store.pool())
    .await
    .unwrap();
    assert_eq!(completed, 200, "each request charged exactly once");
    let producers: BTreeSet<String> = sqlx::query_scalar(
        "SELECT DISTINCT metadata->>'producer' FROM events WHERE event_type = 'ExecutionRequested'",
    )
    .fetch_all(h.store.pool())
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(producers.len(), 2, "both copies served: {producers:?}");
    h.stop().await;
}

#[tokio::test]
async fn late_and_duplicated_answers_are_classified_once() {
    // This test's process records the scheduler's metrics from the start.
    let metrics = deepnode_runtime::observability::metrics_handle();
    let mut h = Harness::new().await;
    pair(&h, "m-late", "late", "good-1").await;
    pair(&h, "m-twice", "twice", "good-2").await;
    let late = Behaviour {
        answers_late: Some(Duration::from_millis(500)),
        ..healthy()
    };
    let twice = Behaviour {
        answers_twice: true,
        ..healthy()
    };
    h.start_sim(vec![
        sim("late", late),
        sim("good-1", healthy()),
        sim("twice", twice),
        sim("good-2", healthy()),
    ])
    .await;
    h.start_scheduler(test_policy(), "scheduler").await;

    let reply = h
        .exec(json!({"request_id": "r-late", "model_id": "m-late", "input": 1, "timeout_ms": 150}))
        .await;
    assert_eq!(
        attempts(&reply),
        vec![
            att("late", "primary", "timeout"),
            att("good-1", "backup", "success")
        ]
    );
    let reply = h
        .exec(json!({"request_id": "r-twice", "model_id": "m-twice", "input": 1}))
        .await;
    assert_eq!(attempts(&reply), vec![att("twice", "primary", "success")]);

    // The late answer and the duplicate were really sent (bounded wait on the nodes' counters)…
    let sent = |id: &str| h.sims[0].counters(&node(id)).unwrap();
    let what = "the late answer and the duplicate to be sent";
    deepnode_testkit::eventually(what, Duration::from_secs(10), || async {
        sent("late").late > 0 && sent("twice").duplicates > 0
    })
    .await;
    // … and once the scheduler has received both and ignored them (it counts each), nothing more
    // was recorded.
    let what = "the scheduler to count the late answer and the duplicate";
    deepnode_testkit::eventually(what, Duration::from_secs(10), || async {
        let text = metrics.render();
        crate::observability::sample_sum(&text, "deepnode_exec_late_answers_total", &[]) >= 2.0
    })
    .await;
    assert_eq!(h.stream("r-late").await.len(), 6);
    assert_eq!(h.stream("r-twice").await.len(), 4);
    assert_eq!(h.count("AttemptSucceeded", "r-twice").await, 1);
    assert_eq!(h.count("AttemptFailed", "r-late").await, 1);
    h.stop().await;
}

#[tokio::test]
async fn a_node_failing_every_request_is_ejected_and_the_backup_takes_over() {
    let mut h = Harness::new().await;
    pair(&h, "m-1", "bad", "good").await;
    // Enough history that three failures do not yet drop `bad` below `good` by reputation.
    h.boost("bad", 30).await;
    h.start_sim(vec![
        sim("bad", Behaviour::always_error()),
        sim("good", healthy()),
    ])
    .await;
    h.start_scheduler(test_policy(), "scheduler").await;
    for i in 0..3 {
        let reply = h
            .exec(json!({"request_id": format!("r-{i}"), "model_id": "m-1", "input": i}))
            .await;
        assert_eq!(attempts(&reply).len(), 2, "{reply}");
    }
    // Three consecutive failures eject `bad` (POLICY Ejection): the next request goes to `good`.
    let reply = h
        .exec(json!({"request_id": "r-3", "model_id": "m-1", "input": 3}))
        .await;
    assert_eq!(attempts(&reply), vec![att("good", "primary", "success")]);
    let schedule = h.schedule(json!({"model_id": "m-1"})).await;
    assert_eq!(
        schedule["filtered"],
        json!([{"node_id": "bad", "reason": "ejected"}])
    );

    // The ejection is an event on the node's stream, caused by the failed attempt that tipped it.
    let ejected = tracker_decisions(&h, "bad", 1).await;
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    let (event_type, payload, metadata) = &ejected[0];
    assert_eq!(event_type, "NodeEjected");
    assert_eq!(payload["node_id"], json!("bad"));
    assert_eq!(payload["ejections"], json!(1));
    assert_eq!(metadata["producer"], json!("scheduler"));
    let cause: (String, String, Value) = sqlx::query_as(
        "SELECT stream_id, event_type, payload FROM events WHERE event_id = $1::uuid",
    )
    .bind(metadata["causation_id"].as_str().unwrap())
    .fetch_one(h.store.pool())
    .await
    .unwrap();
    assert_eq!(
        (cause.0.as_str(), cause.1.as_str(), &cause.2["node_id"]),
        ("exec-r-2", "AttemptFailed", &json!("bad"))
    );
    h.stop().await;
}

/// The outlier tracker's decisions (`NodeEjected`, `NodeRestored`) on `node`'s stream, in log order
/// as (type, payload, metadata), once there are at least `n` (they follow the execution record
/// asynchronously); panics naming them after 5 s.
async fn tracker_decisions(h: &Harness, node: &str, n: usize) -> Vec<(String, Value, Value)> {
    let what = format!("{n} outlier-tracker decisions on node {node}");
    deepnode_testkit::until_some(&what, std::time::Duration::from_secs(5), || async {
        let rows: Vec<(String, Value, Value)> = sqlx::query_as(
            "SELECT event_type, payload, metadata FROM events
              WHERE stream_id = $1 AND event_type IN ('NodeEjected', 'NodeRestored')
              ORDER BY global_position",
        )
        .bind(format!("node-{node}"))
        .fetch_all(h.store.pool())
        .await
        .unwrap();
        (rows.len() >= n).then_some(rows)
    })
    .await
}

#[tokio::test]
async fn a_probe_that_succeeds_restores_an_ejected_node_and_records_it() {
    let mut h = Harness::new().await;
    pair(&h, "m-1", "bad", "good").await;
    h.boost("bad", 30).await;
    h.start_sim(vec![sim("bad", Behaviour::always_error())])
        .await;
    h.start_sim(vec![sim("good", healthy())]).await;
    let mut policy = test_policy();
    policy.ejection.base_ejection_ms = 300;
    let clock = deepnode_runtime::Clock::adjustable();
    h.options.clock = clock.clone();
    h.start_scheduler(policy, "scheduler").await;
    for i in 0..3 {
        h.exec(json!({"request_id": format!("r-{i}"), "model_id": "m-1", "input": i}))
            .await;
    }
    // given `bad` ejected, then repaired: its operator restarts it healthy
    h.sims.remove(0).stop().await;
    h.start_sim(vec![sim("bad", healthy())]).await;
    // when its 300 ms ejection is over (the scheduler's clock moved, not slept through)
    assert!(h.schedule(json!({"model_id": "m-1"})).await["filtered"][0]["reason"] == "ejected");
    clock.advance(std::time::Duration::from_millis(400));

    // the next request is its probe, and it succeeds
    let reply = h
        .exec(json!({"request_id": "probe", "model_id": "m-1", "input": 9}))
        .await;
    assert_eq!(attempts(&reply), vec![att("bad", "primary", "success")]);

    // then `NodeRestored` follows `NodeEjected` on its stream, caused by the probe's success
    let node_events = tracker_decisions(&h, "bad", 2).await;
    let types: Vec<&str> = node_events.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(types, ["NodeEjected", "NodeRestored"]);
    let cause: (String, String) =
        sqlx::query_as("SELECT stream_id, event_type FROM events WHERE event_id = $1::uuid")
            .bind(node_events[1].2["causation_id"].as_str().unwrap())
            .fetch_one(h.store.pool())
            .await
            .unwrap();
    assert_eq!(
        cause,
        ("exec-probe".to_owned(), "AttemptSucceeded".to_owned())
    );
    h.stop().await;
}

#[tokio::test]
async fn an_execution_left_open_by_an_older_build_is_closed_uncharged() {
    use deepnode_domain::events::{AttemptDispatched, ExecutionRequested, Role};
    use deepnode_domain::ids::{ModelId, RequestId};
    let mut h = Harness::new().await;
    pair(&h, "m-1", "a", "b").await;
    // given a scheduler that died after recording the request and its first dispatch
    let request_id = RequestId::parse("orphan-1").unwrap();
    let meta = Metadata::new("dead-scheduler", "orphan-1");
    let started = chrono::Utc::now() - chrono::Duration::seconds(1);
    let orphan = [
        DomainEvent::ExecutionRequested(ExecutionRequested {
            request_id: request_id.clone(),
            model_id: ModelId::parse("m-1").unwrap(),
            timeout_ms: 50,
        }),
        DomainEvent::AttemptDispatched(AttemptDispatched {
            request_id: request_id.clone(),
            model_id: ModelId::parse("m-1").unwrap(),
            node_id: node("a"),
            role: Role::Primary,
            attempt: 1,
            // any routing record: the sweeper never reads it
            decision: serde_json::from_value(
                serde_json::from_str::<serde_json::Value>(include_str!(
                    "../../../../crates/deepnode-domain/tests/fixtures/attempt_dispatched_v1.json"
                ))
                .unwrap()["decision"]
                    .clone(),
            )
            .unwrap(),
        }),
    ]
    .map(|e| e.to_new_event(uuid::Uuid::new_v4(), meta.clone(), started));
    let stream = DomainEvent::execution_stream(&request_id);
    h.store
        .append(&stream, ExpectedVersion::NoStream, orphan.to_vec())
        .await
        .unwrap();

    // when a live scheduler sweeps (its grace is short here)
    h.options.abandon_grace = std::time::Duration::from_millis(100);
    h.options.sweep_interval = std::time::Duration::from_millis(100);
    h.start_scheduler(test_policy(), "scheduler").await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.count("ExecutionFailed", "orphan-1").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the orphan was never closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // then it is closed once, not charged, the dangling attempt left unclassified, and a retry with the
    // same request id gets that final answer instead of "still running"
    let reply = h
        .exec(json!({"request_id": "orphan-1", "model_id": "m-1", "input": 1}))
        .await;
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["error"]["code"], json!("unavailable"), "{reply}");
    assert_eq!(reply["charged"], json!(false), "{reply}");
    assert_eq!(h.count("ExecutionFailed", "orphan-1").await, 1);
    assert_eq!(h.count("AttemptFailed", "orphan-1").await, 0);
    let end = h.stream("orphan-1").await.pop().unwrap();
    assert_eq!(
        (end.0.as_str(), &end.1["abandoned"]),
        ("ExecutionFailed", &json!(true))
    );
    h.stop().await;
}

#[tokio::test]
async fn a_request_for_a_full_model_waits_for_a_slot_within_its_deadline() {
    let mut h = Harness::new().await;
    h.given().node("a", 1).await;
    h.given().node("b", 1).await;
    h.given().deployment("m-1", &["a", "b"]).await;
    let slow = || Behaviour::healthy(Latency::fixed_ms(400));
    h.start_sim(vec![sim("a", slow()), sim("b", slow())]).await;
    h.start_scheduler(test_policy(), "scheduler").await;

    // given both replicas busy with one request each
    let mut dispatched = h.dispatches_to(&["a", "b"]).await;
    let busy: Vec<_> = (0..2)
        .map(|i| h.exec(json!({"request_id": format!("busy-{i}"), "model_id": "m-1", "input": i})))
        .collect();
    // when two more arrive: one willing to wait 5 s, one only 100 ms
    let waiting = async {
        dispatched.wait(2).await;
        tokio::join!(
            h.exec(json!({"request_id": "patient", "model_id": "m-1", "input": 8})),
            h.exec(
                json!({"request_id": "hasty", "model_id": "m-1", "input": 9, "timeout_ms": 100})
            ),
        )
    };
    let (busy, (patient, hasty)) = tokio::join!(futures::future::join_all(busy), waiting);

    // then the patient one starts when a slot frees and is served; the hasty one is refused
    // `overloaded` (not charged, recorded nowhere); the busy ones succeed
    assert!(busy.iter().all(|r| r["ok"] == json!(true)), "{busy:?}");
    assert_eq!(patient["ok"], json!(true), "{patient}");
    assert_eq!(hasty["error"]["code"], json!("overloaded"), "{hasty}");
    assert_eq!(hasty["charged"], json!(false), "{hasty}");
    assert_eq!(h.count("ExecutionRequested", "hasty").await, 0);
    h.stop().await;
}

/// Nodes that answer each request after `latency`, counting how many they hold at once; each node's
/// peak concurrency. Subscribed (and flushed) before this returns.
async fn slow_nodes(
    h: &Harness,
    ids: &[&str],
    latency: Duration,
) -> Vec<(String, std::sync::Arc<std::sync::atomic::AtomicU32>)> {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let mut peaks = Vec::new();
    for id in ids {
        let mut requests = h
            .client
            .subscribe(h.subjects.node_infer(&node(id)))
            .await
            .unwrap();
        let (held, peak) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        peaks.push(((*id).to_owned(), peak.clone()));
        let client = h.client.clone();
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let (client, held, peak) = (client.clone(), held.clone(), peak.clone());
                tokio::spawn(async move {
                    let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(latency).await;
                    held.fetch_sub(1, Ordering::SeqCst);
                    if let Some(reply) = request.reply {
                        let answer = json!({"output": "done"}).to_string();
                        let _ = client.publish(reply, answer.into()).await;
                    }
                });
            }
        });
    }
    h.client.flush().await.unwrap();
    peaks
}

/// `n` execs of `model_of(i)` sent at once, each with `timeout_ms`; the replies in order.
async fn burst(
    h: &Harness,
    n: usize,
    model_of: impl Fn(usize) -> String,
    timeout_ms: u64,
) -> Vec<Value> {
    futures::future::join_all((0..n).map(|i| {
        h.exec(json!({
            "request_id": format!("burst-{i}"),
            "model_id": model_of(i),
            "input": i,
            "timeout_ms": timeout_ms,
        }))
    }))
    .await
}

/// The issue-12 burst against `copies` scheduler copies: 6 nodes of capacity 8 answering in 50 ms,
/// 4 models on two replicas each, 400 requests at once, each willing to wait 2 s (room: 48 slots ×
/// 2 s / 50 ms). Asserts every request served and charged once; returns each node's peak concurrency.
async fn burst_on_six_nodes(copies: usize) -> Vec<(String, u32)> {
    let mut h = Harness::new().await;
    let ids = ["a", "b", "c", "d", "e", "f"];
    for id in ids {
        h.given().node(id, 8).await;
    }
    for (model, replicas) in [
        ("m-1", ["a", "b"]),
        ("m-2", ["c", "d"]),
        ("m-3", ["e", "f"]),
        ("m-4", ["a", "d"]),
    ] {
        h.given().deployment(model, &replicas).await;
    }
    let peaks = slow_nodes(&h, &ids, Duration::from_millis(50)).await;
    for copy in 0..copies {
        h.start_scheduler(test_policy(), &format!("scheduler-{copy}"))
            .await;
    }

    let replies = burst(&h, 400, |i| format!("m-{}", i % 4 + 1), 2_000).await;

    for reply in &replies {
        assert_eq!(reply["ok"], json!(true), "{reply}");
        assert_eq!(reply["charged"], json!(true), "{reply}");
    }
    let completed: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT payload->>'request_id') FROM events WHERE event_type = 'ExecutionCompleted'",
    )
    .fetch_one(h.store.pool())
    .await
    .unwrap();
    assert_eq!(completed, 400);
    let serving: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT metadata->>'producer') FROM events WHERE event_type = 'ExecutionRequested'",
    )
    .fetch_one(h.store.pool())
    .await
    .unwrap();
    assert_eq!(
        serving, copies as i64,
        "every copy served part of the burst"
    );
    h.stop().await;
    peaks
        .into_iter()
        .map(|(id, peak)| (id, peak.load(std::sync::atomic::Ordering::SeqCst)))
        .collect()
}

#[tokio::test]
async fn a_burst_waits_for_free_slots_and_no_node_holds_more_than_its_capacity() {
    for (id, peak) in burst_on_six_nodes(1).await {
        assert!(
            peak <= 8,
            "node {id} held {peak} requests at once (capacity 8)"
        );
    }
}

#[tokio::test]
async fn with_two_scheduler_copies_no_node_holds_more_than_its_capacity() {
    // Each copy counts only its own requests in flight and admits its share of each node's
    // capacity (4 of 8 here), so together they never exceed it; the burst is still served once.
    let peaks = burst_on_six_nodes(2).await;
    eprintln!("two copies, per-node peak concurrency (capacity 8): {peaks:?}");
    for (id, peak) in peaks {
        assert!(
            peak <= 8,
            "node {id} held {peak} requests at once (capacity 8, two copies)"
        );
    }
}

/// Model `m-1` on nodes `a` and `b`, capacity 1 each, answering in 300 ms (no scheduler yet).
async fn two_single_slot_nodes() -> Harness {
    let h = Harness::new().await;
    h.given().node("a", 1).await;
    h.given().node("b", 1).await;
    h.given().deployment("m-1", &["a", "b"]).await;
    slow_nodes(&h, &["a", "b"], Duration::from_millis(300)).await;
    h
}

#[tokio::test]
async fn beyond_the_queue_bound_a_request_is_refused_overloaded_at_once_uncharged_and_unrecorded() {
    // given one model on two nodes of capacity 1 that answer in 300 ms, and room for 4 waiting
    let mut h = two_single_slot_nodes().await;
    let mut policy = test_policy();
    policy.exec.queue_limit = 4;
    h.start_scheduler(policy, "scheduler").await;
    let head = h.head().await;

    // when 10 requests arrive at once
    let replies = burst(&h, 10, |_| "m-1".to_owned(), 2_000).await;

    // then 2 start, 4 wait for a slot and are served, and 4 are refused `overloaded` with a hint
    let served = replies.iter().filter(|r| r["ok"] == json!(true)).count();
    let refused: Vec<&Value> = replies.iter().filter(|r| r["ok"] != json!(true)).collect();
    assert_eq!(served, 6, "{replies:?}");
    assert_eq!(refused.len(), 4, "{replies:?}");
    for reply in refused {
        assert_eq!(reply["error"]["code"], json!("overloaded"), "{reply}");
        assert_eq!(reply["retry_after_ms"], json!(100), "{reply}");
        assert_eq!(reply["charged"], json!(false), "{reply}");
        assert_eq!(reply["attempts"], json!([]), "{reply}");
        assert_eq!(reply["retryable"], json!(true), "{reply}");
    }
    // and a refusal is recorded nowhere and costs no node anything: the log holds exactly the six
    // served executions (4 events each), nothing on the nodes' streams
    let appended: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, stream_id FROM events WHERE global_position > $1 ORDER BY global_position",
    )
    .bind(head)
    .fetch_all(h.store.pool())
    .await
    .unwrap();
    assert_eq!(appended.len(), 6 * 4, "{appended:?}");
    assert!(
        appended
            .iter()
            .all(|(_, stream)| stream.starts_with("exec-")),
        "{appended:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn under_contention_critical_requests_start_first_and_sheddable_ones_are_refused_first() {
    // given one model on two nodes of capacity 1 that answer in 300 ms, both busy
    let mut h = two_single_slot_nodes().await;
    h.start_scheduler(test_policy(), "scheduler").await;
    let harness = &h;
    let exec = |id: &str, priority: &str| {
        let body = json!({"request_id": id, "model_id": "m-1", "input": 1, "timeout_ms": 5_000, "priority": priority});
        async move {
            let sent = std::time::Instant::now();
            let reply = harness.exec(body).await;
            (reply, sent.elapsed())
        }
    };
    let mut dispatched = harness.dispatches_to(&["a", "b"]).await;
    let busy = futures::future::join_all([exec("busy-1", "standard"), exec("busy-2", "standard")]);

    // when, while they run, two standard, two critical and one sheddable request arrive
    let contended = async {
        dispatched.wait(2).await;
        tokio::join!(
            exec("std-1", "standard"),
            exec("std-2", "standard"),
            exec("crit-1", "critical"),
            exec("crit-2", "critical"),
            exec("shed", "sheddable"),
        )
    };
    let (busy, (std_1, std_2, crit_1, crit_2, shed)) = tokio::join!(busy, contended);

    // then the sheddable one is refused at once, and both critical ones finish before either
    // standard one (two slots: the critical pair takes the first two that free)
    assert!(busy.iter().all(|(r, _)| r["ok"] == json!(true)), "{busy:?}");
    assert_eq!(shed.0["error"]["code"], json!("overloaded"), "{}", shed.0);
    assert!(
        shed.1 < Duration::from_millis(150),
        "sheddable refused after {:?}",
        shed.1
    );
    for (reply, _) in [&std_1, &std_2, &crit_1, &crit_2] {
        assert_eq!(reply["ok"], json!(true), "{reply}");
    }
    let last_critical = crit_1.1.max(crit_2.1);
    let first_standard = std_1.1.min(std_2.1);
    assert!(
        last_critical < first_standard,
        "critical done after {last_critical:?}, a standard one after {first_standard:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_caller_flooding_a_full_model_does_not_starve_another_caller_of_its_class() {
    // given one model on one node of capacity 1 answering in 20 ms
    let mut h = Harness::new().await;
    h.given().node("a", 1).await;
    h.given().deployment("m-1", &["a"]).await;
    slow_nodes(&h, &["a"], Duration::from_millis(20)).await;
    h.start_scheduler(test_policy(), "scheduler").await;
    let (flooder, other) = (h.caller().await, h.caller().await);
    let (finished, done) = (
        std::sync::atomic::AtomicUsize::new(0),
        tokio::sync::Notify::new(),
    );
    let exec = |caller: &async_nats::Client, id: String| {
        let body = json!({"request_id": id, "model_id": "m-1", "input": 1, "timeout_ms": 10_000});
        let (h, finished, done, caller) = (&h, &finished, &done, caller.clone());
        async move {
            let reply = h.exec_as(&caller, body).await;
            assert_eq!(reply["ok"], json!(true), "{reply}");
            let place = finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            done.notify_one();
            place
        }
    };

    // when one caller sends 30 at once, with deadlines earlier than the other's, and the other
    // sends 3 once the first of the 30 has been served (by then the rest wait in the queue)
    let flood = futures::future::join_all((0..30).map(|i| exec(&flooder, format!("flood-{i}"))));
    let others = async {
        done.notified().await;
        futures::future::join_all((0..3).map(|i| exec(&other, format!("other-{i}")))).await
    };
    let (mut flood, others) = tokio::join!(flood, others);

    // then the callers took turns: the other caller's three were done among the first few,
    // not behind the flood's 29
    flood.sort_unstable();
    let tenth_of_flood = flood[9];
    for place in others {
        assert!(
            place < tenth_of_flood,
            "the other caller's request finished {place}th, after the flood's 10th ({tenth_of_flood}th)"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn a_refused_request_id_says_a_retry_may_run_it_and_a_retry_does() {
    // given both slots of the model busy
    let mut h = two_single_slot_nodes().await;
    h.start_scheduler(test_policy(), "scheduler").await;
    let mut dispatched = h.dispatches_to(&["a", "b"]).await;
    let busy: Vec<_> = (0..2)
        .map(|i| h.exec(json!({"request_id": format!("busy-{i}"), "model_id": "m-1", "input": i})))
        .collect();
    // when the same request id arrives twice at once, as a sheddable request (refused, not queued)
    let refused = async {
        dispatched.wait(2).await;
        let body =
            json!({"request_id": "dup", "model_id": "m-1", "input": 1, "priority": "sheddable"});
        tokio::join!(h.exec(body.clone()), h.exec(body))
    };
    let (busy, (first, second)) = tokio::join!(futures::future::join_all(busy), refused);
    assert!(busy.iter().all(|r| r["ok"] == json!(true)), "{busy:?}");

    // then both answers say nothing was done and a retry may run it (no final-looking refusal)...
    for reply in [&first, &second] {
        assert_eq!(reply["error"]["code"], json!("overloaded"), "{reply}");
        assert_eq!(reply["retryable"], json!(true), "{reply}");
        assert_eq!(reply["charged"], json!(false), "{reply}");
    }
    assert_eq!(h.count("ExecutionRequested", "dup").await, 0);
    // ...and the retry, once there is room, runs it: the one story of "dup" is this success
    let retried = h
        .exec(json!({"request_id": "dup", "model_id": "m-1", "input": 1}))
        .await;
    assert_eq!(retried["ok"], json!(true), "{retried}");
    let again = h
        .exec(json!({"request_id": "dup", "model_id": "m-1", "input": 1}))
        .await;
    assert_eq!(
        again["ok"],
        json!(true),
        "a repeat returns the recorded answer: {again}"
    );
    assert_eq!(h.count("ExecutionCompleted", "dup").await, 1);
    h.stop().await;
}
