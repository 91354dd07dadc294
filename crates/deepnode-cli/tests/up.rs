//! `deepnode up`, the README's first command, end to end: a short headless run on the demo policy
//! (deploy/demo.toml) with its own NATS server and database, the three service binaries as child
//! processes. The log must show every kind of decision the demo promises — rotation moving a bad
//! primary out and redrawing growth slots, each deliberately bad node caught (ejected, jailed,
//! slashed or phased out), new nodes given a backup slot and promoted to active, no healthy node
//! left unused — the run's own summary must say so, and `deepnode audit` must pass.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use deepnode_testkit::{PrivateNats, TestDb};

/// The demo's deliberately bad nodes with its default 12 nodes (`bad_slot` in `commands/up.rs`);
/// `edge-*` are flaky by design; every other node is healthy.
const BAD: [&str; 3] = ["node-03", "node-04", "node-06"];

// Two workers: the run blocks one while it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_every_rule_at_work_and_its_log_audits_clean() {
    let deepnode = Path::new(env!("CARGO_BIN_EXE_deepnode"));
    for service in [
        "deepnode-scheduler",
        "deepnode-reputation",
        "deepnode-rotation",
    ] {
        assert!(
            deepnode.parent().unwrap().join(service).is_file(),
            "{service} is not built next to deepnode (run the workspace's tests)"
        );
    }
    let db = TestDb::new().await;
    let nats = PrivateNats::start().await;
    let logs = std::env::temp_dir().join(format!("deepnode-up-test-{}", std::process::id()));
    let run = |args: &[&str]| -> Output {
        Command::new(deepnode)
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("NATS_URL", nats.url())
            .env_remove("DEEPNODE_CONFIG")
            .env_remove("DEEPNODE_LOG_KEY")
            .env_remove("DEEPNODE_LOG_PUBLIC_KEYS")
            .output()
            .unwrap()
    };
    let logs_arg = logs.display().to_string();
    // A gentle rate: the debug build of every process shares the machine.
    let out = run(&[
        "up",
        "--duration",
        "80s",
        "--rate",
        "60",
        "--log-dir",
        &logs_arg,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "deepnode up failed; logs in {logs_arg}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = db.pool().await;
    let reasons = |event_type: &'static str| {
        let pool = pool.clone();
        async move {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT payload->>'node_id', coalesce(payload->>'to', payload->>'reason', '')
                   FROM events WHERE event_type = $1 ORDER BY global_position",
            )
            .bind(event_type)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows
        }
    };

    // Rotation: growth slots redrawn, and a bad primary moved out of its top slot.
    let assigned: Vec<(String, String)> = sqlx::query_as(
        "SELECT payload->>'tier', payload->>'reason' FROM events
          WHERE event_type = 'DeploymentAssigned' AND payload->>'reason' LIKE 'rotation:%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        assigned
            .iter()
            .any(|(_, r)| r.contains("growth-slot redraw")),
        "no growth-slot redraw: {assigned:?}"
    );
    assert!(
        assigned
            .iter()
            .any(|(tier, r)| tier == "top" && (r.contains("beats") || r.contains("hard rule"))),
        "no top slot moved: {assigned:?}"
    );

    // Every bad node caught, as its behaviour deserves.
    let mut caught: Vec<String> = Vec::new();
    for event_type in ["NodeEjected", "NodeSlashed"] {
        caught.extend(reasons(event_type).await.into_iter().map(|(n, _)| n));
    }
    caught.extend(
        reasons("NodeStatusChanged")
            .await
            .into_iter()
            .filter(|(_, to)| ["jailed", "phased_out", "tombstoned"].contains(&to.as_str()))
            .map(|(n, _)| n),
    );
    for bad in BAD {
        assert!(caught.iter().any(|n| n == bad), "{bad} was never caught");
    }
    assert!(
        reasons("NodeStatusChanged")
            .await
            .iter()
            .any(|(n, to)| n == "node-03" && to == "jailed"),
        "the node that never answers was not jailed for downtime"
    );

    // New nodes given a backup slot and promoted to active.
    let promoted_after_a_backup_slot: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT s.payload->>'node_id') FROM events s
          WHERE s.event_type = 'NodeStatusChanged' AND s.payload->>'to' = 'active'
            AND s.payload->>'from' = 'probation'
            AND EXISTS (SELECT 1 FROM events a WHERE a.event_type = 'DeploymentAssigned'
                          AND a.payload->>'tier' = 'lower'
                          AND a.payload->>'node_id' = s.payload->>'node_id')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        promoted_after_a_backup_slot >= 1,
        "no node promoted after a backup slot"
    );

    // No healthy node left unused.
    let unused: Vec<String> = sqlx::query_scalar(
        "SELECT node_id FROM node_reputation
          WHERE successes = 0 AND node_id NOT LIKE 'edge-%' AND NOT node_id = ANY($1)",
    )
    .bind(&BAD[..])
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(unused, Vec::<String>::new(), "healthy nodes never used");

    // The run says so itself: decisions as they happened, and the summary's tally.
    assert!(stdout.contains("  decision  "), "{stdout}");
    assert!(stdout.contains("bad nodes caught        3/3"), "{stdout}");
    assert!(stdout.contains("healthy nodes unused    0 of"), "{stdout}");

    // And the log audits clean — folded under the policy the services ran on, against its own
    // signed checkpoints — with the command the summary gives.
    let command = stdout
        .lines()
        .find(|l| l.contains("deepnode audit --public-key"))
        .unwrap_or_else(|| panic!("no audit command in\n{stdout}"));
    let policy = command
        .trim()
        .strip_prefix("DEEPNODE_CONFIG=")
        .and_then(|rest| rest.split(' ').next())
        .unwrap();
    let public_key = command.split('\'').nth(1).unwrap();
    let audit = Command::new(deepnode)
        .args(["audit", "--public-key", public_key])
        .env("DATABASE_URL", db.url())
        .env("NATS_URL", nats.url())
        .env("DEEPNODE_CONFIG", policy)
        .output()
        .unwrap();
    let audit_out = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(audit.status.code(), Some(0), "{audit_out}");
    assert!(audit_out.contains("signature verified"), "{audit_out}");
    std::fs::remove_dir_all(&logs).unwrap();
}
