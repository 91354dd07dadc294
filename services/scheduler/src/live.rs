//! This process's live view of the fleet, beside the log-folded [`NodeBook`]: requests in flight
//! per node (the load L the score sees), the outlier tracker fed by attempt outcomes (ejection,
//! probes) and the retry budget.
//!
//! It is deliberately per process: with several scheduler copies each sees its own in-flight counts
//! and ejections (as Envoy's outlier detection does per proxy); each admits only its share of a
//! node's capacity ([`crate::copies`]), so together they keep the node within it. Reputation and failure rate, which must
//! agree across copies and on replay, come from the log instead. Each ejection and restoration is still
//! a decision on the record: `exec` appends `NodeEjected` / `NodeRestored` to the node's stream, caused
//! by the attempt that triggered it (every copy's `producer` is `deepnode-scheduler`, so the log does
//! not say which copy ejected).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use chrono::{DateTime, Utc};
use deepnode_domain::book::NodeBook;
use deepnode_domain::ejection::{may_eject, EjectionPolicy, NodeHealth, Outcome, Transition};
use deepnode_domain::events::Failure;
use deepnode_domain::ids::NodeId;

use crate::budget::RetryBudget;
use crate::copies::Copies;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a holder panicked mid-update of plain counters; the data is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// In-flight counts, node health and the retry budget of one scheduler process.
#[derive(Debug)]
pub struct Live {
    in_flight: Arc<Mutex<HashMap<NodeId, u32>>>,
    /// Fired whenever an attempt ends (a slot frees): requests waiting for capacity look again.
    freed: Arc<Notify>,
    health: Mutex<BTreeMap<NodeId, NodeHealth>>,
    budget: Mutex<RetryBudget>,
    ejection: EjectionPolicy,
    copies: Arc<Copies>,
}

/// Decrements a node's in-flight count when dropped (the attempt ended, however it ended), and
/// tells the requests waiting for capacity that a slot is free.
#[derive(Debug)]
pub struct InFlight {
    map: Arc<Mutex<HashMap<NodeId, u32>>>,
    freed: Arc<Notify>,
    node: NodeId,
}

impl InFlight {
    /// The node whose slot this is.
    pub fn node(&self) -> &NodeId {
        &self.node
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut map = lock(&self.map);
            if let Some(n) = map.get_mut(&self.node) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.node);
                }
            }
        }
        self.freed.notify_waiters();
    }
}

impl Live {
    /// Fresh state with the given policies.
    pub fn new(ejection: EjectionPolicy, budget: RetryBudget, copies: Arc<Copies>) -> Live {
        Live {
            in_flight: Arc::default(),
            freed: Arc::default(),
            health: Mutex::default(),
            budget: Mutex::new(budget),
            ejection,
            copies,
        }
    }

    /// How many of `node`'s `registered` capacity this process may hold: its share among the
    /// scheduler copies ([`crate::copies`]).
    pub fn capacity(&self, node: &NodeId, registered: u32) -> u32 {
        self.copies.share(node, registered)
    }

    /// Resolves once this process knows the other scheduler copies (admission waits for it).
    pub async fn settled(&self) {
        self.copies.settled().await;
    }

    /// Requests in flight on `node` from this process.
    pub fn in_flight(&self, node: &NodeId) -> u32 {
        lock(&self.in_flight).get(node).copied().unwrap_or(0)
    }

    /// Counts one more request in flight on `node` until the guard drops.
    pub fn begin(&self, node: &NodeId) -> InFlight {
        *lock(&self.in_flight).entry(node.clone()).or_insert(0) += 1;
        InFlight {
            map: self.in_flight.clone(),
            freed: self.freed.clone(),
            node: node.clone(),
        }
    }

    /// Resolves at the next freed slot of any node. Create (and `enable`) it before looking at the
    /// load, so a slot freed between the look and the wait is not missed.
    pub fn slot_freed(&self) -> Notified<'_> {
        self.freed.notified()
    }

    /// The signal [`Live::slot_freed`] waits on (the queues wake their next waiter through it).
    pub fn freed(&self) -> Arc<Notify> {
        self.freed.clone()
    }

    /// Whether routing must treat `node` as ejected at `now`.
    pub fn is_ejected(&self, node: &NodeId, now: DateTime<Utc>) -> bool {
        lock(&self.health)
            .get(node)
            .is_some_and(|h| h.is_ejected(now))
    }

    /// Marks the probe of an ejected node as dispatched, if one is due.
    pub fn start_probe_if_due(&self, node: &NodeId, now: DateTime<Utc>) {
        if let Some(h) = lock(&self.health).get_mut(node) {
            if h.start_probe(now) {
                tracing::info!(node_id = %node, "probing an ejected node");
            }
        }
    }

    /// Feeds one attempt outcome to the outlier tracker. `book` supplies the replica sets, so the
    /// last healthy replica of a model is never ejected.
    pub fn record_outcome(
        &self,
        node: &NodeId,
        failure: Option<Failure>,
        now: DateTime<Utc>,
        book: &NodeBook,
    ) -> Transition {
        let outcome = match failure {
            None => Outcome::Success,
            Some(Failure::InvalidOutput) => Outcome::InvalidOutput,
            Some(Failure::Error | Failure::Timeout) => Outcome::Failure,
        };
        let mut health = lock(&self.health);
        let allowed = outcome == Outcome::Success || {
            // Replica sets holding this node, counting only replicas that could serve at all.
            let sets: Vec<Vec<NodeId>> = book
                .deployments()
                .values()
                .filter(|replicas| replicas.contains_key(node))
                .map(|replicas| {
                    replicas
                        .keys()
                        .filter(|n| {
                            *n == node || book.node(n).is_some_and(|s| s.status.is_eligible())
                        })
                        .cloned()
                        .collect()
                })
                .collect();
            may_eject(node, &sets, &health, now)
        };
        let entry = health.entry(node.clone()).or_default();
        let transition = entry.record(outcome, now, &self.ejection, allowed);
        match transition {
            Transition::Ejected { k, until } => {
                metrics::counter!("deepnode_ejections_total", "node_id" => node.to_string())
                    .increment(1);
                tracing::warn!(node_id = %node, k, %until, "node ejected after consecutive failures");
            }
            Transition::Restored => {
                tracing::info!(node_id = %node, "ejected node restored by its probe")
            }
            Transition::KeptLastHealthy => tracing::warn!(
                node_id = %node,
                "node keeps failing but is the last healthy replica; an emergency re-placement is needed"
            ),
            Transition::None => {}
        }
        if *entry == NodeHealth::default() {
            health.remove(node);
        }
        transition
    }

    /// Records a request in the retry budget.
    pub fn count_request(&self) {
        lock(&self.budget).on_request();
    }

    /// Takes one retry from the budget at `now`, if it allows.
    pub fn try_retry(&self, now: Instant) -> bool {
        lock(&self.budget).try_retry(now)
    }
}
