//! One job, one holder across copies: whoever holds an advisory lease (`deepnode_store::Lease`)
//! does the job; every other copy stands by, asking for the lease on a connection of its own, and
//! takes over when the holder's connection — and with it the lock — goes (its process stopped,
//! crashed or lost the database). The relay and the reputation service's outcome assessment run
//! this way, each keeping its place in the log with a [`Progress`]. (The reputation service's SQL
//! projection holds its lease the same way but writes its loop out: its standby has work of its own
//! while it waits — keeping its fold current — which [`hold`] has no place for.)

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deepnode_store::{EventStore, Lease, RecordedEvent, Subscription};
use tokio::time::Instant;

use crate::shutdown::Shutdown;

/// Runs `job` while this copy holds the lease `key`, standing by (asking every `retry`) while
/// another copy does. `job` gets the lease and returns `Ok` when it is done for good (the service
/// stopping, or an error it must report), or `Err(reason)` when it lost its footing (the lease, the
/// database): the copy logs the reason and stands by again. Returns `None` if `shutdown` fired
/// while standing by. `job_name` names the job in the log.
pub async fn hold<T, F, Fut>(
    store: &EventStore,
    key: i64,
    retry: Duration,
    shutdown: &Shutdown,
    job_name: &str,
    mut job: F,
) -> Option<T>
where
    F: FnMut(Lease) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    while !shutdown.is_cancelled() {
        let taken = tokio::select! {
            _ = shutdown.cancelled() => return None,
            taken = store.take_lease(key, retry) => taken,
        };
        match taken {
            Ok(lease) => {
                tracing::info!("{job_name} lease taken; this copy does the job");
                match job(lease).await {
                    Ok(done) => return Some(done),
                    Err(reason) => {
                        tracing::warn!(%reason, "{job_name} lost its footing; standing by");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "{job_name} lease unavailable"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(retry) => {}
        }
    }
    None
}

/// A leased job's place in the log: the position it has done, stored (as the checkpoint `name`) at
/// most every `every` while it moves and at a clean stop — not once per event. A holder that dies
/// leaves the last stored position, and the next one does again what came after it, so the job
/// must be one that can be done twice (the relay's publications are deduplicated by the stream,
/// the outcome assessment's decisions by their derived ids).
pub struct Progress {
    name: &'static str,
    every: Duration,
    saved: i64,
    done: i64,
    last_save: Instant,
}

impl Progress {
    /// The position stored as `name` (0 when none is).
    pub async fn load(
        store: &EventStore,
        name: &'static str,
        every: Duration,
    ) -> Result<Progress, deepnode_store::Error> {
        let saved = store.checkpoint(name).await?;
        Ok(Progress {
            name,
            every,
            saved,
            done: saved,
            last_save: Instant::now(),
        })
    }

    /// The last position done.
    pub fn position(&self) -> i64 {
        self.done
    }

    /// A clean stop: stores the position (best effort: a holder after it redoes what was not) and
    /// gives the lease up.
    pub async fn finish(mut self, store: &EventStore, lease: Lease) {
        let _ = self.save(store).await;
        lease.release().await;
    }

    /// Whether the position done is past the one stored.
    fn moved(&self) -> bool {
        self.done > self.saved
    }

    /// Records that everything up to `position` is done.
    pub fn advance(&mut self, position: i64) {
        self.done = self.done.max(position);
    }

    /// The subscription's next batch, or `None` when a save falls due before one comes.
    pub async fn next_batch(
        &self,
        subscription: &mut Subscription,
    ) -> Option<Result<Vec<Arc<RecordedEvent>>, deepnode_store::Error>> {
        match self.moved().then(|| self.last_save + self.every) {
            Some(due) => tokio::time::timeout_at(due, subscription.next_batch())
                .await
                .ok(),
            None => Some(subscription.next_batch().await),
        }
    }

    /// Stores the position if it moved and `every` has passed since the last save, after making
    /// sure the lease is still held (if its connection died, so did the lock).
    pub async fn save_if_due(
        &mut self,
        store: &EventStore,
        lease: &mut Lease,
    ) -> Result<(), String> {
        if !self.moved() || self.last_save.elapsed() < self.every {
            return Ok(());
        }
        lease
            .check()
            .await
            .map_err(|e| format!("lease connection lost: {e}"))?;
        self.save(store).await.map_err(|e| e.to_string())
    }

    /// Stores the position now, if it moved.
    pub async fn save(&mut self, store: &EventStore) -> Result<(), deepnode_store::Error> {
        if self.moved() {
            store.advance_checkpoint(self.name, self.done).await?;
            self.saved = self.done;
            self.last_save = Instant::now();
        }
        Ok(())
    }
}
