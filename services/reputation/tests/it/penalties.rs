//! Outcomes → penalties with two service copies: a node failing every attempt is slashed and jailed
//! exactly once, with the triggering outcome as `causation_id`, and its (short, test-policy) jail is
//! released exactly once by the wall-clock tick.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;
use deepnode_testkit::{eventually, log_until};

use std::time::Duration;

use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_reputation::Stats;
use deepnode_store::RecordedEvent;
use deepnode_testkit::TestDb;
use uuid::Uuid;

fn status_changes<'a>(log: &'a [RecordedEvent], to: &'a str) -> Vec<&'a RecordedEvent> {
    log.iter()
        .filter(|e| e.event_type == "NodeStatusChanged" && e.payload.to_value()["to"] == to)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_node_is_jailed_and_slashed_once_across_two_copies() {
    let db = TestDb::new().await;
    let subjects = Subjects::random();
    let mut policy = PolicyConfig::default();
    policy.penalty.jail_base_secs = 2;
    // Both copies run by one clock, which the test moves past the jail instead of waiting for it.
    let clock = deepnode_runtime::Clock::adjustable();
    let options = || deepnode_reputation::ReputationOptions {
        clock: clock.clone(),
        ..common::options()
    };
    let (oa, ob) = (options(), options());
    let (sa, sb) = (oa.stats.clone(), ob.stats.clone());
    let a = common::start(&db, &subjects, &policy, oa).await;
    let b = common::start(&db, &subjects, &policy, ob).await;
    common::register(&a.ctx, "n1").await;

    // given 30 failed attempts on n1, logged by "the scheduler"
    let mut failures = Vec::new();
    for i in 0..30 {
        failures.push(common::log_failed_attempt(&a.ctx.store, "n1", &format!("r{i}")).await);
    }

    // then every outcome is assessed, by one copy or the other
    let what = "all 30 outcomes assessed";
    eventually(what, Duration::from_secs(30), || async {
        Stats::get(&sa.outcomes_assessed) + Stats::get(&sb.outcomes_assessed) >= 30
    })
    .await;

    // and the node is slashed once and jailed once, caused by one of the failures
    let log = log_until(
        &a.ctx.store,
        "the failing node jailed",
        Duration::from_secs(10),
        |log| !status_changes(log, "jailed").is_empty(),
    )
    .await;
    let slashes: Vec<_> = log
        .iter()
        .filter(|e| e.event_type == "NodeSlashed")
        .collect();
    assert_eq!(slashes.len(), 1, "one slash");
    assert_eq!(slashes[0].payload.to_value()["kind"], "downtime");
    assert_eq!(slashes[0].payload.to_value()["fault_id"], "downtime:n1:1");
    let jails = status_changes(&log, "jailed");
    assert_eq!(jails.len(), 1, "one jail");
    for decision in [slashes[0], jails[0]] {
        assert_eq!(decision.stream_id, "node-n1");
        let cause: Uuid = decision.metadata.to_value()["causation_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(failures.contains(&cause), "caused by a failed attempt");
    }

    // when the (2 s) jail ends, the tick releases it to probation, once
    clock.advance(Duration::from_secs(3));
    let log = log_until(
        &a.ctx.store,
        "the jailed node released",
        Duration::from_secs(15),
        |log| {
            log.iter().any(|e| {
                e.event_type == "NodeStatusChanged" && e.payload.to_value()["from"] == "jailed"
            })
        },
    )
    .await;
    let releases: Vec<_> = log
        .iter()
        .filter(|e| e.event_type == "NodeStatusChanged" && e.payload.to_value()["from"] == "jailed")
        .collect();
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0].payload.to_value()["to"], "probation");
    // and once both copies have ticked on a view of the whole log, no copy repeated a decision
    let head = u64::try_from(log.last().unwrap().global_position).unwrap();
    let what = "both copies ticked through the log's head";
    eventually(what, Duration::from_secs(10), || async {
        [&sa, &sb]
            .iter()
            .all(|s| Stats::get(&s.ticked_through) >= head)
    })
    .await;
    let log = common::log(&a.ctx.store).await;
    assert_eq!(
        log.iter().filter(|e| e.event_type == "NodeSlashed").count(),
        1
    );
    assert_eq!(
        log.iter()
            .filter(|e| e.event_type == "NodeStatusChanged")
            .count(),
        2
    );

    a.stop().await;
    b.stop().await;
}
