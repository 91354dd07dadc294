//! One execution's rules (CONTRACT §3): given how each attempt ended, which events record the
//! execution, which outlier-tracker decisions follow it, and what the caller is answered.
//!
//! The scheduler carries out the steps — it routes, asks the nodes, consults its retry budget and
//! its outlier tracker, appends the record and replies — and this module decides everything else:
//!
//! ```text
//! Execution::start ──► Dispatch(primary) ──► settle ─┬─► Next::Done(Ending)        success, no replica left, unjudged
//!                                                    └─► Next::Backup(Failover) ─┬─► stop(why) ─► Ending   budget refused
//!                                                                                └─► retry ─► Dispatch(backup) ─► settle ─► Ending
//! ```
//!
//! An [`Ending`] is the whole record — `[ExecutionRequested, AttemptDispatched, …,
//! ExecutionCompleted | ExecutionFailed]`, appended by one `NoStream` append — the tracker's
//! decisions (`NodeEjected`, `NodeRestored`, each on its node's stream, caused by the attempt's
//! outcome event) and the [`Verdict`]. [`Verdict::from_log`] rebuilds the same verdict from a
//! recorded stream, which is how a repeated request id gets the original answer.
//!
//! Pure: event ids and times come from a [`Stamps`], so a test (or a replay) gets the same events
//! bit for bit.

pub mod classify;

pub use classify::{classify, judge, Bus, Classified, Transport};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::ejection::Transition;
use crate::events::{
    AttemptDispatched, AttemptFailed, AttemptSucceeded, DomainEvent, ExecutionCompleted,
    ExecutionFailed, ExecutionRequested, Failure, Metadata, NodeEjected, NodeRestored, Outcome,
    Role,
};
use crate::ids::{ModelId, NodeId, RequestId};
use crate::log::{NewEvent, RecordedEvent, StreamId};
use crate::scoring::RouteDecision;

/// Where an execution's event ids and times come from: fresh ones in the scheduler, fixed ones in
/// a test.
pub trait Stamps {
    /// A new event id.
    fn id(&mut self) -> Uuid;
    /// The time of the event being built.
    fn now(&mut self) -> DateTime<Utc>;
}

/// A valid `cmd.exec` request, as the record's `ExecutionRequested` states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub request_id: RequestId,
    pub model_id: ModelId,
    pub timeout_ms: u64,
}

impl Request {
    fn event(&self) -> DomainEvent {
        DomainEvent::ExecutionRequested(ExecutionRequested {
            request_id: self.request_id.clone(),
            model_id: self.model_id.clone(),
            timeout_ms: self.timeout_ms,
        })
    }

    /// The execution's stream, `exec-<request_id>`.
    pub fn stream(&self) -> StreamId {
        DomainEvent::execution_stream(&self.request_id)
    }
}

/// An attempt to send to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub node: NodeId,
    pub role: Role,
}

/// How a dispatched attempt ended: the judged answer, how long it took, and what the outlier
/// tracker made of it ([`Transition::None`] for an attempt it was not told about).
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    pub outcome: Classified,
    pub latency_ms: u64,
    pub transition: Transition,
}

/// One settled attempt as the reply lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptView {
    pub node_id: NodeId,
    pub role: Role,
    pub outcome: Outcome,
    pub latency_ms: u64,
}

/// The error code of an execution that ended uncharged (the reply's and `ExecutionFailed.error_code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCode {
    /// Every replica tried failed (or no other one could be tried).
    AllReplicasFailed,
    /// The last attempt was lost to our own bus (or, in older logs, the scheduler stopped).
    Unavailable,
}

impl EndCode {
    /// The code as recorded and replied (`all_replicas_failed`, `unavailable`).
    pub fn as_str(self) -> &'static str {
        match self {
            EndCode::AllReplicasFailed => "all_replicas_failed",
            EndCode::Unavailable => "unavailable",
        }
    }

    /// A recorded code; anything but `unavailable` reads as `all_replicas_failed`.
    fn parse(recorded: &str) -> EndCode {
        if recorded == EndCode::Unavailable.as_str() {
            EndCode::Unavailable
        } else {
            EndCode::AllReplicasFailed
        }
    }
}

/// What the caller is answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A node answered: charged once, with its output.
    Charged {
        request_id: RequestId,
        node_id: NodeId,
        output: Value,
        attempts: Vec<AttemptView>,
    },
    /// No replica served it: not charged, final (a repeat returns this very answer).
    NotCharged {
        request_id: RequestId,
        code: EndCode,
        message: String,
        attempts: Vec<AttemptView>,
    },
    /// Nothing is known — the primary's attempt could not be judged — so nothing is recorded and
    /// sending the request again runs it.
    Unrecorded { message: String },
}

impl Verdict {
    /// Rebuilds the verdict of a finished execution from its recorded stream; `None` while it is in
    /// flight (or for a stream that is not an execution).
    pub fn from_log(events: &[RecordedEvent]) -> Option<Verdict> {
        type Logged = (NodeId, Role, Option<(Outcome, u64)>);
        fn settle(attempts: &mut [Logged], node: &NodeId, outcome: Outcome, latency_ms: u64) {
            if let Some(slot) = attempts
                .iter_mut()
                .find(|(n, _, done)| n == node && done.is_none())
            {
                slot.2 = Some((outcome, latency_ms));
            }
        }
        let mut attempts: Vec<Logged> = Vec::new();
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
        let attempts: Vec<AttemptView> = attempts
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
        match end {
            DomainEvent::ExecutionCompleted(c) => Some(Verdict::Charged {
                request_id: c.request_id,
                node_id: c.node_id,
                output: c.output,
                attempts,
            }),
            DomainEvent::ExecutionFailed(f) => Some(Verdict::NotCharged {
                request_id: f.request_id,
                code: EndCode::parse(&f.error_code),
                message: f
                    .message
                    .unwrap_or_else(|| failure_message(&attempts, None)),
                attempts,
            }),
            _ => None,
        }
    }
}

/// How an execution ends: its record, the tracker's decisions to record after it, and the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    /// Every event of the execution, for one append to its stream that must create it; empty for a
    /// [`Verdict::Unrecorded`].
    pub record: Vec<NewEvent>,
    /// `NodeEjected` / `NodeRestored`, each with its node's stream, to append once the record is in.
    pub decisions: Vec<(StreamId, NewEvent)>,
    pub verdict: Verdict,
}

/// What follows the primary's attempt.
#[derive(Debug)]
pub enum Next<S> {
    /// The execution is over.
    Done(Ending),
    /// The primary failed and another replica exists: [`Failover::retry`] it when the retry budget
    /// allows, else [`Failover::stop`].
    Backup(Failover<S>),
}

impl<S> Next<S> {
    /// Whether the primary answered (the execution is charged).
    pub fn succeeded(&self) -> bool {
        matches!(
            self,
            Next::Done(Ending {
                verdict: Verdict::Charged { .. },
                ..
            })
        )
    }
}

/// An execution whose primary attempt is in flight.
#[derive(Debug)]
pub struct Execution<S> {
    trail: Trail<S>,
    backup: Option<NodeId>,
}

/// An execution whose primary failed, with a backup that may be tried.
#[derive(Debug)]
pub struct Failover<S> {
    trail: Trail<S>,
    backup: NodeId,
    /// The primary's `AttemptFailed`.
    cause: Uuid,
}

/// An execution whose backup attempt is in flight.
#[derive(Debug)]
pub struct Retry<S> {
    trail: Trail<S>,
}

impl<S: Stamps> Execution<S> {
    /// Starts the execution `decision` routed: `ExecutionRequested` and the primary's
    /// `AttemptDispatched` (carrying the decision's record), and the primary to ask.
    pub fn start(
        request: Request,
        decision: &RouteDecision,
        meta: Metadata,
        stamps: S,
    ) -> (Execution<S>, Dispatch) {
        let mut trail = Trail {
            stamps,
            meta,
            decision: Box::new(decision.clone()),
            record: Vec::with_capacity(4),
            decisions: Vec::new(),
            attempts: Vec::with_capacity(2),
            in_flight: None,
            request,
        };
        let requested = trail.push(trail.request.event(), None);
        let primary = decision.primary.clone();
        let dispatch = trail.dispatch(primary, Role::Primary, requested);
        let backup = decision.backup.clone().filter(|b| *b != dispatch.node);
        (Execution { trail, backup }, dispatch)
    }

    /// The primary's attempt ended.
    pub fn settle(mut self, settled: Settled) -> Next<S> {
        let Settled {
            outcome,
            latency_ms,
            transition,
        } = settled;
        match outcome {
            Classified::Success(output) => {
                Next::Done(self.trail.complete(latency_ms, transition, output))
            }
            Classified::Failed(failure, detail) => {
                let cause = self.trail.failed(latency_ms, transition, failure, detail);
                match self.backup {
                    Some(backup) => Next::Backup(Failover {
                        trail: self.trail,
                        backup,
                        cause,
                    }),
                    None => {
                        let why = Some("no other replica to retry on");
                        Next::Done(self.trail.end(EndCode::AllReplicasFailed, why, cause))
                    }
                }
            }
            Classified::Unjudged(detail) => {
                let (primary, _, _) = self.trail.settling();
                let message = format!(
                    "the primary {primary} could not be judged ({detail}); nothing was recorded or \
                     charged and the node is not held responsible; send the request again"
                );
                Next::Done(Ending {
                    record: Vec::new(),
                    decisions: Vec::new(),
                    verdict: Verdict::Unrecorded { message },
                })
            }
        }
    }
}

impl<S: Stamps> Failover<S> {
    /// The replica a retry would ask.
    pub fn backup(&self) -> &NodeId {
        &self.backup
    }

    /// Tries the backup: its `AttemptDispatched`, caused by the primary's failure.
    pub fn retry(mut self) -> (Retry<S>, Dispatch) {
        let dispatch = self.trail.dispatch(self.backup, Role::Backup, self.cause);
        (Retry { trail: self.trail }, dispatch)
    }

    /// Ends without trying the backup, saying why (e.g. the retry budget is spent).
    pub fn stop(self, why: &str) -> Ending {
        self.trail
            .end(EndCode::AllReplicasFailed, Some(why), self.cause)
    }
}

impl<S: Stamps> Retry<S> {
    /// The backup's attempt ended: the execution is over.
    pub fn settle(mut self, settled: Settled) -> Ending {
        let Settled {
            outcome,
            latency_ms,
            transition,
        } = settled;
        match outcome {
            Classified::Success(output) => self.trail.complete(latency_ms, transition, output),
            Classified::Failed(failure, detail) => {
                let cause = self.trail.failed(latency_ms, transition, failure, detail);
                self.trail.end(EndCode::AllReplicasFailed, None, cause)
            }
            Classified::Unjudged(detail) => {
                // The primary's failure stands; the backup's attempt stays unsettled.
                let (backup, _, dispatched) = self.trail.settling();
                let why = format!(
                    "the backup {backup} could not be judged ({detail}) and is not held responsible"
                );
                self.trail.end(EndCode::Unavailable, Some(&why), dispatched)
            }
        }
    }
}

/// What an execution has produced so far.
#[derive(Debug)]
struct Trail<S> {
    stamps: S,
    meta: Metadata,
    request: Request,
    /// The routing decision, recorded by every `AttemptDispatched`.
    decision: Box<RouteDecision>,
    record: Vec<NewEvent>,
    decisions: Vec<(StreamId, NewEvent)>,
    attempts: Vec<AttemptView>,
    /// The attempt in flight: its node, role and `AttemptDispatched` event id.
    in_flight: Option<(NodeId, Role, Uuid)>,
}

impl<S: Stamps> Trail<S> {
    /// Builds `event` (caused by `cause`) and adds it to the record; returns its id.
    fn push(&mut self, event: DomainEvent, cause: Option<Uuid>) -> Uuid {
        let event = self.stamp(event, cause);
        let id = event.event_id;
        self.record.push(event);
        id
    }

    fn stamp(&mut self, event: DomainEvent, cause: Option<Uuid>) -> NewEvent {
        let meta = match cause {
            Some(cause) => self.meta.clone().caused_by(cause),
            None => self.meta.clone(),
        };
        let (id, at) = (self.stamps.id(), self.stamps.now());
        event.to_new_event(id, meta, at)
    }

    fn dispatch(&mut self, node: NodeId, role: Role, cause: Uuid) -> Dispatch {
        let attempt = match role {
            Role::Primary => 1,
            Role::Backup => 2,
        };
        let event = DomainEvent::AttemptDispatched(AttemptDispatched {
            request_id: self.request.request_id.clone(),
            model_id: self.request.model_id.clone(),
            node_id: node.clone(),
            role,
            attempt,
            decision: self.decision.clone(),
        });
        let id = self.push(event, Some(cause));
        self.in_flight = Some((node.clone(), role, id));
        Dispatch { node, role }
    }

    /// The attempt in flight, now ending.
    fn settling(&self) -> (NodeId, Role, Uuid) {
        self.in_flight
            .clone()
            .expect("an attempt is settled only after it was dispatched")
    }

    fn settle(&mut self, outcome: Outcome, latency_ms: u64) -> (NodeId, Uuid) {
        let (node_id, role, dispatched) = self.settling();
        self.in_flight = None;
        self.attempts.push(AttemptView {
            node_id: node_id.clone(),
            role,
            outcome,
            latency_ms,
        });
        (node_id, dispatched)
    }

    /// Records a failed attempt and the tracker's decision it caused; returns its `AttemptFailed` id.
    fn failed(
        &mut self,
        latency_ms: u64,
        transition: Transition,
        failure: Failure,
        detail: String,
    ) -> Uuid {
        let (node_id, dispatched) = self.settle(failure.into(), latency_ms);
        let event = DomainEvent::AttemptFailed(AttemptFailed {
            request_id: self.request.request_id.clone(),
            node_id: node_id.clone(),
            outcome: failure,
            latency_ms,
            detail,
        });
        let id = self.push(event, Some(dispatched));
        self.tracker_decision(&node_id, transition, Some(failure), id);
        id
    }

    /// `[AttemptSucceeded, ExecutionCompleted{charged}]`: the execution is charged.
    fn complete(mut self, latency_ms: u64, transition: Transition, output: Value) -> Ending {
        let (node_id, dispatched) = self.settle(Outcome::Success, latency_ms);
        let succeeded = DomainEvent::AttemptSucceeded(AttemptSucceeded {
            request_id: self.request.request_id.clone(),
            node_id: node_id.clone(),
            latency_ms,
        });
        let succeeded = self.push(succeeded, Some(dispatched));
        let completed = DomainEvent::ExecutionCompleted(ExecutionCompleted {
            request_id: self.request.request_id.clone(),
            model_id: self.request.model_id.clone(),
            node_id: node_id.clone(),
            attempts: self.attempt_count(),
            charged: true,
            output: output.clone(),
        });
        self.push(completed, Some(succeeded));
        self.tracker_decision(&node_id, transition, None, succeeded);
        Ending {
            record: self.record,
            decisions: self.decisions,
            verdict: Verdict::Charged {
                request_id: self.request.request_id,
                node_id,
                output,
                attempts: self.attempts,
            },
        }
    }

    /// `ExecutionFailed` (not charged) with `code`, caused by `cause`; `why` says why no further
    /// replica was tried or judged (`None`: none was left to try).
    fn end(mut self, code: EndCode, why: Option<&str>, cause: Uuid) -> Ending {
        let message = failure_message(&self.attempts, why);
        let failed = DomainEvent::ExecutionFailed(ExecutionFailed {
            request_id: self.request.request_id.clone(),
            model_id: self.request.model_id.clone(),
            attempts: self.attempt_count(),
            charged: false,
            error_code: code.as_str().to_owned(),
            message: Some(message.clone()),
            abandoned: false,
        });
        self.push(failed, Some(cause));
        Ending {
            record: self.record,
            decisions: self.decisions,
            verdict: Verdict::NotCharged {
                request_id: self.request.request_id,
                code,
                message,
                attempts: self.attempts,
            },
        }
    }

    fn attempt_count(&self) -> u8 {
        u8::try_from(self.attempts.len()).expect("an execution makes at most two attempts")
    }

    /// The event recording the tracker's decision about `node`, caused by the attempt's outcome.
    fn tracker_decision(
        &mut self,
        node: &NodeId,
        transition: Transition,
        failure: Option<Failure>,
        cause: Uuid,
    ) {
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
            Transition::None | Transition::KeptLastHealthy => return,
        };
        let stream = event.stream_id();
        let event = self.stamp(event, Some(cause));
        self.decisions.push((stream, event));
    }
}

/// The message of an uncharged execution: each attempt and its outcome, and why it ended there.
fn failure_message(attempts: &[AttemptView], why_no_retry: Option<&str>) -> String {
    let list: Vec<String> = attempts
        .iter()
        .map(|a| {
            let role = match a.role {
                Role::Primary => "primary",
                Role::Backup => "backup",
            };
            format!("{role} {} {}", a.node_id, a.outcome.as_str())
        })
        .collect();
    match why_no_retry {
        Some(why) => format!("{}; {why}; not charged", list.join(", ")),
        None => format!("every replica failed ({}); not charged", list.join(", ")),
    }
}

#[cfg(test)]
mod tests;
