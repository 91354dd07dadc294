//! The deepnode event log in PostgreSQL: append (group commit, optimistic concurrency, idempotent by
//! event id), read (one stream, pages of the global order, a flat-memory stream of the whole log, a
//! live subscription), hash-chain verification, the projection runner and migrations.
//!
//! It stores events as data (type, version, JSON) and does not interpret them: turning a
//! [`RecordedEvent`] into a domain event (and upcasting old versions) is `deepnode-domain`'s job.

mod append;
mod chain;
mod coordination;
mod error;
mod follower;
mod migrate;
mod probe;
mod projection;
mod read;
mod tail;

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

pub use append::{AppendResult, WriterStats};
pub use chain::{verify_chain, verify_chain_with, BreakKind, ChainBreak, ChainCheck, ChainReport};
pub use coordination::{HeldLock, Lease};
pub use deepnode_domain::log::{ExpectedVersion, NewEvent, RecordedEvent, StreamId};
pub use error::Error;
pub use follower::{Follower, FollowerHandle};
pub use migrate::{create_database_if_missing, latest_known_version, migrate};
pub use projection::{checkpoint, Paired, Projection, ProjectionRunner};
pub use read::{read_all, Subscription, Urgency};
pub use tail::{LogTail, Offered};

/// Default `DATABASE_URL` (CONTRACT §1).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/deepnode";

/// A handle on the event log. Cheap to clone; all clones share one pool, one group-commit writer
/// and one stream prober.
#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
    writer: mpsc::Sender<append::AppendRequest>,
    prober: mpsc::Sender<probe::ProbeRequest>,
    stats: std::sync::Arc<WriterStats>,
    tail: Option<LogTail>,
}

impl EventStore {
    /// Creates the database if missing, migrates it, and opens a pool of `max_connections`.
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<EventStore, Error> {
        migrate(database_url).await?;
        // Custom plans everywhere: the log grows from empty, and a generic plan cached while it was
        // small would keep scanning it sequentially.
        let options = PgConnectOptions::from_str(database_url)
            .map_err(|e| Error::Migration(format!("invalid DATABASE_URL: {e}")))?
            .options([("plan_cache_mode", "force_custom_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(EventStore::from_pool(pool))
    }

    /// Wraps an existing pool (of a migrated database). Must be called inside a Tokio runtime: it
    /// starts the group-commit writer's and the stream prober's tasks, which end when the last clone
    /// is dropped.
    pub fn from_pool(pool: PgPool) -> EventStore {
        let (writer, rx) = mpsc::channel(4_096);
        let stats = std::sync::Arc::new(WriterStats::default());
        tokio::spawn(append::run_writer(pool.clone(), rx, stats.clone()));
        let (prober, questions) = mpsc::channel(4_096);
        tokio::spawn(probe::run_prober(pool.clone(), questions));
        EventStore {
            pool,
            writer,
            prober,
            stats,
            tail: None,
        }
    }

    /// This store with `tail` as its process's [`LogTail`]: [`EventStore::subscribe_all`] (and so
    /// every [`Follower`]) then follows the log from it, reading the database only to catch up. The
    /// caller feeds the tail (a service feeds it from the bus, with what the relay published).
    pub fn with_tail(mut self, tail: LogTail) -> EventStore {
        self.tail = Some(tail);
        self
    }

    /// This store with one reader of the log for the whole process: a task follows the log from its
    /// head now (LISTEN/NOTIFY, lingering `linger` after a commit notifies, polling every `poll`)
    /// and puts what it reads in a [`LogTail`] of `capacity` events, which every subscription of
    /// this store — followers, the projection runner, the relay — then follows. Each commit interval
    /// costs the process one listening connection's wake-up, one read and one decode, however many
    /// readers it has; a reader's [`Urgency`] (a `wait_for`) makes the shared reader read at once.
    /// A reader behind the tail's window catches up from the database itself.
    pub async fn with_shared_reader(
        mut self,
        linger: Duration,
        poll: Duration,
        capacity: usize,
    ) -> Result<EventStore, Error> {
        let head = self.head_position().await?;
        let urgency = Urgency::default();
        let subscription =
            Subscription::new(self.pool.clone(), head, poll).linger(linger, urgency.clone());
        self.tail = Some(LogTail::read_by(capacity, subscription, urgency));
        Ok(self)
    }

    /// The process's [`LogTail`], if it has one.
    pub fn tail(&self) -> Option<&LogTail> {
        self.tail.as_ref()
    }

    /// How this store's group commits were written so far (diagnostics: benchmarks and tests).
    pub fn writer_stats(&self) -> &WriterStats {
        &self.stats
    }

    /// The connection pool, for projections and admin queries.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends `events` to `stream` atomically if the stream is at `expected`.
    ///
    /// Idempotent by event id: appending ids that are all already in the log with the same bodies
    /// returns the original positions (`duplicate: true`) and writes nothing; an id reused with a
    /// different body, or only some ids of an append already present, is [`Error::EventIdReused`].
    pub async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, Error> {
        self.append_prepared(stream, expected, Prepared::new(events)?)
            .await
    }

    /// [`EventStore::append`] of events already validated and serialised: an append that may be
    /// retried prepares its events once and clones the [`Prepared`] (strings, not JSON trees).
    pub async fn append_prepared(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Prepared,
    ) -> Result<AppendResult, Error> {
        let (reply, answer) = oneshot::channel();
        let request = append::AppendRequest {
            stream: stream.clone(),
            expected,
            events: events.0,
            reply,
        };
        self.writer.send(request).await.map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Appends inside the caller's transaction, so events and other writes commit (or roll back)
    /// together. The log's head stays locked until that transaction ends, so keep it short; this
    /// bypasses group commit.
    pub async fn append_in(
        conn: &mut sqlx::PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, Error> {
        let events = Prepared::new(events)?.0;
        let (reply, _) = oneshot::channel();
        let request = append::AppendRequest {
            stream: stream.clone(),
            expected,
            events,
            reply,
        };
        append::append_in(conn, &request).await
    }

    /// Events of one stream from `from_version` (1 = the start), in order.
    pub async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: i64,
    ) -> Result<Vec<RecordedEvent>, Error> {
        read::read_stream(&self.pool, stream, from_version).await
    }

    /// Whether `stream` has an event. Questions asked at the same time share one query on one
    /// connection of the store's own (see the `probe` module).
    pub async fn stream_exists(&self, stream: &StreamId) -> Result<bool, Error> {
        let (reply, answer) = oneshot::channel();
        let question = probe::ProbeRequest {
            stream: stream.as_str().to_owned(),
            reply,
        };
        self.prober
            .send(question)
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// A page of at most `limit` events after position `after`, in global order.
    pub async fn read_all(&self, after: i64, limit: i64) -> Result<Vec<RecordedEvent>, Error> {
        read::read_all(&self.pool, after, limit).await
    }

    /// The log after `after` up to `until` (inclusive; `None` = the head when the read starts), as
    /// pages from a background reader. Flat memory whatever the length of the log.
    pub fn stream_all(
        &self,
        after: i64,
        until: Option<i64>,
    ) -> mpsc::Receiver<Result<Vec<RecordedEvent>, Error>> {
        read::stream_all(self.pool.clone(), after, until)
    }

    /// Every event after `after`: catch-up, then live (LISTEN/NOTIFY, polling every `poll` as the
    /// safety net, reconnecting after errors).
    ///
    /// With a [`LogTail`] (see [`EventStore::with_tail`]) it follows the tail instead of the
    /// database, which it then reads only to catch up and once per `poll` of silence.
    pub fn subscribe_all(&self, after: i64, poll: Duration) -> Subscription {
        Subscription::over(self.pool.clone(), after, poll, self.tail.clone())
    }

    /// Like [`EventStore::subscribe_all`], but only ever what was read from the database — by this
    /// subscription, or by the process's shared reader ([`EventStore::with_shared_reader`]) — never
    /// a tail fed from the bus: for the relay, the one reader that feeds the bus from the log.
    pub fn subscribe_database(&self, after: i64, poll: Duration) -> Subscription {
        let filled_from_the_database = self
            .tail
            .clone()
            .filter(|tail| tail.reader_urgency().is_some());
        Subscription::over(self.pool.clone(), after, poll, filled_from_the_database)
    }

    /// The position of the last committed event (0 for an empty log).
    pub async fn head_position(&self) -> Result<i64, Error> {
        Ok(sqlx::query_scalar("SELECT position FROM log_head")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Verifies the hash chain over `from..=to`; see [`verify_chain`].
    pub async fn verify_chain(&self, from: i64, to: Option<i64>) -> Result<ChainReport, Error> {
        chain::verify_chain(&self.pool, from, to).await
    }
}

/// An append's events, validated (non-empty, distinct ids, each valid) and with their bodies
/// serialised once — for the hash and for the database. Cheap to clone.
#[derive(Clone)]
pub struct Prepared(Vec<append::PreparedEvent>);

impl Prepared {
    /// Validates `events` and serialises their bodies.
    pub fn new(events: Vec<NewEvent>) -> Result<Prepared, Error> {
        if events.is_empty() {
            return Err(Error::EmptyAppend);
        }
        let mut seen = HashSet::with_capacity(events.len());
        for event in &events {
            if !seen.insert(event.event_id) {
                return Err(Error::DuplicateInAppend {
                    event_id: event.event_id,
                });
            }
        }
        events
            .into_iter()
            .map(append::PreparedEvent::prepare)
            .collect::<Result<_, _>>()
            .map(Prepared)
    }
}
