#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::events::NodeStatus;
use crate::fixed::Bps;
use crate::scoring::{route, CandidateSnapshot, RouteInput, RoutingPolicy};
use chrono::TimeZone;
use serde_json::json;

/// Ids 1, 2, 3… and one second per event from a fixed instant.
#[derive(Debug, Default)]
struct Counter(u128);

impl Stamps for Counter {
    fn id(&mut self) -> Uuid {
        self.0 += 1;
        Uuid::from_u128(self.0)
    }

    fn now(&mut self) -> DateTime<Utc> {
        let at = Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap();
        at + chrono::Duration::seconds(i64::try_from(self.0).unwrap())
    }
}

fn node(id: &str) -> NodeId {
    NodeId::parse(id).unwrap()
}

/// A real routing decision over nodes `a` and `b`, then pinned to `primary` / `backup`.
fn decision(primary: &str, backup: Option<&str>) -> RouteDecision {
    let candidate = |id: &str| CandidateSnapshot {
        node_id: node(id),
        deployed: true,
        status: NodeStatus::Active,
        ejected: false,
        in_flight: 0,
        capacity: 4,
        reputation: Bps::saturating(8_000),
        failure_rate: Bps::saturating(0),
        stake_micros: 1_000,
        assignments: 0,
    };
    let input = RouteInput {
        model_id: ModelId::parse("m-1").unwrap(),
        request_id: RequestId::parse("r-1").unwrap(),
        seed: 7,
        epoch: 3,
        config_hash: "cfg".to_owned(),
        domain_stake_enabled: false,
        domain_median_stake_micros: 1_000,
        candidates: vec![candidate("a"), candidate("b")],
    };
    let mut d = route(&input, &RoutingPolicy::default()).unwrap();
    d.primary = node(primary);
    d.backup = backup.map(node);
    d
}

fn start(backup: Option<&str>) -> (Execution<Counter>, Dispatch) {
    let request = Request {
        request_id: RequestId::parse("r-1").unwrap(),
        model_id: ModelId::parse("m-1").unwrap(),
        timeout_ms: 500,
    };
    let meta = Metadata::new("scheduler", "corr-1");
    Execution::start(request, &decision("a", backup), meta, Counter::default())
}

fn ok(latency_ms: u64) -> Settled {
    Settled {
        outcome: Classified::Success(json!({"text": "hi"})),
        latency_ms,
        transition: Transition::None,
    }
}

fn failed(failure: Failure, transition: Transition) -> Settled {
    Settled {
        outcome: Classified::Failed(failure, "boom".to_owned()),
        latency_ms: 9,
        transition,
    }
}

fn unjudged() -> Settled {
    Settled {
        outcome: Classified::Unjudged("no answer, bus lost".to_owned()),
        latency_ms: 500,
        transition: Transition::None,
    }
}

fn done(next: Next<Counter>) -> Ending {
    match next {
        Next::Done(ending) => ending,
        Next::Backup(_) => panic!("expected the execution to end"),
    }
}

fn failover(next: Next<Counter>) -> Failover<Counter> {
    match next {
        Next::Backup(f) => f,
        Next::Done(e) => panic!("expected a failover, got {:?}", e.verdict),
    }
}

fn types(events: &[NewEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

fn cause(event: &NewEvent) -> Option<Uuid> {
    event.metadata["causation_id"]
        .as_str()
        .map(|c| c.parse().unwrap())
}

/// The record as the store would return it, for [`Verdict::from_log`].
fn recorded(events: &[NewEvent]) -> Vec<RecordedEvent> {
    events
        .iter()
        .zip(1..)
        .map(|(e, n)| RecordedEvent {
            global_position: n,
            event_id: e.event_id,
            stream_id: "exec-r-1".to_owned(),
            stream_version: n,
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            payload: e.payload.clone().into(),
            metadata: e.metadata.clone().into(),
            occurred_at: e.occurred_at,
            recorded_at: e.occurred_at,
            prev_hash: Vec::new(),
            hash: Vec::new(),
        })
        .collect()
}

fn view(node_id: &str, role: Role, outcome: Outcome, latency_ms: u64) -> AttemptView {
    AttemptView {
        node_id: node(node_id),
        role,
        outcome,
        latency_ms,
    }
}

#[test]
fn a_primary_that_answers_is_charged_with_a_chained_four_event_record() {
    let (exec, primary) = start(Some("b"));
    assert_eq!(
        primary,
        Dispatch {
            node: node("a"),
            role: Role::Primary
        }
    );
    let next = exec.settle(ok(3));
    assert!(next.succeeded());
    let ending = done(next);
    let r = &ending.record;
    assert_eq!(
        types(r),
        [
            "ExecutionRequested",
            "AttemptDispatched",
            "AttemptSucceeded",
            "ExecutionCompleted"
        ]
    );
    // each event is caused by the one before it
    assert_eq!(cause(&r[0]), None);
    for pair in r.windows(2) {
        assert_eq!(cause(&pair[1]), Some(pair[0].event_id));
    }
    assert_eq!(r[1].payload["decision"]["config_hash"], "cfg");
    assert_eq!(r[3].payload["attempts"], 1);
    assert_eq!(r[3].payload["output"], json!({"text": "hi"}));
    assert!(ending.decisions.is_empty());
    assert_eq!(
        ending.verdict,
        Verdict::Charged {
            request_id: RequestId::parse("r-1").unwrap(),
            node_id: node("a"),
            output: json!({"text": "hi"}),
            attempts: vec![view("a", Role::Primary, Outcome::Success, 3)],
        }
    );
}

#[test]
fn a_failed_primary_fails_over_to_the_backup_and_its_ejection_follows_the_record() {
    let until = Utc.with_ymd_and_hms(2026, 11, 30, 13, 0, 0).unwrap();
    let (exec, _) = start(Some("b"));
    let next = exec.settle(failed(
        Failure::Timeout,
        Transition::Ejected { k: 1, until },
    ));
    assert!(!next.succeeded());
    let f = failover(next);
    assert_eq!(f.backup(), &node("b"));
    let (retry, backup) = f.retry();
    assert_eq!(
        backup,
        Dispatch {
            node: node("b"),
            role: Role::Backup
        }
    );
    let ending = retry.settle(ok(4));
    let r = &ending.record;
    assert_eq!(
        types(r),
        [
            "ExecutionRequested",
            "AttemptDispatched",
            "AttemptFailed",
            "AttemptDispatched",
            "AttemptSucceeded",
            "ExecutionCompleted"
        ]
    );
    assert_eq!(
        cause(&r[2]),
        Some(r[1].event_id),
        "failed ← primary dispatched"
    );
    assert_eq!(cause(&r[3]), Some(r[2].event_id), "backup ← primary failed");
    assert_eq!(cause(&r[4]), Some(r[3].event_id));
    assert_eq!(r[3].payload["attempt"], 2);
    assert_eq!(r[3].payload["decision"], r[1].payload["decision"]);
    assert_eq!(r[5].payload["attempts"], 2);
    let [(stream, ejected)] = ending.decisions.as_slice() else {
        panic!("one ejection expected: {:?}", ending.decisions);
    };
    assert_eq!(stream.as_str(), "node-a");
    assert_eq!(ejected.event_type, "NodeEjected");
    assert_eq!(cause(ejected), Some(r[2].event_id));
    assert_eq!(
        ejected.payload["reason"],
        "consecutive failed attempts, the last one timeout"
    );
    let Verdict::Charged {
        attempts, node_id, ..
    } = &ending.verdict
    else {
        panic!("charged expected");
    };
    assert_eq!(node_id, &node("b"));
    assert_eq!(
        attempts,
        &[
            view("a", Role::Primary, Outcome::Timeout, 9),
            view("b", Role::Backup, Outcome::Success, 4)
        ]
    );
}

#[test]
fn every_replica_failing_ends_uncharged_and_says_why() {
    // both tried
    let (exec, _) = start(Some("b"));
    let (retry, _) = failover(exec.settle(failed(Failure::Timeout, Transition::None))).retry();
    let both = retry.settle(failed(Failure::InvalidOutput, Transition::None));
    assert_eq!(types(&both.record).last(), Some(&"ExecutionFailed"));
    assert_eq!(both.record.last().unwrap().payload["charged"], false);
    assert_eq!(both.record.last().unwrap().payload["attempts"], 2);
    let Verdict::NotCharged { code, message, .. } = &both.verdict else {
        panic!("not charged expected");
    };
    assert_eq!(*code, EndCode::AllReplicasFailed);
    assert_eq!(
        message,
        "every replica failed (primary a timeout, backup b invalid_output); not charged"
    );

    // no other replica: a backup equal to the primary is none
    let (exec, _) = start(Some("a"));
    let alone = done(exec.settle(failed(Failure::Error, Transition::None)));
    assert_eq!(
        types(&alone.record),
        [
            "ExecutionRequested",
            "AttemptDispatched",
            "AttemptFailed",
            "ExecutionFailed"
        ]
    );
    assert!(matches!(&alone.verdict, Verdict::NotCharged { message, .. }
        if message == "primary a error; no other replica to retry on; not charged"));

    // the retry budget refused
    let (exec, _) = start(Some("b"));
    let refused = failover(exec.settle(failed(Failure::Error, Transition::None)))
        .stop("retry budget exhausted");
    assert_eq!(types(&refused.record).len(), 4);
    assert!(
        matches!(&refused.verdict, Verdict::NotCharged { message, .. }
        if message == "primary a error; retry budget exhausted; not charged")
    );
}

#[test]
fn an_unjudged_primary_records_nothing_and_an_unjudged_backup_ends_unavailable() {
    let (exec, _) = start(Some("b"));
    let ending = done(exec.settle(unjudged()));
    assert!(ending.record.is_empty() && ending.decisions.is_empty());
    assert!(matches!(&ending.verdict, Verdict::Unrecorded { message }
        if message.starts_with("the primary a could not be judged (no answer, bus lost)")));

    let (exec, _) = start(Some("b"));
    let (retry, _) = failover(exec.settle(failed(Failure::Error, Transition::None))).retry();
    let ending = retry.settle(unjudged());
    let r = &ending.record;
    assert_eq!(types(r).last(), Some(&"ExecutionFailed"));
    assert_eq!(
        cause(&r[4]),
        Some(r[3].event_id),
        "ended by the backup's dispatch, which stays unsettled"
    );
    assert_eq!(r[4].payload["error_code"], "unavailable");
    assert_eq!(r[4].payload["attempts"], 1);
    let Verdict::NotCharged {
        code,
        attempts,
        message,
        ..
    } = &ending.verdict
    else {
        panic!("not charged expected");
    };
    assert_eq!(*code, EndCode::Unavailable);
    assert_eq!(attempts, &[view("a", Role::Primary, Outcome::Error, 9)]);
    assert!(message.contains("the backup b could not be judged"));
}

#[test]
fn a_probe_that_succeeds_restores_its_node_after_the_record() {
    let (exec, _) = start(None);
    let ending = done(exec.settle(Settled {
        transition: Transition::Restored,
        ..ok(1)
    }));
    let [(stream, restored)] = ending.decisions.as_slice() else {
        panic!("one restoration expected");
    };
    assert_eq!(
        (stream.as_str(), restored.event_type.as_str()),
        ("node-a", "NodeRestored")
    );
    assert_eq!(
        cause(restored),
        Some(ending.record[2].event_id),
        "caused by AttemptSucceeded"
    );
    // a node kept as the last healthy replica is no event
    let (exec, _) = start(None);
    let kept = done(exec.settle(failed(Failure::Error, Transition::KeptLastHealthy)));
    assert!(kept.decisions.is_empty());
}

/// Every way an execution ends, each settled the same way twice.
fn every_ending() -> Vec<Ending> {
    let charged_first = || done(start(Some("b")).0.settle(ok(2)));
    let charged_second = || {
        let (retry, _) = failover(
            start(Some("b"))
                .0
                .settle(failed(Failure::Error, Transition::None)),
        )
        .retry();
        retry.settle(ok(5))
    };
    let both_failed = || {
        let (retry, _) = failover(
            start(Some("b"))
                .0
                .settle(failed(Failure::Timeout, Transition::None)),
        )
        .retry();
        retry.settle(failed(Failure::Error, Transition::None))
    };
    let alone = || {
        done(
            start(None)
                .0
                .settle(failed(Failure::InvalidOutput, Transition::None)),
        )
    };
    let refused = || {
        failover(
            start(Some("b"))
                .0
                .settle(failed(Failure::Error, Transition::None)),
        )
        .stop("budget")
    };
    let backup_unjudged = || {
        let (retry, _) = failover(
            start(Some("b"))
                .0
                .settle(failed(Failure::Error, Transition::None)),
        )
        .retry();
        retry.settle(unjudged())
    };
    vec![
        charged_first(),
        charged_second(),
        both_failed(),
        alone(),
        refused(),
        backup_unjudged(),
    ]
}

#[test]
fn the_log_gives_back_the_verdict_of_every_recorded_ending() {
    for ending in every_ending() {
        assert_eq!(
            Verdict::from_log(&recorded(&ending.record)),
            Some(ending.verdict.clone()),
            "{:?}",
            types(&ending.record)
        );
        // an execution still in flight has no verdict yet
        let open = &ending.record[..ending.record.len() - 1];
        assert_eq!(Verdict::from_log(&recorded(open)), None);
    }
}

#[test]
fn the_same_inputs_give_the_same_events_bit_for_bit() {
    assert_eq!(every_ending(), every_ending());
}

#[test]
fn a_failure_recorded_before_messages_were_kept_reads_with_the_message_it_would_have_had() {
    let (exec, _) = start(None);
    let ending = done(exec.settle(failed(Failure::Timeout, Transition::None)));
    let mut old = recorded(&ending.record);
    let end = old.last_mut().unwrap();
    let mut payload = end.payload.to_value();
    payload.as_object_mut().unwrap().remove("message");
    end.payload = payload.into();
    assert!(
        matches!(Verdict::from_log(&old), Some(Verdict::NotCharged { message, .. })
        if message == "every replica failed (primary a timeout); not charged")
    );
}

#[test]
fn end_codes_read_back_as_written() {
    for code in [EndCode::AllReplicasFailed, EndCode::Unavailable] {
        assert_eq!(EndCode::parse(code.as_str()), code);
    }
    assert_eq!(EndCode::parse("something_else"), EndCode::AllReplicasFailed);
}
