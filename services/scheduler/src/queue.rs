//! The requests waiting for a slot, per model, in the order they may take one: `critical` before
//! `standard`, then earliest deadline, then arrival. Only a model's first waiter routes when a slot
//! frees; when it leaves the queue (admitted, or out of time) the next one is woken to look. A new
//! request does not pass those already waiting (it joins the queue). `sheddable` requests never
//! wait: when their model is full they are refused at once, the first to go under contention.

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

/// A waiting request's rank: priority, then deadline, then arrival.
type Key = (Priority, Instant, u64);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every model's queue of one scheduler process.
#[derive(Debug)]
pub struct Queues {
    waiting: Arc<Mutex<HashMap<ModelId, BTreeSet<Key>>>>,
    arrivals: AtomicU64,
    /// Woken when a waiter leaves, so the next one looks (shared with the slots' signal).
    freed: Arc<Notify>,
}

/// A request's place in its model's queue; leaves it (and wakes the others) when dropped.
#[derive(Debug)]
pub struct Queued {
    waiting: Arc<Mutex<HashMap<ModelId, BTreeSet<Key>>>>,
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
            .is_none_or(BTreeSet::is_empty)
    }

    /// Joins `model`'s queue, unless `limit` already wait.
    pub fn join(
        &self,
        model: &ModelId,
        priority: Priority,
        deadline: Instant,
        limit: u32,
    ) -> Option<Queued> {
        let mut waiting = lock(&self.waiting);
        let queue = waiting.entry(model.clone()).or_default();
        if queue.len() >= limit as usize {
            return None;
        }
        let key = (
            priority,
            deadline,
            self.arrivals.fetch_add(1, Ordering::Relaxed),
        );
        queue.insert(key);
        depth(model, queue.len());
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
            .and_then(|q| q.first())
            .is_some_and(|first| *first == self.key)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        {
            let mut waiting = lock(&self.waiting);
            if let Some(queue) = waiting.get_mut(&self.model) {
                queue.remove(&self.key);
                depth(&self.model, queue.len());
                if queue.is_empty() {
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
        let late = queues
            .join(&m, Priority::Standard, now + Duration::from_secs(9), 4)
            .unwrap();
        let early = queues
            .join(&m, Priority::Standard, now + Duration::from_secs(1), 4)
            .unwrap();
        assert!(early.is_first() && !late.is_first());
        let urgent = queues
            .join(&m, Priority::Critical, now + Duration::from_secs(30), 4)
            .unwrap();
        assert!(urgent.is_first() && !early.is_first());
        let _fourth = queues
            .join(&m, Priority::Standard, now + Duration::from_secs(1), 4)
            .unwrap();
        assert!(
            queues.join(&m, Priority::Critical, now, 4).is_none(),
            "the bound holds"
        );
        drop(urgent);
        assert!(early.is_first(), "same deadline: the earlier arrival");
        drop((early, late, _fourth));
        assert!(queues.is_empty(&m));
    }
}
