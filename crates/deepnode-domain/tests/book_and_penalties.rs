//! The projection fold and the penalty decider, through the public API: given a history of events,
//! when it is folded (and assessed), then the rows and decisions are what POLICY.md says. Property
//! tests cover determinism, fault idempotence and phase-out immunity over random histories.

#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Utc};
use deepnode_domain::book::{ExecutionRow, NodeBook};
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::events::*;
use deepnode_domain::ids::{ModelId, NodeId, RequestId};
use deepnode_domain::log::RecordedEvent;
use deepnode_domain::penalties::{assess, jail_duration_secs};
use deepnode_domain::placement::PlacementNode;
use deepnode_domain::rotation::{is_immune, phase_out_candidates};
use proptest::prelude::*;
use uuid::Uuid;

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
}

fn n(id: &str) -> NodeId {
    NodeId::parse(id).unwrap()
}

fn m(id: &str) -> ModelId {
    ModelId::parse(id).unwrap()
}

fn r(id: &str) -> RequestId {
    RequestId::parse(id).unwrap()
}

/// A log in memory: turns typed events into recorded rows with increasing positions.
struct Log {
    rows: Vec<RecordedEvent>,
}

impl Log {
    fn new() -> Log {
        Log { rows: Vec::new() }
    }

    fn push(&mut self, event: DomainEvent, at: DateTime<Utc>) {
        let new = event.to_new_event(Uuid::nil(), Metadata::new("test", "c"), at);
        let position = self.rows.len() as i64 + 1;
        self.rows.push(RecordedEvent {
            global_position: position,
            event_id: Uuid::from_u128(position as u128),
            stream_id: event.stream_name(),
            stream_version: 1,
            event_type: new.event_type,
            schema_version: new.schema_version,
            payload: new.payload.into(),
            metadata: new.metadata.into(),
            occurred_at: at,
            recorded_at: at,
            prev_hash: Vec::new(),
            hash: Vec::new(),
        });
    }

    fn fold(&self) -> NodeBook {
        self.fold_with_executions().0
    }

    /// The book, and every execution's row as the fold handed it out: the final rows of those that
    /// ended (the book does not keep them), then those still in flight, in request id order.
    fn fold_with_executions(&self) -> (NodeBook, Vec<ExecutionRow>) {
        let mut book = NodeBook::default();
        let mut rows = Vec::new();
        for row in &self.rows {
            rows.extend(book.evolve(row).unwrap().ended);
        }
        rows.extend(book.execution_rows());
        rows.sort_by(|a, b| a.request_id.cmp(&b.request_id));
        (book, rows)
    }
}

fn register(id: &str, stake: f64) -> DomainEvent {
    DomainEvent::NodeRegistered(NodeRegistered {
        node_id: n(id),
        domain: "text".into(),
        stake,
        capacity: 4,
    })
}

fn outcome(node: &str, req: &str, o: Outcome) -> DomainEvent {
    match o {
        Outcome::Success => DomainEvent::AttemptSucceeded(AttemptSucceeded {
            request_id: r(req),
            node_id: n(node),
            latency_ms: 10,
        }),
        Outcome::Error => failed(node, req, Failure::Error),
        Outcome::Timeout => failed(node, req, Failure::Timeout),
        Outcome::InvalidOutput => failed(node, req, Failure::InvalidOutput),
    }
}

fn failed(node: &str, req: &str, f: Failure) -> DomainEvent {
    DomainEvent::AttemptFailed(AttemptFailed {
        request_id: r(req),
        node_id: n(node),
        outcome: f,
        latency_ms: 10,
        detail: String::new(),
    })
}

#[test]
fn a_registered_node_is_a_probation_row_at_the_prior() {
    // given a registration
    let mut log = Log::new();
    log.push(register("n1", 100.0), t(0));
    // when folded
    let book = log.fold();
    // then its row is the neutral prior in probation
    let row = book.node_row(&n("n1")).unwrap();
    assert_eq!(row.score, 0.5);
    assert_eq!(row.status, "probation");
    assert_eq!(row.recent_failure_rate, 0.1);
    assert_eq!(
        (row.capacity, row.stake, row.registered_at),
        (4, 100.0, t(0))
    );
    assert_eq!(book.last_position(), 1);
}

#[test]
fn an_ended_execution_is_handed_out_once_and_not_retained() {
    // given 10,000 executions that ended and one still in flight
    let mut log = Log::new();
    log.push(register("n1", 1.0), t(0));
    for i in 0..10_001 {
        log.push(
            DomainEvent::ExecutionRequested(ExecutionRequested {
                request_id: r(&format!("r{i}")),
                model_id: m("m1"),
                timeout_ms: 5000,
            }),
            t(1),
        );
        if i == 10_000 {
            break;
        }
        let end = if i % 2 == 0 {
            DomainEvent::ExecutionCompleted(ExecutionCompleted {
                request_id: r(&format!("r{i}")),
                model_id: m("m1"),
                node_id: n("n1"),
                attempts: 1,
                charged: true,
                output: serde_json::Value::Null,
            })
        } else {
            DomainEvent::ExecutionFailed(ExecutionFailed {
                request_id: r(&format!("r{i}")),
                model_id: m("m1"),
                attempts: 2,
                charged: false,
                error_code: "all_replicas_failed".into(),
                message: None,
                abandoned: false,
            })
        };
        log.push(end, t(2));
    }
    // when folded
    let (book, rows) = log.fold_with_executions();
    // then the book holds only the execution in flight: memory does not grow with the log
    assert_eq!(book.executions().len(), 1);
    assert_eq!(
        book.execution_row(&r("r10000")).map(|e| e.status),
        Some("in_flight".to_owned())
    );
    assert_eq!(book.execution_row(&r("r0")), None);
    // and every ended execution's final row came out of the fold exactly once
    assert_eq!(rows.len(), 10_001);
    let ended: Vec<&ExecutionRow> = rows.iter().filter(|e| e.status != "in_flight").collect();
    assert_eq!(ended.len(), 10_000);
    assert!(ended
        .iter()
        .all(|e| e.completed_at == Some(t(2)) && e.charged == (e.status == "succeeded")));
}

#[test]
fn an_execution_and_its_deployments_project_to_rows() {
    // given a model on two nodes and one request whose primary fails and backup succeeds
    let mut log = Log::new();
    log.push(register("n1", 1.0), t(0));
    log.push(register("n2", 1.0), t(0));
    for (node, tier) in [("n1", Tier::Top), ("n2", Tier::Lower)] {
        log.push(
            DomainEvent::DeploymentAssigned(DeploymentAssigned {
                model_id: m("m1"),
                node_id: n(node),
                tier,
                reason: "placement".into(),
            }),
            t(1),
        );
    }
    log.push(
        DomainEvent::ExecutionRequested(ExecutionRequested {
            request_id: r("r1"),
            model_id: m("m1"),
            timeout_ms: 5000,
        }),
        t(2),
    );
    for (attempt, node, role) in [(1, "n1", Role::Primary), (2, "n2", Role::Backup)] {
        log.push(
            DomainEvent::AttemptDispatched(AttemptDispatched {
                request_id: r("r1"),
                model_id: m("m1"),
                node_id: n(node),
                role,
                attempt,
                decision: Box::new(stored_decision()),
            }),
            t(2),
        );
        let o = if attempt == 1 {
            Outcome::Timeout
        } else {
            Outcome::Success
        };
        log.push(outcome(node, "r1", o), t(3));
    }
    log.push(
        DomainEvent::ExecutionCompleted(ExecutionCompleted {
            request_id: r("r1"),
            model_id: m("m1"),
            node_id: n("n2"),
            attempts: 2,
            charged: true,
            output: serde_json::Value::Null,
        }),
        t(4),
    );
    // when folded
    let (mut book, executions) = log.fold_with_executions();
    // then the execution row says succeeded on n2 after two attempts, charged
    let exec = &executions[0];
    assert_eq!(executions.len(), 1);
    assert_eq!(exec.request_id, "r1");
    assert_eq!(exec.status, "succeeded");
    assert_eq!(exec.node_id.as_deref(), Some("n2"));
    assert_eq!((exec.attempts, exec.charged), (2, true));
    assert_eq!((exec.requested_at, exec.completed_at), (t(2), Some(t(4))));
    // and the counters moved in opposite directions
    let (n1, n2) = (
        book.node_row(&n("n1")).unwrap(),
        book.node_row(&n("n2")).unwrap(),
    );
    assert_eq!((n1.timeouts, n1.successes), (1, 0));
    assert!(n1.score < 0.5 && n2.score > 0.5);
    assert_eq!(n1.updated_at, t(3));
    // and both replicas are rows, in key order
    let tiers: Vec<_> = book
        .deployment_rows()
        .map(|d| (d.node_id, d.tier))
        .collect();
    assert_eq!(
        tiers,
        [("n1".into(), "top".into()), ("n2".into(), "lower".into())]
    );
    assert_eq!(book.node(&n("n1")).unwrap().deployments, 1);
    // when a replica is revoked, its row is gone and the touched key says which
    let touched = book.apply(
        DomainEvent::DeploymentRevoked(DeploymentRevoked {
            model_id: m("m1"),
            node_id: n("n1"),
            reason: "rotation".into(),
        }),
        t(5),
    );
    assert_eq!(touched.deployment, Some((m("m1"), n("n1"))));
    assert_eq!(book.deployment_row(&m("m1"), &n("n1")), None);
    assert_eq!(book.node(&n("n1")).unwrap().deployments, 0);
}

#[test]
fn an_unknown_event_type_stops_the_fold_with_a_typed_error() {
    let mut log = Log::new();
    log.push(register("n1", 1.0), t(0));
    let mut row = log.rows[0].clone();
    row.event_type = "NodeTeleported".into();
    let mut book = NodeBook::default();
    assert!(matches!(
        book.evolve(&row),
        Err(DecodeError::UnknownEventType { .. })
    ));
    assert!(book.nodes().is_empty());
}

fn book_with(events: &[(DomainEvent, DateTime<Utc>)]) -> NodeBook {
    let mut book = NodeBook::default();
    for (e, at) in events {
        book.apply(e.clone(), *at);
    }
    book
}

fn fold_decisions(book: &mut NodeBook, decisions: Vec<DomainEvent>, at: DateTime<Utc>) {
    for d in decisions {
        book.apply(d, at);
    }
}

#[test]
fn downtime_jails_slashes_and_returns_the_node_in_probation() {
    let cfg = PolicyConfig::default();
    // given a node that failed 15 of 20 attempts
    let mut events = vec![(register("n1", 1000.0), t(0))];
    for i in 0..20 {
        let o = if i < 15 {
            Outcome::Error
        } else {
            Outcome::Success
        };
        events.push((outcome("n1", "r", o), t(10 + i)));
    }
    let mut book = book_with(&events);
    let node = book.node(&n("n1")).unwrap().clone();
    // when assessed
    let decisions = assess(&node, t(40), &cfg);
    // then it is slashed 0.1 % and jailed for 600 s
    assert_eq!(decisions.len(), 2);
    let DomainEvent::NodeSlashed(s) = &decisions[0] else {
        panic!("{decisions:?}")
    };
    assert_eq!(
        (s.fault_id.as_str(), s.fraction_bps, s.amount),
        ("downtime:n1:1", 10, 1.0)
    );
    let DomainEvent::NodeStatusChanged(c) = &decisions[1] else {
        panic!("{decisions:?}")
    };
    assert_eq!(
        (c.from, c.to, c.until),
        (NodeStatus::Probation, NodeStatus::Jailed, Some(t(640)))
    );
    // and once folded, the same assessment finds nothing new
    fold_decisions(&mut book, decisions, t(40));
    let node = book.node(&n("n1")).unwrap();
    assert_eq!(
        (node.stake, node.slashed_amount, node.jail_count),
        (999.0, 1.0, 1)
    );
    assert_eq!(book.node_row(&n("n1")).unwrap().status, "jailed");
    assert!(assess(node, t(100), &cfg).is_empty());
    // and after the jail ends it re-enters in probation
    let release = assess(node, t(640), &cfg);
    assert_eq!(release.len(), 1);
    fold_decisions(&mut book, release, t(640));
    assert_eq!(book.node(&n("n1")).unwrap().status, NodeStatus::Probation);
    // and jails double, capped at 24 h
    assert_eq!(jail_duration_secs(2, &cfg), 1200);
    assert_eq!(jail_duration_secs(40, &cfg), 86_400);
}

#[test]
fn invalid_output_twice_slashes_five_percent_and_three_faults_tombstone() {
    let cfg = PolicyConfig::default();
    // given a node
    let mut book = book_with(&[(register("n1", 100.0), t(0))]);
    let mut now = 0;
    let mut kinds = Vec::new();
    for fault in 0..3 {
        // when it returns invalid output twice within the window (with enough successes to avoid
        // downtime)
        for _ in 0..10 {
            now += 1;
            book.apply(outcome("n1", "r", Outcome::Success), t(now));
        }
        for _ in 0..2 {
            now += 60;
            book.apply(outcome("n1", "r", Outcome::InvalidOutput), t(now));
        }
        let decisions = assess(book.node(&n("n1")).unwrap(), t(now), &cfg);
        kinds.push(decisions.iter().map(|d| d.event_type()).collect::<Vec<_>>());
        if fault < 2 {
            // then it is slashed 5 % once per fault
            assert_eq!(kinds[fault], ["NodeSlashed"]);
        }
        fold_decisions(&mut book, decisions, t(now));
    }
    // then the third fault within 7 days tombstones it
    assert_eq!(kinds[2], ["NodeSlashed", "NodeStatusChanged"]);
    let node = book.node(&n("n1")).unwrap();
    assert_eq!(node.status, NodeStatus::Tombstoned);
    let expected = 100.0 * 0.05 + 95.0 * 0.05 + 90.25 * 0.05;
    assert!((node.slashed_amount - expected).abs() < 1e-9);
    assert!(assess(node, t(now + 10), &cfg).is_empty());
}

#[test]
fn probation_ends_after_fifty_observations_and_a_day() {
    let cfg = PolicyConfig::default();
    // given a node with 50 successes in its first hour
    let mut events = vec![(register("n1", 1.0), t(0))];
    for i in 0..50 {
        events.push((outcome("n1", "r", Outcome::Success), t(i)));
    }
    let book = book_with(&events);
    let node = book.node(&n("n1")).unwrap();
    // then it stays in probation before 24 h and is promoted at 24 h
    assert!(assess(node, t(86_399), &cfg).is_empty());
    let promoted = assess(node, t(86_400), &cfg);
    let [DomainEvent::NodeStatusChanged(c)] = promoted.as_slice() else {
        panic!("{promoted:?}")
    };
    assert_eq!((c.from, c.to), (NodeStatus::Probation, NodeStatus::Active));
}

#[test]
fn a_poor_node_is_phased_out_by_rotation_only_after_immunity() {
    let mut cfg = PolicyConfig::default();
    // keep downtime out of the way: this test is about reputation
    cfg.penalty.downtime_min_attempts = u32::MAX;
    // given an active node with 100 observations, 80 of them errors, all in its first hour
    let mut events = vec![(register("n1", 1.0), t(0))];
    for i in 0..100 {
        let o = if i % 5 == 0 {
            Outcome::Success
        } else {
            Outcome::Error
        };
        events.push((outcome("n1", "r", o), t(i)));
    }
    let book = book_with(&events);
    let node = book.node(&n("n1")).unwrap();
    let candidates =
        |at| phase_out_candidates(&[PlacementNode::of(node, at, &cfg)], at, &cfg.rotation);
    // then while younger than 24 h it is immune
    assert!(is_immune(
        &PlacementNode::of(node, t(3600), &cfg),
        t(3600),
        &cfg.rotation
    ));
    assert!(candidates(t(3600)).is_empty());
    // and just after (R has decayed only a little toward 0.5) rotation picks it
    let victims = candidates(t(86_400));
    assert_eq!(victims.len(), 1, "{victims:?}");
    assert_eq!(victims[0].node_id, n("n1"));
    // while the penalty decider never phases out (one rule, one owner)
    let assessed = assess(node, t(86_400), &cfg);
    assert!(
        !assessed.iter().any(
            |e| matches!(e, DomainEvent::NodeStatusChanged(c) if c.to == NodeStatus::PhasedOut)
        ),
        "{assessed:?}"
    );
}

#[test]
fn a_repeated_slash_event_is_not_taken_twice() {
    // given a slash folded twice (an assessment repeated before its events were folded)
    let slash = DomainEvent::NodeSlashed(NodeSlashed {
        node_id: n("n1"),
        fault_id: "downtime:n1:1".into(),
        kind: FaultKind::Downtime,
        fraction_bps: 10,
        amount: 1.0,
        reason: "downtime".into(),
    });
    let book = book_with(&[
        (register("n1", 100.0), t(0)),
        (slash.clone(), t(1)),
        (slash, t(2)),
    ]);
    // then the stake was taken once
    let row = book.node_row(&n("n1")).unwrap();
    assert_eq!(
        (row.stake, row.slashed_amount, row.updated_at),
        (99.0, 1.0, t(1))
    );
}

// ---- property tests over random histories ----

#[derive(Debug, Clone)]
enum Step {
    Outcome(usize, Outcome),
    Report(usize, Outcome),
    Assign(usize, usize, bool),
    Revoke(usize, usize),
    Exec(usize, usize, u8, bool),
    Assess(usize),
}

fn any_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => Just(Outcome::Success),
        1 => Just(Outcome::Error),
        1 => Just(Outcome::Timeout),
        1 => Just(Outcome::InvalidOutput),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..4usize, any_outcome()).prop_map(|(n, o)| Step::Outcome(n, o)),
        1 => (0..4usize, any_outcome()).prop_map(|(n, o)| Step::Report(n, o)),
        1 => (0..3usize, 0..4usize, any::<bool>()).prop_map(|(m, n, top)| Step::Assign(m, n, top)),
        1 => (0..3usize, 0..4usize).prop_map(|(m, n)| Step::Revoke(m, n)),
        1 => (0..20usize, 0..3usize, 1..3u8, any::<bool>())
            .prop_map(|(r, m, a, ok)| Step::Exec(r, m, a, ok)),
        1 => (0..4usize).prop_map(Step::Assess),
    ]
}

/// Builds a log from random steps; `Assess` steps run the penalty decider against the book so far and
/// append what it decides, like the reputation service does.
fn history(steps: &[(Step, i64)], cfg: &PolicyConfig) -> Log {
    let nodes = ["n0", "n1", "n2", "n3"];
    let models = ["m0", "m1", "m2"];
    let mut log = Log::new();
    let mut book = NodeBook::new(cfg);
    let push = |log: &mut Log, book: &mut NodeBook, e: DomainEvent, at| {
        log.push(e.clone(), at);
        book.apply(e, at);
    };
    for (i, node) in nodes.iter().enumerate() {
        push(
            &mut log,
            &mut book,
            register(node, 10.0 * (i as f64 + 1.0)),
            t(0),
        );
    }
    let mut now = 0;
    for (k, (s, dt)) in steps.iter().enumerate() {
        now += dt;
        let at = t(now);
        let req = format!("r{k}");
        let e = match s {
            Step::Outcome(node, o) => outcome(nodes[*node], &req, *o),
            Step::Report(node, o) => DomainEvent::ExecutionReported(ExecutionReported {
                event_id: None,
                request_id: r(&req),
                model_id: m("m0"),
                node_id: n(nodes[*node]),
                outcome: *o,
                latency_ms: 5,
                reported_occurred_at: at,
            }),
            Step::Assign(model, node, top) => DomainEvent::DeploymentAssigned(DeploymentAssigned {
                model_id: m(models[*model]),
                node_id: n(nodes[*node]),
                tier: if *top { Tier::Top } else { Tier::Lower },
                reason: "placement".into(),
            }),
            Step::Revoke(model, node) => DomainEvent::DeploymentRevoked(DeploymentRevoked {
                model_id: m(models[*model]),
                node_id: n(nodes[*node]),
                reason: "rotation".into(),
            }),
            Step::Exec(rq, model, attempts, ok) => {
                let request_id = r(&format!("q{rq}"));
                push(
                    &mut log,
                    &mut book,
                    DomainEvent::ExecutionRequested(ExecutionRequested {
                        request_id: request_id.clone(),
                        model_id: m(models[*model]),
                        timeout_ms: 100,
                    }),
                    at,
                );
                if *ok {
                    DomainEvent::ExecutionCompleted(ExecutionCompleted {
                        request_id,
                        model_id: m(models[*model]),
                        node_id: n(nodes[0]),
                        attempts: *attempts,
                        charged: true,
                        output: serde_json::Value::Null,
                    })
                } else {
                    DomainEvent::ExecutionFailed(ExecutionFailed {
                        request_id,
                        model_id: m(models[*model]),
                        attempts: *attempts,
                        charged: false,
                        error_code: "all_replicas_failed".into(),
                        message: None,
                        abandoned: false,
                    })
                }
            }
            Step::Assess(node) => {
                let Some(state) = book.node(&n(nodes[*node])).cloned() else {
                    continue;
                };
                // Assess twice before folding: the second run must not double-charge.
                let mut decisions = assess(&state, at, cfg);
                decisions.extend(assess(&state, at, cfg));
                for d in decisions {
                    push(&mut log, &mut book, d, at);
                }
                continue;
            }
        };
        push(&mut log, &mut book, e, at);
    }
    log
}

fn steps() -> impl Strategy<Value = Vec<(Step, i64)>> {
    proptest::collection::vec((step(), 0i64..4000), 0..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn replay_is_deterministic(steps in steps()) {
        let cfg = PolicyConfig::default();
        let log = history(&steps, &cfg);
        let ((a, a_executions), (b, b_executions)) =
            (log.fold_with_executions(), log.fold_with_executions());
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a_executions, b_executions);
        prop_assert_eq!(a.node_rows().collect::<Vec<_>>(), b.node_rows().collect::<Vec<_>>());
        prop_assert_eq!(
            a.deployment_rows().collect::<Vec<_>>(),
            b.deployment_rows().collect::<Vec<_>>()
        );
        prop_assert_eq!(
            a.execution_rows().collect::<Vec<_>>(),
            b.execution_rows().collect::<Vec<_>>()
        );
        for row in a.node_rows() {
            prop_assert!((0.0..=1.0).contains(&row.score));
            prop_assert!((0.0..=1.0).contains(&row.recent_failure_rate));
            prop_assert!(row.stake >= 0.0 && row.slashed_amount >= 0.0);
        }
    }

    #[test]
    fn slashes_are_never_taken_twice_for_one_fault(steps in steps()) {
        let mut cfg = PolicyConfig::default();
        // make faults frequent so histories exercise them
        cfg.penalty.downtime_min_attempts = 4;
        let log = history(&steps, &cfg);
        let mut book = NodeBook::new(&cfg);
        let mut taken: std::collections::BTreeMap<String, f64> = Default::default();
        for row in &log.rows {
            let before: f64 = book.node_rows().map(|r| r.slashed_amount).sum();
            book.evolve(row).unwrap();
            let after: f64 = book.node_rows().map(|r| r.slashed_amount).sum();
            if let Ok(DomainEvent::NodeSlashed(s)) = DomainEvent::decode(row) {
                let delta = after - before;
                if let Some(prev) = taken.get(&s.fault_id) {
                    prop_assert!(delta == 0.0, "fault {} taken again after {}", s.fault_id, prev);
                } else {
                    taken.insert(s.fault_id.clone(), delta);
                }
            }
        }
    }

    #[test]
    fn the_penalty_decider_never_phases_out(steps in steps()) {
        // phase-out is rotation's alone (its own property test holds "no phase-out while immune")
        let mut cfg = PolicyConfig::default();
        cfg.rotation.immunity_secs = 3600;
        cfg.rotation.immunity_min_scored_requests = 20;
        cfg.rotation.phase_out_min_observations = 10;
        let log = history(&steps, &cfg);
        for row in &log.rows {
            if let Ok(DomainEvent::NodeStatusChanged(c)) = DomainEvent::decode(row) {
                prop_assert_ne!(c.to, NodeStatus::PhasedOut);
            }
        }
    }

    #[test]
    fn a_new_node_rises_with_successes(k in 1usize..200, gap in 0i64..100_000) {
        let mut events = vec![(register("n1", 1.0), t(0))];
        prop_assert_eq!(book_with(&events).node_row(&n("n1")).unwrap().score, 0.5);
        let mut last = 0.5;
        for i in 0..k {
            events.push((outcome("n1", "r", Outcome::Success), t(i as i64 * gap)));
            let score = book_with(&events).node_row(&n("n1")).unwrap().score;
            // With long gaps the decayed counts converge, so later successes may leave R equal
            // (up to rounding in the last bits); they never lower it, and the first one raises it.
            prop_assert!(score >= last - 1e-12, "{} < {}", score, last);
            if i == 0 {
                prop_assert!(score > 0.5);
            }
            last = score;
        }
    }
}

#[test]
fn the_fold_is_fast_enough() {
    // A coarse guard, not the benchmark: fold 50,000 outcome events over 1,000 nodes.
    let mut log = Log::new();
    for i in 0..1000 {
        log.push(register(&format!("n{i}"), 1.0), t(0));
    }
    for k in 0..50_000i64 {
        let node = format!("n{}", k % 1000);
        let o = if k % 7 == 0 {
            Outcome::Timeout
        } else {
            Outcome::Success
        };
        log.push(outcome(&node, &format!("r{k}"), o), t(k / 10));
    }
    let start = std::time::Instant::now();
    let book = log.fold();
    let elapsed = start.elapsed();
    assert_eq!(book.nodes().len(), 1000);
    let rate = log.rows.len() as f64 / elapsed.as_secs_f64();
    eprintln!(
        "folded {} events in {elapsed:?}: {rate:.0} events/s",
        log.rows.len()
    );
}

/// A routing decision as the scheduler stores it (the events' golden fixture).
fn stored_decision() -> deepnode_domain::scoring::RouteDecision {
    let payload: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/attempt_dispatched_v1.json")).unwrap();
    serde_json::from_value(payload["decision"].clone()).unwrap()
}
