//! One rotation round: take the cluster-wide round lock, catch the view up with the log, snapshot it,
//! call the pure planner ([`plan`]) and append its effects — per move `DeploymentAssigned` then
//! `DeploymentRevoked` in one append on `model-<id>` (make before break: the replica count never
//! dips, even between the two events), `NodeStatusChanged → phased_out` per phase-out victim, and
//! `RotationCompleted` last.
//!
//! Exactly one round runs at a time across copies: a transaction-scoped Postgres advisory try-lock
//! (released by the rollback that ends the round, or by the connection dying), and the
//! `RotationCompleted` append expects the exact version of the `rotation` stream, so an epoch is
//! never completed twice even if the lock were lost. Event ids are UUID v5 of the epoch and the move,
//! with the round's `RotationCompleted` id as `causation_id`. Appends to model and node streams expect
//! the exact version the snapshot saw; a stream that moved meanwhile (a concurrent status change)
//! skips that effect, which the next round re-plans. Periodic rounds run at most once per period slot
//! (`floor(now / period)`) across copies; on-demand rounds always run (when the lock is free).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deepnode_domain::events::{
    DeploymentAssigned, DeploymentRevoked, DomainEvent, Metadata, NodeStatus, NodeStatusChanged,
    RotationCompleted,
};
use deepnode_domain::ids::NodeId;
use deepnode_domain::log::{ExpectedVersion, NewEvent, StreamId};
use deepnode_domain::rotation::{
    plan, revocation_reason, AppliedMove, RotationPlan, RoundRecord, Trigger,
};
use deepnode_runtime::ServiceContext;
use deepnode_store::FollowerHandle;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::snapshot::rotation_input;
use crate::view::{RotationView, ROTATION_STREAM};
use crate::{Error, RotationOptions, ID_NAMESPACE};

/// Advisory lock key of the rotation round ("rotate" in ASCII).
pub const ROUND_LOCK_KEY: i64 = 0x726f_7461_7465;

/// How much of the planner's `held` list the `RotationCompleted` record keeps.
const MAX_HELD_IN_RECORD: usize = 200;

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundOutcome {
    /// The epoch was planned, applied and completed.
    Completed,
    /// Another copy holds the round lock; nothing was done.
    Busy,
    /// A periodic round found this period's round already done; nothing was done.
    NotDue,
}

/// What a round did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundReport {
    /// How it ended.
    pub outcome: RoundOutcome,
    /// The epoch planned (the completed one when `Completed`).
    pub epoch: u64,
    /// Moves applied, in order.
    pub moves: Vec<AppliedMove>,
    /// Nodes phased out.
    pub phased_out: Vec<NodeId>,
    /// Planned effects skipped because their stream moved meanwhile (re-planned next round).
    pub skipped: u32,
    /// The move cap of the epoch.
    pub cap: u32,
}

impl RoundReport {
    fn idle(outcome: RoundOutcome, epoch: u64) -> RoundReport {
        RoundReport {
            outcome,
            epoch,
            moves: Vec::new(),
            phased_out: Vec::new(),
            skipped: 0,
            cap: 0,
        }
    }
}

/// Whether a periodic round is due: no round has completed in the period slot containing `now`.
pub fn periodic_round_due(
    last_round_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    period: Duration,
) -> bool {
    let period_ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX).max(1);
    match last_round_at {
        None => true,
        Some(last) => {
            last.timestamp_millis().div_euclid(period_ms)
                < now.timestamp_millis().div_euclid(period_ms)
        }
    }
}

/// Runs one round now (see the module doc). Returns `Busy` without waiting if another round holds
/// the lock, and `NotDue` for a periodic round whose period slot already has one.
pub async fn run_round(
    ctx: &ServiceContext,
    view: &FollowerHandle<RotationView>,
    options: &RotationOptions,
    trigger: Trigger,
) -> Result<RoundReport, Error> {
    let Some(lock) = ctx.store.try_lock(ROUND_LOCK_KEY).await? else {
        let epoch = view.read().current_epoch();
        tracing::debug!(
            epoch,
            "rotation round skipped: another round holds the lock"
        );
        return Ok(RoundReport::idle(RoundOutcome::Busy, epoch));
    };
    let result = locked_round(ctx, view, options, trigger).await;
    // Ending the transaction releases the lock; if the connection is gone, so is the lock.
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "releasing the rotation lock failed; the connection took it along");
    }
    result
}

/// The snapshot taken under the lock: the plan's input plus what the appends need.
struct Snapshot {
    plan: RotationPlan,
    now: DateTime<Utc>,
    position: i64,
    versions: BTreeMap<String, i64>,
    statuses: BTreeMap<NodeId, NodeStatus>,
}

async fn locked_round(
    ctx: &ServiceContext,
    view: &FollowerHandle<RotationView>,
    options: &RotationOptions,
    trigger: Trigger,
) -> Result<RoundReport, Error> {
    let head = ctx.store.head_position().await?;
    view.wait_for(head, options.catch_up_timeout).await?;
    let now = Utc::now();
    let snapshot = {
        let v = view.read();
        if trigger == Trigger::Periodic
            && !periodic_round_due(v.last_round_at, now, options.epoch(&ctx.policy))
        {
            return Ok(RoundReport::idle(RoundOutcome::NotDue, v.current_epoch()));
        }
        let input = rotation_input(
            &v,
            now,
            options.seed,
            &ctx.policy.routing.stake_domains,
            &ctx.policy,
        );
        Snapshot {
            plan: plan(&input, &ctx.policy.rotation, &ctx.policy.placement),
            now,
            position: v.book.last_position(),
            versions: v.stream_versions.clone(),
            statuses: v
                .book
                .nodes()
                .iter()
                .map(|(id, n)| (id.clone(), n.status))
                .collect(),
        }
    };
    apply(ctx, view, options, trigger, snapshot).await
}

/// Appends `events` to `stream` at the exact version `versions` records, updating it. `Ok(false)`
/// when the stream moved (or the ids were used for other bodies): the effect is skipped.
async fn append_exact(
    ctx: &ServiceContext,
    versions: &mut BTreeMap<String, i64>,
    stream: &StreamId,
    events: Vec<NewEvent>,
) -> Result<Option<i64>, Error> {
    let version = versions.get(stream.as_str()).copied().unwrap_or(0);
    let expected = if version == 0 {
        ExpectedVersion::NoStream
    } else {
        ExpectedVersion::Exact(version)
    };
    match ctx.store.append(stream, expected, events).await {
        Ok(result) => {
            versions.insert(stream.as_str().to_owned(), result.stream_version);
            Ok(Some(result.last_position()))
        }
        Err(
            e @ (deepnode_store::Error::Conflict { .. }
            | deepnode_store::Error::EventIdReused { .. }),
        ) => {
            tracing::warn!(stream = stream.as_str(), error = %e, "skipped: the stream moved since the snapshot");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

fn id(epoch: u64, what: &str) -> Uuid {
    Uuid::new_v5(&ID_NAMESPACE, format!("rotation:{epoch}:{what}").as_bytes())
}

async fn apply(
    ctx: &ServiceContext,
    view: &FollowerHandle<RotationView>,
    options: &RotationOptions,
    trigger: Trigger,
    snapshot: Snapshot,
) -> Result<RoundReport, Error> {
    let Snapshot {
        plan,
        now,
        position,
        mut versions,
        statuses,
    } = snapshot;
    let epoch = plan.epoch;
    let round_id = id(epoch, "completed");
    let metadata =
        Metadata::new(ctx.producer.clone(), format!("rotation-{epoch}")).caused_by(round_id);
    let mut report = RoundReport::idle(RoundOutcome::Completed, epoch);
    report.cap = plan.cap;

    for m in &plan.moves {
        let assigned = DomainEvent::DeploymentAssigned(DeploymentAssigned {
            model_id: m.model_id.clone(),
            node_id: m.assign.clone(),
            tier: m.tier,
            reason: m.reason.assignment_reason(),
        });
        let revoked = DomainEvent::DeploymentRevoked(DeploymentRevoked {
            model_id: m.model_id.clone(),
            node_id: m.revoke.clone(),
            reason: revocation_reason(&m.assign),
        });
        let key = format!("move:{}:{}:{}", m.model_id, m.assign, m.revoke);
        let events = vec![
            assigned.to_new_event(id(epoch, &format!("{key}:assign")), metadata.clone(), now),
            revoked.to_new_event(id(epoch, &format!("{key}:revoke")), metadata.clone(), now),
        ];
        let stream = assigned.stream_id();
        if append_exact(ctx, &mut versions, &stream, events)
            .await?
            .is_some()
        {
            report.moves.push(AppliedMove {
                model_id: m.model_id.clone(),
                assigned: m.assign.clone(),
                revoked: m.revoke.clone(),
                reason: m.reason.clone(),
            });
        } else {
            report.skipped += 1;
        }
    }

    for p in &plan.phase_out {
        let Some(from) = statuses.get(&p.node_id).copied() else {
            continue;
        };
        let event = DomainEvent::NodeStatusChanged(NodeStatusChanged {
            node_id: p.node_id.clone(),
            from,
            to: NodeStatus::PhasedOut,
            reason: format!(
                "phase_out: reputation {} bps below {} bps with {} observations, outside immunity",
                p.reputation.raw(),
                ctx.policy.rotation.phase_out_reputation.raw(),
                p.observations
            ),
            until: None,
        });
        let stream = event.stream_id();
        let new = event.to_new_event(
            id(epoch, &format!("phase_out:{}", p.node_id)),
            metadata.clone(),
            now,
        );
        if append_exact(ctx, &mut versions, &stream, vec![new])
            .await?
            .is_some()
        {
            report.phased_out.push(p.node_id.clone());
        } else {
            report.skipped += 1;
        }
    }

    let mut recorded = plan.clone();
    let held = recorded.held.len();
    recorded.held.truncate(MAX_HELD_IN_RECORD);
    let completed = DomainEvent::RotationCompleted(RotationCompleted {
        epoch,
        moves: u32::try_from(report.moves.len()).unwrap_or(u32::MAX),
        plan: Some(Box::new(RoundRecord {
            trigger,
            now,
            seed: options.seed,
            snapshot_position: position,
            plan: recorded,
            held_total: u64::try_from(held).unwrap_or(u64::MAX),
            applied: report.moves.clone(),
            phased_out: report.phased_out.clone(),
            skipped: report.skipped,
        })),
        config_hash: ctx.policy.config_hash(),
    });
    let stream = completed.stream_id();
    debug_assert_eq!(stream.as_str(), ROTATION_STREAM);
    let new = completed.to_new_event(
        round_id,
        Metadata::new(ctx.producer.clone(), format!("rotation-{epoch}")),
        now,
    );
    let Some(last) = append_exact(ctx, &mut versions, &stream, vec![new]).await? else {
        return Err(Error::EpochTaken { epoch });
    };
    metrics::counter!("deepnode_rotation_moves_total").increment(report.moves.len() as u64);
    metrics::counter!("deepnode_rotation_phase_outs_total")
        .increment(report.phased_out.len() as u64);
    // The next round (here or on another copy, which waits for the head) sees this one.
    view.wait_for(last, options.catch_up_timeout).await?;
    tracing::info!(
        epoch,
        moves = report.moves.len(),
        phased_out = report.phased_out.len(),
        skipped = report.skipped,
        cap = report.cap,
        "rotation round completed"
    );
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    #[test]
    fn a_periodic_round_is_due_once_per_period_slot() {
        let p = Duration::from_secs(60);
        assert!(periodic_round_due(None, t(0), p));
        assert!(!periodic_round_due(Some(t(60_000)), t(119_999), p));
        assert!(periodic_round_due(Some(t(60_000)), t(120_000), p));
        assert!(periodic_round_due(Some(t(119_999)), t(120_001), p));
    }
}
