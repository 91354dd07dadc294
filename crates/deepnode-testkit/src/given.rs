//! The facts a test starts from, appended straight to the log as if they had been recorded
//! (producer `test`, correlation `seed`), so a test states its world in a few lines:
//!
//! ```ignore
//! let given = given(&store);
//! given.node("n1", 4).await;
//! given.node("n2", 4).await;
//! given.deployment("m-1", &["n1", "n2"]).await;
//! ```
//!
//! Nothing here goes through a service: a test that exercises registration or deployment sends
//! the command instead.

use chrono::{DateTime, Utc};
use deepnode_domain::events::{
    DeploymentAssigned, DomainEvent, Metadata, ModelDeployed, NodeRegistered, Tier,
};
use deepnode_domain::ids::{ModelId, NodeId};
use deepnode_domain::log::{ExpectedVersion, StreamId};
use deepnode_store::EventStore;
use uuid::Uuid;

/// Appends seed facts to `store`'s log (see the module doc).
pub fn given(store: &EventStore) -> Given<'_> {
    Given { store }
}

/// See [`given`].
#[derive(Clone, Copy)]
pub struct Given<'a> {
    store: &'a EventStore,
}

impl Given<'_> {
    /// Appends `events` to `stream` in one transaction, each recorded at its own time; panics if
    /// the store refuses them.
    pub async fn recorded(
        &self,
        stream: &StreamId,
        events: impl IntoIterator<Item = (DomainEvent, DateTime<Utc>)>,
    ) {
        let meta = Metadata::new("test", "seed");
        let events = events
            .into_iter()
            .map(|(event, at)| event.to_new_event(Uuid::new_v4(), meta.clone(), at))
            .collect();
        self.store
            .append(stream, ExpectedVersion::Any, events)
            .await
            .unwrap_or_else(|e| panic!("seeding {stream}: {e}"));
    }

    /// Appends one event, recorded now, to its own stream.
    pub async fn event(&self, event: DomainEvent) {
        self.recorded(&event.stream_id(), [(event, Utc::now())])
            .await;
    }

    /// A `text` node with stake 100 and `capacity`, registered now (on probation, as every new
    /// node is).
    pub async fn node(&self, id: &str, capacity: u32) {
        self.event(DomainEvent::NodeRegistered(NodeRegistered {
            node_id: node_id(id),
            domain: "text".into(),
            stake: 100.0,
            capacity,
        }))
        .await;
    }

    /// `model` (domain `text`) deployed on `nodes`: the first in the top tier, the rest lower.
    pub async fn deployment(&self, model: &str, nodes: &[&str]) {
        let model_id = ModelId::parse(model).unwrap_or_else(|e| panic!("model id {model}: {e}"));
        let replicas = u32::try_from(nodes.len()).expect("a handful of replicas");
        self.event(DomainEvent::ModelDeployed(ModelDeployed {
            model_id: model_id.clone(),
            domain: "text".into(),
            replicas,
        }))
        .await;
        for (i, node) in nodes.iter().enumerate() {
            self.event(DomainEvent::DeploymentAssigned(DeploymentAssigned {
                model_id: model_id.clone(),
                node_id: node_id(node),
                tier: if i == 0 { Tier::Top } else { Tier::Lower },
                reason: "test".into(),
            }))
            .await;
        }
    }
}

/// A node id a test spells out; panics on an invalid one.
pub fn node_id(id: &str) -> NodeId {
    NodeId::parse(id).unwrap_or_else(|e| panic!("node id {id}: {e}"))
}
