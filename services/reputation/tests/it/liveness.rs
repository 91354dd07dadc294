//! Heartbeats with two service copies and short intervals: a silent node goes offline once (after
//! the grace period, not before), a beating node never does, and the silent node comes back — once —
//! when it beats again; after a restart every node gets a full grace period again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;
use deepnode_testkit::log_until;

use std::time::Duration;

use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::ids::NodeId;
use deepnode_store::RecordedEvent;
use deepnode_testkit::TestDb;

fn changes(log: &[RecordedEvent], node: &str) -> Vec<(String, String)> {
    log.iter()
        .filter(|e| e.event_type == "NodeStatusChanged" && e.payload.to_value()["node_id"] == node)
        .map(|e| {
            (
                e.payload.to_value()["from"].as_str().unwrap().to_owned(),
                e.payload.to_value()["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_nodes_go_offline_and_come_back_when_they_beat() {
    let db = TestDb::new().await;
    let subjects = Subjects::random();
    let policy = PolicyConfig::default();
    let fast = || deepnode_reputation::ReputationOptions {
        offline_after: Duration::from_millis(1500),
        ..common::options()
    };
    let started = tokio::time::Instant::now();
    let a = common::start(&db, &subjects, &policy, fast()).await;
    let b = common::start(&db, &subjects, &policy, fast()).await;
    common::register(&a.ctx, "alive").await;
    common::register(&a.ctx, "quiet").await;
    // an id with dots spans several subject tokens: `node.gpu.rack-2.n01.heartbeat`
    common::register(&a.ctx, "gpu.rack-2.n01").await;

    // "alive" and the dotted node beat every 200 ms throughout
    let nats = a.ctx.nats.clone();
    let beating =
        ["alive", "gpu.rack-2.n01"].map(|id| subjects.node_heartbeat(&NodeId::parse(id).unwrap()));
    let beater = tokio::spawn(async move {
        loop {
            for subject in &beating {
                nats.publish(subject.clone(), r#"{"in_flight":0}"#.into())
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    let log = log_until(
        &a.ctx.store,
        "the quiet node marked offline",
        Duration::from_secs(15),
        |log| !changes(log, "quiet").is_empty(),
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "grace period honoured"
    );
    assert_eq!(
        changes(&log, "quiet"),
        vec![("probation".to_owned(), "offline".to_owned())]
    );
    let offline = log
        .iter()
        .find(|e| e.event_type == "NodeStatusChanged")
        .unwrap();
    assert_eq!(offline.payload.to_value()["reason"], "missed heartbeats");

    // when "quiet" beats again it comes back to where it was
    let quiet = subjects.node_heartbeat(&NodeId::parse("quiet").unwrap());
    for _ in 0..5 {
        a.ctx
            .nats
            .publish(quiet.clone(), r#"{"in_flight":1}"#.into())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = log_until(
        &a.ctx.store,
        "the quiet node offline again after it beat once",
        Duration::from_secs(10),
        |log| changes(log, "quiet").len() >= 2,
    )
    .await;
    assert_eq!(
        changes(&log, "quiet"),
        vec![
            ("probation".to_owned(), "offline".to_owned()),
            ("offline".to_owned(), "probation".to_owned())
        ]
    );
    assert!(changes(&log, "alive").is_empty(), "a beating node stays up");
    assert!(
        changes(&log, "gpu.rack-2.n01").is_empty(),
        "a beating node with a dotted id stays up"
    );

    // a restarted copy gives every node a full grace period before it can go offline (however
    // long it was silent while no copy ran: the rule's own test is `liveness::tests`)
    a.stop().await;
    b.stop().await;
    let restarted = tokio::time::Instant::now();
    let c = common::start(&db, &subjects, &policy, fast()).await;
    let log = log_until(
        &c.ctx.store,
        "the restarted copy to mark the quiet node offline",
        Duration::from_secs(15),
        |log| changes(log, "quiet").len() >= 3,
    )
    .await;
    assert!(
        restarted.elapsed() >= Duration::from_millis(1500),
        "grace after restart"
    );
    assert_eq!(changes(&log, "quiet").len(), 3);
    assert!(changes(&log, "alive").is_empty());

    beater.abort();
    c.stop().await;
}
