//! Ingest of outside execution reports: a durable JetStream pull consumer on
//! `deepnode.ingest.execution`, shared by every copy of the service. Each report is validated and
//! appended as `ExecutionReported` with **the report's own `event_id` as the log's event id**, so a
//! report delivered twice (a redelivery, a second copy, a publisher retry outside the stream's
//! duplicate window) is a no-op in the log.
//!
//! A message is acked only after its append committed. A malformed report, a report about a node
//! the log does not know, or an event id reused with a different body is terminated (`+TERM`, never
//! redelivered) with a warning and counted; a transient store failure is nak'ed with a delay.
//! The log's `occurred_at` is when the report was ingested; the reporter's claim is kept in the
//! payload (`reported_occurred_at`) so a reporter's clock cannot reorder the reputation fold.

use std::sync::Arc;

use async_nats::jetstream::consumer::pull::Stream;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::Message;
use async_nats::jetstream::AckKind;
use chrono::{DateTime, Utc};
use deepnode_bus::envelope::parse_command;
use deepnode_bus::jetstream::{durable_pull_config, ensure_pull_consumer};
use deepnode_bus::rpc::CORRELATION_HEADER;
use deepnode_domain::events::{DomainEvent, ExecutionReported, Metadata, Outcome};
use deepnode_domain::ids::{ModelId, NodeId, RequestId};
use deepnode_store::ExpectedVersion;
use futures::StreamExt;
use serde::Deserialize;
use tracing::Instrument;
use uuid::Uuid;

use crate::{Error, Shared, Stats};

/// One report on `deepnode.ingest.execution` (CONTRACT §3).
#[derive(Debug, Deserialize)]
struct Report {
    event_id: Uuid,
    request_id: RequestId,
    model_id: ModelId,
    node_id: NodeId,
    outcome: Outcome,
    latency_ms: u64,
    occurred_at: DateTime<Utc>,
}

/// What to tell JetStream about one message.
enum Verdict {
    /// In the log (`duplicate`: it already was).
    Logged { duplicate: bool },
    /// Never deliver again.
    Terminate(String),
    /// Deliver again later.
    Retry(String),
}

/// Ensures the durable ingest consumer (idempotent; every copy shares it).
pub(crate) async fn consumer(shared: &Shared) -> Result<PullConsumer, Error> {
    let s = &shared.ctx.subjects;
    let config = durable_pull_config(&shared.options.ingest_consumer, Some(s.ingest_execution()));
    Ok(ensure_pull_consumer(&shared.ctx.js, &s.ingest_stream(), config).await?)
}

/// The consumer's message stream; a failed pull is logged and retried after `nak_delay`. `None` once
/// the service is stopping.
async fn messages(shared: &Shared, consumer: &PullConsumer) -> Option<Stream> {
    while !shared.stop.is_cancelled() {
        match consumer.messages().await {
            Ok(messages) => return Some(messages),
            Err(e) => {
                let name = &shared.options.ingest_consumer;
                tracing::warn!(consumer = %name, error = %e, "cannot pull ingest reports; retrying");
                tokio::select! {
                    () = shared.stop.cancelled() => return None,
                    () = tokio::time::sleep(shared.options.nak_delay) => {}
                }
            }
        }
    }
    None
}

/// Consumes reports until the service stops; in-flight ones are finished first.
pub(crate) async fn run(shared: Arc<Shared>, consumer: PullConsumer) -> Result<(), Error> {
    while let Some(messages) = messages(&shared, &consumer).await {
        let stop = shared.stop.clone();
        messages
            .take_until(async move { stop.cancelled().await })
            .for_each_concurrent(shared.options.ingest_concurrency.max(1), |message| {
                let shared = shared.clone();
                async move {
                    match message {
                        Ok(message) => handle(&shared, message).await,
                        Err(e) => tracing::warn!(error = %e, "ingest pull failed"),
                    }
                }
            })
            .await;
    }
    Ok(())
}

async fn handle(shared: &Shared, message: Message) {
    let stats = shared.stats();
    let (sequence, delivered) = message
        .info()
        .map_or((0, 1), |i| (i.stream_sequence, i.delivered));
    if delivered > 1 {
        metrics::counter!("deepnode_jetstream_redeliveries_total", "consumer" => shared.options.ingest_consumer.clone())
            .increment(1);
    }
    let correlation = message
        .headers
        .as_ref()
        .filter(|h| h.get(CORRELATION_HEADER).is_some())
        .map(|h| deepnode_bus::rpc::correlation_id(Some(h)));
    let span = tracing::info_span!("ingest", sequence, correlation_id = tracing::field::Empty);
    if let Some(c) = &correlation {
        span.record("correlation_id", c.as_str());
    }
    let (ack, what) = match ingest(shared, &message.payload, correlation)
        .instrument(span)
        .await
    {
        Verdict::Logged { duplicate } => {
            Stats::bump(if duplicate {
                &stats.ingest_duplicates
            } else {
                &stats.ingested
            });
            (AckKind::Ack, "ack")
        }
        Verdict::Terminate(reason) => {
            Stats::bump(&stats.ingest_terminated);
            tracing::warn!(sequence, %reason, "ingest report terminated");
            (AckKind::Term, "term")
        }
        Verdict::Retry(reason) => {
            Stats::bump(&stats.ingest_retried);
            tracing::warn!(sequence, %reason, "ingest report will be retried");
            (AckKind::Nak(Some(shared.options.nak_delay)), "nak")
        }
    };
    if let Err(e) = message.ack_with(ack).await {
        // Unacked: JetStream redelivers it and the append is a no-op then.
        tracing::warn!(sequence, what, error = %e, "could not acknowledge ingest report");
    }
}

/// Appends one report; its `metadata.correlation_id` is the publisher's
/// `Deepnode-Correlation-Id` header when it sent one, else the report's `request_id`.
async fn ingest(shared: &Shared, payload: &[u8], correlation: Option<String>) -> Verdict {
    let report: Report = match parse_command(payload) {
        Ok(report) => report,
        Err(e) => return Verdict::Terminate(format!("malformed report: {}", e.message)),
    };
    match known(shared, &report.node_id).await {
        Ok(true) => {}
        Ok(false) => {
            return Verdict::Terminate(format!(
                "report {} names unknown node {}",
                report.event_id, report.node_id
            ))
        }
        Err(e) => return Verdict::Retry(e.to_string()),
    }
    let event = DomainEvent::ExecutionReported(ExecutionReported {
        event_id: Some(report.event_id),
        request_id: report.request_id.clone(),
        model_id: report.model_id,
        node_id: report.node_id,
        outcome: report.outcome,
        latency_ms: report.latency_ms,
        reported_occurred_at: report.occurred_at,
    });
    let stream = event.stream_id();
    let new = event.to_new_event(
        report.event_id,
        Metadata::new(
            &shared.ctx.producer,
            correlation.unwrap_or_else(|| report.request_id.as_str().to_owned()),
        ),
        Utc::now(),
    );
    use deepnode_store::Error as E;
    match shared
        .ctx
        .store
        .append(&stream, ExpectedVersion::Any, vec![new])
        .await
    {
        Ok(result) => Verdict::Logged {
            duplicate: result.duplicate,
        },
        Err(E::EventIdReused { event_id }) => Verdict::Terminate(format!(
            "event id {event_id} is already in the log with a different body"
        )),
        Err(E::Invalid(reason)) => {
            Verdict::Terminate(format!("report refused by the log: {reason}"))
        }
        Err(e) => Verdict::Retry(format!("appending report {}: {e}", report.event_id)),
    }
}

/// Whether the log knows the node; a node the view has not seen yet gets one catch-up with the head
/// (it may have registered a moment ago).
async fn known(shared: &Shared, node: &NodeId) -> Result<bool, deepnode_store::Error> {
    if shared.view.read().book.node(node).is_some() {
        return Ok(true);
    }
    let head = shared.ctx.store.head_position().await?;
    shared
        .view
        .wait_for(head, shared.options.view_timeout)
        .await?;
    Ok(shared.view.read().book.node(node).is_some())
}
