//! Reading the log: one stream, a page of the global order, the whole log as a flat-memory stream, and
//! a subscription that catches up and then follows live appends.
//!
//! Readers follow `global_position` only. Because positions are assigned under the head lock and
//! committed in order (see `append`), "everything after the last position I saw" is always complete.

use backon::{BackoffBuilder, ExponentialBuilder};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use deepnode_domain::log::{RecordedEvent, StoredJson, StreamId};
use futures::{FutureExt, TryStreamExt};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, watch, Notify};

use crate::tail::{LogTail, Lookup};

use crate::Error;

/// Channel on which the `events_notify` trigger announces commits.
pub(crate) const NOTIFY_CHANNEL: &str = "deepnode_events";

pub(crate) const SELECT_EVENTS: &str = "SELECT global_position, event_id, stream_id, stream_version, \
     event_type, schema_version, payload, metadata, occurred_at, recorded_at, prev_hash, hash FROM events";

pub(crate) fn from_row(row: &PgRow) -> Result<RecordedEvent, sqlx::Error> {
    Ok(RecordedEvent {
        global_position: row.try_get(0)?,
        event_id: row.try_get(1)?,
        stream_id: row.try_get(2)?,
        stream_version: row.try_get(3)?,
        event_type: row.try_get(4)?,
        schema_version: row.try_get(5)?,
        payload: stored_json(row, 6)?,
        metadata: stored_json(row, 7)?,
        occurred_at: row.try_get(8)?,
        recorded_at: row.try_get(9)?,
        prev_hash: row.try_get(10)?,
        hash: row.try_get(11)?,
    })
}

/// A jsonb column as its text, checked to be JSON but not built into a tree (see [`StoredJson`]).
fn stored_json(row: &PgRow, index: usize) -> Result<StoredJson, sqlx::Error> {
    row.try_get::<Json<StoredJson>, _>(index).map(|json| json.0)
}

/// Events of one stream with `stream_version >= from_version`, in version order.
pub async fn read_stream(
    pool: &PgPool,
    stream: &StreamId,
    from_version: i64,
) -> Result<Vec<RecordedEvent>, Error> {
    let sql = format!(
        "{SELECT_EVENTS} WHERE stream_id = $1 AND stream_version >= $2 ORDER BY stream_version"
    );
    let rows = sqlx::query(&sql)
        .bind(stream.as_str())
        .bind(from_version)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| from_row(r).map_err(Error::from))
        .collect()
}

/// At most `limit` events with `global_position > after`, in global order.
pub async fn read_all<'e>(
    db: impl sqlx::PgExecutor<'e>,
    after: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, Error> {
    let sql =
        format!("{SELECT_EVENTS} WHERE global_position > $1 ORDER BY global_position LIMIT $2");
    let rows = sqlx::query(&sql)
        .bind(after)
        .bind(limit)
        .fetch_all(db)
        .await?;
    rows.iter()
        .map(|r| from_row(r).map_err(Error::from))
        .collect()
}

/// Pages of the log after `after` up to `until` (inclusive; `None` = the head when the read starts),
/// in global order. The range is cut into chunks read by [`READERS`] streaming queries at once (each on
/// its own connection and task, so the database's row output and the client's JSON decoding run on
/// every core), and their pages are handed on strictly in order. Memory stays flat: at most
/// `READERS` chunks are open, each with a few pages buffered, whatever the log's length.
pub fn stream_all(
    pool: PgPool,
    after: i64,
    until: Option<i64>,
) -> mpsc::Receiver<Result<Vec<RecordedEvent>, Error>> {
    /// Concurrent chunk readers.
    const READERS: usize = 2;
    /// Positions per chunk.
    const CHUNK: i64 = 20_000;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let end = match until {
            Some(until) => until,
            None => match sqlx::query_scalar("SELECT position FROM log_head")
                .fetch_one(&pool)
                .await
            {
                Ok(head) => head,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            },
        };
        let mut open = std::collections::VecDeque::with_capacity(READERS);
        let mut next = after;
        loop {
            while open.len() < READERS && next < end {
                let chunk_end = next.saturating_add(CHUNK).min(end);
                let (chunk_tx, chunk_rx) = mpsc::channel(4);
                tokio::spawn(read_range(pool.clone(), next, chunk_end, chunk_tx));
                open.push_back(chunk_rx);
                next = chunk_end;
            }
            let Some(mut chunk) = open.pop_front() else {
                return;
            };
            while let Some(page) = chunk.recv().await {
                let failed = page.is_err();
                if tx.send(page).await.is_err() || failed {
                    return; // the consumer is gone, or the read failed (reported)
                }
            }
        }
    });
    rx
}

/// Streams positions `(after, until]` into `tx` as pages of 1,000 events.
async fn read_range(
    pool: PgPool,
    after: i64,
    until: i64,
    tx: mpsc::Sender<Result<Vec<RecordedEvent>, Error>>,
) {
    const PAGE: usize = 1_000;
    let sql = format!(
        "{SELECT_EVENTS} WHERE global_position > $1 AND global_position <= $2 ORDER BY global_position"
    );
    let mut rows = sqlx::query(&sql).bind(after).bind(until).fetch(&pool);
    let mut page = Vec::with_capacity(PAGE);
    loop {
        match rows.try_next().await {
            Ok(Some(row)) => match from_row(&row) {
                Ok(event) => {
                    page.push(event);
                    if page.len() == PAGE && tx.send(Ok(std::mem::take(&mut page))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            },
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
    }
    if !page.is_empty() {
        let _ = tx.send(Ok(page)).await;
    }
}

/// What [`Waker::arm`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Armed {
    /// Listening since before the previous call: every commit since has notified.
    Listening,
    /// Listening from now on: a commit before now may have gone unnoticed.
    Reconnected,
    /// Not listening: only the poll timer wakes.
    Polling,
}

/// Wakes a follower when the log may have grown: a LISTEN on the commit channel, with a poll timer as
/// the safety net for missed notifications and dropped connections.
pub(crate) struct Waker {
    pool: PgPool,
    listener: Option<PgListener>,
    poll: Duration,
}

impl Waker {
    pub(crate) fn new(pool: PgPool, poll: Duration) -> Waker {
        Waker {
            pool,
            listener: None,
            poll,
        }
    }

    /// Makes sure a listener is connected (best effort; polling covers failures). Call before reading,
    /// so a commit between the read and the wait still wakes the next wait.
    pub(crate) async fn arm(&mut self) -> Armed {
        if self.listener.is_some() {
            return Armed::Listening;
        }
        match PgListener::connect_with(&self.pool).await {
            Ok(mut listener) => match listener.listen(NOTIFY_CHANNEL).await {
                Ok(()) => {
                    self.listener = Some(listener);
                    return Armed::Reconnected;
                }
                Err(e) => tracing::debug!(error = %e, "LISTEN failed; polling"),
            },
            Err(e) => tracing::debug!(error = %e, "listener connection failed; polling"),
        }
        Armed::Polling
    }

    /// Drops every notification already received, buffered or still in the socket: they are for
    /// commits a read starting now sees. Without this, every commit folded by one read would wake
    /// one more, empty, read (a lingering reader, which leaves them in the socket while it waits,
    /// would then spend one linger per commit of the interval instead of one in all).
    pub(crate) fn drain(&mut self) {
        let Some(listener) = self.listener.as_mut() else {
            return;
        };
        loop {
            // One poll each: ready only for what has arrived. `try_recv` is cancel-safe (a
            // pending poll dropped here loses nothing; `wait` drops it the same way).
            match listener.try_recv().now_or_never() {
                Some(Ok(Some(_))) => continue,
                None => return,
                // The connection was lost: reconnect on the next arm(), which reads again.
                Some(Ok(None) | Err(_)) => {
                    self.listener = None;
                    return;
                }
            }
        }
    }

    /// Waits for a notification or the poll interval, whichever comes first; `true` when a commit
    /// notified.
    pub(crate) async fn wait(&mut self) -> bool {
        let Some(listener) = self.listener.as_mut() else {
            tokio::time::sleep(self.poll).await;
            return false;
        };
        tokio::select! {
            received = listener.try_recv() => match received {
                Ok(Some(_)) => return true,
                // The connection was lost: notifications may have been missed, so read now and
                // reconnect on the next arm().
                Ok(None) | Err(_) => self.listener = None,
            },
            _ = tokio::time::sleep(self.poll) => {}
        }
        false
    }
}

/// A follower of the global order: yields every event after a position exactly once, in order, first
/// catching up from the table, then following new commits. Transient database errors are retried with
/// backoff, so a subscription survives a dropped connection or a database restart.
///
/// Two ways to follow, one behaviour:
/// - from the database (no [`LogTail`]): LISTEN/NOTIFY wakes it, and each commit costs one read;
/// - from a process's [`LogTail`]: events come from the tail while it holds the next position, so a
///   process whose tail is fed from the bus follows the log without reading it. The database is read
///   only to catch up, when the tail does not hold the next position (it started later, or a message
///   was lost), and once per `poll` of silence — the safety net that bounds how far a stalled feed can
///   hold a reader back.
///
/// With a [`Subscription::linger`], a reader at the head that learns of a commit waits that long
/// before reading, so one read (and one wake-up of its owner) carries every commit of the interval
/// instead of one each; its [`Urgency`] cuts the wait short when someone needs a position now.
pub struct Subscription {
    pool: PgPool,
    position: i64,
    buffer: VecDeque<Arc<RecordedEvent>>,
    source: Source,
    page: i64,
    /// The last read ended at the head of the log (it returned less than a page).
    caught_up: bool,
    linger: Duration,
    urgency: Urgency,
    /// A commit notified and the read for it has not happened yet (kept across a cancelled call,
    /// so a caller that drops `next` mid-linger does not wait for the next commit to read it).
    notified: bool,
}

/// Cuts a lingering [`Subscription`]'s wait short: [`Urgency::now`] makes its current (or next)
/// linger end at once. Cloned handles share one signal.
#[derive(Clone, Default)]
pub struct Urgency(Arc<Notify>);

impl Urgency {
    /// Asks the subscription to read now rather than at the end of its linger.
    pub fn now(&self) {
        self.0.notify_one();
    }
}

enum Source {
    Database(Waker),
    Tail {
        tail: LogTail,
        changed: watch::Receiver<i64>,
        poll: Duration,
    },
}

impl Subscription {
    pub(crate) fn new(pool: PgPool, after: i64, poll: Duration) -> Subscription {
        Subscription {
            source: Source::Database(Waker::new(pool.clone(), poll)),
            pool,
            position: after,
            buffer: VecDeque::new(),
            page: 1_000,
            caught_up: false,
            linger: Duration::ZERO,
            urgency: Urgency::default(),
            notified: false,
        }
    }

    /// Following `tail` when there is one, else the database.
    pub(crate) fn over(
        pool: PgPool,
        after: i64,
        poll: Duration,
        tail: Option<LogTail>,
    ) -> Subscription {
        match tail {
            Some(tail) => Subscription::with_tail(pool, after, poll, tail),
            None => Subscription::new(pool, after, poll),
        }
    }

    pub(crate) fn with_tail(
        pool: PgPool,
        after: i64,
        poll: Duration,
        tail: LogTail,
    ) -> Subscription {
        Subscription {
            source: Source::Tail {
                changed: tail.watch(),
                tail,
                poll,
            },
            ..Subscription::new(pool, after, poll)
        }
    }

    /// This subscription, waiting up to `linger` after it learns of a commit at the head before it
    /// reads (or looks at the tail), unless `urgency` fires. Catching up never lingers. Following a
    /// process's shared reader ([`crate::EventStore::with_shared_reader`]), the shared reader's
    /// linger applies instead of `linger`, and `urgency` is passed on to it.
    pub fn linger(mut self, linger: Duration, urgency: Urgency) -> Subscription {
        self.linger = linger;
        self.urgency = urgency;
        self
    }

    /// The position of the last event yielded.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// Whether the last read reached the head of the log: what it gave is what was committed since
    /// the read before, not a page of a backlog being caught up.
    pub fn at_head(&self) -> bool {
        self.caught_up
    }

    /// Every event already read and not yet yielded (at least one), waiting if there is none yet.
    /// Followers that fold under a lock use this to take the lock once per page, not per event.
    /// Cancel-safe: dropping the future loses nothing.
    /// Events are shared (`Arc`): with a tail, every reader of the process holds the same copy.
    pub async fn next_batch(&mut self) -> Result<Vec<Arc<RecordedEvent>>, Error> {
        let first = self.next().await?;
        let mut batch = Vec::with_capacity(1 + self.buffer.len());
        batch.push(first);
        batch.extend(self.buffer.drain(..));
        if let Some(last) = batch.last() {
            self.position = last.global_position;
        }
        Ok(batch)
    }

    /// The next event in global order, waiting for it if the log has none yet. Cancel-safe.
    pub async fn next(&mut self) -> Result<Arc<RecordedEvent>, Error> {
        let retries = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times();
        let mut delays = retries.build();
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.position = event.global_position;
                return Ok(event);
            }
            if self.caught_up && self.wait_for_news().await {
                continue; // the tail handed over the next events
            }
            match read_all(&self.pool, self.position, self.page).await {
                Ok(events) => {
                    tracing::trace!(
                        after = self.position,
                        read = events.len(),
                        "subscription read the log"
                    );
                    delays = retries.build();
                    self.caught_up = (events.len() as i64) < self.page;
                    self.buffer.extend(events.into_iter().map(Arc::new));
                }
                Err(e) if e.is_transient() => {
                    self.caught_up = false;
                    tracing::warn!(error = %e, position = self.position, "subscription read failed; retrying");
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Called once the reader has reached the head: waits until there may be more. Returns `true`
    /// when the tail put the next events in the buffer, `false` when the database must be read.
    async fn wait_for_news(&mut self) -> bool {
        match &mut self.source {
            Source::Database(waker) => {
                // After a read that reached the head, wait for a commit's notification (or the
                // poll interval) rather than read again at once — unless the listener was just
                // reconnected, when a commit in between may not have notified.
                if !self.notified && waker.arm().await != Armed::Reconnected {
                    self.notified = waker.wait().await;
                }
                if self.notified {
                    linger(self.linger, &self.urgency).await;
                }
                waker.drain();
                self.notified = false;
                false
            }
            Source::Tail {
                tail,
                changed,
                poll,
            } => loop {
                if tail.reader_stopped() {
                    // The process's shared reader failed: from now on this subscription reads (and
                    // listens) for itself.
                    self.source = Source::Database(Waker::new(self.pool.clone(), *poll));
                    self.caught_up = false;
                    return false;
                }
                // Mark the current value seen before looking, so an offer after the look wakes us.
                changed.borrow_and_update();
                match tail.after(self.position, self.page as usize) {
                    Lookup::Events(events) => {
                        self.buffer.extend(events);
                        return true;
                    }
                    Lookup::Behind => {
                        self.caught_up = false;
                        return false;
                    }
                    Lookup::Nothing => {}
                }
                match tail.reader_urgency() {
                    // Filled by the process's shared reader, which lingers and polls for everyone:
                    // wait for what it reads, and pass on an urgent need to it.
                    Some(reader) => tokio::select! {
                        changed = changed.changed() => {
                            if changed.is_err() {
                                return false; // the tail is gone: the database it is
                            }
                        }
                        () = self.urgency.0.notified() => reader.now(),
                    },
                    None => tokio::select! {
                        changed = changed.changed() => {
                            if changed.is_err() {
                                return false; // the tail is gone: the database it is
                            }
                            linger(self.linger, &self.urgency).await;
                        }
                        () = tokio::time::sleep(*poll) => return false,
                    },
                }
            },
        }
    }
}

/// Waits `linger`, or less if `urgency` fires first.
async fn linger(linger: Duration, urgency: &Urgency) {
    if linger.is_zero() {
        return;
    }
    tokio::select! {
        () = tokio::time::sleep(linger) => {}
        () = urgency.0.notified() => {}
    }
}
