//! The requests waiting for a slot, per model, in the order they may take one: `critical` before
//! `standard`; within a class, callers take turns, then earliest deadline, then arrival. Only a
//! model's first waiter routes when a slot frees; when it leaves the queue (admitted, or out of
//! time) the next one is woken to look. A new request does not pass those already waiting (it joins
//! the queue). `sheddable` requests never wait: when their model is full they are refused at once,
//! the first to go under contention.
//!
//! **Fairness: callers take turns (start-time fair queueing).** A caller is the connection a
//! request came on (its reply inbox, [`deepnode_bus::rpc::Request::caller`]). Each waiting request
//! gets a round: one past the later of the round last started and its caller's previous waiting
//! request's round. So a caller's k-th waiting request is in the k-th round from now, rounds start
//! in order, and within a round the earliest deadline goes first: a caller that sends a thousand
//! requests at once gets one start per round like everyone else, however early its deadlines.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use deepnode_domain::ids::ModelId;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How a request ranks under contention (CONTRACT §3 `priority`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Starts first.
    Critical,
    /// The default.
    #[default]
    Standard,
    /// Never waits for a slot: refused first.
    Sheddable,
}

impl Priority {
    /// The wire name (metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Standard => "standard",
            Priority::Sheddable => "sheddable",
        }
    }
}

/// A waiting request's rank: priority, then round, then deadline, then arrival.
type Key = (Priority, u64, Instant, u64);

/// One model's waiting requests and the rounds of its callers.
#[derive(Debug, Default)]
struct Waiting {
    keys: BTreeSet<Key>,
    /// The round of the request that started last.
    round: u64,
    /// Each caller's latest round given to a waiting request (only those past `round`).
    callers: HashMap<String, u64>,
}

type Models = Arc<Mutex<HashMap<ModelId, Waiting>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every model's queue of one scheduler process.
#[derive(Debug)]
pub struct Queues {
    waiting: Models,
    arrivals: AtomicU64,
    /// Woken when a waiter leaves, so the next one looks (shared with the slots' signal).
    freed: Arc<Notify>,
}

/// A request's place in its model's queue; leaves it (and wakes the others) when dropped.
#[derive(Debug)]
pub struct Queued {
    waiting: Models,
    freed: Arc<Notify>,
    model: ModelId,
    key: Key,
}

impl Queues {
    /// Empty queues that wake waiters through `freed`.
    pub fn new(freed: Arc<Notify>) -> Queues {
        Queues {
            waiting: Arc::default(),
            arrivals: AtomicU64::new(0),
            freed,
        }
    }

    /// Whether no request of `model` is waiting.
    pub fn is_empty(&self, model: &ModelId) -> bool {
        lock(&self.waiting)
            .get(model)
            .is_none_or(|w| w.keys.is_empty())
    }

    /// Joins `model`'s queue for `caller` (`None`: a caller of its own), unless `limit` already
    /// wait.
    pub fn join(
        &self,
        model: &ModelId,
        caller: Option<&str>,
        priority: Priority,
        deadline: Instant,
        limit: u32,
    ) -> Option<Queued> {
        let mut waiting = lock(&self.waiting);
        let queue = waiting.entry(model.clone()).or_default();
        if queue.keys.len() >= limit as usize {
            return None;
        }
        let previous = caller.and_then(|c| queue.callers.get(c)).copied();
        let round = previous.unwrap_or(0).max(queue.round) + 1;
        if let Some(caller) = caller {
            queue.callers.insert(caller.to_owned(), round);
        }
        let key = (
            priority,
            round,
            deadline,
            self.arrivals.fetch_add(1, Ordering::Relaxed),
        );
        queue.keys.insert(key);
        depth(model, queue.keys.len());
        Some(Queued {
            waiting: self.waiting.clone(),
            freed: self.freed.clone(),
            model: model.clone(),
            key,
        })
    }
}

impl Queued {
    /// Whether this request is its model's first waiter (the one that may take a freed slot).
    pub fn is_first(&self) -> bool {
        lock(&self.waiting)
            .get(&self.model)
            .and_then(|q| q.keys.first())
            .is_some_and(|first| *first == self.key)
    }

    /// Leaves the queue because this request starts: its round is now the round last started.
    pub fn start(self) {
        let mut waiting = lock(&self.waiting);
        if let Some(queue) = waiting.get_mut(&self.model) {
            let round = self.key.1;
            if round > queue.round {
                queue.round = round;
                queue.callers.retain(|_, r| *r > round);
            }
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        {
            let mut waiting = lock(&self.waiting);
            if let Some(queue) = waiting.get_mut(&self.model) {
                queue.keys.remove(&self.key);
                depth(&self.model, queue.keys.len());
                if queue.keys.is_empty() {
                    waiting.remove(&self.model);
                }
            }
        }
        self.freed.notify_waiters();
    }
}

fn depth(model: &ModelId, n: usize) {
    metrics::gauge!("deepnode_exec_queue_depth", "model_id" => model.to_string()).set(n as f64);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn critical_goes_first_then_the_earliest_deadline_then_arrival_and_the_bound_holds() {
        let queues = Queues::new(Arc::default());
        let m = ModelId::parse("m-1").unwrap();
        let now = Instant::now();
        let join =
            |priority, secs| queues.join(&m, None, priority, now + Duration::from_secs(secs), 4);
        let late = join(Priority::Standard, 9).unwrap();
        let early = join(Priority::Standard, 1).unwrap();
        assert!(early.is_first() && !late.is_first());
        let urgent = join(Priority::Critical, 30).unwrap();
        assert!(urgent.is_first() && !early.is_first());
        let _fourth = join(Priority::Standard, 1).unwrap();
        assert!(join(Priority::Critical, 0).is_none(), "the bound holds");
        drop(urgent);
        assert!(early.is_first(), "same deadline: the earlier arrival");
        drop((early, late, _fourth));
        assert!(queues.is_empty(&m));
    }

    #[test]
    fn callers_take_turns_however_many_they_send_and_however_early_their_deadlines() {
        let queues = Queues::new(Arc::default());
        let m = ModelId::parse("m-1").unwrap();
        let now = Instant::now();
        let at = |ms| now + Duration::from_millis(ms);
        // caller a sends five with early deadlines, then b one with a late deadline
        let mut a: Vec<Queued> = (0..5)
            .map(|i| {
                queues
                    .join(&m, Some("a"), Priority::Standard, at(10 + i), 16)
                    .unwrap()
            })
            .collect();
        let b = queues
            .join(&m, Some("b"), Priority::Standard, at(5_000), 16)
            .unwrap();
        assert!(a[0].is_first(), "round 1: a's earliest deadline first");
        a.remove(0).start();
        assert!(b.is_first(), "still round 1: b's turn, before a's second");
        b.start();
        assert!(a[0].is_first(), "then a again");
        a.remove(0).start();
        // a caller joining now waits one round, not behind all of a's
        let c = queues
            .join(&m, Some("c"), Priority::Standard, at(9_000), 16)
            .unwrap();
        assert!(
            a[0].is_first(),
            "a's third is round 3, c's first round 3 too, a's deadline earlier"
        );
        a.remove(0).start();
        assert!(c.is_first(), "c before a's fourth and fifth");
        // a critical request still goes before every round of standard ones
        let urgent = queues
            .join(&m, Some("a"), Priority::Critical, at(60_000), 16)
            .unwrap();
        assert!(urgent.is_first());
    }
}
