//! Integration tests of the node simulator against the real NATS at `NATS_URL` (default
//! `nats://127.0.0.1:4222`), each under its own random subject prefix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use deepnode_bus::envelope::{parse_command, ErrorBody, ErrorCode, Reply};
use deepnode_bus::rpc::{self, request_bytes};
use deepnode_bus::{connect, Subjects};
use deepnode_domain::ids::NodeId;
use deepnode_sim::{Behaviour, Latency, Sim, SimConfig, SimNode};
use futures::StreamExt;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

async fn client() -> Client {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    connect(&url, "deepnode-sim-test").await.unwrap()
}

fn id(s: &str) -> NodeId {
    NodeId::parse(s).unwrap()
}

fn config(nodes: Vec<SimNode>) -> SimConfig {
    SimConfig {
        nodes,
        seed: 42,
        ..SimConfig::default()
    }
}

fn infer_body(input: Value) -> Bytes {
    Bytes::from(json!({"request_id": "r1", "model_id": "m1", "input": input}).to_string())
}

/// Whether a node's answer is a valid `{"output": ...}`.
fn is_valid_answer(raw: &[u8]) -> bool {
    matches!(serde_json::from_slice::<Value>(raw), Ok(Value::Object(m)) if m.contains_key("output"))
}

#[tokio::test]
async fn healthy_nodes_answer_the_same_deterministic_output() {
    let client = client().await;
    let subjects = Subjects::random();
    let (a, b) = (id("a"), id("b"));
    let sim = Sim::start(
        client.clone(),
        subjects.clone(),
        config(vec![
            SimNode::new(a.clone(), "d"),
            SimNode::new(b.clone(), "d"),
        ]),
    )
    .await
    .unwrap();
    let input = json!({"prompt": "hello", "n": 3});
    let ra = request_bytes(
        &client,
        &subjects.node_infer(&a),
        infer_body(input.clone()),
        T,
    )
    .await
    .unwrap();
    let rb = request_bytes(
        &client,
        &subjects.node_infer(&b),
        infer_body(input.clone()),
        T,
    )
    .await
    .unwrap();
    assert!(is_valid_answer(&ra));
    assert_eq!(ra, rb);
    let v: Value = serde_json::from_slice(&ra).unwrap();
    assert_eq!(v["output"]["echo"], input);
    let other = request_bytes(&client, &subjects.node_infer(&a), infer_body(json!(1)), T)
        .await
        .unwrap();
    assert_ne!(ra, other);

    assert_eq!(sim.counters(&a).unwrap().ok, 2);
    assert_eq!(sim.totals().requests, 3);
    sim.stop().await;
    let after = request_bytes(&client, &subjects.node_infer(&a), infer_body(json!(1)), T).await;
    assert!(
        matches!(after, Err(rpc::Error::NoResponders { .. })),
        "{after:?}"
    );
}

#[tokio::test]
async fn a_node_with_error_rate_one_always_errors() {
    let client = client().await;
    let subjects = Subjects::random();
    let n = id("bad-err");
    let sim = Sim::start(
        client.clone(),
        subjects.clone(),
        config(vec![
            SimNode::new(n.clone(), "d").with_behaviour(Behaviour::always_error())
        ]),
    )
    .await
    .unwrap();
    for i in 0..20 {
        let raw = request_bytes(&client, &subjects.node_infer(&n), infer_body(json!(i)), T)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&raw).unwrap();
        assert!(v.get("output").is_none(), "{v}");
        assert_eq!(v["error"]["code"], json!("internal"), "{v}");
    }
    let c = sim.counters(&n).unwrap();
    assert_eq!((c.requests, c.errors, c.ok), (20, 20, 0));
    sim.stop().await;
}

#[tokio::test]
async fn an_always_invalid_node_answers_garbage() {
    let client = client().await;
    let subjects = Subjects::random();
    let n = id("bad-invalid");
    let sim = Sim::start(
        client.clone(),
        subjects.clone(),
        config(vec![
            SimNode::new(n.clone(), "d").with_behaviour(Behaviour::always_invalid())
        ]),
    )
    .await
    .unwrap();
    let mut kinds = std::collections::BTreeSet::new();
    for i in 0..30 {
        let raw = request_bytes(&client, &subjects.node_infer(&n), infer_body(json!(i)), T)
            .await
            .unwrap();
        assert!(!is_valid_answer(&raw), "{raw:?}");
        kinds.insert(match serde_json::from_slice::<Value>(&raw) {
            Err(_) => "not json",
            Ok(Value::Object(_)) => "object without output",
            Ok(_) => "not an object",
        });
    }
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert_eq!(sim.counters(&n).unwrap().invalid, 30);
    sim.stop().await;
}

#[tokio::test]
async fn latency_is_respected() {
    let client = client().await;
    let subjects = Subjects::random();
    let (fixed, uniform) = (id("slow"), id("uniform"));
    let sim = Sim::start(
        client.clone(),
        subjects.clone(),
        config(vec![
            SimNode::new(fixed.clone(), "d")
                .with_behaviour(Behaviour::healthy(Latency::fixed_ms(200))),
            SimNode::new(uniform.clone(), "d").with_behaviour(Behaviour::healthy(
                Latency::Uniform {
                    min: Duration::from_millis(50),
                    max: Duration::from_millis(100),
                },
            )),
        ]),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let raw = request_bytes(
        &client,
        &subjects.node_infer(&fixed),
        infer_body(json!(1)),
        T,
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(is_valid_answer(&raw));
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_millis(1000), "{took:?}");
    for _ in 0..5 {
        let started = Instant::now();
        request_bytes(
            &client,
            &subjects.node_infer(&uniform),
            infer_body(json!(1)),
            T,
        )
        .await
        .unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(took < Duration::from_millis(800), "{took:?}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn heartbeats_are_published_per_node() {
    let client = client().await;
    let subjects = Subjects::random();
    let mut beats = client
        .subscribe(subjects.heartbeat_wildcard())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let nodes = vec![SimNode::new(id("h1"), "d"), SimNode::new(id("h2"), "d")];
    let sim = Sim::start(
        client.clone(),
        subjects.clone(),
        SimConfig {
            heartbeat_interval: Duration::from_millis(100),
            ..config(nodes)
        },
    )
    .await
    .unwrap();
    let mut seen = std::collections::BTreeMap::<NodeId, u32>::new();
    tokio::time::timeout(T, async {
        while seen.values().filter(|n| **n >= 3).count() < 2 {
            let msg = beats.next().await.unwrap();
            let node = subjects.node_of_heartbeat(&msg.subject).unwrap();
            let body: Value = serde_json::from_slice(&msg.payload).unwrap();
            assert_eq!(body["in_flight"], json!(0));
            *seen.entry(node).or_default() += 1;
        }
    })
    .await
    .expect("three heartbeats from each node");
    assert!(sim.counters(&id("h1")).unwrap().heartbeats >= 3);
    sim.stop().await;
}

#[tokio::test]
async fn timeouts_late_and_double_answers() {
    let client = client().await;
    let subjects = Subjects::random();
    let (mute, late, twice) = (id("mute"), id("late"), id("twice"));
    let sim = Sim::start(
        client.clone(),
        subjects.clone(),
        config(vec![
            SimNode::new(mute.clone(), "d").with_behaviour(Behaviour::always_timeout()),
            SimNode::new(late.clone(), "d").with_behaviour(Behaviour {
                answers_late: Some(Duration::from_millis(300)),
                ..Behaviour::default()
            }),
            SimNode::new(twice.clone(), "d").with_behaviour(Behaviour {
                answers_twice: true,
                ..Behaviour::default()
            }),
        ]),
    )
    .await
    .unwrap();
    let short = Duration::from_millis(150);

    let r = request_bytes(
        &client,
        &subjects.node_infer(&mute),
        infer_body(json!(1)),
        short,
    )
    .await;
    assert!(matches!(r, Err(rpc::Error::Timeout { .. })), "{r:?}");
    assert_eq!(sim.counters(&mute).unwrap().timeouts, 1);

    // The late answer misses a short timeout but does arrive on the reply subject.
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subjects.node_infer(&late), inbox, infer_body(json!(1)))
        .await
        .unwrap();
    assert!(tokio::time::timeout(short, replies.next()).await.is_err());
    let msg = tokio::time::timeout(T, replies.next())
        .await
        .unwrap()
        .unwrap();
    assert!(is_valid_answer(&msg.payload));
    assert_eq!(sim.counters(&late).unwrap().late, 1);

    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subjects.node_infer(&twice), inbox, infer_body(json!(1)))
        .await
        .unwrap();
    for _ in 0..2 {
        let msg = tokio::time::timeout(T, replies.next())
            .await
            .unwrap()
            .unwrap();
        assert!(is_valid_answer(&msg.payload));
    }
    assert_eq!(sim.counters(&twice).unwrap().duplicates, 1);

    // A request the node cannot read is answered with an error, not a crash.
    let raw = request_bytes(
        &client,
        &subjects.node_infer(&twice),
        Bytes::from_static(b"{"),
        T,
    )
    .await
    .unwrap();
    assert!(!is_valid_answer(&raw));
    sim.stop().await;
}

#[derive(serde::Deserialize)]
struct Register {
    node_id: NodeId,
    stake: f64,
    capacity: u32,
}

#[tokio::test]
async fn nodes_register_through_the_command_subject() {
    let client = client().await;
    let subjects = Subjects::random();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let registry = tokio::spawn({
        let client = client.clone();
        let subject = subjects.cmd_node_register();
        async move {
            rpc::serve(
                &client,
                &subject,
                "reputation",
                |req: rpc::Request| async move {
                    match parse_command::<Register>(&req.payload) {
                        Ok(cmd) if cmd.node_id.as_str() == "known" => Reply::err(ErrorBody::new(
                            ErrorCode::Conflict,
                            "node known is already registered",
                        )),
                        Ok(cmd) if cmd.node_id.as_str() == "refused" => {
                            Reply::err(ErrorBody::bad_request("no"))
                        }
                        Ok(cmd) => {
                            assert!(cmd.stake >= 0.0 && cmd.capacity > 0);
                            Reply::ok(&json!({"node_id": cmd.node_id}))
                        }
                        Err(e) => Reply::err(e),
                    }
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await
        }
    });
    let registering = |nodes| SimConfig {
        register: true,
        register_timeout: Duration::from_secs(3),
        ..config(nodes)
    };
    // Registration waits for the registry to come up, then accepts `ok` and `conflict`.
    let sim = Sim::start(
        client.clone(),
        subjects.clone(),
        registering(vec![
            SimNode::new(id("fresh"), "d"),
            SimNode::new(id("known"), "d"),
        ]),
    )
    .await
    .unwrap();
    sim.stop().await;

    let err = Sim::start(
        client.clone(),
        subjects.clone(),
        registering(vec![SimNode::new(id("refused"), "d")]),
    )
    .await
    .err()
    .expect("a refused registration fails start");
    assert!(
        matches!(
            err,
            deepnode_sim::Error::Refused {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{err}"
    );
    // The refused node was stopped again.
    let r = request_bytes(
        &client,
        &subjects.node_infer(&id("refused")),
        infer_body(json!(1)),
        T,
    )
    .await;
    assert!(matches!(r, Err(rpc::Error::NoResponders { .. })), "{r:?}");

    stop.send(()).unwrap();
    registry.await.unwrap().unwrap();

    // Nobody answers registration: start fails after the deadline.
    let err = Sim::start(
        client.clone(),
        subjects.clone(),
        SimConfig {
            register_timeout: Duration::from_millis(300),
            ..registering(vec![SimNode::new(id("lonely"), "d")])
        },
    )
    .await
    .err()
    .expect("no registry, no start");
    assert!(matches!(err, deepnode_sim::Error::Register { .. }), "{err}");
}

#[tokio::test]
async fn bad_configs_are_refused() {
    let client = client().await;
    let dup = config(vec![SimNode::new(id("x"), "d"), SimNode::new(id("x"), "d")]);
    assert!(Sim::start(client.clone(), Subjects::random(), dup)
        .await
        .is_err());
    let bad_rate = config(vec![SimNode::new(id("x"), "d").with_behaviour(Behaviour {
        timeout_rate: -0.1,
        ..Behaviour::default()
    })]);
    assert!(Sim::start(client.clone(), Subjects::random(), bad_rate)
        .await
        .is_err());
    let fleet = SimConfig::fleet(3, "sim", "d", Behaviour::default(), 1).unwrap();
    assert_eq!(fleet.nodes[2].node_id.as_str(), "sim-2");
    assert!(SimConfig::fleet(1, "bad id", "d", Behaviour::default(), 1).is_err());
}
