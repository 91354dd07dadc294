//! Closing executions that older builds left open. Since an execution is recorded by one append at
//! its end (docs/adr/0002-single-append-execution-record.md), a scheduler that dies records nothing
//! and leaves nothing open; but a log written by a build before that (which recorded the request
//! first and its end later) can hold executions that stay `in_flight` for ever, and a caller retrying
//! such a `request_id` would be told "still running" for ever. Every scheduler copy therefore
//! sweeps: an execution still open well past the longest it could legitimately take (two attempts
//! of its timeout, plus a grace for slow appends) is closed with
//! `ExecutionFailed { error_code: "unavailable", charged: false }`, marked `abandoned`.
//!
//! The dangling attempt is deliberately *not* classified: whether the node answered is unknown (its
//! scheduler was gone), so it neither rewards nor penalises the node. The append expects the stream's
//! exact version and uses a deterministic event id, so a scheduler that finishes at the last moment
//! wins, and two sweeping copies close an execution once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deepnode_domain::book::ExecutionStatus;
use deepnode_domain::events::{DomainEvent, ExecutionFailed, Metadata};
use deepnode_domain::execution::EndCode;
use deepnode_domain::ids::RequestId;
use deepnode_domain::log::ExpectedVersion;
use deepnode_runtime::Shutdown;
use serde_json::Value;
use uuid::Uuid;

use crate::Scheduler;

/// Namespace of the deterministic ids of sweeper events.
const SWEEP_NAMESPACE: Uuid = Uuid::from_u128(0x6465_6570_6e6f_6465_7377_6565_7065_7201);

/// Sweeps every `interval` until `shutdown`.
pub(crate) async fn run(s: Arc<Scheduler>, interval: Duration, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let closed = sweep_once(&s, Utc::now()).await;
        if closed > 0 {
            tracing::warn!(closed, "closed executions abandoned by a stopped scheduler");
        }
    }
}

/// Closes every abandoned execution; returns how many this call closed.
pub(crate) async fn sweep_once(s: &Scheduler, now: DateTime<Utc>) -> usize {
    let grace = chrono::Duration::from_std(s.options.abandon_grace).unwrap_or_default();
    // Cheap pre-filter on the folded state; the exact deadline needs the request's own timeout.
    let shortest = chrono::Duration::milliseconds(1) + grace;
    let open: Vec<RequestId> = {
        let book = s.book.read();
        book.executions()
            .iter()
            .filter(|(_, e)| {
                e.status == ExecutionStatus::InFlight && now - e.requested_at > shortest
            })
            .map(|(id, _)| id.clone())
            .collect()
    };
    let mut closed = 0;
    for request_id in open {
        match close_if_abandoned(s, &request_id, now, grace).await {
            Ok(true) => closed += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(%request_id, error = %e, "could not close an abandoned execution")
            }
        }
    }
    closed
}

async fn close_if_abandoned(
    s: &Scheduler,
    request_id: &RequestId,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> Result<bool, deepnode_store::Error> {
    let stream = DomainEvent::execution_stream(request_id);
    let events = s.ctx.store.read_stream(&stream, 1).await?;
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Ok(false);
    };
    let mut requested = None;
    let mut attempts = 0u8;
    for event in &events {
        match DomainEvent::decode(event) {
            Ok(DomainEvent::ExecutionRequested(r)) => requested = Some(r),
            Ok(DomainEvent::AttemptDispatched(_)) => attempts += 1,
            Ok(DomainEvent::ExecutionCompleted(_) | DomainEvent::ExecutionFailed(_)) => {
                return Ok(false)
            }
            _ => {}
        }
    }
    let Some(requested) = requested else {
        return Ok(false);
    };
    let longest = chrono::Duration::milliseconds(
        2 * i64::try_from(requested.timeout_ms).unwrap_or(i64::MAX / 4),
    );
    if now < first.occurred_at + longest + grace {
        return Ok(false);
    }
    let first_metadata = first.metadata.to_value();
    let correlation = first_metadata
        .get("correlation_id")
        .and_then(Value::as_str)
        .unwrap_or(request_id.as_str());
    let meta =
        Metadata::new(s.ctx.producer.clone(), correlation).caused_by(last.event_id.to_string());
    let end = DomainEvent::ExecutionFailed(ExecutionFailed {
        request_id: request_id.clone(),
        model_id: requested.model_id,
        attempts,
        charged: false,
        error_code: EndCode::Unavailable.as_str().to_owned(),
        message: Some(
            "the scheduler executing this request stopped before it finished; it was not \
             charged; retry with a new request_id"
                .to_owned(),
        ),
        abandoned: true,
    })
    .to_new_event(
        Uuid::new_v5(&SWEEP_NAMESPACE, stream.as_str().as_bytes()),
        meta,
        now,
    );
    match s
        .ctx
        .store
        .append(
            &stream,
            ExpectedVersion::Exact(last.stream_version),
            vec![end],
        )
        .await
    {
        Ok(result) => Ok(!result.duplicate),
        // The execution moved on meanwhile (its scheduler finished, or another copy swept it).
        Err(
            deepnode_store::Error::Conflict { .. } | deepnode_store::Error::EventIdReused { .. },
        ) => Ok(false),
        Err(e) => Err(e),
    }
}
