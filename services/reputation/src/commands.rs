//! The node membership commands: `cmd.node.register` and `cmd.node.deregister` (CONTRACT §2–§3).
//!
//! Each command is parsed at the edge (ids through the domain newtypes, so the §3 alphabet is
//! enforced while parsing), validated, and answered only after its event committed. Choices:
//! - registering an id whose stream exists is `conflict`, except for a **deregistered** node, which
//!   may come back (a new `NodeRegistered` on its stream, `Exact` version; the book puts it in
//!   probation and keeps its history and slashes). A tombstoned node never comes back.
//! - with an `idempotency_key` the event id is a UUID v5 of the command name and key, so a retry
//!   returns the original answer and appends nothing; the same key with a different body is
//!   `conflict`.
//! - deregistering an unknown node is `unknown_node`; an already deregistered node answers `ok`
//!   with `already_deregistered: true` and appends nothing; a tombstoned node is `conflict` (leaving
//!   would otherwise open a way back in).
//!
//! Nothing here reads the live view: membership is decided on the node's stream itself, read from
//! the store, so a copy that just started answers exactly like one that has run for days.

use std::sync::Arc;

use chrono::Utc;
use deepnode_bus::envelope::{parse_command, ErrorBody, ErrorCode, Reply};
use deepnode_bus::rpc::Request;
use deepnode_domain::book::NodeBook;
use deepnode_domain::events::{
    DomainEvent, Metadata, NodeDeregistered, NodeRegistered, NodeStatus,
};
use deepnode_domain::ids::NodeId;
use deepnode_store::{ExpectedVersion, StreamId};
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;
use uuid::Uuid;

use crate::decide::{derived_id, node_stream};
use crate::Shared;

/// Longest accepted `domain`, `reason` and `idempotency_key`, in characters.
const MAX_TEXT_CHARS: usize = 1024;

/// `cmd.node.register`'s body.
#[derive(Debug, Deserialize)]
struct RegisterNode {
    node_id: NodeId,
    domain: String,
    stake: f64,
    capacity: u32,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// `cmd.node.deregister`'s body.
#[derive(Debug, Deserialize)]
struct DeregisterNode {
    node_id: NodeId,
    reason: String,
    #[serde(default)]
    idempotency_key: Option<String>,
}

fn check_text(field: &str, value: &str, allow_empty: bool) -> Result<(), ErrorBody> {
    if !allow_empty && value.trim().is_empty() {
        return Err(ErrorBody::bad_request(format!(
            "field \"{field}\" must not be empty"
        )));
    }
    if value.chars().count() > MAX_TEXT_CHARS {
        return Err(ErrorBody::bad_request(format!(
            "field \"{field}\" is longer than {MAX_TEXT_CHARS} characters"
        )));
    }
    Ok(())
}

fn check_key(key: Option<&String>) -> Result<(), ErrorBody> {
    key.map_or(Ok(()), |k| check_text("idempotency_key", k, false))
}

impl RegisterNode {
    fn validate(&self) -> Result<(), ErrorBody> {
        check_text("domain", &self.domain, false)?;
        if !self.stake.is_finite() || self.stake < 0.0 {
            return Err(ErrorBody::bad_request(
                "field \"stake\" must be a finite, non-negative number",
            ));
        }
        if self.capacity == 0 {
            return Err(ErrorBody::bad_request(
                "field \"capacity\" must be a positive integer",
            ));
        }
        check_key(self.idempotency_key.as_ref())
    }
}

impl DeregisterNode {
    fn validate(&self) -> Result<(), ErrorBody> {
        check_text("reason", &self.reason, true)?;
        check_key(self.idempotency_key.as_ref())
    }
}

/// The event id of a command: derived from its idempotency key, else fresh.
fn command_event_id(command: &str, key: Option<&String>) -> Uuid {
    key.map_or_else(Uuid::new_v4, |k| derived_id(&format!("{command}:{k}")))
}

/// The §2 answer to a store failure: the codes of the one mapping ([`deepnode_runtime::store_error`]),
/// with what a conflict means for a node command.
fn store_error(e: deepnode_store::Error) -> ErrorBody {
    use deepnode_store::Error as E;
    match e {
        E::Conflict { .. } => ErrorBody::new(
            ErrorCode::Conflict,
            "the node changed while the command was processed; retry",
        ),
        E::EventIdReused { .. } => ErrorBody::new(
            ErrorCode::Conflict,
            "this idempotency_key was already used for a different command",
        ),
        e => deepnode_runtime::store_error(&e),
    }
}

/// The node's status and its stream's version, folded from the stream alone (membership, status
/// and slashes all live on `node-<id>`); `None` if the stream is empty.
async fn node_status(
    shared: &Shared,
    node: &NodeId,
    stream: &StreamId,
) -> Result<Option<(NodeStatus, i64)>, ErrorBody> {
    let events = shared
        .ctx
        .store
        .read_stream(stream, 1)
        .await
        .map_err(store_error)?;
    let Some(last) = events.last() else {
        return Ok(None);
    };
    let mut book = NodeBook::new(&shared.ctx.policy);
    for event in &events {
        book.evolve(event).map_err(|e| {
            ErrorBody::internal(format!(
                "event {} of {stream} is unreadable: {e}",
                event.stream_version
            ))
        })?;
    }
    Ok(book.node(node).map(|n| (n.status, last.stream_version)))
}

pub(crate) async fn register(shared: Arc<Shared>, request: Request) -> Reply {
    let shared = &*shared;
    let cmd: RegisterNode = match parse_command(&request.payload) {
        Ok(cmd) => cmd,
        Err(e) => return e.into(),
    };
    if let Err(e) = cmd.validate() {
        return e.into();
    }
    let span = tracing::info_span!("register", node_id = %cmd.node_id);
    register_valid(shared, cmd, &request.correlation_id)
        .instrument(span)
        .await
        .unwrap_or_else(Reply::from)
}

async fn register_valid(
    shared: &Shared,
    cmd: RegisterNode,
    correlation_id: &str,
) -> Result<Reply, ErrorBody> {
    let node = cmd.node_id.clone();
    let stream = node_stream(&node).map_err(store_error)?;
    let event_id = command_event_id("cmd.node.register", cmd.idempotency_key.as_ref());
    let event = DomainEvent::NodeRegistered(NodeRegistered {
        node_id: node.clone(),
        domain: cmd.domain,
        stake: cmd.stake,
        capacity: cmd.capacity,
    })
    .to_new_event(
        event_id,
        Metadata::new(&shared.ctx.producer, correlation_id),
        Utc::now(),
    );
    let ok = Reply::ok(&json!({ "node_id": node }));
    let store = &shared.ctx.store;
    match store
        .append(&stream, ExpectedVersion::NoStream, vec![event.clone()])
        .await
    {
        Ok(result) => {
            if !result.duplicate {
                tracing::info!("node registered");
            }
            return Ok(ok);
        }
        Err(deepnode_store::Error::Conflict { .. }) => {}
        Err(e) => return Err(store_error(e)),
    }
    // The stream exists: only a deregistered node may register again.
    match node_status(shared, &node, &stream).await? {
        Some((NodeStatus::Deregistered, version)) => {
            store
                .append(&stream, ExpectedVersion::Exact(version), vec![event])
                .await
                .map_err(store_error)?;
            tracing::info!("deregistered node registered again");
            Ok(ok)
        }
        Some((status, _)) => Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!(
                "node {node} is already registered (status {})",
                status.as_str()
            ),
        )),
        None => Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!("node {node} changed while registering; retry"),
        )),
    }
}

pub(crate) async fn deregister(shared: Arc<Shared>, request: Request) -> Reply {
    let shared = &*shared;
    let cmd: DeregisterNode = match parse_command(&request.payload) {
        Ok(cmd) => cmd,
        Err(e) => return e.into(),
    };
    if let Err(e) = cmd.validate() {
        return e.into();
    }
    let span = tracing::info_span!("deregister", node_id = %cmd.node_id);
    deregister_valid(shared, cmd, &request.correlation_id)
        .instrument(span)
        .await
        .unwrap_or_else(Reply::from)
}

async fn deregister_valid(
    shared: &Shared,
    cmd: DeregisterNode,
    correlation_id: &str,
) -> Result<Reply, ErrorBody> {
    let node = cmd.node_id.clone();
    let stream = node_stream(&node).map_err(store_error)?;
    let event_id = command_event_id("cmd.node.deregister", cmd.idempotency_key.as_ref());
    let Some((status, version)) = node_status(shared, &node, &stream).await? else {
        return Err(ErrorBody::new(
            ErrorCode::UnknownNode,
            format!("node {node} is not registered"),
        ));
    };
    match status {
        NodeStatus::Deregistered => {
            return Ok(Reply::ok(&json!({ "already_deregistered": true })));
        }
        NodeStatus::Tombstoned => {
            return Err(ErrorBody::new(
                ErrorCode::Conflict,
                format!("node {node} is tombstoned and cannot deregister"),
            ));
        }
        _ => {}
    }
    let event = DomainEvent::NodeDeregistered(NodeDeregistered {
        node_id: node.clone(),
        reason: cmd.reason,
    })
    .to_new_event(
        event_id,
        Metadata::new(&shared.ctx.producer, correlation_id),
        Utc::now(),
    );
    let result = shared
        .ctx
        .store
        .append(&stream, ExpectedVersion::Exact(version), vec![event])
        .await
        .map_err(store_error)?;
    if !result.duplicate {
        tracing::info!("node deregistered");
    }
    Ok(Reply::ok(&json!({})))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<RegisterNode, ErrorBody> {
        parse_command::<RegisterNode>(body.as_bytes()).and_then(|c| c.validate().map(|()| c))
    }

    #[test]
    fn register_bodies_are_validated_at_the_edge() {
        assert!(parse(r#"{"node_id":"n1","domain":"d","stake":0,"capacity":1}"#).is_ok());
        for bad in [
            r#"{"node_id":"n 1","domain":"d","stake":0,"capacity":1}"#,
            r#"{"node_id":"n1","domain":"","stake":0,"capacity":1}"#,
            r#"{"node_id":"n1","domain":"d","stake":-1,"capacity":1}"#,
            r#"{"node_id":"n1","domain":"d","stake":0,"capacity":0}"#,
            r#"{"node_id":"n1","domain":"d","stake":0,"capacity":1.5}"#,
            r#"{"node_id":"n1","domain":"d","stake":"1","capacity":1}"#,
            r#"{"node_id":"n1","domain":"d","stake":1e999,"capacity":1}"#,
            r#"{"node_id":"n1","domain":"d","capacity":1}"#,
            r#"{"node_id":"n1","domain":"d","stake":0,"capacity":1,"idempotency_key":""}"#,
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{bad}: {err}");
        }
    }

    #[test]
    fn idempotency_keys_give_stable_distinct_ids() {
        let k = "k1".to_owned();
        let a = command_event_id("cmd.node.register", Some(&k));
        assert_eq!(a, command_event_id("cmd.node.register", Some(&k)));
        assert_ne!(a, command_event_id("cmd.node.deregister", Some(&k)));
        assert_ne!(
            command_event_id("cmd.node.register", None),
            command_event_id("cmd.node.register", None)
        );
    }
}
