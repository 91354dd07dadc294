//! [`View`]: the state this service decides against — the domain's [`NodeBook`] folded live from the
//! log, plus the two things the book does not keep that the service needs: each node stream's
//! version (for `ExpectedVersion::Exact` appends, so two copies never take one decision twice) and
//! the status a node had before it went offline (where a heartbeat brings it back).
//!
//! It reads no clock and makes no decisions; it is only a fold over stored events.

use std::collections::BTreeMap;

use deepnode_domain::book::NodeBook;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::events::{DecodeError, DomainEvent, NodeStatus};
use deepnode_domain::ids::NodeId;
use deepnode_domain::log::RecordedEvent;

/// The folded state: the book, node stream versions, pre-offline statuses.
#[derive(Debug, Clone)]
pub struct View {
    /// The domain's projected state of the network.
    pub book: NodeBook,
    /// Stream version of each `node-<id>` stream, keyed by stream id.
    versions: BTreeMap<String, i64>,
    /// For nodes that went offline: the status they left (from the `NodeStatusChanged` event).
    offline_from: BTreeMap<NodeId, NodeStatus>,
}

impl View {
    /// An empty view folding with `policy`.
    pub fn new(policy: &PolicyConfig) -> View {
        View {
            book: NodeBook::new(policy),
            versions: BTreeMap::new(),
            offline_from: BTreeMap::new(),
        }
    }

    /// Folds one stored event (the follower's fold).
    pub fn evolve(&mut self, event: &RecordedEvent) -> Result<(), DecodeError> {
        let decoded = DomainEvent::decode(event)?;
        if event.stream_id.starts_with("node-") {
            self.versions
                .insert(event.stream_id.clone(), event.stream_version);
            if let DomainEvent::NodeStatusChanged(e) = &decoded {
                if e.to == NodeStatus::Offline {
                    self.offline_from.insert(e.node_id.clone(), e.from);
                }
            }
        }
        self.book.evolve_decoded(event, decoded);
        Ok(())
    }

    /// The version of a stream as folded (0 when the view has seen none of it).
    pub fn version(&self, stream: &str) -> i64 {
        self.versions.get(stream).copied().unwrap_or(0)
    }

    /// Where an offline node returns when it beats again: the eligible status it left (active or
    /// probation); probation when the view does not know (the book then resumes its probation clock).
    pub fn return_status(&self, node: &NodeId) -> NodeStatus {
        match self.offline_from.get(node) {
            Some(NodeStatus::Active) => NodeStatus::Active,
            _ => NodeStatus::Probation,
        }
    }
}
