//! The domain events of CONTRACT §4 as typed payloads, and the one place where stored rows become
//! typed events again ([`DomainEvent::decode`]) — including schema evolution.
//!
//! Each event type is declared once: its payload struct followed by an `event!` line (its [`Event`]
//! impl: stored name, schema version, stream), and an entry in the `domain_events!` list, which builds
//! [`DomainEvent`], [`EVENT_TYPES`] and the dispatch between them.
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
use crate::rotation::RoundRecord;
use crate::scoring::RouteDecision;

/// One event type, declared once: the name stored in `events.event_type` (the struct's name), the
/// schema version this binary writes, and the stream it belongs to. Each payload struct below is
/// followed by its `event!` line; [`DomainEvent`] and [`EVENT_TYPES`] are built from the list given
/// to `domain_events!`, so adding an event type is one struct, one `event!` and one list entry.
pub trait Event: Serialize + DeserializeOwned {
    /// The PascalCase type stored in `events.event_type`.
    const TYPE: &'static str;
    /// The schema version written now; readers accept every version from 1 up to it.
    const VERSION: i32;

    /// The text of the stream this event belongs to (see [`DomainEvent::stream_name`]).
    fn stream_name(&self) -> String;

    /// Reads a payload of an older schema `version` (1 ≤ version < [`Event::VERSION`]) as the
    /// current shape. A type whose shape changed overrides this with its upcasters; without one an
    /// older version is an error, never a silent reinterpretation.
    fn upcast(version: i32, _payload: &Value) -> Result<Self, serde_json::Error> {
        Err(no_upcaster(version))
    }
}

/// `event!(Name, version N, stream |e| …)` implements [`Event`] for the payload struct `Name`
/// (extra items, such as an `upcast`, follow the stream).
macro_rules! event {
    ($name:ident, version $version:literal, stream |$e:ident| $stream:expr $(, $($extra:tt)*)?) => {
        impl Event for $name {
            const TYPE: &'static str = stringify!($name);
            const VERSION: i32 = $version;

            fn stream_name(&self) -> String {
                let $e = self;
                $stream
            }

            $($($extra)*)?
        }

        impl From<$name> for DomainEvent {
            fn from(event: $name) -> DomainEvent {
                DomainEvent::$name(event)
            }
        }
    };
}

/// Builds [`DomainEvent`] (one variant per type, named after its payload struct), [`EVENT_TYPES`]
/// and the per-type dispatch from the list of event types.
macro_rules! domain_events {
    ($($name:ident),* $(,)?) => {
        /// Every event of the domain, one variant per event type.
        #[derive(Debug, Clone, PartialEq)]
        pub enum DomainEvent {
            $($name($name),)*
        }

        /// Every event type with its current schema version, in declaration order.
        pub const EVENT_TYPES: &[(&str, i32)] = &[$(($name::TYPE, $name::VERSION),)*];

        impl DomainEvent {
            /// The PascalCase event type stored in `events.event_type`.
            pub fn event_type(&self) -> &'static str {
                match self {
                    $(DomainEvent::$name(_) => $name::TYPE,)*
                }
            }

            /// The schema version this binary writes for the event's type.
            pub fn schema_version(&self) -> i32 {
                match self {
                    $(DomainEvent::$name(_) => $name::VERSION,)*
                }
            }

            /// The text of the stream this event belongs to: `node-<id>` for a node's lifecycle,
            /// `model-<id>` for deployments, `exec-<request_id>` for an execution and its attempts,
            /// `report-<request_id>` for ingested reports (one stream each, so concurrent ingestion
            /// never contends), `rotation` for rotation epochs.
            pub fn stream_name(&self) -> String {
                match self {
                    $(DomainEvent::$name(e) => e.stream_name(),)*
                }
            }

            fn payload_value(&self) -> Result<Value, serde_json::Error> {
                match self {
                    $(DomainEvent::$name(e) => serde_json::to_value(e),)*
                }
            }

            /// The payload read as `event_type` of `version`; `None` for a type not in the list.
            fn read(
                event_type: &str,
                version: i32,
                payload: Payload<'_>,
            ) -> Option<Result<DomainEvent, serde_json::Error>> {
                $(if event_type == $name::TYPE {
                    return Some(read::<$name>(version, payload).map(DomainEvent::$name));
                })*
                None
            }
        }
    };
}

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

event!(NodeRegistered, version 2, stream |e| format!("node-{}", e.node_id),
    fn upcast(version: i32, payload: &Value) -> Result<Self, serde_json::Error> {
        match version {
            1 => NodeRegisteredV1::deserialize(payload).map(NodeRegistered::from),
            _ => Err(no_upcaster(version)),
        }
    }
);

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

event!(NodeDeregistered, version 1, stream |e| format!("node-{}", e.node_id));

/// `ModelDeployed`: a model was declared with its domain and wanted replica count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDeployed {
    pub model_id: ModelId,
    pub domain: String,
    pub replicas: u32,
}

event!(ModelDeployed, version 1, stream |e| format!("model-{}", e.model_id));

/// `DeploymentAssigned`: a replica of a model was placed on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentAssigned {
    pub model_id: ModelId,
    pub node_id: NodeId,
    pub tier: Tier,
    pub reason: String,
}

event!(DeploymentAssigned, version 1, stream |e| format!("model-{}", e.model_id));

/// `DeploymentRevoked`: a replica was removed from a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRevoked {
    pub model_id: ModelId,
    pub node_id: NodeId,
    pub reason: String,
}

event!(DeploymentRevoked, version 1, stream |e| format!("model-{}", e.model_id));

/// `ExecutionRequested`: a caller asked for an execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRequested {
    pub request_id: RequestId,
    pub model_id: ModelId,
    pub timeout_ms: u64,
}

event!(ExecutionRequested, version 1, stream |e| format!("exec-{}", e.request_id));

/// `AttemptDispatched`: an attempt was sent to a node, with the routing decision that chose it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptDispatched {
    pub request_id: RequestId,
    pub model_id: ModelId,
    pub node_id: NodeId,
    pub role: Role,
    /// 1 or 2.
    pub attempt: u8,
    /// The routing decision's whole record (inputs, per-factor scores, weights, tie-break, config
    /// hash), which [`RouteDecision::verify`] re-checks. Stored in this shape since the first build
    /// (`stored_decision_and_round_records_read_and_write_back_byte_for_byte` pins it).
    pub decision: Box<RouteDecision>,
}

event!(AttemptDispatched, version 1, stream |e| format!("exec-{}", e.request_id));

/// `AttemptSucceeded`: a node answered with a valid output in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptSucceeded {
    pub request_id: RequestId,
    pub node_id: NodeId,
    pub latency_ms: u64,
}

event!(AttemptSucceeded, version 1, stream |e| format!("exec-{}", e.request_id));

/// `AttemptFailed`: a node's attempt failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptFailed {
    pub request_id: RequestId,
    pub node_id: NodeId,
    pub outcome: Failure,
    pub latency_ms: u64,
    pub detail: String,
}

event!(AttemptFailed, version 1, stream |e| format!("exec-{}", e.request_id));

/// `ExecutionCompleted`: an execution succeeded and was charged (exactly once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionCompleted {
    pub request_id: RequestId,
    pub model_id: ModelId,
    pub node_id: NodeId,
    pub attempts: u8,
    /// Always true.
    pub charged: bool,
    /// The node's output as the caller received it, so a repeated request is answered from the log
    /// (`null` in logs written before outputs were recorded).
    #[serde(default)]
    pub output: Value,
}

event!(ExecutionCompleted, version 1, stream |e| format!("exec-{}", e.request_id));

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
    /// The reply's message, so a repeated request is answered from the log (absent in logs written
    /// before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Set when the sweeper closed an execution whose scheduler stopped before recording it (which
    /// only builds before the single-append record could leave behind).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abandoned: bool,
}

event!(ExecutionFailed, version 1, stream |e| format!("exec-{}", e.request_id));

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

event!(ExecutionReported, version 1, stream |e| format!("report-{}", e.request_id));

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

event!(NodeStatusChanged, version 1, stream |e| format!("node-{}", e.node_id));

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

event!(NodeSlashed, version 1, stream |e| format!("node-{}", e.node_id));

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

event!(NodeEjected, version 1, stream |e| format!("node-{}", e.node_id));

/// `NodeRestored`: a probe request to an ejected node succeeded and that scheduler copy routes to it
/// again; `causation_id` is the probe's `AttemptSucceeded`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRestored {
    pub node_id: NodeId,
}

event!(NodeRestored, version 1, stream |e| format!("node-{}", e.node_id));

/// `RotationCompleted`: a rotation epoch finished (the moves themselves are deployment events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationCompleted {
    pub epoch: u64,
    /// How many replicas moved.
    pub moves: u32,
    /// The round's record: what it planned from which snapshot and what it applied (`null` or
    /// absent reads as `None`).
    #[serde(default)]
    pub plan: Option<Box<RoundRecord>>,
    /// The hash of the policy config used.
    #[serde(default)]
    pub config_hash: String,
}

event!(RotationCompleted, version 1, stream |_e| "rotation".to_owned());

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

domain_events!(
    NodeRegistered,
    NodeDeregistered,
    ModelDeployed,
    DeploymentAssigned,
    DeploymentRevoked,
    ExecutionRequested,
    AttemptDispatched,
    AttemptSucceeded,
    AttemptFailed,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionReported,
    NodeStatusChanged,
    NodeSlashed,
    NodeEjected,
    NodeRestored,
    RotationCompleted,
);

/// The current schema version of an event type, or `None` for a type this binary does not know.
pub fn current_schema_version(event_type: &str) -> Option<i32> {
    EVENT_TYPES
        .iter()
        .find(|(name, _)| *name == event_type)
        .map(|(_, v)| *v)
}

/// Whether this binary reads `event_type` at `schema_version` (a type it knows, a version from 1 up
/// to the current one): what [`DomainEvent::decode`] checks before it reads the payload.
pub fn check_readable(event_type: &str, schema_version: i32) -> Result<(), DecodeError> {
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
    Ok(())
}

/// A payload to read: a JSON tree, or the text stored in the log.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Tree(&'a Value),
    Text(&'a str),
}

/// Reads a payload of `version` (already checked to be between 1 and the current one) as `E`.
fn read<E: Event>(version: i32, payload: Payload<'_>) -> Result<E, serde_json::Error> {
    match payload {
        // Deserialising from `&Value` borrows the payload: no clone of the JSON tree per event.
        Payload::Tree(tree) if version == E::VERSION => E::deserialize(tree),
        // Straight from the text: no JSON tree is built for the current version.
        Payload::Text(text) if version == E::VERSION => serde_json::from_str(text),
        Payload::Tree(tree) => E::upcast(version, tree),
        Payload::Text(text) => E::upcast(version, &serde_json::from_str(text)?),
    }
}

fn no_upcaster(version: i32) -> serde_json::Error {
    serde::de::Error::custom(format_args!("no upcaster from schema_version {version}"))
}

impl DomainEvent {
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
        // Serialising these derive-only structs cannot fail (string keys, no custom impls), and a
        // quiet empty payload in the immutable log would be worse than a loud stop.
        self.payload_value()
            .expect("an event payload serialises: plain structs with string keys")
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
        let payload = Payload::Text(event.payload.text());
        DomainEvent::decode_payload(&event.event_type, event.schema_version, payload)
    }

    /// [`DomainEvent::decode`] on the three columns that matter, the payload as a JSON tree.
    pub fn decode_parts(
        event_type: &str,
        schema_version: i32,
        payload: &Value,
    ) -> Result<DomainEvent, DecodeError> {
        DomainEvent::decode_payload(event_type, schema_version, Payload::Tree(payload))
    }

    fn decode_payload(
        event_type: &str,
        schema_version: i32,
        payload: Payload<'_>,
    ) -> Result<DomainEvent, DecodeError> {
        check_readable(event_type, schema_version)?;
        match DomainEvent::read(event_type, schema_version, payload) {
            Some(read) => read.map_err(|e| DecodeError::Payload {
                event_type: event_type.to_owned(),
                schema_version,
                message: e.to_string(),
            }),
            None => Err(DecodeError::UnknownEventType {
                event_type: event_type.to_owned(),
                schema_version,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::log::StoredJson;
    use serde_json::json;

    fn node(id: &str) -> NodeId {
        NodeId::parse(id).unwrap()
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    /// A routing decision as the scheduler stores it in `AttemptDispatched` (v1).
    const STORED_DISPATCH: &str = include_str!("../tests/fixtures/attempt_dispatched_v1.json");
    /// A round's record as the rotation service stores it in `RotationCompleted` (v1).
    const STORED_ROUND: &str = include_str!("../tests/fixtures/rotation_completed_v1.json");

    fn stored_decision() -> RouteDecision {
        let payload: Value = serde_json::from_str(STORED_DISPATCH).unwrap();
        RouteDecision::deserialize(&payload["decision"]).unwrap()
    }

    #[test]
    fn stored_decision_and_round_records_read_and_write_back_byte_for_byte() {
        for (event_type, stored) in [
            ("AttemptDispatched", STORED_DISPATCH),
            ("RotationCompleted", STORED_ROUND),
        ] {
            let payload: Value = serde_json::from_str(stored).unwrap();
            let event = DomainEvent::decode_parts(event_type, 1, &payload).unwrap();
            assert_eq!(
                serde_json::to_string(&event.payload()).unwrap(),
                stored.trim(),
                "{event_type}"
            );
        }
        // the decision is the whole record: it re-checks itself
        assert!(stored_decision().verify());
        // a round recorded without a record reads as none, and writes `null` as before
        for plan in [json!(null), json!("absent")] {
            let mut payload = json!({"epoch": 3, "moves": 0, "config_hash": "c", "plan": plan});
            if plan == json!("absent") {
                payload.as_object_mut().unwrap().remove("plan");
            }
            let Ok(DomainEvent::RotationCompleted(round)) =
                DomainEvent::decode_parts("RotationCompleted", 1, &payload)
            else {
                panic!("{payload}");
            };
            assert_eq!(round.plan, None);
            assert_eq!(
                DomainEvent::RotationCompleted(round).payload()["plan"],
                json!(null)
            );
        }
        // a decision that is not a routing record is refused, loudly
        let mut bad: Value = serde_json::from_str(STORED_DISPATCH).unwrap();
        bad["decision"] = json!({"score_bps": 7000});
        assert!(matches!(
            DomainEvent::decode_parts("AttemptDispatched", 1, &bad),
            Err(DecodeError::Payload { .. })
        ));
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
                decision: Box::new(stored_decision()),
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
                output: json!({"text": "hello"}),
            }),
            DomainEvent::ExecutionFailed(ExecutionFailed {
                request_id: r.clone(),
                model_id: m.clone(),
                attempts: 2,
                charged: false,
                error_code: "all_replicas_failed".into(),
                message: Some("every replica failed".into()),
                abandoned: false,
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
                plan: None,
                config_hash: "abc".into(),
            }),
        ]
    }

    #[test]
    fn stored_type_names_versions_and_streams_are_pinned() {
        // The type name is the struct's name and the version its `event!` line: renaming a struct or
        // bumping a version changes what the log stores, so it must fail here first.
        let pinned = [
            ("NodeRegistered", 2, "node-n1"),
            ("NodeDeregistered", 1, "node-n1"),
            ("ModelDeployed", 1, "model-m1"),
            ("DeploymentAssigned", 1, "model-m1"),
            ("DeploymentRevoked", 1, "model-m1"),
            ("ExecutionRequested", 1, "exec-r1"),
            ("AttemptDispatched", 1, "exec-r1"),
            ("AttemptSucceeded", 1, "exec-r1"),
            ("AttemptFailed", 1, "exec-r1"),
            ("ExecutionCompleted", 1, "exec-r1"),
            ("ExecutionFailed", 1, "exec-r1"),
            ("ExecutionReported", 1, "report-r1"),
            ("NodeStatusChanged", 1, "node-n1"),
            ("NodeSlashed", 1, "node-n1"),
            ("NodeEjected", 1, "node-n1"),
            ("NodeRestored", 1, "node-n1"),
            ("RotationCompleted", 1, "rotation"),
        ];
        let found: Vec<_> = samples()
            .iter()
            .map(|e| (e.event_type(), e.schema_version(), e.stream_name()))
            .collect();
        let pinned: Vec<_> = pinned
            .iter()
            .map(|&(t, v, s)| (t, v, s.to_owned()))
            .collect();
        assert_eq!(found, pinned);
        let listed: Vec<_> = pinned.iter().map(|(t, v, _)| (*t, *v)).collect();
        assert_eq!(EVENT_TYPES, listed.as_slice());
    }

    #[test]
    fn executions_recorded_without_output_or_message_still_read() {
        // given the end of an execution as logs before the output and message were recorded hold it
        let completed = json!({"request_id": "r1", "model_id": "m1", "node_id": "n1",
                               "attempts": 1, "charged": true});
        let failed = json!({"request_id": "r1", "model_id": "m1", "attempts": 2,
                            "charged": false, "error_code": "all_replicas_failed"});
        // then they read with a null output and no message, and write back the same payload
        let Ok(DomainEvent::ExecutionCompleted(c)) =
            DomainEvent::decode_parts("ExecutionCompleted", 1, &completed)
        else {
            panic!("ExecutionCompleted did not read");
        };
        assert_eq!(c.output, Value::Null);
        let Ok(e @ DomainEvent::ExecutionFailed(_)) =
            DomainEvent::decode_parts("ExecutionFailed", 1, &failed)
        else {
            panic!("ExecutionFailed did not read");
        };
        assert_eq!(e.payload(), failed);
    }

    #[test]
    fn an_older_version_without_an_upcaster_is_an_error() {
        // given a type at version 1 asked to read version 0 through the upcast path directly
        let err = NodeRestored::upcast(0, &json!({"node_id": "n1"})).unwrap_err();
        // then it says so instead of reading the payload as the current shape
        assert!(err.to_string().contains("no upcaster"), "{err}");
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

    /// A stored event as the database gives it back: the payload's text in another layout.
    fn stored(event_type: &str, schema_version: i32, payload: &str) -> RecordedEvent {
        RecordedEvent {
            global_position: 1,
            event_id: Uuid::nil(),
            stream_id: "s".into(),
            stream_version: 1,
            event_type: event_type.into(),
            schema_version,
            payload: StoredJson::from_text(payload.into()).unwrap(),
            metadata: json!({}).into(),
            occurred_at: t0(),
            recorded_at: t0(),
            prev_hash: Vec::new(),
            hash: Vec::new(),
        }
    }

    #[test]
    fn every_event_reads_back_from_its_stored_text() {
        for event in samples() {
            let new = event.to_new_event(Uuid::nil(), Metadata::new("test", "c1"), t0());
            let text = serde_json::to_string_pretty(&new.payload).unwrap();
            let recorded = stored(&new.event_type, new.schema_version, &text);
            assert_eq!(DomainEvent::decode(&recorded), Ok(event));
        }
    }

    #[test]
    fn an_older_version_stored_as_text_is_upcast() {
        let v1 = stored(
            "NodeRegistered",
            1,
            r#"{"node_id": "n1", "stake": 3.0, "domain": "text"}"#,
        );
        assert_eq!(
            DomainEvent::decode(&v1),
            DomainEvent::decode_parts(
                "NodeRegistered",
                1,
                &json!({"node_id": "n1", "domain": "text", "stake": 3.0})
            )
        );
        assert!(matches!(
            DomainEvent::decode(&v1),
            Ok(DomainEvent::NodeRegistered(NodeRegistered {
                capacity: 1,
                ..
            }))
        ));
        let newer = stored("NodeRegistered", 3, "{}");
        assert!(matches!(
            DomainEvent::decode(&newer),
            Err(DecodeError::NewerSchema { found: 3, .. })
        ));
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
    fn the_longest_ids_still_make_valid_stream_ids() {
        // (every type's stream is pinned in `stored_type_names_versions_and_streams_are_pinned`)
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
