//! [`NodeBook`]: the whole projected state of the network — nodes with their reputation and penalty
//! bookkeeping, models, current deployments and executions — and [`NodeBook::evolve`], THE projection
//! fold shared by the SQL projector, `deepnode replay` and `deepnode audit`.
//!
//! The fold uses only what is in the events (`occurred_at` included) and the policy it was built with;
//! it never reads a clock, and every map is a `BTreeMap`, so folding the same log twice gives identical
//! state and identical rows. Row views ([`NodeRow`], [`DeploymentRow`], [`ExecutionRow`]) match the SQL
//! columns of CONTRACT §5 exactly. Memory is bounded by the network, not the log: per node by
//! fixed-size windows and a capped fault history, and executions are held only while in flight —
//! an ended execution's final row is handed out once, in [`Touched::ended`], and forgotten. This module makes no decisions: penalties are assessed in `penalties`, placement and
//! routing elsewhere; events about unknown nodes are ignored rather than invented.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};

use crate::config::{PenaltyPolicy, PolicyConfig, ReputationPolicy};
use crate::events::{DecodeError, DomainEvent, FaultKind, NodeStatus, Outcome, Tier};
use crate::ids::{ModelId, NodeId, RequestId};
use crate::log::RecordedEvent;
use crate::reputation::{FailureWindow, Reputation};

/// How many slashed fault ids a node remembers. Older faults cannot recur: their causes are consumed
/// (the invalid-output buffer is cleared by the slash, the downtime id carries the jail count).
pub const REMEMBERED_FAULTS: usize = 32;

/// Everything the book knows about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub node_id: NodeId,
    pub domain: String,
    /// Bonded stake remaining after slashes.
    pub stake: f64,
    pub capacity: u32,
    pub reputation: Reputation,
    pub status: NodeStatus,
    /// Total stake slashed so far.
    pub slashed_amount: f64,
    pub registered_at: DateTime<Utc>,
    /// The latest `occurred_at` of an event about this node.
    pub updated_at: DateTime<Utc>,
    /// When the current status began.
    pub status_since: DateTime<Utc>,
    /// When the current probation began (registration or the end of a jail).
    pub probation_since: DateTime<Utc>,
    /// Observations when the current probation began.
    pub observations_at_probation: u64,
    /// For a jailed node: when the jail ends.
    pub jailed_until: Option<DateTime<Utc>>,
    /// How many times the node has been jailed.
    pub jail_count: u32,
    /// Replicas currently assigned to the node.
    pub deployments: u32,
    /// Outcomes since the last jail, for the downtime rule (the routing window is in `reputation`).
    pub penalty_window: FailureWindow,
    /// Times (µs) of the latest invalid outputs not yet punished, at most the confirmation count.
    pub unpunished_invalid: VecDeque<i64>,
    /// Times (µs) of the latest invalid-output slashes, at most the tombstone count.
    pub invalid_faults: VecDeque<i64>,
    /// Ids of the latest slashed faults, at most [`REMEMBERED_FAULTS`].
    pub slashed_faults: VecDeque<String>,
}

impl NodeState {
    /// A node as registered at `at`: in probation, reputation at the prior.
    pub fn new(
        node_id: NodeId,
        domain: String,
        stake: f64,
        capacity: u32,
        at: DateTime<Utc>,
    ) -> NodeState {
        NodeState {
            node_id,
            domain,
            stake,
            capacity,
            reputation: Reputation::new(),
            status: NodeStatus::Probation,
            slashed_amount: 0.0,
            registered_at: at,
            updated_at: at,
            status_since: at,
            probation_since: at,
            observations_at_probation: 0,
            jailed_until: None,
            jail_count: 0,
            deployments: 0,
            penalty_window: FailureWindow::new(),
            unpunished_invalid: VecDeque::new(),
            invalid_faults: VecDeque::new(),
            slashed_faults: VecDeque::new(),
        }
    }

    /// Whether a fault with this id was already slashed.
    pub fn has_slashed(&self, fault_id: &str) -> bool {
        self.slashed_faults.iter().any(|f| f == fault_id)
    }

    fn observe(
        &mut self,
        outcome: Outcome,
        at: DateTime<Utc>,
        rep: &ReputationPolicy,
        pen: &PenaltyPolicy,
    ) {
        self.reputation.observe(outcome, at, rep);
        self.penalty_window
            .record(outcome != Outcome::Success, at, rep);
        if outcome == Outcome::InvalidOutput {
            let keep = pen.invalid_confirmations.max(1) as usize;
            while self.unpunished_invalid.len() >= keep {
                self.unpunished_invalid.pop_front();
            }
            self.unpunished_invalid.push_back(at.timestamp_micros());
        }
        self.touch(at);
    }

    fn touch(&mut self, at: DateTime<Utc>) {
        if at > self.updated_at {
            self.updated_at = at;
        }
    }

    fn set_status(&mut self, to: NodeStatus, at: DateTime<Utc>) {
        // A new probation (after a jail, a phase-out reversal or a re-registration) restarts the
        // clock; a node coming back from `offline` resumes the probation it was serving.
        if to == NodeStatus::Probation
            && !matches!(self.status, NodeStatus::Probation | NodeStatus::Offline)
        {
            self.probation_since = at;
            self.observations_at_probation = self.reputation.observations();
        }
        if to != NodeStatus::Jailed {
            self.jailed_until = None;
        }
        self.status = to;
        self.status_since = at;
    }

    /// The `node_reputation` row of this node.
    pub fn row(&self, rep: &ReputationPolicy) -> NodeRow {
        let r = &self.reputation;
        NodeRow {
            node_id: self.node_id.to_string(),
            domain: self.domain.clone(),
            stake: self.stake,
            capacity: i32::try_from(self.capacity).unwrap_or(i32::MAX),
            score: r.score(),
            successes: to_i64(r.successes()),
            errors: to_i64(r.errors()),
            timeouts: to_i64(r.timeouts()),
            invalid_outputs: to_i64(r.invalid_outputs()),
            recent_failure_rate: r.failure_rate_at(self.updated_at, rep),
            status: self.status.as_str().to_owned(),
            slashed_amount: self.slashed_amount,
            registered_at: self.registered_at,
            updated_at: self.updated_at,
        }
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A declared model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelState {
    pub domain: String,
    pub replicas: u32,
    pub deployed_at: DateTime<Utc>,
}

/// One current replica of a model on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeploymentState {
    pub tier: Tier,
    pub assigned_at: DateTime<Utc>,
}

/// An execution's status (`executions.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExecutionStatus {
    InFlight,
    Succeeded,
    Failed,
}

impl ExecutionStatus {
    /// The text stored in `executions.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::InFlight => "in_flight",
            ExecutionStatus::Succeeded => "succeeded",
            ExecutionStatus::Failed => "failed",
        }
    }
}

/// One execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionState {
    pub model_id: ModelId,
    pub status: ExecutionStatus,
    /// The node that served it (succeeded) or was tried last (in flight, failed).
    pub node_id: Option<NodeId>,
    pub attempts: u8,
    pub charged: bool,
    pub requested_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// A `node_reputation` row (CONTRACT §5).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub node_id: String,
    pub domain: String,
    pub stake: f64,
    pub capacity: i32,
    pub score: f64,
    pub successes: i64,
    pub errors: i64,
    pub timeouts: i64,
    pub invalid_outputs: i64,
    pub recent_failure_rate: f64,
    pub status: String,
    pub slashed_amount: f64,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A `deployments` row (CONTRACT §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRow {
    pub model_id: String,
    pub node_id: String,
    pub tier: String,
    pub assigned_at: DateTime<Utc>,
}

/// An `executions` row (CONTRACT §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionRow {
    pub request_id: String,
    pub model_id: String,
    pub status: String,
    pub node_id: Option<String>,
    pub attempts: i32,
    pub charged: bool,
    pub requested_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// The keys whose rows an event may have changed; the SQL projector upserts each (or deletes it when
/// the book no longer has the row, e.g. a revoked deployment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub node: Option<NodeId>,
    pub deployment: Option<(ModelId, NodeId)>,
    pub execution: Option<RequestId>,
    pub model: Option<ModelId>,
    /// The final row of an execution this event ended. The book forgets an execution once it has
    /// ended (nothing in the log changes it afterwards), so this is the only place its row is
    /// handed out: the projector writes it, the audit compares it.
    pub ended: Option<ExecutionRow>,
}

impl Touched {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.node.is_none()
            && self.deployment.is_none()
            && self.execution.is_none()
            && self.model.is_none()
    }
}

/// The projected state of the whole network.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeBook {
    reputation_policy: ReputationPolicy,
    penalty_policy: PenaltyPolicy,
    nodes: BTreeMap<NodeId, NodeState>,
    models: BTreeMap<ModelId, ModelState>,
    deployments: BTreeMap<ModelId, BTreeMap<NodeId, DeploymentState>>,
    executions: BTreeMap<RequestId, ExecutionState>,
    last_position: i64,
}

impl Default for NodeBook {
    fn default() -> Self {
        NodeBook::new(&PolicyConfig::default())
    }
}

impl NodeBook {
    /// An empty book folding with `config`'s reputation and penalty numbers (the projector, replay
    /// and audit must use the same config to agree).
    pub fn new(config: &PolicyConfig) -> NodeBook {
        NodeBook {
            reputation_policy: config.reputation.clone(),
            penalty_policy: config.penalty.clone(),
            nodes: BTreeMap::new(),
            models: BTreeMap::new(),
            deployments: BTreeMap::new(),
            executions: BTreeMap::new(),
            last_position: 0,
        }
    }

    /// Folds one stored event. Decoding errors (unknown type, newer schema) are returned untouched so
    /// the caller can name the position; the book is unchanged then.
    pub fn evolve(&mut self, event: &RecordedEvent) -> Result<Touched, DecodeError> {
        let decoded = DomainEvent::decode(event)?;
        Ok(self.evolve_decoded(event, decoded))
    }

    /// [`NodeBook::evolve`] of `event` already decoded as `decoded`, for a caller that reads the
    /// typed event too (so it is decoded once).
    pub fn evolve_decoded(&mut self, event: &RecordedEvent, decoded: DomainEvent) -> Touched {
        self.last_position = self.last_position.max(event.global_position);
        self.apply(decoded, event.occurred_at)
    }

    /// Folds one typed event that occurred at `at` (what `evolve` does after decoding; deciders and
    /// tests use it directly).
    pub fn apply(&mut self, event: DomainEvent, at: DateTime<Utc>) -> Touched {
        let mut touched = Touched::default();
        let rep = &self.reputation_policy;
        let pen = &self.penalty_policy;
        match event {
            DomainEvent::NodeRegistered(e) => {
                match self.nodes.get_mut(&e.node_id) {
                    Some(node) => {
                        node.domain = e.domain;
                        node.stake = e.stake;
                        node.capacity = e.capacity;
                        if node.status == NodeStatus::Deregistered {
                            node.set_status(NodeStatus::Probation, at);
                        }
                        node.touch(at);
                    }
                    None => {
                        let node =
                            NodeState::new(e.node_id.clone(), e.domain, e.stake, e.capacity, at);
                        self.nodes.insert(e.node_id.clone(), node);
                    }
                }
                touched.node = Some(e.node_id);
            }
            DomainEvent::NodeDeregistered(e) => {
                if let Some(node) = self.nodes.get_mut(&e.node_id) {
                    node.set_status(NodeStatus::Deregistered, at);
                    node.touch(at);
                    touched.node = Some(e.node_id);
                }
            }
            DomainEvent::NodeStatusChanged(e) => {
                if let Some(node) = self.nodes.get_mut(&e.node_id) {
                    if e.to == NodeStatus::Jailed && node.status != NodeStatus::Jailed {
                        node.jail_count += 1;
                        node.penalty_window.clear();
                    }
                    node.set_status(e.to, at);
                    if e.to == NodeStatus::Jailed {
                        node.jailed_until = e.until;
                    }
                    node.touch(at);
                    touched.node = Some(e.node_id);
                }
            }
            DomainEvent::NodeSlashed(e) => {
                if let Some(node) = self.nodes.get_mut(&e.node_id) {
                    // Idempotent by fault id: a repeated slash event takes nothing.
                    if !node.has_slashed(&e.fault_id) {
                        let amount = e.amount.max(0.0).min(node.stake.max(0.0));
                        node.stake -= amount;
                        node.slashed_amount += amount;
                        if node.slashed_faults.len() >= REMEMBERED_FAULTS {
                            node.slashed_faults.pop_front();
                        }
                        node.slashed_faults.push_back(e.fault_id);
                        if e.kind == FaultKind::InvalidOutput {
                            node.unpunished_invalid.clear();
                            let keep = pen.tombstone_faults.max(1) as usize;
                            while node.invalid_faults.len() >= keep {
                                node.invalid_faults.pop_front();
                            }
                            node.invalid_faults.push_back(at.timestamp_micros());
                        }
                        node.touch(at);
                        touched.node = Some(e.node_id);
                    }
                }
            }
            DomainEvent::AttemptSucceeded(e) => {
                if let Some(node) = self.nodes.get_mut(&e.node_id) {
                    node.observe(Outcome::Success, at, rep, pen);
                    touched.node = Some(e.node_id);
                }
            }
            DomainEvent::AttemptFailed(e) => {
                if let Some(node) = self.nodes.get_mut(&e.node_id) {
                    node.observe(e.outcome.into(), at, rep, pen);
                    touched.node = Some(e.node_id);
                }
            }
            DomainEvent::ExecutionReported(e) => {
                if let Some(node) = self.nodes.get_mut(&e.node_id) {
                    node.observe(e.outcome, at, rep, pen);
                    touched.node = Some(e.node_id);
                }
            }
            DomainEvent::ModelDeployed(e) => {
                self.models.insert(
                    e.model_id.clone(),
                    ModelState {
                        domain: e.domain,
                        replicas: e.replicas,
                        deployed_at: at,
                    },
                );
                touched.model = Some(e.model_id);
            }
            DomainEvent::DeploymentAssigned(e) => {
                let replicas = self.deployments.entry(e.model_id.clone()).or_default();
                let fresh = replicas
                    .insert(
                        e.node_id.clone(),
                        DeploymentState {
                            tier: e.tier,
                            assigned_at: at,
                        },
                    )
                    .is_none();
                if fresh {
                    if let Some(node) = self.nodes.get_mut(&e.node_id) {
                        node.deployments += 1;
                    }
                }
                touched.deployment = Some((e.model_id, e.node_id));
            }
            DomainEvent::DeploymentRevoked(e) => {
                let mut removed = false;
                if let Some(replicas) = self.deployments.get_mut(&e.model_id) {
                    removed = replicas.remove(&e.node_id).is_some();
                    if replicas.is_empty() {
                        self.deployments.remove(&e.model_id);
                    }
                }
                if removed {
                    if let Some(node) = self.nodes.get_mut(&e.node_id) {
                        node.deployments = node.deployments.saturating_sub(1);
                    }
                    touched.deployment = Some((e.model_id, e.node_id));
                }
            }
            DomainEvent::ExecutionRequested(e) => {
                if !self.executions.contains_key(&e.request_id) {
                    self.executions.insert(
                        e.request_id.clone(),
                        ExecutionState {
                            model_id: e.model_id,
                            status: ExecutionStatus::InFlight,
                            node_id: None,
                            attempts: 0,
                            charged: false,
                            requested_at: at,
                            completed_at: None,
                        },
                    );
                    touched.execution = Some(e.request_id);
                }
            }
            DomainEvent::AttemptDispatched(e) => {
                let exec = self
                    .executions
                    .entry(e.request_id.clone())
                    .or_insert_with(|| ExecutionState {
                        model_id: e.model_id.clone(),
                        status: ExecutionStatus::InFlight,
                        node_id: None,
                        attempts: 0,
                        charged: false,
                        requested_at: at,
                        completed_at: None,
                    });
                exec.attempts = exec.attempts.max(e.attempt);
                if exec.status == ExecutionStatus::InFlight {
                    exec.node_id = Some(e.node_id);
                }
                touched.execution = Some(e.request_id);
            }
            DomainEvent::ExecutionCompleted(e) => {
                if let Some(mut exec) = self.executions.remove(&e.request_id) {
                    exec.status = ExecutionStatus::Succeeded;
                    exec.node_id = Some(e.node_id);
                    exec.attempts = e.attempts;
                    exec.charged = e.charged;
                    exec.completed_at = Some(at);
                    touched.ended = Some(execution_row(&e.request_id, &exec));
                    touched.execution = Some(e.request_id);
                }
            }
            DomainEvent::ExecutionFailed(e) => {
                if let Some(mut exec) = self.executions.remove(&e.request_id) {
                    exec.status = ExecutionStatus::Failed;
                    exec.attempts = e.attempts;
                    exec.charged = false;
                    exec.completed_at = Some(at);
                    touched.ended = Some(execution_row(&e.request_id, &exec));
                    touched.execution = Some(e.request_id);
                }
            }
            // Ejection is each scheduler copy's own outlier state: recorded for the audit trail, it
            // changes neither reputation nor status.
            DomainEvent::RotationCompleted(_)
            | DomainEvent::NodeEjected(_)
            | DomainEvent::NodeRestored(_) => {}
        }
        touched
    }

    /// The highest global position folded by [`NodeBook::evolve`] (0 before any).
    pub fn last_position(&self) -> i64 {
        self.last_position
    }

    /// The reputation policy the book folds with.
    pub fn reputation_policy(&self) -> &ReputationPolicy {
        &self.reputation_policy
    }

    /// One node's state.
    pub fn node(&self, node_id: &NodeId) -> Option<&NodeState> {
        self.nodes.get(node_id)
    }

    /// Every node in id order.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeState> {
        &self.nodes
    }

    /// Every declared model in id order.
    pub fn models(&self) -> &BTreeMap<ModelId, ModelState> {
        &self.models
    }

    /// Current replicas per model, both in id order.
    pub fn deployments(&self) -> &BTreeMap<ModelId, BTreeMap<NodeId, DeploymentState>> {
        &self.deployments
    }

    /// Every execution still in flight, in request id order. Ended executions are not kept: their
    /// final rows leave the fold in [`Touched::ended`], so the book's memory is bounded by what is
    /// in flight, not by the length of the log.
    pub fn executions(&self) -> &BTreeMap<RequestId, ExecutionState> {
        &self.executions
    }

    /// The `node_reputation` row of a node.
    pub fn node_row(&self, node_id: &NodeId) -> Option<NodeRow> {
        self.nodes
            .get(node_id)
            .map(|n| n.row(&self.reputation_policy))
    }

    /// Every `node_reputation` row in key order.
    pub fn node_rows(&self) -> impl Iterator<Item = NodeRow> + '_ {
        self.nodes.values().map(|n| n.row(&self.reputation_policy))
    }

    /// The `deployments` row of one replica, `None` if it is not (or no longer) assigned.
    pub fn deployment_row(&self, model_id: &ModelId, node_id: &NodeId) -> Option<DeploymentRow> {
        self.deployments
            .get(model_id)
            .and_then(|r| r.get(node_id))
            .map(|d| deployment_row(model_id, node_id, d))
    }

    /// Every `deployments` row in key order.
    pub fn deployment_rows(&self) -> impl Iterator<Item = DeploymentRow> + '_ {
        self.deployments
            .iter()
            .flat_map(|(m, replicas)| replicas.iter().map(move |(n, d)| deployment_row(m, n, d)))
    }

    /// The `executions` row of a request still in flight (`None` once it ended: see
    /// [`Touched::ended`]).
    pub fn execution_row(&self, request_id: &RequestId) -> Option<ExecutionRow> {
        self.executions
            .get(request_id)
            .map(|e| execution_row(request_id, e))
    }

    /// The `executions` rows of the requests still in flight, in key order.
    pub fn execution_rows(&self) -> impl Iterator<Item = ExecutionRow> + '_ {
        self.executions.iter().map(|(r, e)| execution_row(r, e))
    }
}

fn deployment_row(model_id: &ModelId, node_id: &NodeId, d: &DeploymentState) -> DeploymentRow {
    DeploymentRow {
        model_id: model_id.to_string(),
        node_id: node_id.to_string(),
        tier: d.tier.as_str().to_owned(),
        assigned_at: d.assigned_at,
    }
}

fn execution_row(request_id: &RequestId, e: &ExecutionState) -> ExecutionRow {
    ExecutionRow {
        request_id: request_id.to_string(),
        model_id: e.model_id.to_string(),
        status: e.status.as_str().to_owned(),
        node_id: e.node_id.as_ref().map(|n| n.to_string()),
        attempts: i32::from(e.attempts),
        charged: e.charged,
        requested_at: e.requested_at,
        completed_at: e.completed_at,
    }
}
