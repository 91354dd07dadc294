//! Outcomes → penalties. The copy holding the outcome lease follows the log from its stored position
//! (the checkpoint `reputation-outcomes`) and assesses every `AttemptSucceeded`, `AttemptFailed` and
//! `ExecutionReported` in global order: it waits until the live view has folded that event's
//! position, runs `penalties::assess(node, event.occurred_at, policy)` and appends what the policy
//! says (slash, jail, tombstone, phase-out, probation promotion) to the node's stream, each with the
//! triggering event as `causation_id`. Other copies stand by and take over when the holder goes.
//!
//! The events come from the process's own reader of the log, which the view already follows — not
//! from a JetStream consumer, which made nats-server store, deliver and take an acknowledgement for
//! every event a second time (every event, not only outcomes, on a server before 2.10, which cannot
//! filter a consumer by several subjects).
//!
//! Event ids are UUID v5 of (triggering event id, node stream version decided against, index) and the
//! append expects exactly that version (see [`crate::decide`]): an outcome assessed again — by a new
//! holder redoing what came after the stored position — either finds its identical decision already
//! logged or re-decides against the newer state. Time comes from the event, never the wall clock, so
//! the decision is a replayable function of the log.

use std::sync::Arc;
use std::time::Duration;

use deepnode_domain::events::{check_readable, Metadata};
use deepnode_domain::ids::NodeId;
use deepnode_domain::penalties;
use deepnode_runtime::lease::{self, Progress};
use deepnode_store::{Lease, RecordedEvent};
use serde::Deserialize;
use serde_json::Value;

use crate::decide::{decide_and_append, Decision};
use crate::{Error, Shared, Stats};

/// The event types whose outcomes can trigger a penalty decision.
pub(crate) const TRIGGERS: [&str; 3] = ["AttemptSucceeded", "AttemptFailed", "ExecutionReported"];

/// Advisory lock key of the outcome lease ("outcome" in ASCII): whoever holds it assesses.
pub const OUTCOMES_LOCK_KEY: i64 = 0x6f_7574_636f_6d65;

/// The checkpoint row the assessment keeps its position in. A database that had a log before
/// outcomes were assessed from it starts at the head it had then (migration `V9`).
pub const OUTCOMES_CHECKPOINT: &str = "reputation-outcomes";

/// How often the assessed position is stored while outcomes flow: a new holder assesses again at
/// most this much.
const SAVE_EVERY: Duration = Duration::from_millis(250);

/// How often the log is read without news (the process's shared reader normally wakes it).
const POLL: Duration = Duration::from_secs(1);

/// Assesses outcomes while this copy holds the outcome lease, standing by while another does,
/// until the service stops.
pub(crate) async fn run(shared: Arc<Shared>) -> Result<(), Error> {
    let store = shared.ctx.store.clone();
    let retry = shared.options.lease_retry;
    lease::hold(
        &store,
        OUTCOMES_LOCK_KEY,
        retry,
        &shared.stop,
        "outcome assessment",
        |lease| assess_while_leased(&shared, lease),
    )
    .await;
    Ok(())
}

/// Assesses the log's outcomes in order from the stored position. On a failure it stores what is
/// done and returns, to stand by and resume there: waiting mends most (the view lagging, the
/// database away). An outcome this build cannot read is not passed over: the live view, which every
/// decision is taken against, stops at such an event too (see `deepnode_store::Follower`), and the
/// assessment waits at it with the view until a build that reads it runs.
async fn assess_while_leased(shared: &Shared, mut lease: Lease) -> Result<(), String> {
    let store = &shared.ctx.store;
    let mut progress = Progress::load(store, OUTCOMES_CHECKPOINT, SAVE_EVERY)
        .await
        .map_err(|e| e.to_string())?;
    let mut subscription = store.subscribe_all(progress.position(), POLL);
    loop {
        let batch = tokio::select! {
            () = shared.stop.cancelled() => {
                progress.finish(store, lease).await;
                return Ok(());
            }
            batch = progress.next_batch(&mut subscription) => batch,
        };
        for event in batch
            .transpose()
            .map_err(|e| e.to_string())?
            .unwrap_or_default()
        {
            if TRIGGERS.contains(&event.event_type.as_str()) {
                if let Err(reason) = assess(shared, &event).await {
                    let _ = progress.save(store).await;
                    return Err(format!(
                        "outcome at position {}: {reason}",
                        event.global_position
                    ));
                }
            }
            progress.advance(event.global_position);
        }
        progress.save_if_due(store, &mut lease).await?;
    }
}

/// Every trigger's payload names its node.
#[derive(Deserialize)]
struct AboutNode {
    node_id: NodeId,
}

#[derive(Deserialize)]
struct Correlation {
    #[serde(default)]
    correlation_id: Option<Value>,
}

/// Assesses one outcome event; why not, when it could not.
async fn assess(shared: &Shared, recorded: &RecordedEvent) -> Result<(), String> {
    check_readable(&recorded.event_type, recorded.schema_version).map_err(|e| e.to_string())?;
    let unreadable = |e: serde_json::Error| format!("unreadable: {e}");
    let about: AboutNode = recorded.payload.parse().map_err(unreadable)?;
    let metadata: Correlation = recorded.metadata.parse().map_err(unreadable)?;
    let node = about.node_id;
    // The event came from the log tail the view follows too: the view gets there on its own.
    shared
        .view
        .folded(recorded.global_position, shared.options.view_timeout)
        .await
        .map_err(|e| e.to_string())?;
    Stats::bump(&shared.stats().outcomes_assessed);

    let at = recorded.occurred_at;
    let trigger = recorded.event_id;
    let correlation = metadata
        .correlation_id
        .as_ref()
        .and_then(|c| c.as_str())
        .map_or_else(|| trigger.to_string(), str::to_owned);
    let policy = shared.ctx.policy.clone();
    let producer = shared.ctx.producer.clone();
    let decided = decide_and_append(shared, &node, |view, version| {
        let state = view.book.node(&node)?;
        Some(Decision {
            events: penalties::assess(state, at, &policy),
            id_seed: format!("penalty:{trigger}:{version}"),
            metadata: Metadata::new(&producer, &correlation).caused_by(trigger),
            occurred_at: at,
        })
    })
    .await
    .map_err(|e| format!("deciding on node {node}: {e}"))?;
    if let Some(result) = decided.filter(|r| !r.duplicate) {
        for _ in &result.positions {
            Stats::bump(&shared.stats().penalty_events);
        }
        tracing::info!(
            node_id = %node,
            cause = %trigger,
            positions = ?result.positions,
            "penalty decision appended"
        );
    }
    Ok(())
}
