//! `cmd.exec`: one inference request with failover, recorded before it is answered.
//!
//! The execution's rules — which events record it, which outlier-tracker decisions follow, what the
//! caller is answered — are the pure `deepnode_domain::execution`; this module carries out its steps:
//! it admits and routes the request, asks the nodes, judges their answers, consults the retry budget
//! and the outlier tracker, appends the record and replies.
//!
//! The whole execution is recorded by **one** append to stream `exec-<request_id>`, with `NoStream`,
//! once its outcome is known and before the reply. One durable commit per request is what keeps the
//! scheduler's added latency near one WAL flush; the events keep the times and decision inputs of
//! the moments they describe, so the record is the same as if written step by step.
//!
//! A repeated `request_id` is answered from the log: the primary is asked while the log is checked
//! for the stream (the check overlaps the node's work); a recorded one aborts the attempt and is
//! replayed. Two copies racing on the same new id both ask a node, but only the first append lands;
//! the other gets `Conflict` and answers with what was recorded, so a request is charged once. A
//! scheduler that dies mid-request has recorded nothing: a retry with the same id runs it afresh.
//! (Streams recorded step by step by earlier versions may end without an outcome; `sweep` closes
//! those.) `ExecutionCompleted` carries the node's `output` and `ExecutionFailed` the reply's
//! `message`, so a repeat is answered with the original answer byte for byte, by any copy.

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;
use deepnode_bus::envelope::{parse_command, ErrorBody, ErrorCode, Reply};
use deepnode_bus::rpc::{Request, CORRELATION_HEADER};
use deepnode_domain::ejection::Transition;
use deepnode_domain::events::{DomainEvent, Failure, Metadata, Outcome};
use deepnode_domain::execution::{
    judge, Classified, Dispatch, EndCode, Ending, Execution, Next, Request as ExecRequest, Settled,
    Stamps, Transport, Verdict,
};
use deepnode_domain::ids::{ModelId, RequestId};
use deepnode_domain::log::{ExpectedVersion, NewEvent, StreamId};
use deepnode_store::{Error as StoreError, Prepared};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::{JoinError, JoinHandle};
use tracing::Instrument;
use uuid::Uuid;

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

/// The result of one dispatched attempt: its judged answer and latency.
type AttemptResult = (Classified, u64);

/// The scheduler's event ids and times: fresh ones.
struct Fresh;

impl Stamps for Fresh {
    fn id(&mut self) -> Uuid {
        Uuid::new_v4()
    }

    fn now(&mut self) -> chrono::DateTime<Utc> {
        Utc::now()
    }
}

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

/// The reply to a store failure: the one mapping every service uses
/// ([`deepnode_runtime::store_error`]).
fn store_failure(e: &StoreError) -> Reply {
    Reply::err(deepnode_runtime::store_error(e))
}

/// The reply stating `verdict` (CONTRACT §3). A recorded one is final — a repeat returns this very
/// answer — so an uncharged one says `retryable: false`; an unrecorded one may be sent again.
fn reply(verdict: Verdict) -> Reply {
    match verdict {
        Verdict::Charged {
            request_id,
            node_id,
            output,
            attempts,
        } => Reply::ok(&json!({
            "request_id": request_id,
            "output": output,
            "node_id": node_id,
            "charged": true,
            "attempts": attempts,
        })),
        Verdict::NotCharged {
            request_id,
            code,
            message,
            attempts,
        } => Reply::err_with(
            ErrorBody::new(error_code(code), message),
            &json!({"request_id": request_id, "charged": false, "attempts": attempts, "retryable": false}),
        ),
        Verdict::Unrecorded { message } => {
            Reply::err(ErrorBody::new(ErrorCode::Unavailable, message))
        }
    }
}

/// The reply code of an uncharged execution's end.
fn error_code(code: EndCode) -> ErrorCode {
    match code {
        EndCode::AllReplicasFailed => ErrorCode::AllReplicasFailed,
        EndCode::Unavailable => ErrorCode::Unavailable,
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
        self.live.start_probe_if_due(node, self.options.clock.now());
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

    /// Settles a finished attempt to `node` (a replica of `model`; `joined` is how its task ended):
    /// counts it and feeds its outcome to the outlier tracker, whose verdict the settled attempt
    /// carries (an ejection or a restoration is recorded once the execution is). A last healthy
    /// replica kept despite its failures asks for an emergency round.
    async fn settle_attempt(
        &self,
        Dispatch { node, role }: &Dispatch,
        model: &ModelId,
        joined: Result<AttemptResult, JoinError>,
    ) -> Settled {
        let (outcome, latency_ms) = joined.unwrap_or_else(|e| {
            let detail = format!("attempt task failed: {e}");
            (Classified::Failed(Failure::Error, detail), 0)
        });
        let failure = match &outcome {
            Classified::Success(_) => None,
            Classified::Failed(f, detail) => {
                let outcome = Outcome::from(*f).as_str();
                tracing::info!(node_id = %node, outcome, %detail, ?role, "attempt failed");
                Some(*f)
            }
            Classified::Unjudged(detail) => {
                tracing::warn!(node_id = %node, %detail, "attempt not held against the node");
                metrics::counter!("deepnode_exec_attempts_total", "node_id" => node.to_string(), "outcome" => "unjudged")
                    .increment(1);
                return Settled {
                    outcome,
                    latency_ms,
                    transition: Transition::None,
                };
            }
        };
        metrics::counter!(
            "deepnode_exec_attempts_total",
            "node_id" => node.to_string(),
            "outcome" => failure.map_or(Outcome::Success, Outcome::from).as_str(),
        )
        .increment(1);
        let transition = {
            let book = self.book.read();
            self.live
                .record_outcome(node, failure, self.options.clock.now(), &book)
        };
        if transition == Transition::KeptLastHealthy && self.has_ineligible_replica(model) {
            self.ask_for_replacement(model, "the last healthy replica keeps failing")
                .await;
        }
        Settled {
            outcome,
            latency_ms,
            transition,
        }
    }

    /// The answer recorded for `request_id` when it was executed before (or is being executed: see
    /// [`Scheduler::recorded_answer`]), `None` for a new request id.
    async fn recorded(
        &self,
        stream: &StreamId,
        request_id: &RequestId,
    ) -> Result<Option<Answered>, StoreError> {
        if !self.ctx.store.stream_exists(stream).await? {
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

    /// Carries out an execution's `ending`: records it with one `NoStream` append and answers with
    /// its verdict, or with the recorded answer when another copy recorded this request id first. An
    /// unrecorded verdict is answered as it is. Transient failures are retried with the same event
    /// ids: an append that did land is then reported as a duplicate, not a conflict.
    async fn finish(&self, stream: &StreamId, request_id: &RequestId, ending: Ending) -> Answered {
        let Ending {
            record,
            decisions,
            verdict,
        } = ending;
        if record.is_empty() {
            return reply(verdict).into();
        }
        let record = match Prepared::new(record) {
            Ok(record) => record,
            Err(e) => return store_failure(&e).into(),
        };
        // A transient failure (the connection dropped, the pool timed out) is retried twice, 50 ms
        // then 200 ms later; the same event ids make a retry of an append that did land a duplicate.
        let appended = (|| {
            self.ctx
                .store
                .append_prepared(stream, ExpectedVersion::NoStream, record.clone())
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
                let reply = reply(verdict);
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
            if let Some(reply) = Verdict::from_log(&events).map(reply) {
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
    let request = ExecRequest {
        request_id,
        model_id,
        timeout_ms,
    };
    let stream = request.stream();
    let (request_id, model_id) = (&request.request_id, &request.model_id);
    // Waiting for a slot takes at most the attempt timeout; the attempts then get theirs in full.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    let (decision, slot_1) = match s
        .admit(model_id, request_id, caller.as_deref(), priority, deadline)
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
            if let Ok(Some(answer)) = s.recorded(&stream, request_id).await {
                return answer;
            }
            return refusal.into();
        }
    };
    if decision.emergency_replacement {
        s.ask_for_replacement(model_id, "no healthy replica left")
            .await;
    }
    let timeout = Duration::from_millis(timeout_ms);
    let body = Bytes::from(
        json!({"request_id": request_id, "model_id": model_id, "input": input}).to_string(),
    );
    drop(input);
    s.live.count_request();
    let (request_id, model_id) = (request_id.clone(), model_id.clone());
    let meta = Metadata::new(s.ctx.producer.clone(), correlation_id.clone());
    let (execution, primary) = Execution::start(request, &decision, meta, Fresh);

    // Attempt 1. A repeated request id needs no read of the log to be found: its record conflicts
    // (the stream must not exist) and the recorded answer is returned. The log is read first only
    // when the node is slow to answer, so a repeat is answered without waiting for it (and before
    // a retry, below).
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
    let settled_1 = s.settle_attempt(&primary, &model_id, joined_1).await;
    let next = execution.settle(settled_1);
    // A repeat is not retried (nor failed again): it has its recorded answer.
    if !checked && !next.succeeded() {
        if let Some(answer) = s.answer_if_recorded(&stream, &request_id).await {
            return answer;
        }
    }
    let ending = match next {
        Next::Done(ending) => ending,
        // Attempt 2: the other replica, if the retry budget allows.
        Next::Backup(failover) if !s.live.try_retry(s.options.clock.instant()) => {
            failover.stop("retry budget exhausted, backup not tried")
        }
        Next::Backup(failover) => {
            metrics::counter!("deepnode_exec_fallbacks_total").increment(1);
            let (retry, backup) = failover.retry();
            let slot_2 = s.live.begin(&backup.node);
            let joined_2 = s
                .spawn_attempt(slot_2, body, &correlation_id, timeout)
                .await;
            retry.settle(s.settle_attempt(&backup, &model_id, joined_2).await)
        }
    };
    s.finish(&stream, &request_id, ending).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_is_recorded_with_the_code_it_is_answered_with() {
        for code in [EndCode::AllReplicasFailed, EndCode::Unavailable] {
            assert_eq!(code.as_str(), error_code(code).as_str());
        }
    }
}
