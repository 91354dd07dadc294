//! The projection runner: folds the log into SQL tables, writing each batch of rows and the
//! projection's checkpoint in one transaction, so a crash at any instant leaves the tables equal to
//! the fold of the log up to the stored checkpoint — never an event applied twice or skipped.
//!
//! The checkpoint row is locked (`FOR UPDATE`) for the duration of a batch, so several copies of a
//! service may run the same projection: they take turns and each continues from where the last
//! committed. A projection may keep in-memory state (for example a whole `NodeBook`); the runner
//! feeds it the events other copies applied (`observe`) and resets it after a failed transaction.

use backon::{BackoffBuilder, ExponentialBuilder};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deepnode_domain::log::RecordedEvent;
use sqlx::{PgConnection, PgPool};

use crate::read::{read_all, Subscription, Urgency};
use crate::tail::Lookup;
use crate::{Error, EventStore, LogTail};

/// A read model kept by the [`ProjectionRunner`].
#[async_trait]
pub trait Projection: Send {
    /// Stable name: the key in `projection_checkpoints`.
    fn name(&self) -> &str;

    /// Applies a batch inside the runner's transaction (rows only; the runner writes the checkpoint).
    /// A stateful projection folds the events into its state here too.
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), Error>;

    /// Folds events that another copy already wrote into in-memory state (nothing to write).
    fn observe(&mut self, _events: &[RecordedEvent]) -> Result<(), Error> {
        Ok(())
    }

    /// Forgets in-memory state: called at start and after a failed transaction, before the runner
    /// re-observes the log up to the stored checkpoint.
    fn reset(&mut self) {}

    /// Deletes every row of the projection's tables (for a rebuild from position 0).
    async fn clear(&mut self, conn: &mut PgConnection) -> Result<(), Error>;
}

/// Drives one projection: catch up, then follow new commits.
pub struct ProjectionRunner<P> {
    pool: PgPool,
    /// The process's tail of the log, followed instead of the database when present.
    tail: Option<LogTail>,
    projection: P,
    /// Position the projection's in-memory state reflects.
    memory_position: i64,
    batch: i64,
    poll: Duration,
    /// How long a live batch waits for more events before it is written.
    linger: Duration,
}

impl<P: Projection> ProjectionRunner<P> {
    /// A runner with default batch size (500 events), poll interval (1 s) and no linger, following
    /// the database.
    pub fn new(pool: PgPool, mut projection: P) -> Self {
        projection.reset();
        ProjectionRunner {
            pool,
            tail: None,
            projection,
            memory_position: 0,
            batch: 500,
            poll: Duration::from_secs(1),
            linger: Duration::ZERO,
        }
    }

    /// A runner over `store`'s pool that follows the store's [`LogTail`] if it has one.
    pub fn for_store(store: &EventStore, projection: P) -> Self {
        let mut runner = ProjectionRunner::new(store.pool().clone(), projection);
        runner.tail = store.tail().cloned();
        runner
    }

    /// Lets a live batch wait up to `linger` for more events before it is read and written: one read
    /// and one transaction then carry every commit of that interval (the rows' lag grows by at most
    /// `linger`).
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets how many events one transaction applies at most.
    pub fn with_batch(mut self, batch: i64) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The projection, e.g. to read its in-memory state in tests.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The stored checkpoint of this projection (0 when it has none yet).
    pub async fn checkpoint(&self) -> Result<i64, Error> {
        checkpoint(&self.pool, self.projection.name()).await
    }

    /// Applies batches until the projection has reached the head of the log; returns the checkpoint.
    pub async fn run_to_head(&mut self) -> Result<i64, Error> {
        loop {
            match self.step().await {
                Ok(Some(_)) => continue,
                Ok(None) => return self.checkpoint().await,
                Err(e) => {
                    self.forget();
                    return Err(e);
                }
            }
        }
    }

    /// Forgets the in-memory state; the next catch-up folds the log from its start. For a caller
    /// that dropped [`run`](Self::run) mid-batch (a lost lease): the state may then hold a batch
    /// whose transaction never committed.
    pub fn forget(&mut self) {
        self.projection.reset();
        self.memory_position = 0;
    }

    /// Runs until `shutdown` resolves, retrying transient errors with backoff.
    pub async fn run(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let retries = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times();
        let mut delays = retries.build();
        loop {
            let followed = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                followed = self.follow() => followed,
            };
            match followed {
                // Another copy moved the checkpoint in a way this one cannot follow: start over.
                Ok(()) => delays = retries.build(),
                Err(e) if e.is_transient() => {
                    self.forget();
                    tracing::warn!(projection = self.projection.name(), error = %e, "projection paused; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        _ = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A standby's part: every `every`, folds into the in-memory state what has been written up to the
    /// stored checkpoint (by whichever copy writes), writing nothing. A copy that then runs the
    /// projection continues from there instead of folding the whole log first. With the process's
    /// [`LogTail`] it takes the events from the tail as they come (holding at most
    /// `STANDBY_AHEAD` not yet written) and reads the database only for what the tail did not
    /// give it. Runs until cancelled (safe at any point: what it held is only an accelerator); a
    /// transient error is retried at the next interval, any other is returned.
    pub async fn stand_by(&mut self, every: Duration) -> Error {
        let mut ahead = VecDeque::new();
        loop {
            match &self.tail {
                Some(tail) => gather(tail, self.memory_position, &mut ahead, every).await,
                None => tokio::time::sleep(every).await,
            }
            let caught_up = match self.checkpoint().await {
                Ok(stored) => self.observe_ahead(stored, &mut ahead).await,
                Err(e) => Err(e),
            };
            match caught_up {
                Ok(()) => {}
                Err(e) if e.is_transient() => {
                    tracing::debug!(projection = self.projection.name(), error = %e, "standby catch-up failed; retrying");
                }
                Err(e) => return e,
            }
        }
    }

    /// Catches up with the log, then writes each new batch as it arrives (after the linger). Returns
    /// `Ok` when the stored checkpoint went somewhere this copy's state cannot follow (a rebuild).
    async fn follow(&mut self) -> Result<(), Error> {
        // `write` locks the row, so it must exist (a catch-up over an empty log creates none).
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, global_position) VALUES ($1, 0)
             ON CONFLICT (projection) DO NOTHING",
        )
        .bind(self.projection.name())
        .execute(&self.pool)
        .await?;
        self.run_to_head().await?;
        let subscription = Subscription::over(
            self.pool.clone(),
            self.memory_position,
            self.poll,
            self.tail.clone(),
        );
        let mut subscription = subscription.linger(self.linger, Urgency::default());
        loop {
            // The projection takes owned events; from a tail this is the one copy the process makes.
            let mut events: Vec<RecordedEvent> = subscription
                .next_batch()
                .await?
                .into_iter()
                .map(std::sync::Arc::unwrap_or_clone)
                .collect();
            while !events.is_empty() {
                let rest = events.split_off(events.len().min(self.batch as usize));
                if !self.write(std::mem::replace(&mut events, rest)).await? {
                    return Ok(());
                }
            }
        }
    }

    /// One transaction for `events` (contiguous, in order): lock the checkpoint, apply what it has
    /// not seen, move it. If another copy already applied some, they are only observed. Returns
    /// `false` when the checkpoint is behind this copy's state (a rebuild): the caller starts over.
    async fn write(&mut self, mut events: Vec<RecordedEvent>) -> Result<bool, Error> {
        events.retain(|e| e.global_position > self.memory_position);
        if events.is_empty() {
            return Ok(true);
        }
        let mut tx = self.pool.begin().await?;
        let position: i64 = sqlx::query_scalar(
            "SELECT global_position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
        )
        .bind(self.projection.name())
        .fetch_one(&mut *tx)
        .await?;
        if position < self.memory_position {
            tx.rollback().await?;
            self.forget();
            return Ok(false);
        }
        if position > self.memory_position {
            // Another copy got there first: fold what it wrote, write only the rest.
            let seen = events.partition_point(|e| e.global_position <= position);
            self.projection.observe(&events[..seen])?;
            if let Some(last) = events[..seen].last() {
                self.memory_position = last.global_position;
            }
            events.drain(..seen);
            self.observe_until(position).await?;
        }
        let Some(last) = events.last().map(|e| e.global_position) else {
            tx.commit().await?;
            return Ok(true);
        };
        self.projection.apply(&mut tx, &events).await?;
        set_checkpoint(&mut tx, self.projection.name(), last).await?;
        tx.commit().await?;
        self.memory_position = last;
        Ok(true)
    }

    /// Deletes the projection's rows, resets its checkpoint to 0 and replays the whole log.
    pub async fn rebuild(&mut self) -> Result<i64, Error> {
        let mut tx = self.pool.begin().await?;
        lock_checkpoint(&mut tx, self.projection.name()).await?;
        self.projection.clear(&mut tx).await?;
        sqlx::query("UPDATE projection_checkpoints SET global_position = 0 WHERE projection = $1")
            .bind(self.projection.name())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.forget();
        self.run_to_head().await
    }

    /// One transaction: lock the checkpoint, apply the next batch, move the checkpoint, commit.
    /// Returns the new checkpoint, or `None` when there was nothing to apply.
    async fn step(&mut self) -> Result<Option<i64>, Error> {
        // Catch the in-memory state up to the stored checkpoint before taking the lock, so a long
        // catch-up (a fresh process) does not hold other copies up.
        let stored = self.checkpoint().await?;
        self.observe_until(stored).await?;

        let mut tx = self.pool.begin().await?;
        let position = lock_checkpoint(&mut tx, self.projection.name()).await?;
        self.observe_until(position).await?;
        let events = read_all(&self.pool, position, self.batch).await?;
        let Some(last) = events.last().map(|e| e.global_position) else {
            tx.rollback().await?;
            return Ok(None);
        };
        self.memory_position = last;
        self.projection.apply(&mut tx, &events).await?;
        set_checkpoint(&mut tx, self.projection.name(), last).await?;
        tx.commit().await?;
        Ok(Some(last))
    }

    /// [`observe_until`](Self::observe_until), folding first what `ahead` holds of it (events from
    /// the tail, contiguous; those the state already has are dropped, and a front that does not
    /// continue the state drops them all).
    async fn observe_ahead(
        &mut self,
        until: i64,
        ahead: &mut VecDeque<Arc<RecordedEvent>>,
    ) -> Result<(), Error> {
        // State past `until` (a rebuild elsewhere) is `observe_until`'s to forget; every event left
        // in `ahead` is then past `until` too, so nothing is folded here first.
        while ahead
            .front()
            .is_some_and(|e| e.global_position <= self.memory_position)
        {
            ahead.pop_front();
        }
        if ahead
            .front()
            .is_some_and(|e| e.global_position != self.memory_position + 1)
        {
            ahead.clear();
        }
        let written = ahead
            .iter()
            .take_while(|e| e.global_position <= until)
            .count();
        let events: Vec<RecordedEvent> = ahead
            .drain(..written)
            .map(|e| RecordedEvent::clone(&e))
            .collect();
        if let Some(last) = events.last().map(|e| e.global_position) {
            self.projection.observe(&events)?;
            self.memory_position = last;
        }
        self.observe_until(until).await
    }

    /// Folds `(memory_position, until]` into in-memory state without writing.
    async fn observe_until(&mut self, until: i64) -> Result<(), Error> {
        if self.memory_position > until {
            // Our state is ahead of the table (a rebuild elsewhere): start again from scratch.
            self.forget();
        }
        while self.memory_position < until {
            let limit = (until - self.memory_position).min(5_000);
            let events = read_all(&self.pool, self.memory_position, limit).await?;
            let Some(last) = events.last().map(|e| e.global_position) else {
                break;
            };
            self.projection.observe(&events)?;
            self.memory_position = last;
        }
        Ok(())
    }
}

/// The most events a standby holds from the tail beyond what it has folded (~1.5 KB each); past it,
/// the rest is read from the database at the next catch-up.
const STANDBY_AHEAD: usize = 4_096;

/// For `every`, takes from `tail` the events after `ahead`'s last (or after `from` when it is
/// empty) as they arrive, up to `STANDBY_AHEAD` held. Where the tail no longer holds (or never
/// held) the next event, it stops taking: the catch-up reads the database from there.
async fn gather(
    tail: &LogTail,
    from: i64,
    ahead: &mut VecDeque<Arc<RecordedEvent>>,
    every: Duration,
) {
    let deadline = tokio::time::Instant::now() + every;
    let mut offered = tail.watch();
    loop {
        if ahead.len() >= STANDBY_AHEAD {
            break;
        }
        let after = ahead.back().map_or(from, |e| e.global_position);
        match tail.after(after, STANDBY_AHEAD - ahead.len()) {
            Lookup::Events(events) => {
                ahead.extend(events);
                continue;
            }
            Lookup::Behind => break,
            Lookup::Nothing => {}
        }
        tokio::select! {
            changed = offered.changed() => if changed.is_err() { break },
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
    tokio::time::sleep_until(deadline).await;
}

/// Two projections kept by one runner — one read of the log, one transaction per batch for both.
/// `first` is the runner's own (its name is the runner's checkpoint, its `clear` is what a rebuild
/// deletes); `second` rides along: its rows are written in the same transaction as `first`'s and its
/// own checkpoint row is moved with them, so it stays readable on its own (`checkpoint(pool,
/// second.name())`) and may join wherever its rows stand. Rows behind the batch (a new table on an
/// old log, a deployment that ran it alone) are caught up inside the transaction — once, holding the
/// lock meanwhile; rows ahead are only observed. A rebuild of `first` leaves `second`'s rows alone:
/// they already are the fold of the log.
pub struct Paired<A, B> {
    first: A,
    second: B,
    /// Position `second`'s in-memory state reflects (behind `first`'s after its rows went back).
    second_position: i64,
}

impl<A, B> Paired<A, B> {
    /// `first` with `second` alongside.
    pub fn new(first: A, second: B) -> Self {
        Paired {
            first,
            second,
            second_position: 0,
        }
    }

    /// The projection the runner is named after.
    pub fn first(&self) -> &A {
        &self.first
    }

    /// The projection alongside.
    pub fn second(&self) -> &B {
        &self.second
    }
}

impl<A: Projection, B: Projection> Paired<A, B> {
    /// Folds `events` (contiguous, any start) into `second`: those at or below `stored` (its rows)
    /// are observed, the rest applied.
    async fn second_takes(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
        stored: i64,
    ) -> Result<(), Error> {
        let events =
            &events[events.partition_point(|e| e.global_position <= self.second_position)..];
        let Some(last) = events.last().map(|e| e.global_position) else {
            return Ok(());
        };
        let written = events.partition_point(|e| e.global_position <= stored);
        self.second.observe(&events[..written])?;
        if written < events.len() {
            self.second.apply(conn, &events[written..]).await?;
        }
        self.second_position = last;
        Ok(())
    }
}

#[async_trait]
impl<A: Projection, B: Projection> Projection for Paired<A, B> {
    fn name(&self) -> &str {
        self.first.name()
    }

    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), Error> {
        self.first.apply(conn, events).await?;
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(());
        };
        let (first, last) = (first.global_position, last.global_position);
        let stored = lock_checkpoint(conn, self.second.name()).await?;
        if self.second_position > stored {
            // Its rows went back (rebuilt elsewhere): its state starts again.
            self.second.reset();
            self.second_position = 0;
        }
        // Whatever lies between `second`'s state and this batch comes from the log.
        while self.second_position < first - 1 {
            let limit = (first - 1 - self.second_position).min(5_000);
            let behind = read_all(&mut *conn, self.second_position, limit).await?;
            if behind.is_empty() {
                break;
            }
            self.second_takes(conn, &behind, stored).await?;
        }
        self.second_takes(conn, events, stored).await?;
        if last > stored {
            set_checkpoint(conn, self.second.name(), last).await?;
        }
        Ok(())
    }

    fn observe(&mut self, events: &[RecordedEvent]) -> Result<(), Error> {
        self.first.observe(events)?;
        let fresh =
            &events[events.partition_point(|e| e.global_position <= self.second_position)..];
        // After a gap `second` waits for the next `apply`, which reads what it missed.
        if fresh
            .first()
            .is_some_and(|e| e.global_position == self.second_position + 1)
        {
            self.second.observe(fresh)?;
            self.second_position = fresh
                .last()
                .map_or(self.second_position, |e| e.global_position);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.first.reset();
        self.second.reset();
        self.second_position = 0;
    }

    async fn clear(&mut self, conn: &mut PgConnection) -> Result<(), Error> {
        self.first.clear(conn).await
    }
}

/// The stored checkpoint of a projection (0 when it has none yet).
pub async fn checkpoint(pool: &PgPool, projection: &str) -> Result<i64, Error> {
    let position: Option<i64> = sqlx::query_scalar(
        "SELECT global_position FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(projection)
    .fetch_optional(pool)
    .await?;
    Ok(position.unwrap_or(0))
}

/// Moves the (locked) checkpoint of `projection` to `position`.
async fn set_checkpoint(
    conn: &mut PgConnection,
    projection: &str,
    position: i64,
) -> Result<(), Error> {
    sqlx::query("UPDATE projection_checkpoints SET global_position = $2 WHERE projection = $1")
        .bind(projection)
        .bind(position)
        .execute(conn)
        .await?;
    Ok(())
}

/// Creates the checkpoint row if needed and locks it for this transaction; returns its position.
async fn lock_checkpoint(conn: &mut PgConnection, projection: &str) -> Result<i64, Error> {
    let lock =
        "SELECT global_position FROM projection_checkpoints WHERE projection = $1 FOR UPDATE";
    let position: Option<i64> = sqlx::query_scalar(lock)
        .bind(projection)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(position) = position {
        return Ok(position);
    }
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, global_position) VALUES ($1, 0)
         ON CONFLICT (projection) DO NOTHING",
    )
    .bind(projection)
    .execute(&mut *conn)
    .await?;
    let position: i64 = sqlx::query_scalar(lock)
        .bind(projection)
        .fetch_one(&mut *conn)
        .await?;
    Ok(position)
}
