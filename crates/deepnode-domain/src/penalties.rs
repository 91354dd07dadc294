//! Penalty assessment as a pure decider: given one node's projected state, a time and the policy,
//! [`assess`] returns the events to append (`NodeSlashed`, `NodeStatusChanged`) — effects as data. The
//! caller appends them with the triggering event as `causation_id` and folds them back into the
//! [`NodeBook`](crate::book::NodeBook), which is what makes the next assessment see them.
//!
//! Rules (POLICY.md "Penalties", Cosmos SDK x/slashing):
//! - jailed → probation once the jail has ended;
//! - invalid output confirmed `invalid_confirmations` times within `invalid_window_secs` → slash 5 %;
//!   the `tombstone_faults`-th such fault within `tombstone_window_secs` → tombstoned;
//! - downtime (success ratio below 0.5 over the window, ≥ 20 attempts since the last jail) → slash
//!   0.1 % and jail 600 s × 2^(k−1), capped at 24 h; the node re-enters in probation;
//! - probation → active after ≥ 50 observations and ≥ 24 h in probation.
//!
//! Phase-out (R < 0.3 with ≥ 100 observations, outside immunity) is not decided here: it has one
//! rule and one owner, [`crate::rotation::phase_out_candidates`] in the rotation round, which orders
//! the victims and moves their replicas away in the same plan.
//!
//! Fault ids are deterministic (`downtime:<node>:<k>`, `invalid_output:<node>:<µs of the confirming
//! output>`) and the book never applies one twice, so a slash is never taken twice for one fault even if
//! an assessment is repeated before its events are folded. This module does no IO and reads no clock.

use chrono::{DateTime, TimeDelta, Utc};

use crate::book::NodeState;
use crate::config::PolicyConfig;
use crate::events::{DomainEvent, FaultKind, NodeSlashed, NodeStatus, NodeStatusChanged};
use crate::fixed::Bps;

/// The length of the k-th jail (k ≥ 1): `base × 2^(k−1)`, capped.
pub fn jail_duration_secs(k: u32, cfg: &PolicyConfig) -> i64 {
    let p = &cfg.penalty;
    let doubling = k.saturating_sub(1).min(62);
    p.jail_base_secs
        .saturating_mul(1_i64 << doubling)
        .min(p.jail_max_secs)
}

fn status_change(
    node: &NodeState,
    to: NodeStatus,
    reason: &str,
    until: Option<DateTime<Utc>>,
) -> DomainEvent {
    DomainEvent::NodeStatusChanged(NodeStatusChanged {
        node_id: node.node_id.clone(),
        from: node.status,
        to,
        reason: reason.to_owned(),
        until,
    })
}

fn slash(
    node: &NodeState,
    fault_id: String,
    kind: FaultKind,
    bps: Bps,
    reason: &str,
) -> DomainEvent {
    DomainEvent::NodeSlashed(NodeSlashed {
        node_id: node.node_id.clone(),
        fault_id,
        kind,
        fraction_bps: bps.raw(),
        amount: node.stake.max(0.0) * bps.to_f64(),
        reason: reason.to_owned(),
    })
}

/// The invalid-output fault the node currently owes, if any: its id.
fn invalid_output_fault(
    node: &NodeState,
    now: DateTime<Utc>,
    cfg: &PolicyConfig,
) -> Option<String> {
    let p = &cfg.penalty;
    let need = p.invalid_confirmations.max(1) as usize;
    if node.unpunished_invalid.len() < need {
        return None;
    }
    let first = *node.unpunished_invalid.front()?;
    let last = *node.unpunished_invalid.back()?;
    let window = p.invalid_window_secs.saturating_mul(1_000_000);
    let recent = now.timestamp_micros().saturating_sub(last) <= window;
    if last.saturating_sub(first) > window || !recent {
        return None;
    }
    let id = format!("invalid_output:{}:{last}", node.node_id);
    (!node.has_slashed(&id)).then_some(id)
}

/// The downtime fault the node currently owes, if any: its id and the jail number k.
fn downtime_fault(
    node: &NodeState,
    now: DateTime<Utc>,
    cfg: &PolicyConfig,
) -> Option<(String, u32)> {
    let p = &cfg.penalty;
    let stats = node.penalty_window.stats_at(now, &cfg.reputation);
    if stats.samples < p.downtime_min_attempts.max(1) {
        return None;
    }
    if Bps::from_f64(stats.success_ratio()) >= p.downtime_success_ratio {
        return None;
    }
    let k = node.jail_count.saturating_add(1);
    let id = format!("downtime:{}:{k}", node.node_id);
    (!node.has_slashed(&id)).then_some((id, k))
}

/// The events that penalise, release, promote or phase out this node at `now`; empty when nothing is
/// due. At most one status change is returned, and it always starts from the node's current status.
pub fn assess(node: &NodeState, now: DateTime<Utc>, cfg: &PolicyConfig) -> Vec<DomainEvent> {
    let mut out = Vec::new();
    match node.status {
        NodeStatus::Jailed => {
            if node.jailed_until.is_none_or(|until| until <= now) {
                out.push(status_change(
                    node,
                    NodeStatus::Probation,
                    "jail ended",
                    None,
                ));
            }
            return out;
        }
        NodeStatus::Active | NodeStatus::Probation => {}
        NodeStatus::Offline
        | NodeStatus::PhasedOut
        | NodeStatus::Tombstoned
        | NodeStatus::Deregistered => return out,
    }

    if let Some(fault_id) = invalid_output_fault(node, now, cfg) {
        out.push(slash(
            node,
            fault_id,
            FaultKind::InvalidOutput,
            cfg.penalty.invalid_slash,
            "invalid output confirmed",
        ));
        let horizon =
            now.timestamp_micros() - cfg.penalty.tombstone_window_secs.saturating_mul(1_000_000);
        let recent_faults = node
            .invalid_faults
            .iter()
            .filter(|&&t| t >= horizon)
            .count();
        if recent_faults + 1 >= cfg.penalty.tombstone_faults.max(1) as usize {
            out.push(status_change(
                node,
                NodeStatus::Tombstoned,
                "repeated invalid output",
                None,
            ));
            return out;
        }
    }

    if let Some((fault_id, k)) = downtime_fault(node, now, cfg) {
        out.push(slash(
            node,
            fault_id,
            FaultKind::Downtime,
            cfg.penalty.downtime_slash,
            "downtime",
        ));
        let until = now + TimeDelta::seconds(jail_duration_secs(k, cfg));
        out.push(status_change(
            node,
            NodeStatus::Jailed,
            "downtime",
            Some(until),
        ));
        return out;
    }

    let observations = node.reputation.observations();
    if node.status == NodeStatus::Probation {
        let seen = observations.saturating_sub(node.observations_at_probation);
        let age = now
            .signed_duration_since(node.probation_since)
            .num_seconds();
        if seen >= cfg.placement.probation_min_observations
            && age >= cfg.placement.probation_min_age_secs
        {
            out.push(status_change(
                node,
                NodeStatus::Active,
                "probation passed",
                None,
            ));
        }
    }
    out
}
