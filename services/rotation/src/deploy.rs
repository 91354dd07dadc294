//! `cmd.model.deploy`: validate the command, place the model with the pure [`place`] decider on a
//! snapshot of the folded view, and append `ModelDeployed` + one `DeploymentAssigned` per replica to
//! `model-<id>` in one append expecting `NoStream` — so a model is deployed at most once, whichever
//! copy of the service answers.
//!
//! With an `idempotency_key` the event ids are UUID v5 of (model, key, index): a retry finds its own
//! events in the stream and returns the original assignments, appending nothing. Without a key a
//! second deploy of the same model is a `conflict`. Fewer than two eligible nodes is
//! `no_eligible_nodes`: a model is never deployed on a single node. Bad input is answered before
//! anything is read or written.

use chrono::Utc;
use deepnode_bus::envelope::{parse_command, ErrorBody, ErrorCode, Reply};
use deepnode_bus::rpc::Request;
use deepnode_domain::events::{DeploymentAssigned, DomainEvent, Metadata, ModelDeployed, Tier};
use deepnode_domain::ids::{ModelId, NodeId};
use deepnode_domain::log::{ExpectedVersion, RecordedEvent};
use deepnode_domain::placement::{place, PlacementError};
use deepnode_runtime::ServiceContext;
use deepnode_store::FollowerHandle;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use uuid::Uuid;

use crate::snapshot::placement_input;
use crate::view::RotationView;
use crate::{Error, RotationOptions, ID_NAMESPACE};

/// Most replicas one deploy may ask for.
pub const MAX_REPLICAS: u32 = 64;

/// Longest accepted `domain` and `idempotency_key`, in characters.
pub const MAX_TEXT_LEN: usize = 128;

/// The `cmd.model.deploy` request (CONTRACT §3).
#[derive(Debug, Clone, Deserialize)]
pub struct DeployCommand {
    /// The model; validated as an id while parsing.
    pub model_id: ModelId,
    /// The model's domain (non-empty).
    pub domain: String,
    /// Replicas wanted, an integer ≥ 2 (default 2).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Makes a retry return the original answer.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// One replica in the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentReply {
    /// The node hosting the replica.
    pub node_id: NodeId,
    /// `top` or `lower`.
    pub tier: Tier,
}

/// The success fields of the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReply {
    /// The model.
    pub model_id: ModelId,
    /// The replicas, primary (top tier) first.
    pub assignments: Vec<AssignmentReply>,
}

/// Checks the fields serde cannot; returns the replica count.
fn validate(cmd: &DeployCommand) -> Result<u32, ErrorBody> {
    if cmd.domain.trim().is_empty() {
        return Err(ErrorBody::bad_request("field \"domain\" must not be empty"));
    }
    if cmd.domain.chars().count() > MAX_TEXT_LEN {
        return Err(ErrorBody::bad_request(format!(
            "field \"domain\" is longer than {MAX_TEXT_LEN} characters"
        )));
    }
    if let Some(key) = &cmd.idempotency_key {
        if key.is_empty() || key.chars().count() > MAX_TEXT_LEN {
            return Err(ErrorBody::bad_request(format!(
                "field \"idempotency_key\" must be 1 to {MAX_TEXT_LEN} characters"
            )));
        }
    }
    let replicas = cmd.replicas.unwrap_or(2);
    if !(2..=MAX_REPLICAS).contains(&replicas) {
        return Err(ErrorBody::bad_request(format!(
            "field \"replicas\" must be an integer from 2 to {MAX_REPLICAS}, got {replicas}"
        )));
    }
    Ok(replicas)
}

/// The id of the `index`-th event of a keyed deploy (0 = `ModelDeployed`).
fn keyed_id(model: &ModelId, key: &str, index: usize) -> Uuid {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("deploy:{model}:{key}:{index}").as_bytes(),
    )
}

/// The original answer of a keyed deploy, if `stream` starts with its events.
fn original_answer(model: &ModelId, key: &str, stream: &[RecordedEvent]) -> Option<DeployReply> {
    let first = stream.first()?;
    if first.event_id != keyed_id(model, key, 0) {
        return None;
    }
    let assignments = stream
        .iter()
        .skip(1)
        .enumerate()
        .take_while(|(i, e)| e.event_id == keyed_id(model, key, i + 1))
        .filter_map(|(_, e)| match DomainEvent::decode(e) {
            Ok(DomainEvent::DeploymentAssigned(a)) => Some(AssignmentReply {
                node_id: a.node_id,
                tier: a.tier,
            }),
            _ => None,
        })
        .collect();
    Some(DeployReply {
        model_id: model.clone(),
        assignments,
    })
}

fn conflict(model: &ModelId) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Conflict,
        format!("model {model} is already deployed"),
    )
}

/// Answers one `cmd.model.deploy` request.
pub async fn handle(
    ctx: &ServiceContext,
    view: &FollowerHandle<RotationView>,
    options: &RotationOptions,
    request: &Request,
) -> Reply {
    let span = tracing::info_span!("deploy", correlation_id = %request.correlation_id);
    match deploy(ctx, view, options, request)
        .instrument(span.clone())
        .await
    {
        Ok(reply) => Reply::ok(&reply),
        Err(body) => {
            tracing::info!(parent: &span, code = %body.code, message = %body.message, "deploy refused");
            Reply::err(body)
        }
    }
}

async fn deploy(
    ctx: &ServiceContext,
    view: &FollowerHandle<RotationView>,
    options: &RotationOptions,
    request: &Request,
) -> Result<DeployReply, ErrorBody> {
    let cmd: DeployCommand = parse_command(&request.payload)?;
    let replicas = validate(&cmd)?;
    let model = cmd.model_id.clone();
    let stream = DomainEvent::ModelDeployed(ModelDeployed {
        model_id: model.clone(),
        domain: cmd.domain.clone(),
        replicas,
    })
    .stream_id();

    // Read-your-writes: decide on a view that has every event committed before this request.
    let head = ctx.store.head_position().await.map_err(to_body)?;
    view.wait_for(head, options.catch_up_timeout)
        .await
        .map_err(to_body)?;

    if let Some(key) = &cmd.idempotency_key {
        let existing = ctx.store.read_stream(&stream, 1).await.map_err(to_body)?;
        if !existing.is_empty() {
            return original_answer(&model, key, &existing).ok_or_else(|| conflict(&model));
        }
    }

    let now = Utc::now();
    let placement = {
        let v = view.read();
        if v.book.models().contains_key(&model) {
            return Err(conflict(&model));
        }
        let stake = ctx.policy.routing.stake_domains.contains(&cmd.domain);
        let input = placement_input(
            &v,
            &model,
            &cmd.domain,
            now,
            options.seed,
            stake,
            &ctx.policy,
        );
        let mut policy = ctx.policy.placement.clone();
        policy.replicas = replicas;
        place(&input, &policy)
    };
    let placement = placement.map_err(|e| match e {
        PlacementError::NoEligibleNodes { .. } => ErrorBody::new(
            ErrorCode::NoEligibleNodes,
            format!(
                "{e}: register active nodes of domain {:?} with free capacity",
                cmd.domain
            ),
        ),
        PlacementError::DuplicateNode(_) => ErrorBody::internal(e.to_string()),
    })?;

    let key = cmd.idempotency_key.as_deref();
    let id_of = |index: usize| match key {
        Some(key) => keyed_id(&model, key, index),
        None => Uuid::new_v4(),
    };
    let deployed_id = id_of(0);
    let metadata = Metadata::new(ctx.producer.clone(), request.correlation_id.clone());
    let mut events = vec![DomainEvent::ModelDeployed(ModelDeployed {
        model_id: model.clone(),
        domain: cmd.domain.clone(),
        replicas,
    })
    .to_new_event(deployed_id, metadata.clone(), now)];
    let mut assignments = Vec::new();
    for (i, a) in placement.assignments.iter().enumerate() {
        let tier = a.tier;
        let reason = if i == 0 {
            "placement: best score in the top tier"
        } else {
            "placement: seeded growth-tier draw"
        };
        events.push(
            DomainEvent::DeploymentAssigned(DeploymentAssigned {
                model_id: model.clone(),
                node_id: a.node_id.clone(),
                tier,
                reason: reason.to_owned(),
            })
            .to_new_event(id_of(i + 1), metadata.clone().caused_by(deployed_id), now),
        );
        assignments.push(AssignmentReply {
            node_id: a.node_id.clone(),
            tier,
        });
    }

    match ctx
        .store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
    {
        Ok(result) => {
            if let Err(e) = view
                .wait_for(result.last_position(), options.catch_up_timeout)
                .await
            {
                // The events are durable; only our local view is slow.
                tracing::warn!(error = %e, "deployed, but the local view is behind");
            }
            tracing::info!(%model, replicas = assignments.len(), "model deployed");
            Ok(DeployReply {
                model_id: model,
                assignments,
            })
        }
        Err(
            deepnode_store::Error::Conflict { .. } | deepnode_store::Error::EventIdReused { .. },
        ) => {
            // Lost a race: with our key it may be our own earlier attempt.
            if let Some(key) = key {
                let existing = ctx.store.read_stream(&stream, 1).await.map_err(to_body)?;
                if let Some(original) = original_answer(&model, key, &existing) {
                    return Ok(original);
                }
            }
            Err(conflict(&model))
        }
        Err(e) => Err(to_body(e)),
    }
}

fn to_body(e: deepnode_store::Error) -> ErrorBody {
    Error::Store(e).to_body()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cmd(json: &str) -> Result<u32, ErrorBody> {
        let c: DeployCommand = parse_command(json.as_bytes())?;
        validate(&c)
    }

    #[test]
    fn replicas_default_to_two_and_must_be_at_least_two() {
        assert_eq!(cmd(r#"{"model_id":"m1","domain":"llm"}"#), Ok(2));
        assert_eq!(
            cmd(r#"{"model_id":"m1","domain":"llm","replicas":3}"#),
            Ok(3)
        );
        for bad in [
            r#"{"model_id":"m1","domain":"llm","replicas":1}"#,
            r#"{"model_id":"m1","domain":"llm","replicas":2.5}"#,
            r#"{"model_id":"m1","domain":"llm","replicas":"2"}"#,
            r#"{"model_id":"m1","domain":""}"#,
            r#"{"model_id":"m 1","domain":"llm"}"#,
            r#"{"domain":"llm"}"#,
        ] {
            assert_eq!(cmd(bad).unwrap_err().code, ErrorCode::BadRequest, "{bad}");
        }
    }

    #[test]
    fn keyed_ids_are_stable_and_distinct() {
        let m = ModelId::parse("m1").unwrap();
        assert_eq!(keyed_id(&m, "k", 0), keyed_id(&m, "k", 0));
        assert_ne!(keyed_id(&m, "k", 0), keyed_id(&m, "k", 1));
        assert_ne!(keyed_id(&m, "k", 0), keyed_id(&m, "j", 0));
    }
}
