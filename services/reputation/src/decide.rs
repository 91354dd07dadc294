//! Appending a decision about one node safely when several copies of the service run: decide
//! against the live view, append to the node's stream with `ExpectedVersion::Exact(version as
//! folded)` and deterministic event ids; on a conflict, let the view catch up with the log and decide
//! again. Two copies therefore never take one decision twice: the loser either sees its identical
//! events already there (same ids, a duplicate no-op) or re-decides against the winner's outcome.
//!
//! It does not decide anything itself: callers pass the decider (penalties, liveness).

use chrono::{DateTime, Utc};
use deepnode_domain::events::{DomainEvent, Metadata};
use deepnode_domain::ids::NodeId;
use deepnode_store::{AppendResult, ExpectedVersion, StreamId};
use uuid::Uuid;

use crate::view::View;
use crate::Shared;

/// How many times a decision is retried after conflicts before giving up (the caller retries later).
const MAX_ATTEMPTS: u32 = 5;

/// The service's UUID v5 namespace for derived event ids.
pub(crate) const NAMESPACE: Uuid = Uuid::from_u128(0x7d1c_4b0e_5e6a_4f1e_9a57_2c3b_8e61_d0a4);

/// A UUID v5 of `seed` in the service's namespace.
pub(crate) fn derived_id(seed: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, seed.as_bytes())
}

/// Events to append to one node's stream.
pub(crate) struct Decision {
    pub events: Vec<DomainEvent>,
    /// Seed of the event ids: event `i` gets `derived_id("{seed}:{i}")`.
    pub id_seed: String,
    pub metadata: Metadata,
    pub occurred_at: DateTime<Utc>,
}

/// The node stream's id (`node-<id>`).
pub(crate) fn node_stream(node: &NodeId) -> Result<StreamId, deepnode_store::Error> {
    Ok(StreamId::parse(&format!("node-{node}"))?)
}

/// Decides with `decide(view, stream_version)` and appends the decision (if any) with
/// `Exact(stream_version)`, re-deciding after conflicts. Returns the append (or `None` when there
/// was nothing to do), after the view has folded it.
pub(crate) async fn decide_and_append<F>(
    shared: &Shared,
    node: &NodeId,
    decide: F,
) -> Result<Option<AppendResult>, deepnode_store::Error>
where
    F: Fn(&View, i64) -> Option<Decision>,
{
    let stream = node_stream(node)?;
    let timeout = shared.options.view_timeout;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (version, decision) = {
            let view = shared.view.read();
            let version = view.version(stream.as_str());
            (version, decide(&view, version))
        };
        let Some(decision) = decision.filter(|d| !d.events.is_empty()) else {
            return Ok(None);
        };
        let events = decision
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.to_new_event(
                    derived_id(&format!("{}:{i}", decision.id_seed)),
                    decision.metadata.clone(),
                    decision.occurred_at,
                )
            })
            .collect();
        match shared
            .ctx
            .store
            .append(&stream, ExpectedVersion::Exact(version), events)
            .await
        {
            Ok(result) => {
                shared
                    .view
                    .wait_for(result.last_position(), timeout)
                    .await?;
                return Ok(Some(result));
            }
            Err(deepnode_store::Error::Conflict { .. }) if attempt < MAX_ATTEMPTS => {
                // Another copy decided first: catch up with the log and decide again.
                let head = shared.ctx.store.head_position().await?;
                shared.view.wait_for(head, timeout).await?;
            }
            Err(e) => return Err(e),
        }
    }
}
