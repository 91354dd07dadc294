//! The traffic generator of `deepnode up`: sends `cmd.exec` at a steady rate with unique request ids
//! (`up-<run>-<n>`), round-robin over the deployed models, at most `concurrency` in flight (a tick
//! that finds them all busy is counted as shed, not queued), and classifies every answer into
//! [`Stats`]: served by the primary, served by the backup (a fallback), failed and not charged
//! (`all_replicas_failed`), another error code, or no answer at all.
//!
//! It does not retry: a retry would hide exactly what the demo is meant to show.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepnode_bus::async_nats::Client;
use deepnode_bus::rpc;
use deepnode_runtime::Shutdown;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Counters of one run, shared between the generator and the view.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Requests sent.
    pub sent: u64,
    /// Answered `ok` (charged), by whichever replica.
    pub succeeded: u64,
    /// Of those, served by the backup after the primary failed.
    pub fallbacks: u64,
    /// Answered `all_replicas_failed` with `charged: false`.
    pub not_charged: u64,
    /// Answered another error, by code.
    pub other_errors: BTreeMap<String, u64>,
    /// No answer (bus timeout or no responders).
    pub unanswered: u64,
    /// Ticks skipped because `concurrency` requests were already in flight.
    pub shed: u64,
    /// Round-trip latency of every answer, in microseconds.
    pub latency: Histogram<u64>,
}

impl Stats {
    fn new() -> anyhow::Result<Stats> {
        Ok(Stats {
            sent: 0,
            succeeded: 0,
            fallbacks: 0,
            not_charged: 0,
            other_errors: BTreeMap::new(),
            unanswered: 0,
            shed: 0,
            // 1 µs .. 10 min, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 600_000_000, 3)
                .map_err(|e| anyhow::anyhow!("creating the latency histogram: {e}"))?,
        })
    }

    /// Answers received, of any kind.
    pub fn answered(&self) -> u64 {
        self.succeeded + self.not_charged + self.other_errors.values().sum::<u64>()
    }

    /// Other errors as `code n, code n`.
    pub fn other_errors_text(&self) -> String {
        if self.other_errors.is_empty() {
            return "none".to_owned();
        }
        self.other_errors
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A latency quantile in milliseconds (0 when nothing was recorded).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latency.is_empty() {
            0.0
        } else {
            self.latency.value_at_quantile(q) as f64 / 1000.0
        }
    }
}

/// Shared, lockable stats. The lock is held only to bump counters.
pub type SharedStats = Arc<Mutex<Stats>>;

/// Fresh shared stats.
pub fn shared() -> anyhow::Result<SharedStats> {
    Ok(Arc::new(Mutex::new(Stats::new()?)))
}

/// A copy of the stats now.
pub fn snapshot(stats: &SharedStats) -> Stats {
    match stats.lock() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn update(stats: &SharedStats, f: impl FnOnce(&mut Stats)) {
    match stats.lock() {
        Ok(mut guard) => f(&mut guard),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    }
}

/// What the generator sends.
pub struct Plan {
    /// The `cmd.exec` subject.
    pub subject: String,
    /// Models to spread requests over.
    pub models: Vec<String>,
    /// Request ids are `<id_prefix>-<n>`.
    pub id_prefix: String,
    /// Requests per second.
    pub rate: u32,
    /// Most in flight.
    pub concurrency: u32,
    /// Per-attempt timeout sent with each request.
    pub timeout_ms: u64,
}

/// Sends requests until `stop` fires, then waits (bounded) for those in flight.
pub async fn drive(client: Client, plan: Plan, stats: SharedStats, stop: Shutdown) {
    if plan.models.is_empty() {
        stop.cancelled().await;
        return;
    }
    let permits = Arc::new(Semaphore::new(plan.concurrency as usize));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut issued: u64 = 0;
    // Both attempts may time out, plus the scheduler's recording; the bus timeout is above that.
    let answer_within = Duration::from_millis(plan.timeout_ms.saturating_mul(2) + 10_000);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let due = (started.elapsed().as_secs_f64() * f64::from(plan.rate)) as u64;
        while issued < due {
            issued += 1;
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                update(&stats, |s| s.shed += 1);
                continue;
            };
            let index = usize::try_from(issued).unwrap_or(0) % plan.models.len();
            let body = json!({
                "request_id": format!("{}-{issued:07}", plan.id_prefix),
                "model_id": plan.models[index],
                "input": {"prompt": format!("demo request {issued}")},
                "timeout_ms": plan.timeout_ms,
            });
            update(&stats, |s| s.sent += 1);
            let (client, subject, stats) = (client.clone(), plan.subject.clone(), stats.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let sent_at = Instant::now();
                let reply = rpc::request_json(&client, &subject, &body, answer_within).await;
                let micros = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                update(&stats, |s| record(s, reply.ok(), micros));
            });
        }
    }
    // Let the requests in flight finish (bounded), so the summary counts every one.
    let _ = tokio::time::timeout(answer_within, permits.acquire_many(plan.concurrency)).await;
}

/// Files one answer (or its absence) into the stats.
fn record(s: &mut Stats, reply: Option<Value>, micros: u64) {
    let Some(reply) = reply else {
        s.unanswered += 1;
        return;
    };
    let _ = s.latency.record(micros.max(1));
    if reply.get("ok").and_then(Value::as_bool) == Some(true) {
        s.succeeded += 1;
        let by_backup = reply
            .get("attempts")
            .and_then(Value::as_array)
            .and_then(|a| a.last())
            .and_then(|a| a.get("role"))
            .and_then(Value::as_str)
            == Some("backup");
        if by_backup {
            s.fallbacks += 1;
        }
        return;
    }
    let code = reply
        .pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or("malformed_reply")
        .to_owned();
    let charged = reply.get("charged").and_then(Value::as_bool);
    if code == "all_replicas_failed" && charged == Some(false) {
        s.not_charged += 1;
    } else {
        *s.other_errors.entry(code).or_default() += 1;
    }
}
