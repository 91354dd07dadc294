//! End-to-end tests of the rotation service against real PostgreSQL and NATS: each test gets its own
//! database and subject prefix, seeds nodes directly as events (registrations plus enough attempt
//! outcomes to give them reputations), and talks to the service in-process over the bus or through
//! `run_round`. They check the reply contract of `cmd.model.deploy`, and the round properties: moves
//! bounded by the cap, never fewer than two replicas at any position of the log, zero moves on an
//! unchanged state, one round per epoch across copies, and phase-out outside immunity only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use deepnode_bus::subjects::Subjects;
use deepnode_domain::book::NodeBook;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::events::{
    AttemptFailed, AttemptSucceeded, DomainEvent, Failure, NodeRegistered, NodeStatus,
    NodeStatusChanged,
};
use deepnode_domain::ids::{ModelId, RequestId};
use deepnode_domain::log::{RecordedEvent, StreamId};
use deepnode_rotation::{
    run, run_round, start_view, RotationOptions, RotationView, RoundOutcome, Trigger,
};
use deepnode_runtime::{ServiceContext, Settings};
use deepnode_store::FollowerHandle;
use deepnode_testkit::{answering, given, log_until, nats_url, node_id, Given, Services, TestDb};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(10);

struct Harness {
    db: TestDb,
    ctx: ServiceContext,
    services: Services,
}

impl Harness {
    /// A fresh database and prefix; no service running yet.
    async fn new() -> Harness {
        let db = TestDb::new().await;
        let ctx = context(&db, Subjects::random()).await;
        Harness {
            db,
            ctx,
            services: Services::default(),
        }
    }

    /// Starts one copy of the service (its own connections) and waits until it answers.
    async fn start(&mut self, options: RotationOptions) {
        let ctx = context_traced(&self.db, self.ctx.subjects.clone()).await;
        self.services
            .start("rotation", |stop| run(ctx, options, stop));
        // Ready when the deploy subject answers (a bad request appends nothing).
        answering(
            &self.ctx.nats,
            &self.ctx.subjects.cmd_model_deploy(),
            TIMEOUT,
        )
        .await;
    }

    async fn stop(mut self) {
        let stopped = self.services.stop().await;
        stopped.expect("every rotation copy stops cleanly");
    }

    async fn deploy(&self, body: Value) -> Value {
        deepnode_bus::request_json(
            &self.ctx.nats,
            &self.ctx.subjects.cmd_model_deploy(),
            &body,
            TIMEOUT,
        )
        .await
        .expect("deploy answers")
    }

    /// Seeds the log: see [`deepnode_testkit::given`].
    fn given(&self) -> Given<'_> {
        given(&self.ctx.store)
    }

    /// Registers a node `age` ago, gives it `ok` successes and `bad` errors (the latest a minute
    /// ago) and, if `active`, promotes it out of probation.
    async fn node(
        &self,
        id: &str,
        domain: &str,
        age: chrono::Duration,
        ok: u32,
        bad: u32,
        active: bool,
    ) {
        let node = node_id(id);
        let now = Utc::now();
        let registered = DomainEvent::NodeRegistered(NodeRegistered {
            node_id: node.clone(),
            domain: domain.to_owned(),
            stake: 10.0,
            capacity: 8,
        });
        let mut events = vec![(registered, now - age)];
        if active {
            let promoted = DomainEvent::NodeStatusChanged(NodeStatusChanged {
                node_id: node.clone(),
                from: NodeStatus::Probation,
                to: NodeStatus::Active,
                reason: "seeded".into(),
                until: None,
            });
            events.push((promoted, now - age / 2));
        }
        let stream = StreamId::parse(&format!("node-{id}")).unwrap();
        self.given().recorded(&stream, events).await;
        let total = ok + bad;
        if total == 0 {
            return;
        }
        let mut attempts = Vec::new();
        for i in 0..total {
            let request_id = RequestId::parse(&format!("seed-{id}-{i}")).unwrap();
            // Interleave failures evenly so the failure window sees the same mix.
            let failed = u64::from(i) * u64::from(bad) / u64::from(total)
                != u64::from(i + 1) * u64::from(bad) / u64::from(total);
            let event = if failed {
                DomainEvent::AttemptFailed(AttemptFailed {
                    request_id,
                    node_id: node.clone(),
                    outcome: Failure::Error,
                    latency_ms: 5,
                    detail: "seeded".into(),
                })
            } else {
                DomainEvent::AttemptSucceeded(AttemptSucceeded {
                    request_id,
                    node_id: node.clone(),
                    latency_ms: 5,
                })
            };
            let at = now
                - chrono::Duration::seconds(60)
                - chrono::Duration::milliseconds(i64::from(total - i));
            attempts.push((event, at));
        }
        let stream = StreamId::parse(&format!("exec-seed-{id}")).unwrap();
        self.given().recorded(&stream, attempts).await;
    }

    /// An established node: 3 days old, active, `ok`/`bad` outcomes.
    async fn established(&self, id: &str, ok: u32, bad: u32) {
        self.node(id, "llm", chrono::Duration::days(3), ok, bad, true)
            .await;
    }

    async fn log(&self) -> Vec<RecordedEvent> {
        self.ctx.store.read_all(0, 100_000).await.unwrap()
    }

    async fn head(&self) -> i64 {
        self.ctx.store.head_position().await.unwrap()
    }

    async fn view(&self) -> FollowerHandle<RotationView> {
        let view = start_view(&self.ctx);
        view.wait_for(self.head().await, TIMEOUT).await.unwrap();
        view
    }
}

async fn context_traced(db: &TestDb, subjects: Subjects) -> ServiceContext {
    deepnode_runtime::telemetry::init("rotation-test", deepnode_runtime::settings::LogFormat::Text);
    context(db, subjects).await
}

async fn context(db: &TestDb, subjects: Subjects) -> ServiceContext {
    let settings = Settings::new(db.url().to_owned(), nats_url(), None).unwrap();
    ServiceContext::connect(&settings, "rotation-test", subjects)
        .await
        .expect("connect")
}

fn manual() -> RotationOptions {
    RotationOptions {
        periodic: false,
        ..RotationOptions::default()
    }
}

fn code(reply: &Value) -> &str {
    reply["error"]["code"].as_str().unwrap_or("<ok>")
}

fn assignments(reply: &Value) -> Vec<(String, String)> {
    reply["assignments"]
        .as_array()
        .unwrap_or_else(|| panic!("no assignments in {reply}"))
        .iter()
        .map(|a| {
            (
                a["node_id"].as_str().unwrap().to_owned(),
                a["tier"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn of_type<'a>(log: &'a [RecordedEvent], event_type: &str) -> Vec<&'a RecordedEvent> {
    log.iter().filter(|e| e.event_type == event_type).collect()
}

#[tokio::test]
async fn deploy_places_two_distinct_nodes_top_then_lower() {
    let mut h = Harness::new().await;
    for (i, ok) in [100, 90, 80, 70].into_iter().enumerate() {
        h.established(&format!("n{i}"), ok, 100 - ok).await;
    }
    h.start(manual()).await;

    let reply = h.deploy(json!({"model_id": "m1", "domain": "llm"})).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let a = assignments(&reply);
    assert_eq!(a.len(), 2);
    assert_ne!(a[0].0, a[1].0);
    assert_eq!((a[0].1.as_str(), a[1].1.as_str()), ("top", "lower"));
    // The best node is the primary.
    assert_eq!(a[0].0, "n0");

    let stream = h
        .ctx
        .store
        .read_stream(&StreamId::parse("model-m1").unwrap(), 1)
        .await
        .unwrap();
    let types: Vec<&str> = stream.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["ModelDeployed", "DeploymentAssigned", "DeploymentAssigned"]
    );

    let three = h
        .deploy(json!({"model_id": "m3", "domain": "llm", "replicas": 3}))
        .await;
    let a = assignments(&three);
    assert_eq!(a.len(), 3);
    let mut nodes: Vec<&String> = a.iter().map(|x| &x.0).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "replicas on distinct nodes: {three}");
    assert_eq!(a[0].1, "top");
    h.stop().await;
}

#[tokio::test]
async fn redeploy_conflicts_and_an_idempotency_key_returns_the_original_answer() {
    let mut h = Harness::new().await;
    for i in 0..4 {
        h.established(&format!("n{i}"), 90, 10).await;
    }
    h.start(manual()).await;

    let first = h.deploy(json!({"model_id": "m1", "domain": "llm"})).await;
    assert_eq!(first["ok"], json!(true));
    let head = h.head().await;
    let again = h.deploy(json!({"model_id": "m1", "domain": "llm"})).await;
    assert_eq!(code(&again), "conflict", "{again}");
    assert_eq!(h.head().await, head, "a conflict appends nothing");

    let body = json!({"model_id": "m2", "domain": "llm", "idempotency_key": "k-1"});
    let keyed = h.deploy(body.clone()).await;
    assert_eq!(keyed["ok"], json!(true), "{keyed}");
    let head = h.head().await;
    let retry = h.deploy(body).await;
    assert_eq!(retry, keyed, "a retry returns the original answer");
    assert_eq!(h.head().await, head, "and appends nothing");
    // A different key for a deployed model is a conflict.
    let other = h
        .deploy(json!({"model_id": "m2", "domain": "llm", "idempotency_key": "k-2"}))
        .await;
    assert_eq!(code(&other), "conflict");
    h.stop().await;
}

#[tokio::test]
async fn too_few_eligible_nodes_is_no_eligible_nodes_and_nothing_is_appended() {
    let mut h = Harness::new().await;
    h.established("solo", 90, 10).await;
    h.established("j1", 90, 10).await;
    h.established("j2", 90, 10).await;
    h.node("v1", "vision", chrono::Duration::days(3), 90, 10, true)
        .await;
    // j1 is jailed: registered in llm but not eligible.
    let jailed = DomainEvent::NodeStatusChanged(NodeStatusChanged {
        node_id: node_id("j1"),
        from: NodeStatus::Active,
        to: NodeStatus::Jailed,
        reason: "seeded".into(),
        until: Some(Utc::now() + chrono::Duration::hours(1)),
    });
    let j2_offline = DomainEvent::NodeStatusChanged(NodeStatusChanged {
        node_id: node_id("j2"),
        from: NodeStatus::Active,
        to: NodeStatus::Offline,
        reason: "seeded".into(),
        until: None,
    });
    h.given().event(jailed).await;
    h.given().event(j2_offline).await;
    h.start(manual()).await;
    let head = h.head().await;

    for body in [
        json!({"model_id": "m1", "domain": "nowhere"}),
        json!({"model_id": "m1", "domain": "vision"}),
        json!({"model_id": "m1", "domain": "llm"}),
    ] {
        let reply = h.deploy(body.clone()).await;
        assert_eq!(code(&reply), "no_eligible_nodes", "{body} → {reply}");
    }
    assert_eq!(h.head().await, head, "nothing appended");
    h.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_the_right_code_and_nothing_is_appended() {
    let mut h = Harness::new().await;
    for i in 0..3 {
        h.established(&format!("n{i}"), 90, 10).await;
    }
    h.start(manual()).await;
    let head = h.head().await;
    let subject = h.ctx.subjects.cmd_model_deploy();
    let big = format!(
        r#"{{"model_id":"m1","domain":"llm","pad":"{}"}}"#,
        "x".repeat(600 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed json", b"{not json".to_vec(), "bad_request"),
        ("empty body", b"".to_vec(), "bad_request"),
        ("an array", b"[1,2]".to_vec(), "bad_request"),
        (
            "missing model_id",
            br#"{"domain":"llm"}"#.to_vec(),
            "bad_request",
        ),
        (
            "missing domain",
            br#"{"model_id":"m1"}"#.to_vec(),
            "bad_request",
        ),
        (
            "id charset",
            br#"{"model_id":"m 1","domain":"llm"}"#.to_vec(),
            "bad_request",
        ),
        (
            "empty id",
            br#"{"model_id":"","domain":"llm"}"#.to_vec(),
            "bad_request",
        ),
        (
            "long id",
            format!(r#"{{"model_id":"{}","domain":"llm"}}"#, "m".repeat(129)).into_bytes(),
            "bad_request",
        ),
        (
            "id type",
            br#"{"model_id":7,"domain":"llm"}"#.to_vec(),
            "bad_request",
        ),
        (
            "empty domain",
            br#"{"model_id":"m1","domain":""}"#.to_vec(),
            "bad_request",
        ),
        (
            "one replica",
            br#"{"model_id":"m1","domain":"llm","replicas":1}"#.to_vec(),
            "bad_request",
        ),
        (
            "fractional replicas",
            br#"{"model_id":"m1","domain":"llm","replicas":2.5}"#.to_vec(),
            "bad_request",
        ),
        (
            "string replicas",
            br#"{"model_id":"m1","domain":"llm","replicas":"2"}"#.to_vec(),
            "bad_request",
        ),
        (
            "negative replicas",
            br#"{"model_id":"m1","domain":"llm","replicas":-2}"#.to_vec(),
            "bad_request",
        ),
        (
            "empty key",
            br#"{"model_id":"m1","domain":"llm","idempotency_key":""}"#.to_vec(),
            "bad_request",
        ),
        ("too large", big.into_bytes(), "payload_too_large"),
    ];
    for (name, body, want) in cases {
        let reply = deepnode_bus::request_bytes(&h.ctx.nats, &subject, body.into(), TIMEOUT)
            .await
            .unwrap();
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["ok"], json!(false), "{name}: {reply}");
        assert_eq!(code(&reply), want, "{name}: {reply}");
    }
    assert_eq!(h.head().await, head, "nothing appended");
    // The service is still up.
    let ok = h.deploy(json!({"model_id": "m1", "domain": "llm"})).await;
    assert_eq!(ok["ok"], json!(true), "{ok}");
    h.stop().await;
}

/// Folds the whole log event by event and checks that once a model has reached two replicas it never
/// has fewer, at any position.
fn assert_never_below_two_replicas(log: &[RecordedEvent]) {
    let mut book = NodeBook::new(&PolicyConfig::default());
    let mut reached: std::collections::BTreeSet<ModelId> = Default::default();
    for e in log {
        book.evolve(e).unwrap();
        for (model, replicas) in book.deployments() {
            if replicas.len() >= 2 {
                reached.insert(model.clone());
            }
        }
        for model in &reached {
            let n = book.deployments().get(model).map_or(0, |r| r.len());
            assert!(
                n >= 2,
                "model {model} has {n} replicas at position {}",
                e.global_position
            );
        }
    }
}

#[tokio::test]
async fn rounds_move_at_most_the_cap_keep_two_replicas_and_settle() {
    let mut h = Harness::new().await;
    h.established("a", 60, 40).await;
    h.established("b", 60, 40).await;
    h.start(manual()).await;
    for m in ["m1", "m2", "m3"] {
        let reply = h.deploy(json!({"model_id": m, "domain": "llm"})).await;
        assert_eq!(reply["ok"], json!(true), "{reply}");
    }
    let view = h.view().await;
    // Epochs 1 and 2: replicas are within their minimum residency, nothing moves.
    for epoch in 1..=2 {
        let r = run_round(&h.ctx, &view, &manual(), Trigger::OnDemand)
            .await
            .unwrap();
        assert_eq!(
            (r.outcome, r.epoch, r.moves.len()),
            (RoundOutcome::Completed, epoch, 0)
        );
    }
    // A clearly better node arrives.
    h.established("c", 200, 0).await;
    view.wait_for(h.head().await, TIMEOUT).await.unwrap();

    let mut total = 0;
    let mut settled = false;
    for _ in 0..10 {
        let r = run_round(&h.ctx, &view, &manual(), Trigger::OnDemand)
            .await
            .unwrap();
        assert_eq!(r.outcome, RoundOutcome::Completed);
        // 6 replicas × 5 % rounds to 0, so the floor of 1 move per epoch applies.
        assert_eq!(r.cap, 1);
        assert!(r.moves.len() <= r.cap as usize, "{r:?}");
        for m in &r.moves {
            assert_eq!(m.assigned.as_str(), "c");
        }
        total += r.moves.len();
        if r.moves.is_empty() {
            settled = true;
            break;
        }
    }
    assert!(settled, "rotation never settled");
    assert_eq!(total, 3, "every model's top slot moved to c");
    // Unchanged state: another round makes zero moves.
    let again = run_round(&h.ctx, &view, &manual(), Trigger::OnDemand)
        .await
        .unwrap();
    assert!(again.moves.is_empty(), "{again:?}");

    let log = h.log().await;
    assert_never_below_two_replicas(&log);
    // Every move is an assign followed by its revoke, caused by its round.
    let completed = of_type(&log, "RotationCompleted");
    let epochs: Vec<u64> = completed
        .iter()
        .map(|e| e.payload.to_value()["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, (1..=epochs.len() as u64).collect::<Vec<_>>());
    for e in of_type(&log, "DeploymentRevoked") {
        let cause = e.metadata.to_value()["causation_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            completed.iter().any(|c| c.event_id.to_string() == cause),
            "{cause}"
        );
        let prev = log
            .iter()
            .find(|p| p.global_position == e.global_position - 1)
            .unwrap();
        assert_eq!(prev.event_type, "DeploymentAssigned");
    }
    view.stop();
    h.stop().await;
}

#[tokio::test]
async fn concurrent_rounds_on_two_copies_complete_each_epoch_once() {
    let mut h = Harness::new().await;
    h.established("a", 60, 40).await;
    h.established("b", 60, 40).await;
    h.start(manual()).await;
    h.deploy(json!({"model_id": "m1", "domain": "llm"})).await;
    let other = context(&h.db, h.ctx.subjects.clone()).await;
    let (v1, v2) = (h.view().await, {
        let v = start_view(&other);
        v.wait_for(h.head().await, TIMEOUT).await.unwrap();
        v
    });
    let mut completed = 0;
    let options = manual();
    for _ in 0..5 {
        let (r1, r2) = tokio::join!(
            run_round(&h.ctx, &v1, &options, Trigger::OnDemand),
            run_round(&other, &v2, &options, Trigger::OnDemand),
        );
        for r in [r1.unwrap(), r2.unwrap()] {
            if r.outcome == RoundOutcome::Completed {
                completed += 1;
            } else {
                assert_eq!(r.outcome, RoundOutcome::Busy);
            }
        }
    }
    let log = h.log().await;
    let epochs: Vec<u64> = of_type(&log, "RotationCompleted")
        .iter()
        .map(|e| e.payload.to_value()["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs.len(), completed);
    assert!(completed >= 5, "at least one round per trigger pair");
    assert_eq!(
        epochs,
        (1..=completed as u64).collect::<Vec<_>>(),
        "each epoch once, in order"
    );
    v1.stop();
    v2.stop();
    h.stop().await;
}

#[tokio::test]
async fn two_periodic_copies_run_one_round_per_period() {
    let mut h = Harness::new().await;
    let period = Duration::from_millis(400);
    let options = RotationOptions {
        period: Some(period),
        ..RotationOptions::default()
    };
    h.start(options.clone()).await;
    h.start(options).await;
    let started: DateTime<Utc> = Utc::now();
    // (waits on the rounds themselves: five of them, however long the box takes)
    let log = log_until(&h.ctx.store, "five periodic rounds", TIMEOUT, |log| {
        of_type(log, "RotationCompleted").len() >= 5
    })
    .await;
    let elapsed = Utc::now() - started;
    let completed = of_type(&log, "RotationCompleted");
    let epochs: Vec<u64> = completed
        .iter()
        .map(|e| e.payload.to_value()["epoch"].as_u64().unwrap())
        .collect();
    assert!(epochs.len() >= 3, "periodic rounds ran: {epochs:?}");
    assert_eq!(epochs, (1..=epochs.len() as u64).collect::<Vec<_>>());
    // One round per period slot across both copies, never two.
    let slots = elapsed.num_milliseconds() / 400 + 2;
    assert!(
        epochs.len() as i64 <= slots,
        "{} rounds in {} slots",
        epochs.len(),
        slots
    );
    let mut seen = std::collections::BTreeSet::new();
    for e in &completed {
        assert!(
            seen.insert(e.occurred_at.timestamp_millis() / 400),
            "two rounds in one slot"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn on_demand_rounds_over_the_bus_and_phase_out_outside_immunity_only() {
    let mut h = Harness::new().await;
    for id in ["a", "b", "c"] {
        h.established(id, 95, 5).await;
    }
    // Persistently poor and outside immunity (3 days, 150 observations).
    h.established("poor", 20, 130).await;
    // Just as poor but registered an hour ago: immune.
    h.node("fresh", "llm", chrono::Duration::hours(1), 20, 130, true)
        .await;
    h.start(manual()).await;

    let reply = deepnode_bus::request_json(
        &h.ctx.nats,
        &h.ctx.subjects.cmd_rotation_run(),
        &json!({}),
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(reply["outcome"], json!("completed"));
    assert_eq!(reply["phased_out"], json!(["poor"]), "{reply}");

    let log = h.log().await;
    let changes: Vec<&RecordedEvent> = of_type(&log, "NodeStatusChanged")
        .into_iter()
        .filter(|e| e.payload.to_value()["to"] == json!("phased_out"))
        .collect();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].payload.to_value()["node_id"], json!("poor"));
    assert_eq!(changes[0].payload.to_value()["from"], json!("active"));
    let completed = of_type(&log, "RotationCompleted");
    assert_eq!(
        changes[0].metadata.to_value()["causation_id"].as_str(),
        Some(completed[0].event_id.to_string().as_str())
    );
    // Already phased out: the next round does not do it again.
    let again = deepnode_bus::request_json(
        &h.ctx.nats,
        &h.ctx.subjects.cmd_rotation_run(),
        &json!({}),
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(again["epoch"], json!(2));
    assert_eq!(again["phased_out"], json!([]));
    h.stop().await;
}
