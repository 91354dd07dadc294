//! Outcomes → penalties: a durable consumer on the events stream (shared by every copy), filtered to
//! `AttemptSucceeded`, `AttemptFailed` and `ExecutionReported` where the server can filter by several
//! subjects (nats-server 2.10 and later; an older one delivers every event, and the others are
//! acknowledged after reading their type alone). For each outcome it waits until the
//! live view has folded that event's position, runs `penalties::assess(node, event.occurred_at,
//! policy)` and appends what the policy says (slash, jail, tombstone, phase-out, probation
//! promotion) to the node's stream, each with the triggering event as `causation_id`; then acks.
//!
//! Event ids are UUID v5 of (triggering event id, node stream version decided against, index) and the
//! append expects exactly that version (see [`crate::decide`]): a redelivered or concurrently handled
//! trigger either finds its identical decision already logged or re-decides against the newer state.
//! Time comes from the event, never the wall clock, so the decision is a replayable function of the log.

use std::sync::Arc;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::Message;
use async_nats::jetstream::AckKind;
use chrono::{DateTime, Utc};
use deepnode_bus::jetstream::{durable_pull_config, ensure_pull_consumer};
use deepnode_domain::events::{check_readable, Metadata};
use deepnode_domain::ids::NodeId;
use deepnode_domain::penalties;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

use crate::decide::{decide_and_append, Decision};
use crate::{pull, Error, Shared, Stats};

/// The event types whose outcomes can trigger a penalty decision.
pub(crate) const TRIGGERS: [&str; 3] = ["AttemptSucceeded", "AttemptFailed", "ExecutionReported"];

/// Ensures the durable outcome consumer (idempotent; every copy shares it).
pub(crate) async fn consumer(shared: &Shared) -> Result<PullConsumer, Error> {
    let s = &shared.ctx.subjects;
    let mut config = durable_pull_config(&shared.options.outcome_consumer, None);
    config.filter_subjects = TRIGGERS.iter().map(|t| s.events(t)).collect();
    let consumer = ensure_pull_consumer(&shared.ctx.js, &s.events_stream(), config).await?;
    let kept = &consumer.cached_info().config;
    if kept.filter_subjects.is_empty() && kept.filter_subject.is_empty() {
        // nats-server before 2.10 drops `filter_subjects` without a word.
        tracing::info!(
            consumer = %shared.options.outcome_consumer,
            "this nats-server cannot filter a consumer by several subjects (2.10 and later can): \
             every event is delivered, and those that are no outcome are acknowledged unread"
        );
    }
    Ok(consumer)
}

/// Assesses outcome events one at a time (in stream order) until the service stops.
pub(crate) async fn run(shared: Arc<Shared>, consumer: PullConsumer) -> Result<(), Error> {
    let name = shared.options.outcome_consumer.clone();
    while let Some(messages) = pull::messages(&shared, &consumer, &name, "outcome events").await {
        let stop = shared.stop.clone();
        let messages = messages.take_until(async move { stop.cancelled().await });
        tokio::pin!(messages);
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => handle(&shared, message).await,
                Err(e) => tracing::warn!(error = %e, "outcome pull failed"),
            }
        }
    }
    Ok(())
}

async fn handle(shared: &Shared, message: Message) {
    let (sequence, delivered) = message
        .info()
        .map_or((0, 1), |i| (i.stream_sequence, i.delivered));
    if delivered > 1 {
        metrics::counter!("deepnode_jetstream_redeliveries_total", "consumer" => shared.options.outcome_consumer.clone())
            .increment(1);
    }
    let ack = match assess(shared, &message.payload).await {
        Ok(()) => AckKind::Ack,
        Err(Next::Skip(reason)) => {
            tracing::warn!(sequence, %reason, "outcome event skipped");
            Stats::bump(&shared.stats().outcomes_terminated);
            AckKind::Term
        }
        Err(Next::Retry(reason)) => {
            tracing::warn!(sequence, %reason, "outcome event will be retried");
            AckKind::Nak(Some(shared.options.nak_delay))
        }
    };
    if let Err(e) = message.ack_with(ack).await {
        tracing::warn!(sequence, error = %e, "could not acknowledge outcome event");
    }
}

/// Why an event was not (yet) assessed.
enum Next {
    /// It cannot be understood; never again.
    Skip(String),
    /// Later (the view lags, the store is down, conflicts persisted).
    Retry(String),
}

/// What an assessment reads of an event on the bus (`deepnode_runtime::wire`'s form): its place in
/// the log, its type and time, and — only for an outcome — the node its payload is about and its
/// correlation. Payload and metadata are borrowed unread, not built as JSON trees: the live view
/// folds the event itself from the log, and an event that is no outcome (delivered by a server that
/// cannot filter) is acknowledged on its type alone.
#[derive(Deserialize)]
struct Trigger<'a> {
    global_position: i64,
    event_id: Uuid,
    event_type: &'a str,
    schema_version: i32,
    occurred_at: DateTime<Utc>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(borrow)]
    metadata: &'a RawValue,
}

/// Every trigger's payload names its node.
#[derive(Deserialize)]
struct AboutNode {
    node_id: NodeId,
}

#[derive(Deserialize)]
struct Correlation {
    #[serde(default)]
    correlation_id: Option<Value>,
}

async fn assess(shared: &Shared, payload: &[u8]) -> Result<(), Next> {
    let not_outcome = |e: serde_json::Error| Next::Skip(format!("not an outcome event: {e}"));
    let recorded: Trigger<'_> = serde_json::from_slice(payload).map_err(not_outcome)?;
    if !TRIGGERS.contains(&recorded.event_type) {
        return Ok(());
    }
    check_readable(recorded.event_type, recorded.schema_version).map_err(|e| {
        Next::Skip(format!(
            "event at position {}: {e}",
            recorded.global_position
        ))
    })?;
    let about: AboutNode = serde_json::from_str(recorded.payload.get()).map_err(not_outcome)?;
    let metadata: Correlation =
        serde_json::from_str(recorded.metadata.get()).map_err(not_outcome)?;
    let node = about.node_id;
    shared
        .view
        .wait_for(recorded.global_position, shared.options.view_timeout)
        .await
        .map_err(|e| Next::Retry(e.to_string()))?;
    Stats::bump(&shared.stats().outcomes_assessed);

    let at = recorded.occurred_at;
    let trigger = recorded.event_id;
    let correlation = metadata
        .correlation_id
        .as_ref()
        .and_then(|c| c.as_str())
        .map_or_else(|| trigger.to_string(), str::to_owned);
    let policy = shared.ctx.policy.clone();
    let producer = shared.ctx.producer.clone();
    let decided = decide_and_append(shared, &node, |view, version| {
        let state = view.book.node(&node)?;
        Some(Decision {
            events: penalties::assess(state, at, &policy),
            id_seed: format!("penalty:{trigger}:{version}"),
            metadata: Metadata::new(&producer, &correlation).caused_by(trigger),
            occurred_at: at,
        })
    })
    .await
    .map_err(|e| Next::Retry(format!("deciding on node {node}: {e}")))?;
    if let Some(result) = decided.filter(|r| !r.duplicate) {
        for _ in &result.positions {
            Stats::bump(&shared.stats().penalty_events);
        }
        tracing::info!(
            node_id = %node,
            cause = %trigger,
            positions = ?result.positions,
            "penalty decision appended"
        );
    }
    Ok(())
}
