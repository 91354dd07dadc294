//! One simulated node at run time: its seeded RNG, its counters, the loop answering its infer
//! subject, and its heartbeat loop. Not public: the crate root exposes only [`Counters`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::{Client, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::behaviour::{InvalidKind, Plan};
use crate::SimNode;

/// What one node has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Infer requests received.
    pub requests: u64,
    /// Valid answers sent (an answer sent twice counts once).
    pub ok: u64,
    /// Error answers sent (including answers to requests it could not parse).
    pub errors: u64,
    /// Requests deliberately left unanswered.
    pub timeouts: u64,
    /// Invalid answers sent.
    pub invalid: u64,
    /// Valid answers deliberately sent late.
    pub late: u64,
    /// Extra copies sent by `answers_twice`.
    pub duplicates: u64,
    /// Heartbeats published.
    pub heartbeats: u64,
}

impl std::ops::Add for Counters {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            requests: self.requests + o.requests,
            ok: self.ok + o.ok,
            errors: self.errors + o.errors,
            timeouts: self.timeouts + o.timeouts,
            invalid: self.invalid + o.invalid,
            late: self.late + o.late,
            duplicates: self.duplicates + o.duplicates,
            heartbeats: self.heartbeats + o.heartbeats,
        }
    }
}

#[derive(Default)]
struct AtomicCounters {
    requests: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    invalid: AtomicU64,
    late: AtomicU64,
    duplicates: AtomicU64,
    heartbeats: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) struct NodeState {
    node: SimNode,
    rng: Mutex<StdRng>,
    in_flight: AtomicU64,
    counters: AtomicCounters,
}

/// FNV-1a, a stable hash for seeds and output digests (std's hasher is not stable across runs).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl NodeState {
    pub(crate) fn new(node: SimNode, seed: u64, index: usize) -> Self {
        let node_seed = seed ^ fnv1a(node.node_id.as_str().as_bytes()) ^ index as u64;
        Self {
            node,
            rng: Mutex::new(StdRng::seed_from_u64(node_seed)),
            in_flight: AtomicU64::new(0),
            counters: AtomicCounters::default(),
        }
    }

    pub(crate) fn counters(&self) -> Counters {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            requests: get(&c.requests),
            ok: get(&c.ok),
            errors: get(&c.errors),
            timeouts: get(&c.timeouts),
            invalid: get(&c.invalid),
            late: get(&c.late),
            duplicates: get(&c.duplicates),
            heartbeats: get(&c.heartbeats),
        }
    }

    /// Decides the plan and the delay for one request, under the RNG lock (never held across
    /// an await).
    fn decide(&self) -> (Option<Plan>, Duration) {
        let mut rng = self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let plan = self.node.behaviour.plan(&mut *rng);
        let delay = self.node.behaviour.latency.sample(&mut *rng);
        (plan, delay)
    }
}

/// The infer request (CONTRACT §3). Lenient on purpose: a node is not the one validating ids.
#[derive(Debug, Deserialize)]
struct InferRequest {
    #[allow(dead_code)]
    request_id: String,
    model_id: String,
    #[serde(default)]
    input: Value,
}

/// The valid answer for an input: identical on every node, so a backup gives the same output.
pub(crate) fn output_for(model_id: &str, input: &Value) -> Value {
    // serde_json's map is ordered (no preserve_order feature), so this text is canonical.
    let digest = fnv1a(format!("{model_id}\n{input}").as_bytes());
    json!({"output": {"model_id": model_id, "digest": format!("{digest:016x}"), "echo": input}})
}

fn error_answer(message: &str) -> Bytes {
    Bytes::from(json!({"ok": false, "error": {"code": "internal", "message": message}}).to_string())
}

fn invalid_answer(kind: InvalidKind) -> Bytes {
    match kind {
        InvalidKind::NotJson => Bytes::from_static(b"\x00\xffnot json at all"),
        InvalidKind::NotAnObject => Bytes::from_static(b"[\"output\", 42]"),
        InvalidKind::NoOutputField => Bytes::from_static(b"{\"result\": \"forgot the output\"}"),
    }
}

/// Answers the node's infer subject until stopped, then waits up to `grace` for in-flight answers.
pub(crate) async fn serve(
    client: Client,
    mut sub: Subscriber,
    state: std::sync::Arc<NodeState>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut tasks = JoinSet::new();
    loop {
        let msg = tokio::select! {
            // Err means the handle was dropped: stop as well.
            _ = stop.changed() => break,
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        while tasks.try_join_next().is_some() {}
        let client = client.clone();
        let state = state.clone();
        let span = tracing::debug_span!("sim_infer", node = %state.node.node_id);
        tasks.spawn(async move { answer(&client, &state, msg).await }.instrument(span));
    }
    if let Err(e) = sub.unsubscribe().await {
        tracing::debug!(error = %e, "unsubscribe failed; the connection is probably gone");
    }
    let finished =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::debug!(node = %state.node.node_id, "stop grace over; dropping in-flight answers");
        tasks.abort_all();
    }
}

async fn answer(client: &Client, state: &NodeState, msg: Message) {
    let c = &state.counters;
    bump(&c.requests);
    let Some(reply_to) = msg.reply else {
        tracing::debug!("infer message without reply subject ignored");
        return;
    };
    let (plan, delay) = state.decide();
    let Some(plan) = plan else {
        bump(&c.timeouts);
        return;
    };
    state.in_flight.fetch_add(1, Ordering::Relaxed);
    let behaviour = &state.node.behaviour;
    let late = matches!(plan, Plan::Valid)
        .then_some(behaviour.answers_late)
        .flatten();
    let delay = delay + late.unwrap_or_default();
    // tokio's timer has millisecond ticks: even a zero sleep waits for the next one, so a node
    // configured to answer instantly must not sleep at all.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (body, copies) = match plan {
        Plan::Valid => match deepnode_bus::parse_command::<InferRequest>(&msg.payload) {
            Ok(req) => {
                bump(&c.ok);
                if late.is_some() {
                    bump(&c.late);
                }
                let copies = if behaviour.answers_twice { 2 } else { 1 };
                let body = Bytes::from(output_for(&req.model_id, &req.input).to_string());
                (body, copies)
            }
            Err(e) => {
                bump(&c.errors);
                (error_answer(&format!("cannot read infer request: {e}")), 1)
            }
        },
        Plan::Error => {
            bump(&c.errors);
            (error_answer("simulated inference failure"), 1)
        }
        Plan::Invalid(kind) => {
            bump(&c.invalid);
            (invalid_answer(kind), 1)
        }
    };
    for copy in 0..copies {
        if copy > 0 {
            bump(&c.duplicates);
        }
        if let Err(e) = client.publish(reply_to.clone(), body.clone()).await {
            tracing::warn!(error = %e, "could not publish infer answer");
        }
    }
    state.in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// Publishes `{"in_flight": n}` on the node's heartbeat subject now and every `interval`.
pub(crate) async fn heartbeat(
    client: Client,
    subject: String,
    state: std::sync::Arc<NodeState>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = ticker.tick() => {
                let in_flight = state.in_flight.load(Ordering::Relaxed);
                let body = Bytes::from(json!({"in_flight": in_flight}).to_string());
                match client.publish(subject.clone(), body).await {
                    Ok(()) => bump(&state.counters.heartbeats),
                    Err(e) => tracing::warn!(%subject, error = %e, "could not publish heartbeat"),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn output_depends_only_on_model_and_input() {
        let a = output_for("m1", &json!({"x": 1, "y": [2]}));
        let b = output_for("m1", &json!({"y": [2], "x": 1}));
        assert_eq!(a, b);
        assert_ne!(a, output_for("m2", &json!({"x": 1, "y": [2]})));
        assert!(a["output"]["digest"].as_str().unwrap().len() == 16);
    }
}
