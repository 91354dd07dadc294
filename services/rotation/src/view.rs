//! [`RotationView`]: the state the rotation service decides from — the shared [`NodeBook`] plus a
//! small rotation fold of what the book does not keep: the last completed epoch, the epoch each
//! current replica was assigned in, the latest departure of every (model, node) pair, and the stream
//! versions the service appends to with `ExpectedVersion::Exact`.
//!
//! Epochs are derived from the log alone: an epoch is completed by its `RotationCompleted`; a
//! `DeploymentAssigned` or `DeploymentRevoked` folded while the last completed epoch is `e` belongs to
//! epoch `e + 1` (a round appends its moves before its `RotationCompleted`, and a deploy between
//! rounds counts towards the next one). The fold reads no clock and uses only `BTreeMap`s, so
//! replaying the log rebuilds the same view. It makes no decisions.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deepnode_domain::book::NodeBook;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::events::{DecodeError, DomainEvent};
use deepnode_domain::ids::{ModelId, NodeId};
use deepnode_domain::log::RecordedEvent;

/// The name of the stream holding `RotationCompleted` events.
pub const ROTATION_STREAM: &str = "rotation";

/// The rotation service's folded state.
#[derive(Debug, Clone)]
pub struct RotationView {
    /// The shared projection fold (nodes, models, deployments).
    pub book: NodeBook,
    /// The last completed epoch (0 before the first round).
    pub completed_epoch: u64,
    /// When the last round's snapshot was taken (`occurred_at` of its `RotationCompleted`).
    pub last_round_at: Option<DateTime<Utc>>,
    /// Epoch of every current replica.
    pub assigned_epoch: BTreeMap<(ModelId, NodeId), u64>,
    /// Latest epoch each node left each model in.
    pub departures: BTreeMap<(ModelId, NodeId), u64>,
    /// Current version of every stream the service appends to by exact version (`rotation`,
    /// `model-*`, `node-*`); a missing stream is version 0.
    pub stream_versions: BTreeMap<String, i64>,
}

impl RotationView {
    /// An empty view folding with `policy`.
    pub fn new(policy: &PolicyConfig) -> RotationView {
        RotationView {
            book: NodeBook::new(policy),
            completed_epoch: 0,
            last_round_at: None,
            assigned_epoch: BTreeMap::new(),
            departures: BTreeMap::new(),
            stream_versions: BTreeMap::new(),
        }
    }

    /// The epoch in progress: the next one to complete.
    pub fn current_epoch(&self) -> u64 {
        self.completed_epoch.saturating_add(1)
    }

    /// The version of `stream` (0 if it has no events).
    pub fn stream_version(&self, stream: &str) -> i64 {
        self.stream_versions.get(stream).copied().unwrap_or(0)
    }

    /// Folds one stored event into the book and the rotation fold. A decoding error leaves the view
    /// unchanged and is returned so the follower stops at that position.
    pub fn evolve(&mut self, event: &RecordedEvent) -> Result<(), DecodeError> {
        let decoded = DomainEvent::decode(event)?;
        let tracked = event.stream_id == ROTATION_STREAM
            || event.stream_id.starts_with("model-")
            || event.stream_id.starts_with("node-");
        if tracked {
            self.stream_versions
                .insert(event.stream_id.clone(), event.stream_version);
        }
        let epoch = self.current_epoch();
        match &decoded {
            DomainEvent::DeploymentAssigned(e) => {
                self.assigned_epoch
                    .entry((e.model_id.clone(), e.node_id.clone()))
                    .or_insert(epoch);
            }
            DomainEvent::DeploymentRevoked(e) => {
                let key = (e.model_id.clone(), e.node_id.clone());
                if self.assigned_epoch.remove(&key).is_some() {
                    self.departures.insert(key, epoch);
                }
            }
            DomainEvent::RotationCompleted(e) if e.epoch >= self.completed_epoch => {
                self.completed_epoch = e.epoch;
                self.last_round_at = Some(event.occurred_at);
            }
            _ => {}
        }
        // The book takes the event last (by value: it is decoded once).
        self.book.evolve_decoded(event, decoded);
        Ok(())
    }
}
