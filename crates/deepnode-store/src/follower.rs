//! A [`Follower`] keeps an in-memory state folded from the log, live: it catches up from position 0
//! and then follows new commits (see [`crate::Subscription`]). Services use it to decide against the
//! same state replay and audit compute, and [`FollowerHandle::wait_for`] gives read-your-writes: after
//! appending at position N, wait until the state has folded N before answering from it.
//!
//! A follower may linger ([`Follower::start_lingering`]): it then folds the commits of each interval
//! in one read instead of one read per commit, and `wait_for` a position it has not folded yet cuts
//! the wait short, so read-your-writes costs no linger.
//!
//! The fold itself is the caller's (the store does not interpret events); a fold error stops the
//! follower and is reported by `wait_for`, because skipping an event would silently corrupt state.

use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use deepnode_domain::log::RecordedEvent;
use tokio::sync::watch;

use crate::{Error, EventStore, Urgency};

/// Where a follower is: the last folded position, or why it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Progress {
    At(i64),
    Failed(String),
}

/// A shared, live view of state folded from the log.
pub struct FollowerHandle<S> {
    state: Arc<RwLock<S>>,
    progress: watch::Receiver<Progress>,
    urgency: Urgency,
    task: tokio::task::AbortHandle,
}

impl<S> Clone for FollowerHandle<S> {
    fn clone(&self) -> Self {
        FollowerHandle {
            state: self.state.clone(),
            progress: self.progress.clone(),
            urgency: self.urgency.clone(),
            task: self.task.clone(),
        }
    }
}

/// Starts following the log from position 0 with `state` as the initial state.
pub struct Follower;

impl Follower {
    /// Spawns the follower task. `fold` is applied to every event in global order, as soon as it
    /// commits.
    pub fn start<S, F, E>(store: &EventStore, state: S, fold: F) -> FollowerHandle<S>
    where
        S: Send + Sync + 'static,
        F: FnMut(&mut S, &RecordedEvent) -> Result<(), E> + Send + 'static,
        E: std::fmt::Display,
    {
        Follower::start_lingering(store, state, Duration::ZERO, fold)
    }

    /// Like [`Follower::start`], but once at the head a commit is folded up to `linger` later,
    /// together with every other commit of that interval (one read for all of them), unless a
    /// [`FollowerHandle::wait_for`] needs it sooner.
    pub fn start_lingering<S, F, E>(
        store: &EventStore,
        state: S,
        linger: Duration,
        mut fold: F,
    ) -> FollowerHandle<S>
    where
        S: Send + Sync + 'static,
        F: FnMut(&mut S, &RecordedEvent) -> Result<(), E> + Send + 'static,
        E: std::fmt::Display,
    {
        let state = Arc::new(RwLock::new(state));
        let (tx, progress) = watch::channel(Progress::At(0));
        let urgency = Urgency::default();
        let mut subscription = store
            .subscribe_all(0, Duration::from_millis(500))
            .linger(linger, urgency.clone());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let batch = match subscription.next_batch().await {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::error!(error = %e, "follower stopped: reading the log failed");
                        let _ = tx.send(Progress::Failed(e.to_string()));
                        return;
                    }
                };
                let mut last = 0;
                let failure = {
                    // A poisoned lock means a reader panicked; the state itself is still whole.
                    let mut state = shared.write().unwrap_or_else(|p| p.into_inner());
                    batch.iter().find_map(|event| {
                        last = event.global_position;
                        fold(&mut state, event)
                            .err()
                            .map(|e| format!("event at position {}: {e}", event.global_position))
                    })
                };
                if let Some(reason) = failure {
                    tracing::error!(%reason, "follower stopped: the fold refused an event");
                    let _ = tx.send(Progress::Failed(reason));
                    return;
                }
                if tx.send(Progress::At(last)).is_err() {
                    return; // every handle is gone
                }
            }
        });
        FollowerHandle {
            state,
            progress,
            urgency,
            task: task.abort_handle(),
        }
    }
}

impl<S> FollowerHandle<S> {
    /// Reads the current state. Hold the guard briefly: the follower waits for it to fold.
    pub fn read(&self) -> RwLockReadGuard<'_, S> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The last position folded into the state.
    pub fn position(&self) -> i64 {
        match *self.progress.borrow() {
            Progress::At(p) => p,
            Progress::Failed(_) => -1,
        }
    }

    /// Waits until the state has folded `position` (read-your-writes), at most `timeout`; a
    /// lingering reader is asked to read at once.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> Result<(), Error> {
        if self.position() < position {
            self.urgency.now();
        }
        self.folded(position, timeout).await
    }

    /// Waits until the state has folded `position`, at most `timeout`, without asking the reader
    /// to hurry: for a position the process has already read (an event taken from the log tail
    /// this follower follows too), which the follower reaches on its own. ([`wait_for`] here would
    /// cost a read of the log each time the follower had not yet been scheduled.)
    ///
    /// [`wait_for`]: FollowerHandle::wait_for
    pub async fn folded(&self, position: i64, timeout: Duration) -> Result<(), Error> {
        let mut progress = self.progress.clone();
        let reached = tokio::time::timeout(
            timeout,
            progress.wait_for(|p| {
                matches!(p, Progress::Failed(_)) || matches!(p, Progress::At(at) if *at >= position)
            }),
        )
        .await;
        match reached {
            Ok(Ok(p)) => match &*p {
                Progress::Failed(reason) => Err(Error::Decode {
                    position,
                    reason: reason.clone(),
                }),
                Progress::At(_) => Ok(()),
            },
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Lagging { position }),
        }
    }

    /// Stops the follower task.
    pub fn stop(&self) {
        self.task.abort();
    }
}
