//! Rendering the §5 rows for people (aligned tables) and programs (JSON with the column names of
//! CONTRACT §5). Shared by `replay`, `nodes` and `deployments`, so a replayed past and the stored
//! present print the same way.

use chrono::{DateTime, SecondsFormat, Utc};
use deepnode_domain::book::{DeploymentRow, NodeRow};
use serde_json::{json, Value};

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A `node_reputation` row as JSON.
pub fn node_json(r: &NodeRow) -> Value {
    json!({
        "node_id": r.node_id, "domain": r.domain, "stake": r.stake, "capacity": r.capacity,
        "score": r.score, "successes": r.successes, "errors": r.errors, "timeouts": r.timeouts,
        "invalid_outputs": r.invalid_outputs, "recent_failure_rate": r.recent_failure_rate,
        "status": r.status, "slashed_amount": r.slashed_amount,
        "registered_at": time(r.registered_at), "updated_at": time(r.updated_at),
    })
}

/// A `deployments` row as JSON.
pub fn deployment_json(r: &DeploymentRow) -> Value {
    json!({"model_id": r.model_id, "node_id": r.node_id, "tier": r.tier, "assigned_at": time(r.assigned_at)})
}

/// Prints nodes as an aligned table.
pub fn print_nodes(rows: &[NodeRow]) {
    println!(
        "{:<24} {:<12} {:<12} {:>8} {:>10} {:>8} {:>6} {:>8} {:>7} {:>6} {:>10} {:>9}",
        "NODE",
        "DOMAIN",
        "STATUS",
        "SCORE",
        "SUCCESSES",
        "ERRORS",
        "TIMEOUTS",
        "INVALID",
        "FAIL%",
        "CAP",
        "STAKE",
        "SLASHED"
    );
    for r in rows {
        println!(
            "{:<24} {:<12} {:<12} {:>8.4} {:>10} {:>8} {:>6} {:>8} {:>7.2} {:>6} {:>10.3} {:>9.3}",
            r.node_id,
            r.domain,
            r.status,
            r.score,
            r.successes,
            r.errors,
            r.timeouts,
            r.invalid_outputs,
            r.recent_failure_rate * 100.0,
            r.capacity,
            r.stake,
            r.slashed_amount
        );
    }
    println!("({} nodes)", rows.len());
}

/// Prints deployments as an aligned table.
pub fn print_deployments(rows: &[DeploymentRow]) {
    println!("{:<24} {:<24} {:<6} ASSIGNED_AT", "MODEL", "NODE", "TIER");
    for r in rows {
        println!(
            "{:<24} {:<24} {:<6} {}",
            r.model_id,
            r.node_id,
            r.tier,
            time(r.assigned_at)
        );
    }
    println!("({} deployments)", rows.len());
}
