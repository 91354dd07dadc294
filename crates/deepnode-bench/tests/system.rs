//! The deployed system, end to end: `deepnode-bench system` starts its own nats-server, a fresh
//! database, the three service binaries as separate processes and `deepnode sim`, drives a few
//! thousand executions from outside, and fails unless every `ok` reply is exactly one charged
//! execution in the log and in `executions`, the relay and the projection reach the log's head,
//! and `deepnode audit` exits 0. (The figures it prints are not asserted: speed is a benchmark's.)

use std::path::Path;
use std::process::Command;

#[test]
fn the_deployed_services_serve_record_and_audit_a_few_thousand_executions() {
    let bench = Path::new(env!("CARGO_BIN_EXE_deepnode-bench"));
    let bin_dir = bench.parent().expect("the bench binary has a directory");
    for binary in [
        "deepnode",
        "deepnode-scheduler",
        "deepnode-reputation",
        "deepnode-rotation",
    ] {
        assert!(
            bin_dir.join(binary).is_file(),
            "{binary} is not built in {} (run the workspace's tests, which build every binary)",
            bin_dir.display()
        );
    }
    let logs = std::env::temp_dir().join(format!("deepnode-system-test-{}", std::process::id()));
    let out = Command::new(bench)
        .args([
            "system",
            "--copies",
            "1",
            "--seconds",
            "4",
            "--rates",
            "300",
            "--clients",
            "8",
        ])
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--log-dir")
        .arg(&logs)
        .output()
        .expect("running deepnode-bench system");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deepnode-bench system failed ({}); logs in {}\n{stdout}\n{stderr}",
        out.status,
        logs.display()
    );
    // Every ok reply is one completed, charged execution; the counts are the bench's own checks.
    let durability = stdout
        .lines()
        .find(|l| l.starts_with("durability:"))
        .unwrap_or_else(|| panic!("no durability line in\n{stdout}"));
    let replies: u64 = durability
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable durability line {durability:?}"));
    // 400 warm-up + 1,200 paced + what 8 closed-loop clients get through in 4 s.
    assert!(replies >= 1_600, "only {replies} executions: {durability}");
    assert!(durability.ends_with("equal"), "{durability}");
    assert!(
        stdout.contains("relay at the head in") && !stdout.contains("not within"),
        "{stdout}"
    );
    assert!(stdout.contains("(audit: ok)"), "{stdout}");
    let _ = std::fs::remove_dir_all(&logs);
}
