//! The log made checkable by someone who does not trust its operator (issue 14, CONTRACT §4a): this
//! service keeps the Merkle tree of the log (`deepnode_projections::tree::TreeProjection`, in the
//! same runner and transactions as the SQL projection), takes a signed checkpoint of it when one is due
//! (the policy's `log.checkpoint_every_events` / `log.checkpoint_every_secs`), publishes each to the
//! JetStream stream `DEEPNODE_CHECKPOINTS` — outside the database, where the operator of the
//! database cannot take it back — and answers `cmd.log.checkpoint` and `cmd.log.proof`.
//!
//! The signing key comes from the file `DEEPNODE_LOG_KEY` names (read by the binary); without one
//! checkpoints are taken unsigned, and `deepnode verify` says so.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use chrono::Utc;
use deepnode_bus::envelope::{parse_command, ErrorBody, ErrorCode, Reply};
use deepnode_bus::rpc::Request;
use deepnode_domain::merkle;
use deepnode_domain::note::{Checkpoint, SignedNote};
use deepnode_projections::tree::{self, Cadence, StoredCheckpoint};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::{Error, Shared};

/// How often a checkpoint's being due is looked at.
const CHECKPOINT_TICK: Duration = Duration::from_secs(1);

/// The log's name in its checkpoints: the signing key's name, else the policy's `log.origin`.
pub(crate) fn origin(shared: &Shared) -> String {
    shared.options.log_key.as_ref().map_or_else(
        || shared.ctx.policy.log.origin.clone(),
        |k| k.name().to_owned(),
    )
}

/// Takes and publishes checkpoints until the service stops.
pub(crate) async fn checkpoints(shared: Arc<Shared>) -> Result<(), Error> {
    let policy = &shared.ctx.policy.log;
    let cadence = Cadence {
        every_events: policy.checkpoint_every_events,
        every: chrono::Duration::seconds(i64::try_from(policy.checkpoint_every_secs).unwrap_or(10)),
    };
    let origin = origin(&shared);
    let pool = shared.ctx.store.pool().clone();
    // What the stream already holds is not published again (a restart would otherwise repeat
    // every checkpoint once the stream's duplicate window has passed).
    let mut published = latest_on_stream(&shared)
        .await
        .and_then(|note| Checkpoint::parse(&note.text).ok())
        .map(|c| c.size);
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(CHECKPOINT_TICK) => {}
        }
        match tree::take_checkpoint(
            &pool,
            &origin,
            shared.options.log_key.as_ref(),
            cadence,
            Utc::now(),
        )
        .await
        {
            Ok(Some(cp)) => tracing::info!(
                tree_size = cp.tree_size,
                signed = cp.signed,
                "checkpoint taken"
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not take a checkpoint"),
        }
        // Publish every stored checkpoint the stream may lack (one taken by another copy, or by this
        // one before a crash); the stream drops repeats by message id.
        match tree::checkpoints_after(&pool, published).await {
            Ok(unpublished) => {
                for cp in &unpublished {
                    if publish(&shared, cp).await {
                        published = Some(cp.tree_size);
                    } else {
                        break;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the checkpoints"),
        }
    }
}

/// Publishes one checkpoint to `DEEPNODE_CHECKPOINTS` (message id `checkpoint-<tree size>`);
/// `true` once the stream acknowledged it.
async fn publish(shared: &Shared, cp: &StoredCheckpoint) -> bool {
    let mut headers = HeaderMap::new();
    headers.insert(
        "Nats-Msg-Id",
        format!("checkpoint-{}", cp.tree_size).as_str(),
    );
    let subject = shared.ctx.subjects.checkpoints();
    let sent = shared
        .ctx
        .js
        .publish_with_headers(subject, headers, cp.note.clone().into())
        .await;
    match sent {
        Ok(ack) => match ack.await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(tree_size = cp.tree_size, error = %e, "checkpoint not acknowledged by the stream");
                false
            }
        },
        Err(e) => {
            tracing::warn!(tree_size = cp.tree_size, error = %e, "could not publish a checkpoint");
            false
        }
    }
}

/// `cmd.log.checkpoint`: the latest checkpoint.
pub(crate) async fn latest(shared: Arc<Shared>, _request: Request) -> Reply {
    let shared = &*shared;
    match tree::latest_checkpoint(shared.ctx.store.pool()).await {
        Ok(Some(cp)) => {
            // The cosignatures: witnesses publish the note with their line added to the stream, so
            // the stream's latest message for this checkpoint carries them.
            let cosigned = latest_on_stream(shared)
                .await
                .filter(|n| SignedNote::parse(&cp.note).is_ok_and(|own| own.text == n.text));
            let cosignatures: Vec<String> = cosigned
                .map(|n| {
                    n.signatures
                        .into_iter()
                        .filter(|(name, _)| *name != origin(shared))
                        .map(|(name, sig)| format!("\u{2014} {name} {sig}"))
                        .collect()
                })
                .unwrap_or_default();
            Reply::ok(&json!({
                "checkpoint": cp.note,
                "cosignatures": cosignatures,
                "tree_size": cp.tree_size,
                "signed": cp.signed,
            }))
        }
        Ok(None) => Reply::err(ErrorBody::new(
            ErrorCode::Unavailable,
            "no checkpoint has been taken yet",
        )),
        Err(e) => Reply::err(ErrorBody::new(ErrorCode::Unavailable, e.to_string())),
    }
}

/// The latest note on the checkpoints stream, if any.
async fn latest_on_stream(shared: &Shared) -> Option<SignedNote> {
    let payload = deepnode_bus::jetstream::latest_checkpoint(&shared.ctx.js, &shared.ctx.subjects)
        .await
        .ok()??;
    SignedNote::parse(std::str::from_utf8(&payload).ok()?).ok()
}

/// `cmd.log.proof`'s body.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum ProofCommand {
    Inclusion {
        #[serde(default)]
        position: Option<u64>,
        #[serde(default)]
        event_id: Option<Uuid>,
        tree_size: u64,
    },
    Consistency {
        from_size: u64,
        to_size: u64,
    },
}

/// `cmd.log.proof`: an inclusion or consistency proof from the stored tree.
pub(crate) async fn proof(shared: Arc<Shared>, request: Request) -> Reply {
    let shared = &*shared;
    let cmd: ProofCommand = match parse_command(&request.payload) {
        Ok(cmd) => cmd,
        Err(e) => return Reply::err(e),
    };
    let pool = shared.ctx.store.pool();
    let built = match tree::tree_size(pool).await {
        Ok(size) => size,
        Err(e) => return Reply::err(ErrorBody::new(ErrorCode::Unavailable, e.to_string())),
    };
    let bad = |why: String| Reply::err(ErrorBody::bad_request(why));
    let (ranges, leaf_index, tree_size) = match cmd {
        ProofCommand::Inclusion {
            position,
            event_id,
            tree_size,
        } => {
            let position = match (position, event_id) {
                (Some(p), None) => p,
                (None, Some(id)) => match tree::position_of(pool, id).await {
                    Ok(Some(p)) => p,
                    Ok(None) => return bad(format!("no event {id} in the log")),
                    Err(e) => {
                        return Reply::err(ErrorBody::new(ErrorCode::Unavailable, e.to_string()))
                    }
                },
                _ => return bad("give exactly one of `position` and `event_id`".to_owned()),
            };
            if position == 0 || position > tree_size {
                return bad(format!(
                    "position {position} is not in a tree of {tree_size} events"
                ));
            }
            let Some(ranges) = merkle::inclusion_ranges(position - 1, tree_size) else {
                return bad("no such leaf".to_owned());
            };
            (ranges, Some(position - 1), tree_size)
        }
        ProofCommand::Consistency { from_size, to_size } => {
            let Some(ranges) = merkle::consistency_ranges(from_size, to_size) else {
                return bad(format!(
                    "a consistency proof needs 0 < from_size ≤ to_size, not {from_size} and {to_size}"
                ));
            };
            (ranges, None, to_size)
        }
    };
    if tree_size > built {
        return bad(format!(
            "the tree holds {built} events so far, not {tree_size}"
        ));
    }
    match tree::range_hashes(pool, &ranges).await {
        Ok(Some(hashes)) => Reply::ok(&json!({
            "tree_size": tree_size,
            "leaf_index": leaf_index,
            "hashes": hashes.iter().map(hex::encode).collect::<Vec<_>>(),
        })),
        Ok(None) => Reply::err(ErrorBody::new(
            ErrorCode::Unavailable,
            "the stored tree lacks a subtree this proof needs",
        )),
        Err(e) => Reply::err(ErrorBody::new(ErrorCode::Unavailable, e.to_string())),
    }
}
