//! `cmd.exec`: one inference request with failover, recorded before it is answered.
//!
//! The whole execution is recorded by **one** append to stream `exec-<request_id>`, with `NoStream`,
//! once its outcome is known and before the reply:
//! `[ExecutionRequested, AttemptDispatched(primary), AttemptSucceeded, ExecutionCompleted]` (charged),
//! or with a failover `[…, AttemptFailed, AttemptDispatched(backup), …]`, or ending in
//! `[AttemptFailed, ExecutionFailed]` (not charged). One durable commit per request is what keeps the
//! scheduler's added latency near one WAL flush; the events keep the times and decision inputs of
//! the moments they describe, so the record is the same as if written step by step.
//!
//! A repeated `request_id` is answered from the log: the primary is asked while the log is checked
//! for the stream (the check overlaps the node's work); a recorded one aborts the attempt and is
//! replayed. Two copies racing on the same new id both ask a node, but only the first append lands;
//! the other gets `Conflict` and answers with what was recorded, so a request is charged once. A
//! scheduler that dies mid-request has recorded nothing: a retry with the same id runs it afresh.
//! (Streams recorded step by step by earlier versions may end without an outcome; `sweep` closes
//! those.)
//!
//! `ExecutionCompleted`'s payload carries the node's `output` and `ExecutionFailed`'s the reply
//! `message` as additional fields (the typed domain structs ignore them), so a repeated request id is
//! answered with the original answer byte for byte, by any scheduler copy.

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;
use deepnode_bus::envelope::{parse_command, ErrorBody, ErrorCode, Reply};
use deepnode_bus::rpc::{Request, CORRELATION_HEADER};
use deepnode_domain::ejection::Transition;
use deepnode_domain::events::{
    AttemptDispatched, AttemptFailed, AttemptSucceeded, DomainEvent, ExecutionCompleted,
    ExecutionFailed, ExecutionRequested, Failure, Metadata, NodeEjected, NodeRestored, Outcome,
    Role,
};
use deepnode_domain::ids::{ModelId, NodeId, RequestId};
use deepnode_domain::log::{ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use deepnode_store::Error as StoreError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::task::{JoinError, JoinHandle};
use tracing::Instrument;
use uuid::Uuid;

use crate::classify::{judge, Classified, Transport};
use crate::live::InFlight;
use crate::queue::Priority;
use crate::replies::Answer;
use crate::Scheduler;

/// `cmd.exec` body.
#[derive(Debug, Deserialize)]
struct ExecCommand {
    request_id: RequestId,
    model_id: ModelId,
    input: Value,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// How it ranks when its model is full (`critical`, `standard`, `sheddable`).
    #[serde(default)]
    priority: Priority,
}

/// One attempt as the reply lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct AttemptView {
    node_id: NodeId,
    role: Role,
    outcome: Outcome,
    latency_ms: u64,
}

/// An attempt read back from the log: node, role and (once settled) outcome and latency.
type LoggedAttempt = (NodeId, Role, Option<(Outcome, u64)>);

/// The result of one dispatched attempt.
type AttemptResult = (Classified, u64);

/// How long an exec waits for its first attempt before reading the log for its request id. A node
/// that answers sooner has finished before the read would have paid off (a repeat's record finds it
/// anyway); reading on every request cost ~0.17 ms of the scheduler's added p50 at 1,000 exec/s
/// (`benches/exec.rs`, nodes answering instantly).
const CHECK_LOG_AFTER: Duration = Duration::from_millis(2);

/// What answered a request: this request's own execution (or refusal), or the log's record of an
/// earlier one with the same `request_id` (a repeat) — which the metrics count apart.
enum Answered {
    Ran(Reply),
    Recorded(Reply),
}

impl From<Reply> for Answered {
    fn from(reply: Reply) -> Answered {
        Answered::Ran(reply)
    }
}

/// Handles one `cmd.exec` request and counts it: `deepnode_exec_requests_total{outcome}` and
/// `deepnode_exec_latency_seconds{outcome}`, where outcome is `charged` or `not_charged` for an
/// execution recorded by this request, `replayed` for a repeated request id, else the error code.
pub(crate) async fn handle(s: Arc<Scheduler>, request: Request) -> Reply {
    let started = Instant::now();
    let (reply, replayed) = match handle_request(s, request).await {
        Answered::Ran(reply) => (reply, false),
        Answered::Recorded(reply) => (reply, true),
    };
    let reply = not_charged_unless_said(reply);
    let outcome = match reply.error() {
        _ if replayed => "replayed",
        None => "charged",
        Some(e) if e.code == ErrorCode::AllReplicasFailed => {
            metrics::counter!("deepnode_exec_not_charged_total").increment(1);
            "not_charged"
        }
        Some(e) => e.code.as_str(),
    };
    metrics::counter!("deepnode_exec_requests_total", "outcome" => outcome).increment(1);
    metrics::histogram!("deepnode_exec_latency_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    reply
}

/// CONTRACT §3: every failed exec says `charged: false` and lists its `attempts` — empty when it was
/// refused before any ran (bad input, unknown model, no eligible replica, overloaded, the store
/// unavailable). Failures after attempts carry their own (see `failure_reply_with`).
///
/// It also says whether sending the same request again may run it (`retryable`): `true` when it was
/// refused for the moment and nothing was recorded for its id (`unknown_model`, `no_eligible_nodes`,
/// `overloaded`, `unavailable`), so a later answer for that id never contradicts this one; `false`
/// when the answer is final (bad input, or an outcome recorded in the log, which a repeat returns).
fn not_charged_unless_said(mut reply: Reply) -> Reply {
    if let Reply::Err { error, extra } = &mut reply {
        let retryable = matches!(
            error.code,
            ErrorCode::UnknownModel
                | ErrorCode::NoEligibleNodes
                | ErrorCode::Overloaded
                | ErrorCode::Unavailable
        );
        extra.entry("charged").or_insert(Value::Bool(false));
        extra
            .entry("attempts")
            .or_insert_with(|| Value::Array(Vec::new()));
        extra.entry("retryable").or_insert(Value::Bool(retryable));
    }
    reply
}

async fn handle_request(s: Arc<Scheduler>, request: Request) -> Answered {
    let cmd: ExecCommand = match parse_command(&request.payload) {
        Ok(cmd) => cmd,
        Err(e) => return Reply::err(e).into(),
    };
    let timeout_ms = match cmd.timeout_ms {
        None => s.ctx.policy.exec.default_timeout_ms,
        Some(t) if t == 0 || t > s.options.max_timeout_ms => {
            return Reply::err(ErrorBody::bad_request(format!(
                "field \"timeout_ms\": must be between 1 and {} milliseconds",
                s.options.max_timeout_ms
            )))
            .into()
        }
        Some(t) => t,
    };
    let span = tracing::info_span!(
        "exec",
        request_id = %cmd.request_id,
        model_id = %cmd.model_id,
        correlation_id = %request.correlation_id,
    );
    let caller = request.caller().map(str::to_owned);
    execute(s, cmd, timeout_ms, request.correlation_id, caller)
        .instrument(span)
        .await
}

pub(crate) fn new_event(event: DomainEvent, meta: Metadata) -> NewEvent {
    event.to_new_event(Uuid::new_v4(), meta, Utc::now())
}

/// The reply to a store failure: the one mapping every service uses
/// ([`deepnode_runtime::store_error`]).
fn store_failure(e: &StoreError) -> Reply {
    Reply::err(deepnode_runtime::store_error(e))
}

fn success_reply(
    request_id: &RequestId,
    node_id: &NodeId,
    output: Value,
    attempts: &[AttemptView],
) -> Reply {
    Reply::ok(&json!({
        "request_id": request_id,
        "output": output,
        "node_id": node_id,
        "charged": true,
        "attempts": attempts,
    }))
}

fn failure_reply_with(
    code: ErrorCode,
    request_id: &RequestId,
    message: String,
    attempts: &[AttemptView],
) -> Reply {
    // Recorded, so final: a repeat returns this very answer.
    Reply::err_with(
        ErrorBody::new(code, message),
        &json!({"request_id": request_id, "charged": false, "attempts": attempts, "retryable": false}),
    )
}

fn failure_message(attempts: &[AttemptView], why_no_retry: Option<&str>) -> String {
    let list: Vec<String> = attempts
        .iter()
        .map(|a| {
            let role = if a.role == Role::Primary {
                "primary"
            } else {
                "backup"
            };
            format!("{role} {} {}", a.node_id, a.outcome.as_str())
        })
        .collect();
    match why_no_retry {
        Some(why) => format!("{}; {why}; not charged", list.join(", ")),
        None => format!("every replica failed ({}); not charged", list.join(", ")),
    }
}

impl Scheduler {
    /// Asks `node` with the request body, counting it in flight until the answer or the timeout.
    fn spawn_attempt(
        &self,
        slot: InFlight,
        body: Bytes,
        correlation_id: &str,
        timeout: Duration,
    ) -> JoinHandle<AttemptResult> {
        let node = slot.node();
        self.live.start_probe_if_due(node, Utc::now());
        let subject = self.ctx.subjects.node_infer(node);
        let mut headers = HeaderMap::new();
        headers.insert(CORRELATION_HEADER, correlation_id);
        let (replies, bus) = (self.replies.clone(), self.bus.clone());
        tokio::spawn(
            async move {
                let _in_flight = slot;
                let started = Instant::now();
                let epoch = bus.begin();
                let answer = replies.request(subject, headers, body, timeout).await;
                let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let during = bus.since(epoch);
                let classified = match answer {
                    Answer::Message(msg) => judge(Transport::Answer(&msg.payload), during),
                    Answer::TimedOut => judge(Transport::TimedOut, during),
                    Answer::NoResponders => judge(Transport::NoResponders, during),
                    Answer::Broken(why) => judge(Transport::Broken(why), during),
                };
                (classified, latency_ms)
            }
            .in_current_span(),
        )
    }

    /// Settles a finished attempt to `node` (a replica of `model`, dispatched by the
    /// `AttemptDispatched` event `dispatched`; `joined` is how its task ended) and feeds its outcome
    /// to the outlier tracker; the settled attempt carries what the tracker decided (an ejection or
    /// a restoration is recorded once the execution is). A last healthy replica kept despite its
    /// failures asks for an emergency round.
    async fn finish_attempt<'a>(
        &self,
        node: &'a NodeId,
        role: Role,
        dispatched: Uuid,
        model: &ModelId,
        joined: Result<AttemptResult, JoinError>,
    ) -> (Classified, Attempt<'a>) {
        let (classified, latency_ms) = match joined {
            Ok(result) => result,
            Err(e) => (
                Classified::Failed(Failure::Error, format!("attempt task failed: {e}")),
                0,
            ),
        };
        let failure = match &classified {
            Classified::Success(_) => None,
            Classified::Failed(f, _) => Some(*f),
            Classified::Unjudged(detail) => {
                tracing::warn!(node_id = %node, %detail, "attempt not held against the node");
                metrics::counter!("deepnode_exec_attempts_total", "node_id" => node.to_string(), "outcome" => "unjudged")
                    .increment(1);
                let attempt = Attempt {
                    node,
                    role,
                    latency_ms,
                    dispatched,
                    transition: Transition::None,
                };
                return (classified, attempt);
            }
        };
        let outcome = failure.map_or(Outcome::Success, Outcome::from);
        metrics::counter!(
            "deepnode_exec_attempts_total",
            "node_id" => node.to_string(),
            "outcome" => outcome.as_str(),
        )
        .increment(1);
        let transition = {
            let book = self.book.read();
            self.live.record_outcome(node, failure, Utc::now(), &book)
        };
        if transition == Transition::KeptLastHealthy && self.has_ineligible_replica(model) {
            self.ask_for_replacement(model, "the last healthy replica keeps failing")
                .await;
        }
        let attempt = Attempt {
            node,
            role,
            latency_ms,
            dispatched,
            transition,
        };
        (classified, attempt)
    }

    /// The answer recorded for `request_id` when it was executed before (or is being executed: see
    /// [`Scheduler::recorded_answer`]), `None` for a new request id.
    async fn recorded(
        &self,
        stream: &StreamId,
        request_id: &RequestId,
    ) -> Result<Option<Answered>, StoreError> {
        if self.ctx.store.read_stream(stream, 1).await?.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.recorded_answer(stream, request_id).await))
    }

    /// [`Scheduler::recorded`] for a request about to be (re)tried: a log that cannot be read is
    /// `unavailable` rather than a reason to execute unrecorded.
    async fn answer_if_recorded(
        &self,
        stream: &StreamId,
        request_id: &RequestId,
    ) -> Option<Answered> {
        self.recorded(stream, request_id)
            .await
            .unwrap_or_else(|e| Some(store_failure(&e).into()))
    }

    /// Records a finished execution with one `NoStream` append and returns `reply`, or the recorded
    /// answer when another copy recorded this request id first. Transient failures are retried with
    /// the same event ids: an append that did land is then reported as a duplicate, not a conflict.
    async fn record(
        &self,
        stream: &StreamId,
        request_id: &RequestId,
        events: Vec<NewEvent>,
        decisions: Vec<(StreamId, NewEvent)>,
        reply: Reply,
    ) -> Answered {
        // A transient failure (the connection dropped, the pool timed out) is retried twice, 50 ms
        // then 200 ms later; the same event ids make a retry of an append that did land a duplicate.
        let appended = (|| {
            self.ctx
                .store
                .append(stream, ExpectedVersion::NoStream, events.clone())
        })
        .retry(
            ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(50))
                .with_factor(4.0)
                .with_max_times(2),
        )
        .when(StoreError::is_transient)
        .notify(|e, after| tracing::warn!(error = %e, ?after, "append failed; retrying"))
        .await;
        match appended {
            Ok(result) => {
                self.record_decisions(decisions);
                let deciding = result.positions.last().zip(result.hashes.last());
                Answered::Ran(match deciding {
                    Some((position, hash)) => self.with_receipt(reply, *position, hash),
                    None => reply,
                })
            }
            Err(StoreError::Conflict { .. }) => self.recorded_answer(stream, request_id).await,
            Err(e) => store_failure(&e).into(),
        }
    }

    /// `reply` with its `receipt` (CONTRACT §4a): the position and Merkle leaf hash of the event
    /// that decided it (the execution's last), the log's origin, and the log key's signature over
    /// them (`null` without a key) — a promise that the next checkpoint includes that event.
    fn with_receipt(&self, reply: Reply, position: i64, chain_hash: &[u8; 32]) -> Reply {
        let leaf = deepnode_domain::merkle::leaf_hash(chain_hash);
        let key = self.options.log_key.as_ref();
        let origin = key.map_or_else(
            || self.ctx.policy.log.origin.clone(),
            |k| k.name().to_owned(),
        );
        let position = u64::try_from(position).unwrap_or(0);
        let signature = key.map(|k| {
            k.signature(&deepnode_domain::note::receipt_text(
                &origin, position, &leaf,
            ))
        });
        let receipt = json!({
            "position": position,
            "leaf_hash": hex::encode(leaf),
            "origin": origin,
            "signature": signature,
        });
        match reply {
            Reply::Ok(mut fields) => {
                fields.insert("receipt".to_owned(), receipt);
                Reply::Ok(fields)
            }
            Reply::Err { error, mut extra } => {
                extra.insert("receipt".to_owned(), receipt);
                Reply::Err { error, extra }
            }
        }
    }

    /// Whether one of `model`'s replicas is on a node that may not serve (offline, jailed,
    /// deregistered, phased out): what a rotation round re-places. When every replica is eligible and
    /// merely failing, a round could not help, and none is asked for.
    fn has_ineligible_replica(&self, model: &ModelId) -> bool {
        let book = self.book.read();
        book.deployments().get(model).is_some_and(|replicas| {
            replicas
                .keys()
                .any(|n| !book.node(n).is_some_and(|s| s.status.is_eligible()))
        })
    }

    /// Asks the rotation service for a round now, for a model left without a healthy replica (see
    /// `emergency`); at most once per cooldown per model from this process.
    async fn ask_for_replacement(&self, model: &ModelId, why: &str) {
        if !self.emergencies.should_ask(model, Instant::now()) {
            return;
        }
        tracing::warn!(model_id = %model, why, "asking rotation for an emergency re-placement");
        metrics::counter!("deepnode_emergency_rounds_requested_total").increment(1);
        let body = json!({"reason": "emergency", "model_id": model, "why": why});
        if let Err(e) = self
            .ctx
            .nats
            .publish(
                self.ctx.subjects.cmd_rotation_run(),
                body.to_string().into(),
            )
            .await
        {
            tracing::warn!(error = %e, "could not ask for an emergency rotation round");
        }
    }

    /// Appends the outlier tracker's decisions (`NodeEjected`, `NodeRestored`) to their nodes' streams,
    /// after the execution whose attempt caused them is in the log, without holding up the reply.
    /// They are already in force in this process; a failure to record one is logged, not retried.
    fn record_decisions(&self, decisions: Vec<(StreamId, NewEvent)>) {
        for (stream, decision) in decisions {
            let store = self.ctx.store.clone();
            tokio::spawn(
                async move {
                    let event_type = decision.event_type.clone();
                    if let Err(e) = store
                        .append(&stream, ExpectedVersion::Any, vec![decision])
                        .await
                    {
                        tracing::warn!(error = %e, %stream, event_type, "could not record an ejection decision");
                    }
                }
                .in_current_span(),
            );
        }
    }

    /// Answers a repeated request id from the log, waiting (bounded) for one still in flight.
    async fn recorded_answer(&self, stream: &StreamId, request_id: &RequestId) -> Answered {
        // A repeated request id: not a new execution (see `handle`'s counters).
        Answered::Recorded(self.recorded_reply(stream, request_id).await)
    }

    /// The reply of [`Scheduler::recorded_answer`].
    async fn recorded_reply(&self, stream: &StreamId, request_id: &RequestId) -> Reply {
        let started = Instant::now();
        let mut limit = self.options.duplicate_grace;
        let mut pauses = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(5))
            .with_max_delay(Duration::from_millis(100))
            .without_max_times()
            .build();
        loop {
            let events = match self.ctx.store.read_stream(stream, 1).await {
                Ok(events) => events,
                Err(e) => return store_failure(&e),
            };
            if let Some(reply) = answer_from_log(&events) {
                tracing::debug!("repeated request id answered from the log");
                let deciding = events.last().and_then(|e| {
                    <[u8; 32]>::try_from(e.hash.as_slice())
                        .ok()
                        .map(|h| (e.global_position, h))
                });
                return match deciding {
                    Some((position, hash)) => self.with_receipt(reply, position, &hash),
                    None => reply,
                };
            }
            if let Some(Ok(DomainEvent::ExecutionRequested(r))) =
                events.first().map(DomainEvent::decode)
            {
                limit = Duration::from_millis(r.timeout_ms.saturating_mul(2))
                    + self.options.duplicate_grace;
            }
            if started.elapsed() >= limit {
                return Reply::err(ErrorBody::new(
                    ErrorCode::Conflict,
                    format!("request {request_id} is still being executed; retry later"),
                ));
            }
            tokio::time::sleep(pauses.next().unwrap_or(Duration::from_millis(100))).await;
        }
    }
}

/// Rebuilds the reply of a finished execution from its stream; `None` while it is in flight.
fn answer_from_log(events: &[RecordedEvent]) -> Option<Reply> {
    let mut attempts: Vec<LoggedAttempt> = Vec::new();
    fn settle(attempts: &mut [LoggedAttempt], node: &NodeId, outcome: Outcome, latency: u64) {
        if let Some(slot) = attempts
            .iter_mut()
            .find(|(n, _, done)| n == node && done.is_none())
        {
            slot.2 = Some((outcome, latency));
        }
    }
    let mut end = None;
    for event in events {
        match DomainEvent::decode(event) {
            Ok(DomainEvent::AttemptDispatched(d)) => attempts.push((d.node_id, d.role, None)),
            Ok(DomainEvent::AttemptSucceeded(a)) => {
                settle(&mut attempts, &a.node_id, Outcome::Success, a.latency_ms)
            }
            Ok(DomainEvent::AttemptFailed(a)) => {
                settle(&mut attempts, &a.node_id, a.outcome.into(), a.latency_ms)
            }
            Ok(e @ (DomainEvent::ExecutionCompleted(_) | DomainEvent::ExecutionFailed(_))) => {
                end = Some(e);
            }
            _ => {}
        }
    }
    let end = end?;
    let views: Vec<AttemptView> = attempts
        .into_iter()
        .filter_map(|(node_id, role, done)| {
            done.map(|(outcome, latency_ms)| AttemptView {
                node_id,
                role,
                outcome,
                latency_ms,
            })
        })
        .collect();
    Some(match end {
        DomainEvent::ExecutionCompleted(c) => {
            success_reply(&c.request_id, &c.node_id, c.output, &views)
        }
        DomainEvent::ExecutionFailed(f) => {
            let message = f.message.unwrap_or_else(|| failure_message(&views, None));
            // The recorded code: `all_replicas_failed`, or `unavailable` for an execution the
            // sweeper closed after its scheduler stopped (see `sweep`).
            let code = serde_json::from_value(Value::String(f.error_code.clone()))
                .unwrap_or(ErrorCode::AllReplicasFailed);
            failure_reply_with(code, &f.request_id, message, &views)
        }
        _ => return None,
    })
}

/// The whole execution of one valid request.
async fn execute(
    s: Arc<Scheduler>,
    cmd: ExecCommand,
    timeout_ms: u64,
    correlation_id: String,
    caller: Option<String>,
) -> Answered {
    let ExecCommand {
        request_id,
        model_id,
        input,
        priority,
        ..
    } = cmd;
    let requested = DomainEvent::ExecutionRequested(ExecutionRequested {
        request_id: request_id.clone(),
        model_id: model_id.clone(),
        timeout_ms,
    });
    let stream = requested.stream_id();
    // Waiting for a slot takes at most the attempt timeout; the attempts then get theirs in full.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    let (decision, slot_1) = match s
        .admit(
            &model_id,
            &request_id,
            caller.as_deref(),
            priority,
            deadline,
        )
        .await
    {
        Ok(admitted) => admitted,
        // Overloaded: answered from memory, at once (a read of the log per refusal is exactly the
        // load an overload cannot afford); a repeat of a recorded request gets its record once
        // it is admitted.
        Err(refusal)
            if refusal
                .error()
                .is_some_and(|e| e.code == ErrorCode::Overloaded) =>
        {
            return refusal.into();
        }
        Err(refusal) => {
            // A repeated request whose model has gone since still gets its recorded answer.
            if let Ok(Some(answer)) = s.recorded(&stream, &request_id).await {
                return answer;
            }
            return refusal.into();
        }
    };
    if decision.emergency_replacement {
        s.ask_for_replacement(&model_id, "no healthy replica left")
            .await;
    }
    let decision_json = serde_json::to_value(&decision)
        .expect("a routing decision serialises: plain structs with string keys");
    let timeout = Duration::from_millis(timeout_ms);
    let meta = Metadata::new(s.ctx.producer.clone(), correlation_id.clone());
    let body = Bytes::from(
        json!({"request_id": request_id, "model_id": model_id, "input": input}).to_string(),
    );
    drop(input);
    s.live.count_request();

    let dispatched = |node: &NodeId, role: Role, attempt: u8, cause: Uuid| {
        new_event(
            DomainEvent::AttemptDispatched(AttemptDispatched {
                request_id: request_id.clone(),
                model_id: model_id.clone(),
                node_id: node.clone(),
                role,
                attempt,
                decision: decision_json.clone(),
            }),
            meta.clone().caused_by(cause),
        )
    };
    // Attempt 1. A repeated request id needs no read of the log to be found: its record conflicts
    // (the stream must not exist) and the recorded answer is returned. The log is read first only
    // when the node is slow to answer, so a repeat is answered without waiting for it (and before
    // a retry, below).
    let primary = decision.primary.clone();
    let requested = new_event(requested, meta.clone());
    let dispatched_1 = dispatched(&primary, Role::Primary, 1, requested.event_id);
    let cause_1 = dispatched_1.event_id;
    let mut task_1 = s.spawn_attempt(slot_1, body.clone(), &correlation_id, timeout);
    let quick = tokio::time::timeout(CHECK_LOG_AFTER, &mut task_1)
        .await
        .ok();
    let checked = quick.is_none();
    if checked {
        if let Some(answer) = s.answer_if_recorded(&stream, &request_id).await {
            task_1.abort();
            return answer;
        }
    }
    let joined_1 = match quick {
        Some(joined) => joined,
        None => task_1.await,
    };
    let mut trail = Trail {
        record: vec![requested, dispatched_1],
        decisions: Vec::new(),
        attempts: Vec::with_capacity(2),
    };
    let (result_1, attempt_1) = s
        .finish_attempt(&primary, Role::Primary, cause_1, &model_id, joined_1)
        .await;
    let cause_fail_1 = match result_1 {
        Classified::Success(output) => {
            let success = Success {
                attempt: attempt_1,
                output,
            };
            return complete(&s, &stream, &request_id, &model_id, &meta, trail, success).await;
        }
        Classified::Failed(failure, detail) => {
            trail.failed(attempt_1, failure, detail, &request_id, &meta)
        }
        Classified::Unjudged(detail) => {
            // Nothing is known about this execution: record nothing, so sending it again runs it.
            return Reply::err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!("the primary {primary} could not be judged ({detail}); nothing was recorded or charged and the node is not held responsible; send the request again"),
            ))
            .into();
        }
    };

    // A repeat is not retried: it has its recorded answer.
    if !checked {
        if let Some(answer) = s.answer_if_recorded(&stream, &request_id).await {
            return answer;
        }
    }

    // Attempt 2: the other replica, if there is one and the retry budget allows.
    let backup = decision.backup.clone().filter(|b| *b != primary);
    let refusal = match &backup {
        None => Some("no other replica to retry on"),
        Some(_) if !s.live.try_retry() => Some("retry budget exhausted, backup not tried"),
        Some(_) => None,
    };
    let Some(backup) = backup.filter(|_| refusal.is_none()) else {
        let end = (ErrorCode::AllReplicasFailed, refusal, cause_fail_1);
        return give_up(&s, &stream, &request_id, &model_id, &meta, trail, end).await;
    };
    metrics::counter!("deepnode_exec_fallbacks_total").increment(1);
    let dispatched_2 = dispatched(&backup, Role::Backup, 2, cause_fail_1);
    let cause_2 = dispatched_2.event_id;
    trail.record.push(dispatched_2);
    let joined_2 = s
        .spawn_attempt(s.live.begin(&backup), body, &correlation_id, timeout)
        .await;
    let (result_2, attempt_2) = s
        .finish_attempt(&backup, Role::Backup, cause_2, &model_id, joined_2)
        .await;
    match result_2 {
        Classified::Success(output) => {
            let success = Success {
                attempt: attempt_2,
                output,
            };
            complete(&s, &stream, &request_id, &model_id, &meta, trail, success).await
        }
        Classified::Failed(failure, detail) => {
            let cause_fail_2 = trail.failed(attempt_2, failure, detail, &request_id, &meta);
            let end = (ErrorCode::AllReplicasFailed, None, cause_fail_2);
            give_up(&s, &stream, &request_id, &model_id, &meta, trail, end).await
        }
        Classified::Unjudged(detail) => {
            // The primary's failure stands; the backup's attempt stays unclassified.
            let why = format!(
                "the backup {backup} could not be judged ({detail}) and is not held responsible"
            );
            let end = (ErrorCode::Unavailable, Some(why.as_str()), cause_2);
            give_up(&s, &stream, &request_id, &model_id, &meta, trail, end).await
        }
    }
}

/// Ends an execution no replica served: `ExecutionFailed` (not charged) after the last attempt,
/// recorded before the reply goes out. `end` is the code (`all_replicas_failed`, or `unavailable`
/// when the last attempt was lost to our own bus), why no further replica was tried or judged
/// (`None` when none was left to try) and the event that caused the end.
async fn give_up(
    s: &Scheduler,
    stream: &StreamId,
    request_id: &RequestId,
    model_id: &ModelId,
    meta: &Metadata,
    mut trail: Trail,
    (code, why, cause): (ErrorCode, Option<&str>, Uuid),
) -> Answered {
    let message = failure_message(&trail.attempts, why);
    let attempts = u8::try_from(trail.attempts.len()).unwrap_or(u8::MAX);
    let end = execution_failed(request_id, model_id, attempts, code, &message, meta, cause);
    trail.record.push(end);
    let reply = failure_reply_with(code, request_id, message, &trail.attempts);
    s.record(stream, request_id, trail.record, trail.decisions, reply)
        .await
}

/// `ExecutionFailed` (not charged), carrying the reply's message for repeated request ids.
fn execution_failed(
    request_id: &RequestId,
    model_id: &ModelId,
    attempts: u8,
    code: ErrorCode,
    message: &str,
    meta: &Metadata,
    cause: Uuid,
) -> NewEvent {
    new_event(
        DomainEvent::ExecutionFailed(ExecutionFailed {
            request_id: request_id.clone(),
            model_id: model_id.clone(),
            attempts,
            charged: false,
            error_code: code.as_str().to_owned(),
            message: Some(message.to_owned()),
            abandoned: false,
        }),
        meta.clone().caused_by(cause),
    )
}

/// One settled attempt, as the record and the reply need it.
struct Attempt<'a> {
    node: &'a NodeId,
    role: Role,
    latency_ms: u64,
    /// Its `AttemptDispatched` event.
    dispatched: Uuid,
    /// What the outlier tracker made of it (an ejection, a probe's success restoring a node).
    transition: Transition,
}

/// The attempt that answered, and its answer.
struct Success<'a> {
    attempt: Attempt<'a>,
    output: Value,
}

/// What an execution has produced so far: its record (appended once, at the end), the outlier
/// tracker's decisions to record after it, and the attempts its reply lists.
struct Trail {
    record: Vec<NewEvent>,
    decisions: Vec<(StreamId, NewEvent)>,
    attempts: Vec<AttemptView>,
}

impl Trail {
    /// Notes a failed attempt: in the reply's list, as `AttemptFailed` in the record, and the
    /// tracker's decision it caused. Returns the `AttemptFailed` event id.
    fn failed(
        &mut self,
        attempt: Attempt<'_>,
        failure: Failure,
        detail: String,
        request_id: &RequestId,
        meta: &Metadata,
    ) -> Uuid {
        let role = if attempt.role == Role::Primary {
            "primary"
        } else {
            "backup"
        };
        let outcome = Outcome::from(failure);
        tracing::info!(node_id = %attempt.node, outcome = outcome.as_str(), %detail, "{role} attempt failed");
        self.attempts.push(AttemptView {
            node_id: attempt.node.clone(),
            role: attempt.role,
            outcome,
            latency_ms: attempt.latency_ms,
        });
        let event = new_event(
            DomainEvent::AttemptFailed(AttemptFailed {
                request_id: request_id.clone(),
                node_id: attempt.node.clone(),
                outcome: failure,
                latency_ms: attempt.latency_ms,
                detail,
            }),
            meta.clone().caused_by(attempt.dispatched),
        );
        let id = event.event_id;
        self.record.push(event);
        self.decisions.extend(tracker_decision(
            attempt.node,
            attempt.transition,
            Some(failure),
            id,
            meta,
        ));
        id
    }
}

/// The event recording an outlier-tracker decision about `node`, caused by `cause` (the attempt's
/// `AttemptFailed` or `AttemptSucceeded`), with the stream it belongs to.
fn tracker_decision(
    node: &NodeId,
    transition: Transition,
    failure: Option<Failure>,
    cause: Uuid,
    meta: &Metadata,
) -> Option<(StreamId, NewEvent)> {
    let event = match transition {
        Transition::Ejected { k, until } => DomainEvent::NodeEjected(NodeEjected {
            node_id: node.clone(),
            ejections: k,
            until,
            reason: match failure {
                Some(f) => format!(
                    "consecutive failed attempts, the last one {}",
                    Outcome::from(f).as_str()
                ),
                None => "consecutive failed attempts".to_owned(),
            },
        }),
        Transition::Restored => DomainEvent::NodeRestored(NodeRestored {
            node_id: node.clone(),
        }),
        Transition::None | Transition::KeptLastHealthy => return None,
    };
    Some((
        event.stream_id(),
        new_event(event, meta.clone().caused_by(cause)),
    ))
}

/// Records the execution ending in `[AttemptSucceeded, ExecutionCompleted{charged}]` and answers.
async fn complete(
    s: &Scheduler,
    stream: &StreamId,
    request_id: &RequestId,
    model_id: &ModelId,
    meta: &Metadata,
    mut trail: Trail,
    Success { attempt, output }: Success<'_>,
) -> Answered {
    trail.attempts.push(AttemptView {
        node_id: attempt.node.clone(),
        role: attempt.role,
        outcome: Outcome::Success,
        latency_ms: attempt.latency_ms,
    });
    let succeeded = new_event(
        DomainEvent::AttemptSucceeded(AttemptSucceeded {
            request_id: request_id.clone(),
            node_id: attempt.node.clone(),
            latency_ms: attempt.latency_ms,
        }),
        meta.clone().caused_by(attempt.dispatched),
    );
    let completed = new_event(
        DomainEvent::ExecutionCompleted(ExecutionCompleted {
            request_id: request_id.clone(),
            model_id: model_id.clone(),
            node_id: attempt.node.clone(),
            attempts: u8::try_from(trail.attempts.len()).unwrap_or(u8::MAX),
            charged: true,
            output: output.clone(),
        }),
        meta.clone().caused_by(succeeded.event_id),
    );
    trail.decisions.extend(tracker_decision(
        attempt.node,
        attempt.transition,
        None,
        succeeded.event_id,
        meta,
    ));
    trail.record.push(succeeded);
    trail.record.push(completed);
    let reply = success_reply(request_id, attempt.node, output, &trail.attempts);
    s.record(stream, request_id, trail.record, trail.decisions, reply)
        .await
}
