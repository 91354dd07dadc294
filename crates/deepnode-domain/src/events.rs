//! The domain events of CONTRACT §4 as typed payloads, and the one place where stored rows become
//! typed events again ([`DomainEvent::decode`]) — including schema evolution.
//!
//! Every event type has a current `schema_version` ([`current_schema_version`]). Writers always write
//! the current shape; readers accept every older version and upcast it (for example `NodeRegistered`
//! v1, which had no `capacity`, reads as v2 with `capacity = 1`). A released shape is never edited: a
//! change adds a version and an upcaster here. An unknown event type, or a version newer than this
//! binary knows, is a typed [`DecodeError`] naming the type and version — never a silent skip; callers
//! add the log position. This module does no IO and reads no clock: `occurred_at` is an argument.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::ids::{ModelId, NodeId, RequestId};
use crate::log::{NewEvent, RecordedEvent, StreamId};

/// The replica tier of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Chosen from the top of the reputation ranking.
    Top,
    /// The growth tier: everything else, including probation nodes.
    Lower,
}

impl Tier {
    /// The contract's text for the tier (`top`, `lower`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Top => "top",
            Tier::Lower => "lower",
        }
    }
}

/// The role of an attempt within one execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The routed node (attempt 1).
    Primary,
    /// The other replica (attempt 2).
    Backup,
}

/// The outcome of an attempt or an externally reported execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A valid output in time.
    Success,
    /// An error reply (or a crash).
    Error,
    /// No answer within the timeout.
    Timeout,
    /// An answer that was not a valid output.
    InvalidOutput,
}

impl Outcome {
    /// The contract's text (`success`, `error`, `timeout`, `invalid_output`).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::InvalidOutput => "invalid_output",
        }
    }
}

/// How an attempt failed: an [`Outcome`] other than success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// An error reply (or a crash).
    Error,
    /// No answer within the timeout.
    Timeout,
    /// An answer that was not a valid output.
    InvalidOutput,
}

impl From<Failure> for Outcome {
    fn from(value: Failure) -> Self {
        match value {
            Failure::Error => Outcome::Error,
            Failure::Timeout => Outcome::Timeout,
            Failure::InvalidOutput => Outcome::InvalidOutput,
        }
    }
}

/// A node's lifecycle status (CONTRACT §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Fully eligible.
    Active,
    /// New (younger than 24 h or fewer than 50 observations) or back from jail; eligible, growth tier.
    Probation,
    /// Serving a downtime jail; not eligible until it ends.
    Jailed,
    /// Missed heartbeats; not eligible until it beats again.
    Offline,
    /// Removed for persistently poor reputation.
    PhasedOut,
    /// Removed for good (repeated invalid output).
    Tombstoned,
    /// Left the network by its own request.
    Deregistered,
}

impl NodeStatus {
    /// The text stored in `node_reputation.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Active => "active",
            NodeStatus::Probation => "probation",
            NodeStatus::Jailed => "jailed",
            NodeStatus::Offline => "offline",
            NodeStatus::PhasedOut => "phased_out",
            NodeStatus::Tombstoned => "tombstoned",
            NodeStatus::Deregistered => "deregistered",
        }
    }

    /// Whether the node may be routed to or placed on (active or probation).
    pub fn is_eligible(self) -> bool {
        matches!(self, NodeStatus::Active | NodeStatus::Probation)
    }

    /// Whether the status is final (no transition leaves it).
    pub fn is_terminal(self) -> bool {
        matches!(self, NodeStatus::Tombstoned | NodeStatus::Deregistered)
    }
}

/// The kind of fault a slash punishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Success ratio below the threshold over the window.
    Downtime,
    /// Invalid output confirmed repeatedly within the window.
    InvalidOutput,
}

/// The event's envelope metadata, stored in the `metadata` jsonb column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Groups every event of one user-visible operation (e.g. the request id or command id).
    pub correlation_id: String,
    /// The event id (or command id) that caused this event, when there is one.
    pub causation_id: Option<String>,
    /// The component that produced the event (e.g. `scheduler`).
    pub producer: String,
}

impl Metadata {
    /// Metadata with no cause.
    pub fn new(producer: impl Into<String>, correlation_id: impl Into<String>) -> Metadata {
        Metadata {
            correlation_id: correlation_id.into(),
            causation_id: None,
            producer: producer.into(),
        }
    }

    /// The same metadata, caused by `cause` (usually an event id).
    pub fn caused_by(mut self, cause: impl ToString) -> Metadata {
        self.causation_id = Some(cause.to_string());
        self
    }
}

/// `NodeRegistered` (v2): a node joined with its domain, stake and capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRegistered {
    pub node_id: NodeId,
    pub domain: String,
    /// Non-negative (checked at the edge).
    pub stake: f64,
    /// Maximum concurrent requests, positive (checked at the edge).
    pub capacity: u32,
}

/// `NodeRegistered` v1, before `capacity` existed. Read only, upcast to [`NodeRegistered`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct NodeRegisteredV1 {
    node_id: NodeId,
    domain: String,
    stake: f64,
}

impl From<NodeRegisteredV1> for NodeRegistered {
    fn from(v1: NodeRegisteredV1) -> Self {
        NodeRegistered {
            node_id: v1.node_id,
            domain: v1.domain,
            stake: v1.stake,
            // v1 nodes served one request at a time.
            capacity: 1,
        }
    }
}

/// `NodeDeregistered`: a node left the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDeregistered {
    pub node_id: NodeId,
    pub reason: String,
}

/// `ModelDeployed`: a model was declared with its domain and wanted replica count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDeployed {
    pub model_id: ModelId,
    pub domain: String,
    pub replicas: u32,
}

/// `DeploymentAssigned`: a replica of a model was placed on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentAssigned {
    pub model_id: ModelId,
    pub node_id: NodeId,
    pub tier: Tier,
    pub reason: String,
}

/// `DeploymentRevoked`: a replica was removed from a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRevoked {
    pub model_id: ModelId,
    pub node_id: NodeId,
    pub reason: String,
}

/// `ExecutionRequested`: a caller asked for an execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRequested {
    pub request_id: RequestId,
    pub model_id: ModelId,
    pub timeout_ms: u64,
}

/// `AttemptDispatched`: an attempt was sent to a node, with the routing decision that chose it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptDispatched {
    pub request_id: RequestId,
    pub model_id: ModelId,
    pub node_id: NodeId,
    pub role: Role,
    /// 1 or 2.
    pub attempt: u8,
    /// The routing decision record (inputs, per-factor scores, weights, tie-break, config hash); its
    /// typed shape is `crate::scoring::RouteDecision`.
    pub decision: Value,
}

/// `AttemptSucceeded`: a node answered with a valid output in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptSucceeded {
    pub request_id: RequestId,
    pub node_id: NodeId,
    pub latency_ms: u64,
}

/// `AttemptFailed`: a node's attempt failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptFailed {
    pub request_id: RequestId,
    pub node_id: NodeId,
    pub outcome: Failure,
    pub latency_ms: u64,
    pub detail: String,
}

/// `ExecutionCompleted`: an execution succeeded and was charged (exactly once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionCompleted {
    pub request_id: RequestId,
    pub model_id: ModelId,
    pub node_id: NodeId,
    pub attempts: u8,
    /// Always true.
    pub charged: bool,
}

/// `ExecutionFailed`: every attempt failed; nothing is charged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionFailed {
    pub request_id: RequestId,
    pub model_id: ModelId,
    pub attempts: u8,
    /// Always false.
    pub charged: bool,
    /// The reply's error code, e.g. `all_replicas_failed`.
    pub error_code: String,
}

/// `ExecutionReported`: an outcome ingested from outside (`deepnode.ingest.execution`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionReported {
    /// The reporter's event id, when given (also the log's `event_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Uuid>,
    pub request_id: RequestId,
    pub model_id: ModelId,
    pub node_id: NodeId,
    pub outcome: Outcome,
    pub latency_ms: u64,
    /// When the reporter says it happened.
    pub reported_occurred_at: DateTime<Utc>,
}

/// `NodeStatusChanged`: a node moved from one status to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatusChanged {
    pub node_id: NodeId,
    pub from: NodeStatus,
    pub to: NodeStatus,
    pub reason: String,
    /// For `to = jailed`: when the jail ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// `NodeSlashed`: part of a node's stake was taken for a fault. Idempotent by `fault_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSlashed {
    pub node_id: NodeId,
    /// Deterministic id of the fault; a fault is never slashed twice.
    pub fault_id: String,
    pub kind: FaultKind,
    /// The fraction of stake taken, in basis points.
    pub fraction_bps: u32,
    /// The stake taken.
    pub amount: f64,
    pub reason: String,
}

/// `NodeEjected`: a scheduler copy stopped routing to a node after consecutive failed attempts
/// (POLICY.md "Ejection"); its `causation_id` is the `AttemptFailed` that tipped it. Ejection is kept
/// per scheduler copy (as an outlier detector per proxy), so `producer` in the metadata names the copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEjected {
    pub node_id: NodeId,
    /// This is the node's `k`-th ejection in a row (30 s × k, capped).
    pub ejections: u32,
    /// When a probe request may decide whether it comes back.
    pub until: DateTime<Utc>,
    pub reason: String,
}

/// `NodeRestored`: a probe request to an ejected node succeeded and that scheduler copy routes to it
/// again; `causation_id` is the probe's `AttemptSucceeded`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRestored {
    pub node_id: NodeId,
}

/// `RotationCompleted`: a rotation epoch finished (the moves themselves are deployment events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationCompleted {
    pub epoch: u64,
    /// How many replicas moved.
    pub moves: u32,
    /// The planner's record (typed by `crate::rotation`); `null` when absent.
    #[serde(default)]
    pub plan: Value,
    /// The hash of the policy config used.
    #[serde(default)]
    pub config_hash: String,
}

/// Why a stored event could not be read as a [`DomainEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {event_type:?} (schema_version {schema_version})")]
    UnknownEventType {
        event_type: String,
        schema_version: i32,
    },
    #[error("{event_type} has schema_version {found}, newer than the {known} this binary knows")]
    NewerSchema {
        event_type: String,
        found: i32,
        known: i32,
    },
    #[error("{event_type} has invalid schema_version {found}")]
    BadSchemaVersion { event_type: String, found: i32 },
    #[error("{event_type} v{schema_version} payload does not match its schema: {message}")]
    Payload {
        event_type: String,
        schema_version: i32,
        message: String,
    },
}

/// Every event of the domain, one variant per event type.
#[derive(Debug, Clone, PartialEq)]
pub enum DomainEvent {
    NodeRegistered(NodeRegistered),
    NodeDeregistered(NodeDeregistered),
    ModelDeployed(ModelDeployed),
    DeploymentAssigned(DeploymentAssigned),
    DeploymentRevoked(DeploymentRevoked),
    ExecutionRequested(ExecutionRequested),
    AttemptDispatched(AttemptDispatched),
    AttemptSucceeded(AttemptSucceeded),
    AttemptFailed(AttemptFailed),
    ExecutionCompleted(ExecutionCompleted),
    ExecutionFailed(ExecutionFailed),
    ExecutionReported(ExecutionReported),
    NodeStatusChanged(NodeStatusChanged),
    NodeSlashed(NodeSlashed),
    NodeEjected(NodeEjected),
    NodeRestored(NodeRestored),
    RotationCompleted(RotationCompleted),
}

/// Every event type with its current schema version, in declaration order.
pub const EVENT_TYPES: &[(&str, i32)] = &[
    ("NodeRegistered", 2),
    ("NodeDeregistered", 1),
    ("ModelDeployed", 1),
    ("DeploymentAssigned", 1),
    ("DeploymentRevoked", 1),
    ("ExecutionRequested", 1),
    ("AttemptDispatched", 1),
    ("AttemptSucceeded", 1),
    ("AttemptFailed", 1),
    ("ExecutionCompleted", 1),
    ("ExecutionFailed", 1),
    ("ExecutionReported", 1),
    ("NodeStatusChanged", 1),
    ("NodeSlashed", 1),
    ("NodeEjected", 1),
    ("NodeRestored", 1),
    ("RotationCompleted", 1),
];

/// The current schema version of an event type, or `None` for a type this binary does not know.
pub fn current_schema_version(event_type: &str) -> Option<i32> {
    EVENT_TYPES
        .iter()
        .find(|(name, _)| *name == event_type)
        .map(|(_, v)| *v)
}

fn parse<T: DeserializeOwned>(
    event_type: &str,
    schema_version: i32,
    payload: &Value,
) -> Result<T, DecodeError> {
    // Deserialising from `&Value` borrows the payload: no clone of the JSON tree per event.
    T::deserialize(payload).map_err(|e| DecodeError::Payload {
        event_type: event_type.to_owned(),
        schema_version,
        message: e.to_string(),
    })
}

impl DomainEvent {
    /// The PascalCase event type stored in `events.event_type`.
    pub fn event_type(&self) -> &'static str {
        match self {
            DomainEvent::NodeRegistered(_) => "NodeRegistered",
            DomainEvent::NodeDeregistered(_) => "NodeDeregistered",
            DomainEvent::ModelDeployed(_) => "ModelDeployed",
            DomainEvent::DeploymentAssigned(_) => "DeploymentAssigned",
            DomainEvent::DeploymentRevoked(_) => "DeploymentRevoked",
            DomainEvent::ExecutionRequested(_) => "ExecutionRequested",
            DomainEvent::AttemptDispatched(_) => "AttemptDispatched",
            DomainEvent::AttemptSucceeded(_) => "AttemptSucceeded",
            DomainEvent::AttemptFailed(_) => "AttemptFailed",
            DomainEvent::ExecutionCompleted(_) => "ExecutionCompleted",
            DomainEvent::ExecutionFailed(_) => "ExecutionFailed",
            DomainEvent::ExecutionReported(_) => "ExecutionReported",
            DomainEvent::NodeStatusChanged(_) => "NodeStatusChanged",
            DomainEvent::NodeSlashed(_) => "NodeSlashed",
            DomainEvent::NodeEjected(_) => "NodeEjected",
            DomainEvent::NodeRestored(_) => "NodeRestored",
            DomainEvent::RotationCompleted(_) => "RotationCompleted",
        }
    }

    /// The schema version this binary writes for the event's type.
    pub fn schema_version(&self) -> i32 {
        match self {
            DomainEvent::NodeRegistered(_) => 2,
            _ => 1,
        }
    }

    /// The text of the stream this event belongs to: `node-<id>` for a node's lifecycle, `model-<id>`
    /// for deployments, `exec-<request_id>` for an execution and its attempts, `report-<request_id>`
    /// for ingested reports (one stream each, so concurrent ingestion never contends), `rotation` for
    /// rotation epochs.
    pub fn stream_name(&self) -> String {
        match self {
            DomainEvent::NodeRegistered(e) => format!("node-{}", e.node_id),
            DomainEvent::NodeDeregistered(e) => format!("node-{}", e.node_id),
            DomainEvent::NodeStatusChanged(e) => format!("node-{}", e.node_id),
            DomainEvent::NodeSlashed(e) => format!("node-{}", e.node_id),
            DomainEvent::NodeEjected(e) => format!("node-{}", e.node_id),
            DomainEvent::NodeRestored(e) => format!("node-{}", e.node_id),
            DomainEvent::ModelDeployed(e) => format!("model-{}", e.model_id),
            DomainEvent::DeploymentAssigned(e) => format!("model-{}", e.model_id),
            DomainEvent::DeploymentRevoked(e) => format!("model-{}", e.model_id),
            DomainEvent::ExecutionRequested(e) => format!("exec-{}", e.request_id),
            DomainEvent::AttemptDispatched(e) => format!("exec-{}", e.request_id),
            DomainEvent::AttemptSucceeded(e) => format!("exec-{}", e.request_id),
            DomainEvent::AttemptFailed(e) => format!("exec-{}", e.request_id),
            DomainEvent::ExecutionCompleted(e) => format!("exec-{}", e.request_id),
            DomainEvent::ExecutionFailed(e) => format!("exec-{}", e.request_id),
            DomainEvent::ExecutionReported(e) => format!("report-{}", e.request_id),
            DomainEvent::RotationCompleted(_) => "rotation".to_owned(),
        }
    }

    /// The stream this event belongs to, see [`DomainEvent::stream_name`].
    pub fn stream_id(&self) -> StreamId {
        let name = self.stream_name();
        // Proven invariant: ids are ≤ 128 chars of the id charset and every prefix is ≤ 7 ASCII
        // chars of that charset, so the name is always a valid stream id. The fallback is unreachable.
        match StreamId::parse(&name) {
            Ok(id) => id,
            Err(e) => unreachable!("stream id {name:?} built from valid ids is invalid: {e}"),
        }
    }

    /// The stream of the execution `request_id` (`exec-<request_id>`), where all its events live.
    pub fn execution_stream(request_id: &RequestId) -> StreamId {
        // As in `stream_id`: a valid request id with this prefix is always a valid stream id.
        match StreamId::parse(&format!("exec-{request_id}")) {
            Ok(id) => id,
            Err(e) => unreachable!("execution stream of {request_id} is invalid: {e}"),
        }
    }

    /// The event's payload as the JSON object stored in `events.payload`.
    pub fn payload(&self) -> Value {
        // Serialising these derive-only structs cannot fail (string keys, no custom impls); a `Null`
        // would be refused by `NewEvent::validate` anyway.
        let value = match self {
            DomainEvent::NodeRegistered(e) => serde_json::to_value(e),
            DomainEvent::NodeDeregistered(e) => serde_json::to_value(e),
            DomainEvent::ModelDeployed(e) => serde_json::to_value(e),
            DomainEvent::DeploymentAssigned(e) => serde_json::to_value(e),
            DomainEvent::DeploymentRevoked(e) => serde_json::to_value(e),
            DomainEvent::ExecutionRequested(e) => serde_json::to_value(e),
            DomainEvent::AttemptDispatched(e) => serde_json::to_value(e),
            DomainEvent::AttemptSucceeded(e) => serde_json::to_value(e),
            DomainEvent::AttemptFailed(e) => serde_json::to_value(e),
            DomainEvent::ExecutionCompleted(e) => serde_json::to_value(e),
            DomainEvent::ExecutionFailed(e) => serde_json::to_value(e),
            DomainEvent::ExecutionReported(e) => serde_json::to_value(e),
            DomainEvent::NodeStatusChanged(e) => serde_json::to_value(e),
            DomainEvent::NodeSlashed(e) => serde_json::to_value(e),
            DomainEvent::NodeEjected(e) => serde_json::to_value(e),
            DomainEvent::NodeRestored(e) => serde_json::to_value(e),
            DomainEvent::RotationCompleted(e) => serde_json::to_value(e),
        };
        // A quiet empty payload in the immutable log would be worse than a loud stop.
        value.expect("an event payload serialises: plain structs with string keys")
    }

    /// The event ready to append, in the current schema version.
    pub fn to_new_event(
        &self,
        event_id: Uuid,
        metadata: Metadata,
        occurred_at: DateTime<Utc>,
    ) -> NewEvent {
        NewEvent {
            event_id,
            event_type: self.event_type().to_owned(),
            schema_version: self.schema_version(),
            payload: self.payload(),
            metadata: serde_json::to_value(metadata)
                .expect("metadata serialises: a plain struct of strings and ids"),
            occurred_at,
        }
    }

    /// Reads a stored event, upcasting older schema versions to the current shape.
    pub fn decode(event: &RecordedEvent) -> Result<DomainEvent, DecodeError> {
        DomainEvent::decode_parts(&event.event_type, event.schema_version, &event.payload)
    }

    /// [`DomainEvent::decode`] on the three columns that matter.
    pub fn decode_parts(
        event_type: &str,
        schema_version: i32,
        payload: &Value,
    ) -> Result<DomainEvent, DecodeError> {
        let Some(known) = current_schema_version(event_type) else {
            return Err(DecodeError::UnknownEventType {
                event_type: event_type.to_owned(),
                schema_version,
            });
        };
        if schema_version > known {
            return Err(DecodeError::NewerSchema {
                event_type: event_type.to_owned(),
                found: schema_version,
                known,
            });
        }
        if schema_version < 1 {
            return Err(DecodeError::BadSchemaVersion {
                event_type: event_type.to_owned(),
                found: schema_version,
            });
        }
        let (t, v) = (event_type, schema_version);
        Ok(match t {
            "NodeRegistered" if v == 1 => {
                DomainEvent::NodeRegistered(parse::<NodeRegisteredV1>(t, v, payload)?.into())
            }
            "NodeRegistered" => DomainEvent::NodeRegistered(parse(t, v, payload)?),
            "NodeDeregistered" => DomainEvent::NodeDeregistered(parse(t, v, payload)?),
            "ModelDeployed" => DomainEvent::ModelDeployed(parse(t, v, payload)?),
            "DeploymentAssigned" => DomainEvent::DeploymentAssigned(parse(t, v, payload)?),
            "DeploymentRevoked" => DomainEvent::DeploymentRevoked(parse(t, v, payload)?),
            "ExecutionRequested" => DomainEvent::ExecutionRequested(parse(t, v, payload)?),
            "AttemptDispatched" => DomainEvent::AttemptDispatched(parse(t, v, payload)?),
            "AttemptSucceeded" => DomainEvent::AttemptSucceeded(parse(t, v, payload)?),
            "AttemptFailed" => DomainEvent::AttemptFailed(parse(t, v, payload)?),
            "ExecutionCompleted" => DomainEvent::ExecutionCompleted(parse(t, v, payload)?),
            "ExecutionFailed" => DomainEvent::ExecutionFailed(parse(t, v, payload)?),
            "ExecutionReported" => DomainEvent::ExecutionReported(parse(t, v, payload)?),
            "NodeStatusChanged" => DomainEvent::NodeStatusChanged(parse(t, v, payload)?),
            "NodeSlashed" => DomainEvent::NodeSlashed(parse(t, v, payload)?),
            "NodeEjected" => DomainEvent::NodeEjected(parse(t, v, payload)?),
            "NodeRestored" => DomainEvent::NodeRestored(parse(t, v, payload)?),
            "RotationCompleted" => DomainEvent::RotationCompleted(parse(t, v, payload)?),
            _ => {
                return Err(DecodeError::UnknownEventType {
                    event_type: event_type.to_owned(),
                    schema_version,
                })
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(id: &str) -> NodeId {
        NodeId::parse(id).unwrap()
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn samples() -> Vec<DomainEvent> {
        let m = ModelId::parse("m1").unwrap();
        let r = RequestId::parse("r1").unwrap();
        vec![
            DomainEvent::NodeRegistered(NodeRegistered {
                node_id: node("n1"),
                domain: "vision".into(),
                stake: 12.5,
                capacity: 4,
            }),
            DomainEvent::NodeDeregistered(NodeDeregistered {
                node_id: node("n1"),
                reason: "bye".into(),
            }),
            DomainEvent::ModelDeployed(ModelDeployed {
                model_id: m.clone(),
                domain: "vision".into(),
                replicas: 2,
            }),
            DomainEvent::DeploymentAssigned(DeploymentAssigned {
                model_id: m.clone(),
                node_id: node("n1"),
                tier: Tier::Top,
                reason: "placement".into(),
            }),
            DomainEvent::DeploymentRevoked(DeploymentRevoked {
                model_id: m.clone(),
                node_id: node("n1"),
                reason: "rotation".into(),
            }),
            DomainEvent::ExecutionRequested(ExecutionRequested {
                request_id: r.clone(),
                model_id: m.clone(),
                timeout_ms: 5000,
            }),
            DomainEvent::AttemptDispatched(AttemptDispatched {
                request_id: r.clone(),
                model_id: m.clone(),
                node_id: node("n1"),
                role: Role::Primary,
                attempt: 1,
                decision: json!({"score_bps": 7000}),
            }),
            DomainEvent::AttemptSucceeded(AttemptSucceeded {
                request_id: r.clone(),
                node_id: node("n1"),
                latency_ms: 12,
            }),
            DomainEvent::AttemptFailed(AttemptFailed {
                request_id: r.clone(),
                node_id: node("n1"),
                outcome: Failure::InvalidOutput,
                latency_ms: 12,
                detail: "not json".into(),
            }),
            DomainEvent::ExecutionCompleted(ExecutionCompleted {
                request_id: r.clone(),
                model_id: m.clone(),
                node_id: node("n1"),
                attempts: 1,
                charged: true,
            }),
            DomainEvent::ExecutionFailed(ExecutionFailed {
                request_id: r.clone(),
                model_id: m.clone(),
                attempts: 2,
                charged: false,
                error_code: "all_replicas_failed".into(),
            }),
            DomainEvent::ExecutionReported(ExecutionReported {
                event_id: Some(Uuid::nil()),
                request_id: r.clone(),
                model_id: m,
                node_id: node("n1"),
                outcome: Outcome::Timeout,
                latency_ms: 5000,
                reported_occurred_at: t0(),
            }),
            DomainEvent::NodeStatusChanged(NodeStatusChanged {
                node_id: node("n1"),
                from: NodeStatus::Active,
                to: NodeStatus::PhasedOut,
                reason: "low reputation".into(),
                until: None,
            }),
            DomainEvent::NodeSlashed(NodeSlashed {
                node_id: node("n1"),
                fault_id: "downtime:n1:1".into(),
                kind: FaultKind::Downtime,
                fraction_bps: 10,
                amount: 0.0125,
                reason: "downtime".into(),
            }),
            DomainEvent::NodeEjected(NodeEjected {
                node_id: node("n1"),
                ejections: 2,
                until: t0(),
                reason: "3 consecutive failures".into(),
            }),
            DomainEvent::NodeRestored(NodeRestored {
                node_id: node("n1"),
            }),
            DomainEvent::RotationCompleted(RotationCompleted {
                epoch: 7,
                moves: 1,
                plan: Value::Null,
                config_hash: "abc".into(),
            }),
        ]
    }

    #[test]
    fn every_event_round_trips_through_the_log_shape() {
        let all = samples();
        assert_eq!(all.len(), EVENT_TYPES.len());
        for (event, (name, version)) in all.iter().zip(EVENT_TYPES) {
            // given an event written by this binary
            let new = event.to_new_event(Uuid::nil(), Metadata::new("test", "c1"), t0());
            // then it is a valid log row of the current version
            assert_eq!(new.validate(), Ok(()));
            assert_eq!(new.event_type, *name);
            assert_eq!(new.schema_version, *version);
            // and it reads back as itself
            let back = DomainEvent::decode_parts(&new.event_type, new.schema_version, &new.payload);
            assert_eq!(back.as_ref(), Ok(event));
        }
    }

    #[test]
    fn enums_and_metadata_use_the_contract_spelling() {
        let failed = &samples()[8];
        assert_eq!(failed.payload()["outcome"], json!("invalid_output"));
        assert_eq!(
            serde_json::to_value(NodeStatus::PhasedOut).unwrap(),
            json!("phased_out")
        );
        let meta = serde_json::to_value(Metadata::new("scheduler", "r1").caused_by("e1")).unwrap();
        assert_eq!(
            meta,
            json!({"correlation_id": "r1", "causation_id": "e1", "producer": "scheduler"})
        );
    }

    #[test]
    fn stream_ids_follow_the_contract() {
        let all = samples();
        assert_eq!(all[0].stream_id().as_str(), "node-n1");
        assert_eq!(all[2].stream_id().as_str(), "model-m1");
        assert_eq!(all[7].stream_id().as_str(), "exec-r1");
        assert_eq!(all[11].stream_id().as_str(), "report-r1");
        assert_eq!(all[14].stream_id().as_str(), "node-n1");
        assert_eq!(all[15].stream_id().as_str(), "node-n1");
        assert_eq!(all[16].stream_id().as_str(), "rotation");
        let longest = "x".repeat(crate::ids::MAX_ID_LEN);
        let reported = DomainEvent::NodeDeregistered(NodeDeregistered {
            node_id: node(&longest),
            reason: String::new(),
        });
        assert_eq!(reported.stream_name(), reported.stream_id().as_str());
    }

    #[test]
    fn node_registered_v1_is_upcast_with_capacity_one() {
        // given a v1 NodeRegistered as written before capacity existed
        let v1 = json!({"node_id": "n1", "domain": "text", "stake": 3.0});
        // when it is read by this binary
        let event = DomainEvent::decode_parts("NodeRegistered", 1, &v1);
        // then it is the current shape with capacity 1
        assert_eq!(
            event,
            Ok(DomainEvent::NodeRegistered(NodeRegistered {
                node_id: node("n1"),
                domain: "text".into(),
                stake: 3.0,
                capacity: 1,
            }))
        );
        // and a v2 payload without capacity is refused rather than guessed
        assert!(matches!(
            DomainEvent::decode_parts("NodeRegistered", 2, &v1),
            Err(DecodeError::Payload {
                schema_version: 2,
                ..
            })
        ));
    }

    #[test]
    fn unknown_types_and_future_versions_are_typed_errors() {
        assert_eq!(
            DomainEvent::decode_parts("NodeTeleported", 1, &json!({})),
            Err(DecodeError::UnknownEventType {
                event_type: "NodeTeleported".into(),
                schema_version: 1
            })
        );
        let err = DomainEvent::decode_parts("NodeRegistered", 3, &json!({})).unwrap_err();
        assert_eq!(
            err,
            DecodeError::NewerSchema {
                event_type: "NodeRegistered".into(),
                found: 3,
                known: 2
            }
        );
        assert!(err.to_string().contains("NodeRegistered"));
        assert!(matches!(
            DomainEvent::decode_parts("NodeSlashed", 0, &json!({})),
            Err(DecodeError::BadSchemaVersion { found: 0, .. })
        ));
    }
}
