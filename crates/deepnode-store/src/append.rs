//! Appending to the log with group commit.
//!
//! Every append in this process goes through one writer task. The writer takes whatever appends are
//! waiting and writes them all with one statement, which is its own transaction: it locks the single
//! `log_head` row (which serialises all appenders, in this process and in others), so positions stay
//! contiguous and commit order equals position order. Concurrent callers thus share one round trip
//! and one commit (one WAL flush), while the hash chain follows position order.
//!
//! Two statements can write a batch:
//! - `deepnode_append_at` (migration V7), the fast path: the writer remembers the head it last
//!   wrote and a lower bound of each stream's version, so when every append of the batch can be
//!   decided from those (a new stream, or a known stream at the expected version) it places the
//!   events itself — positions, stream versions, hashes ([`chain_hash`] of
//!   [`canonical_bytes_of_parts`]) — and the function only checks that the head has not moved and
//!   inserts. What the writer could not know is enforced by the unique indexes: an id already in the
//!   log or a stream another appender moved on refuses the whole statement, and the batch goes to
//! - `deepnode_append` (migration V5), which looks up stream versions and prior ids and decides each
//!   append — idempotent replay by event id, expected-version check, positions, stream versions, hash
//!   chain — before inserting the accepted ones. The appender encodes the parts of each event's
//!   canonical bytes that do not depend on its place in the log, so the function only concatenates
//!   and hashes ([`deepnode_domain::log::canonical_bytes`] defines the format).
//!
//! A rejected append (conflict, reused id) does not abort the batch: `deepnode_append` decides it and
//! writes the others. Should the database still refuse a batch (a constraint the checks missed), each
//! append of it is retried alone, so one bad append never fails its neighbours.
//!
//! Each group commit is measured through the `metrics` facade (`deepnode_store_append_seconds`,
//! `deepnode_store_append_batch_events`, `deepnode_store_appends_total{result}`,
//! `deepnode_store_group_commits_total{path}`); without an installed recorder those calls do
//! nothing, so the store carries no exporter.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use deepnode_domain::log::{
    canonical_body, canonical_bytes_of_parts, canonical_identity, chain_hash, to_micros,
    CanonicalRow, ExpectedVersion, NewEvent, StreamId, CANONICAL_TAG,
};
use sqlx::{Executor, PgConnection, PgPool, Row};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::Error;

/// Most events written by one group-commit transaction.
const MAX_BATCH_EVENTS: usize = 2_000;

/// The outcome of a successful append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    /// Global positions of the appended events, in order.
    pub positions: Vec<i64>,
    /// The stream's version after its last event of this append.
    pub stream_version: i64,
    /// True when every event id had been appended before: nothing was written and the original
    /// positions are returned.
    pub duplicate: bool,
    /// The chain hash of each event, in order (what a receipt for it signs, via its Merkle leaf).
    pub hashes: Vec<[u8; 32]>,
}

impl AppendResult {
    /// Position of the last event of this append.
    pub fn last_position(&self) -> i64 {
        self.positions.last().copied().unwrap_or(0)
    }
}

pub(crate) struct AppendRequest {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<PreparedEvent>,
    pub reply: oneshot::Sender<Result<AppendResult, Error>>,
}

/// A validated event with its bodies serialised once, for both the hash and the database.
#[derive(Clone)]
pub(crate) struct PreparedEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload_json: String,
    pub metadata_json: String,
    pub occurred_at: DateTime<Utc>,
}

impl PreparedEvent {
    pub(crate) fn prepare(event: NewEvent) -> Result<PreparedEvent, Error> {
        let (event_id, event_type) = (event.event_id, event.event_type.clone());
        let (schema_version, occurred_at) = (event.schema_version, to_micros(event.occurred_at));
        let (payload_json, metadata_json) = event.into_stored_bodies()?;
        Ok(PreparedEvent {
            event_id,
            event_type,
            schema_version,
            payload_json,
            metadata_json,
            occurred_at,
        })
    }
}

/// Counts of one store's group commits by the statement that wrote them.
#[derive(Debug, Default)]
pub struct WriterStats {
    placed: AtomicU64,
    looked_up: AtomicU64,
}

impl WriterStats {
    /// Batches the writer placed itself and wrote with `deepnode_append_at`.
    pub fn placed(&self) -> u64 {
        self.placed.load(Ordering::Relaxed)
    }

    /// Batches decided by `deepnode_append` (looked up in the database).
    pub fn looked_up(&self) -> u64 {
        self.looked_up.load(Ordering::Relaxed)
    }
}

/// Runs until every sender is dropped, committing waiting appends in batches.
pub(crate) async fn run_writer(
    pool: PgPool,
    mut rx: mpsc::Receiver<AppendRequest>,
    stats: Arc<WriterStats>,
) {
    let mut writer = Writer {
        pool,
        conn: None,
        head: None,
        versions: KnownVersions::default(),
        stats,
    };
    let mut last_size = 1;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut events = batch[0].events.len();
        take_waiting(&mut rx, &mut batch, &mut events);
        // Linger briefly when fewer appends wait than the last commit carried: the appenders it just
        // answered are typically submitting their next append right now, and one commit should carry
        // them all (as commit_delay does in PostgreSQL). A lone appender never waits.
        if batch.len() < last_size {
            let deadline = std::time::Instant::now() + LINGER;
            while batch.len() < last_size
                && events < MAX_BATCH_EVENTS
                && std::time::Instant::now() < deadline
            {
                tokio::task::yield_now().await;
                take_waiting(&mut rx, &mut batch, &mut events);
            }
        }
        last_size = batch.len();
        writer.write_and_reply(batch).await;
    }
}

/// Longest a batch waits for appenders the previous commit answered.
const LINGER: std::time::Duration = std::time::Duration::from_micros(150);

fn take_waiting(
    rx: &mut mpsc::Receiver<AppendRequest>,
    batch: &mut Vec<AppendRequest>,
    events: &mut usize,
) {
    while *events < MAX_BATCH_EVENTS {
        match rx.try_recv() {
            Ok(next) => {
                *events += next.events.len();
                batch.push(next);
            }
            Err(_) => break,
        }
    }
}

/// The group-commit writer's own connection (one long-lived session, so no pool round trip per batch
/// and the functions' cached plans are reused) and what it remembers between batches: the head it
/// last wrote and the stream versions it has seen. Unlike the pool's sessions it plans its statements
/// generically: re-planning the function call on every batch cost ~0.06 ms.
struct Writer {
    pool: PgPool,
    conn: Option<PgConnection>,
    /// Where the log ended after this writer's last statement, when it knows.
    head: Option<Head>,
    versions: KnownVersions,
    stats: Arc<WriterStats>,
}

/// The log's last position and hash: what the next event chains to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    position: i64,
    hash: [u8; 32],
}

/// How one call of `deepnode_append_at` ended.
enum Placed {
    /// The rows are in the log; the head after them, and the rows' chain hashes.
    Written(Head, Vec<[u8; 32]>),
    /// Another appender moved the head first; nothing was written. The actual head.
    Moved(Head),
}

/// Most statements one batch tries on the fast path: learning the head (when unknown), writing, and
/// writing once more after another appender moved the head in between. (8 was tried: with two
/// scheduler copies it took the batches falling to `deepnode_append` from ~5 % to almost none, but
/// the refusals cost as much — no change in CPU or saturation; docs/BENCHMARKS-system.md.)
const PLACED_ATTEMPTS: usize = 3;

impl Writer {
    async fn connection(&mut self) -> Result<(), Error> {
        if self.conn.is_none() {
            let mut conn = self.pool.acquire().await?.detach();
            conn.execute("SET plan_cache_mode = auto").await?;
            self.conn = Some(conn);
        }
        Ok(())
    }

    async fn write_and_reply(&mut self, batch: Vec<AppendRequest>) {
        let size = batch.len();
        let requests: Vec<&AppendRequest> = batch.iter().collect();
        let started = std::time::Instant::now();
        let written = self.write_batch(&requests).await;
        record_batch(started, &requests, &written);
        match written {
            Ok(results) => reply_all(batch, results),
            Err(e) if size > 1 && !e.is_transient() => {
                tracing::warn!(error = %e, size, "group commit refused; retrying its appends one by one");
                for request in batch {
                    let result = match self.write_batch(&[&request]).await {
                        Ok(mut results) => results.pop().unwrap_or(Err(UNANSWERED)),
                        Err(e) => Err(e),
                    };
                    let _ = request.reply.send(result);
                }
            }
            Err(e) => {
                for request in batch {
                    let _ = request.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Writes one batch in one transaction. `Ok` carries one result per request (some may be
    /// rejections); `Err` means nothing of the batch was written.
    ///
    /// The fast path: when every append can be decided from what this writer remembers (see
    /// [`KnownVersions::place`]), the writer places the events itself — positions from the head it
    /// last wrote, stream versions, the hash chain — and `deepnode_append_at` only checks the head and
    /// inserts. Otherwise, or when the database refuses the placement (an id already in the log, a
    /// stream moved on by another appender), `deepnode_append` looks everything up and decides.
    async fn write_batch(
        &mut self,
        requests: &[&AppendRequest],
    ) -> Result<Vec<Result<AppendResult, Error>>, Error> {
        self.connection().await?;
        let cols = Columns::of(requests, to_micros(Utc::now()));
        let written = self.write_columns(requests, &cols).await;
        if let Err(e) = &written {
            // The connection failed mid-statement: the outcome is unknown to us, so the error is
            // transient; a retry with the same event ids is answered from the log (idempotent).
            if e.is_transient() {
                self.conn = None;
                self.head = None;
            }
        }
        written
    }

    async fn write_columns(
        &mut self,
        requests: &[&AppendRequest],
        cols: &Columns<'_>,
    ) -> Result<Vec<Result<AppendResult, Error>>, Error> {
        let Writer {
            conn,
            head,
            versions,
            stats,
            ..
        } = self;
        let conn = conn.as_mut().ok_or(Error::Closed)?;
        let placement = cols
            .repeated
            .is_empty()
            .then(|| versions.place(requests))
            .flatten();
        let placeable = placement.is_some();
        if let Some(starts) = placement {
            for _ in 0..PLACED_ATTEMPTS {
                let placed = match *head {
                    Some(from) => write_placed(conn, from, requests, cols, &starts),
                    None => write_placed(conn, UNKNOWN_HEAD, &[], cols, &[]),
                };
                match placed.await {
                    Ok(Placed::Written(to, hashes)) => {
                        *head = Some(to);
                        stats.placed.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("deepnode_store_group_commits_total", "path" => "placed")
                            .increment(1);
                        let from = to.position - cols.event_id.len() as i64;
                        return Ok(placed_results(requests, &starts, from, versions, &hashes));
                    }
                    Ok(Placed::Moved(actual)) => *head = Some(actual),
                    Err(e) if crate::error::is_transient(&e) => return Err(e.into()),
                    // An id already in the log or a stream moved on (unique_violation), or any other
                    // refusal: deepnode_append decides, and reports, each append.
                    Err(e) => {
                        tracing::debug!(error = %e, "placed batch refused; looking it up");
                        break;
                    }
                }
            }
        }
        tracing::debug!(placeable, "batch not placed; deepnode_append looks it up");
        *head = None;
        let results = call_append(conn, requests, cols).await?;
        stats.looked_up.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("deepnode_store_group_commits_total", "path" => "looked_up").increment(1);
        versions.learn(requests, &results);
        Ok(results)
    }
}

/// A head no log has: asks `deepnode_append_at` for the actual one without writing.
const UNKNOWN_HEAD: Head = Head {
    position: -1,
    hash: [0; 32],
};

/// Places the events of `requests` after `from` — positions, stream versions from `starts` (each
/// append's stream version before it), the hash chain — and writes them with `deepnode_append_at`
/// if the log's head is still `from`. With no requests it only reads the head.
async fn write_placed(
    conn: &mut PgConnection,
    from: Head,
    requests: &[&AppendRequest],
    cols: &Columns<'_>,
    starts: &[i64],
) -> Result<Placed, sqlx::Error> {
    // No requests: only read the head (the arrays go empty).
    let events = if requests.is_empty() {
        0
    } else {
        cols.event_id.len()
    };
    let mut stream_versions = Vec::with_capacity(events);
    let mut hashes = Vec::with_capacity(events);
    let mut prev = from.hash;
    let mut position = from.position;
    let mut i = 0;
    for (request, start) in requests.iter().zip(starts) {
        for version in (start + 1..).take(request.events.len()) {
            position += 1;
            let canonical =
                canonical_bytes_of_parts(position, &cols.identity[i], version, &cols.body[i]);
            prev = chain_hash(&prev, &canonical);
            stream_versions.push(version);
            hashes.push(prev);
            i += 1;
        }
    }
    let row = sqlx::query(
        "SELECT o_written, o_position, o_hash
           FROM deepnode_append_at($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(from.position)
    .bind(&from.hash[..])
    .bind(&cols.event_id[..events])
    .bind(&cols.event_stream[..events])
    .bind(&stream_versions)
    .bind(&cols.event_type[..events])
    .bind(&cols.schema_version[..events])
    .bind(&cols.payload[..events])
    .bind(&cols.metadata[..events])
    .bind(&cols.occurred_at[..events])
    .bind(hashes.iter().map(|h| h.to_vec()).collect::<Vec<_>>())
    .bind(cols.recorded_at)
    .fetch_one(&mut *conn)
    .await?;
    let written: bool = row.try_get(0)?;
    let hash: Vec<u8> = row.try_get(2)?;
    let head = Head {
        position: row.try_get(1)?,
        hash: hash
            .try_into()
            .map_err(|_| sqlx::Error::Decode("log_head.hash is not 32 bytes".into()))?,
    };
    Ok(if written {
        Placed::Written(head, hashes)
    } else {
        Placed::Moved(head)
    })
}

/// The results of a placed batch written after position `from`; records the streams' new versions.
fn placed_results(
    requests: &[&AppendRequest],
    starts: &[i64],
    from: i64,
    versions: &mut KnownVersions,
    hashes: &[[u8; 32]],
) -> Vec<Result<AppendResult, Error>> {
    let mut position = from;
    requests
        .iter()
        .zip(starts)
        .map(|(request, start)| {
            let n = request.events.len() as i64;
            let positions = (position + 1..=position + n).collect();
            let first = usize::try_from(position - from).unwrap_or(usize::MAX);
            let hashes = hashes
                .get(first..first + request.events.len())
                .unwrap_or_default()
                .to_vec();
            position += n;
            versions.raise(request.stream.as_str(), start + n);
            Ok(AppendResult {
                positions,
                stream_version: start + n,
                duplicate: false,
                hashes,
            })
        })
        .collect()
}

/// Lower bounds of the versions of streams this writer has appended to or been told about (a stream
/// only grows), for placing appends without looking their streams up. A bound that another appender
/// has since overtaken is harmless: the version placed after it already exists, and the unique index
/// on (stream_id, stream_version) refuses the batch. Two generations keep memory bounded: when the
/// current one fills it becomes the previous, and the older one is dropped.
#[derive(Default)]
struct KnownVersions {
    current: HashMap<String, i64>,
    previous: HashMap<String, i64>,
}

impl KnownVersions {
    /// Streams remembered per generation.
    const GENERATION: usize = 16_384;

    fn get(&self, stream: &str) -> Option<i64> {
        self.current
            .get(stream)
            .or_else(|| self.previous.get(stream))
            .copied()
    }

    fn raise(&mut self, stream: &str, version: i64) {
        let version = self.get(stream).map_or(version, |known| known.max(version));
        if let Some(known) = self.current.get_mut(stream) {
            *known = version;
            return;
        }
        if self.current.len() >= Self::GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(stream.to_owned(), version);
    }

    /// Each append's stream version before it, if every append of the batch can be decided from
    /// what is known: a stream that must not exist and is not known to (written at 1), or a stream
    /// whose known version is the one expected (exactly, or any). Anything else — a stream never
    /// seen with an exact or any expectation, a certain conflict — is for `deepnode_append`.
    fn place(&self, requests: &[&AppendRequest]) -> Option<Vec<i64>> {
        let mut after: HashMap<&str, i64> = HashMap::new();
        requests
            .iter()
            .map(|request| {
                let stream = request.stream.as_str();
                let known = after.get(stream).copied().or_else(|| self.get(stream));
                let start = match (request.expected, known) {
                    (ExpectedVersion::NoStream, None | Some(0)) => 0,
                    (ExpectedVersion::Exact(v), Some(k)) if k == v => v,
                    (ExpectedVersion::Any, Some(k)) => k,
                    _ => return None,
                };
                after.insert(stream, start + request.events.len() as i64);
                Some(start)
            })
            .collect()
    }

    /// Remembers the versions `deepnode_append` reported: streams appended to and conflicts' actual
    /// versions.
    fn learn(&mut self, requests: &[&AppendRequest], results: &[Result<AppendResult, Error>]) {
        for (request, result) in requests.iter().zip(results) {
            match result {
                Ok(r) if !r.duplicate => self.raise(request.stream.as_str(), r.stream_version),
                Err(Error::Conflict { actual, .. }) => self.raise(request.stream.as_str(), *actual),
                _ => {}
            }
        }
    }
}

/// Metrics of one group commit (no-ops unless the process installed a recorder): its duration, its
/// size in events, and each append's result.
fn record_batch(
    started: std::time::Instant,
    requests: &[&AppendRequest],
    written: &Result<Vec<Result<AppendResult, Error>>, Error>,
) {
    metrics::histogram!("deepnode_store_append_seconds").record(started.elapsed().as_secs_f64());
    match written {
        Ok(results) => {
            let events: usize = requests.iter().map(|r| r.events.len()).sum();
            metrics::histogram!("deepnode_store_append_batch_events").record(events as f64);
            let ok = results.iter().filter(|r| r.is_ok()).count();
            metrics::counter!("deepnode_store_appends_total", "result" => "ok")
                .increment(ok as u64);
            metrics::counter!("deepnode_store_appends_total", "result" => "rejected")
                .increment((results.len() - ok) as u64);
        }
        Err(_) => metrics::counter!("deepnode_store_appends_total", "result" => "failed")
            .increment(requests.len() as u64),
    }
}

fn reply_all(batch: Vec<AppendRequest>, results: Vec<Result<AppendResult, Error>>) {
    for (request, result) in batch.into_iter().zip(results) {
        // The caller may have given up waiting; its append is committed all the same.
        let _ = request.reply.send(result);
    }
}

/// Appends one request inside the caller's transaction (see `EventStore::append_in`).
pub(crate) async fn append_in(
    conn: &mut PgConnection,
    request: &AppendRequest,
) -> Result<AppendResult, Error> {
    let cols = Columns::of(&[request], to_micros(Utc::now()));
    let mut results = call_append(conn, &[request], &cols).await?;
    results.pop().unwrap_or(Err(UNANSWERED))
}

/// `deepnode_append` answers every append it is given; a missing answer is a bug in it.
const UNANSWERED: Error = Error::Internal("deepnode_append left an append unanswered");

/// Decides and writes `requests` on `conn` with one call of `deepnode_append` (migration V5), which
/// locks the head until the surrounding transaction ends, looks up stream versions and prior event
/// ids, assigns positions and stream versions, chains the hashes and inserts the accepted events.
/// The appender encodes the position-free parts of each event's canonical bytes, so the database
/// only concatenates and hashes. Returns one result per request.
async fn call_append(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
    cols: &Columns<'_>,
) -> Result<Vec<Result<AppendResult, Error>>, Error> {
    let rows = sqlx::query(
        "SELECT o_append, o_outcome, o_stream_version, o_positions, o_actual, o_event_id
           FROM deepnode_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(&cols.stream)
    .bind(&cols.expected)
    .bind(&cols.count)
    .bind(&cols.event_id)
    .bind(&cols.event_type)
    .bind(&cols.schema_version)
    .bind(&cols.payload)
    .bind(&cols.metadata)
    .bind(&cols.occurred_at)
    .bind(&cols.identity)
    .bind(&cols.body)
    .bind(&cols.repeated)
    .bind(cols.recorded_at)
    .bind(CANONICAL_TAG)
    .fetch_all(&mut *conn)
    .await?;

    let mut results: Vec<Option<Result<AppendResult, Error>>> =
        (0..requests.len()).map(|_| None).collect();
    for row in rows {
        let index = usize::try_from(row.try_get::<i32, _>(0)? - 1).ok();
        let Some((index, request)) = index.and_then(|i| Some((i, requests.get(i)?))) else {
            return Err(Error::Internal(
                "deepnode_append answered an append it was not given",
            ));
        };
        let outcome: &str = row.try_get(1)?;
        let result = match outcome {
            "appended" | "duplicate" => Ok(AppendResult {
                positions: row.try_get(3)?,
                stream_version: row.try_get(2)?,
                duplicate: outcome == "duplicate",
                hashes: Vec::new(),
            }),
            "conflict" => Err(Error::Conflict {
                stream: request.stream.to_string(),
                expected: request.expected,
                actual: row.try_get(4)?,
            }),
            _ => Err(Error::EventIdReused {
                event_id: row.try_get(5)?,
            }),
        };
        results[index] = Some(result);
    }
    // deepnode_append answers every append; a missing answer would be a bug in it, not a write.
    let mut results: Vec<Result<AppendResult, Error>> = results
        .into_iter()
        .map(|r| r.unwrap_or(Err(UNANSWERED)))
        .collect();
    // It chained the rows itself: read their hashes back (this path is the rare one).
    let positions: Vec<i64> = results
        .iter()
        .flatten()
        .flat_map(|r| r.positions.iter().copied())
        .collect();
    let hashes: HashMap<i64, Vec<u8>> =
        sqlx::query_as("SELECT global_position, hash FROM events WHERE global_position = ANY($1)")
            .bind(&positions)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    for result in results.iter_mut().flatten() {
        result.hashes = result
            .positions
            .iter()
            .map(|p| {
                hashes
                    .get(p)
                    .and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok())
                    .unwrap_or([0; 32])
            })
            .collect();
    }
    Ok(results)
}

/// Event ids given more than once in a batch (concurrent retries of one append sharing a commit),
/// sorted; usually none.
fn repeated_ids(ids: &[Uuid]) -> Vec<Uuid> {
    let mut seen = HashSet::with_capacity(ids.len());
    let mut repeated: Vec<Uuid> = ids.iter().copied().filter(|id| !seen.insert(*id)).collect();
    repeated.sort_unstable();
    repeated.dedup();
    repeated
}

/// One batch as the database functions take it: per append its stream, expectation and event count,
/// and per event its columns, the appends' events concatenated in order.
struct Columns<'a> {
    stream: Vec<&'a str>,
    expected: Vec<Option<i64>>,
    count: Vec<i32>,
    event_id: Vec<Uuid>,
    event_stream: Vec<&'a str>,
    event_type: Vec<&'a str>,
    schema_version: Vec<i32>,
    payload: Vec<&'a str>,
    metadata: Vec<&'a str>,
    occurred_at: Vec<DateTime<Utc>>,
    /// The position- and version-free parts of each event's canonical bytes.
    identity: Vec<Vec<u8>>,
    body: Vec<Vec<u8>>,
    /// Event ids given more than once in the batch.
    repeated: Vec<Uuid>,
    recorded_at: DateTime<Utc>,
}

impl<'a> Columns<'a> {
    fn of(requests: &[&'a AppendRequest], recorded_at: DateTime<Utc>) -> Self {
        let events: usize = requests.iter().map(|r| r.events.len()).sum();
        let mut cols = Columns {
            stream: Vec::with_capacity(requests.len()),
            expected: Vec::with_capacity(requests.len()),
            count: Vec::with_capacity(requests.len()),
            event_id: Vec::with_capacity(events),
            event_stream: Vec::with_capacity(events),
            event_type: Vec::with_capacity(events),
            schema_version: Vec::with_capacity(events),
            payload: Vec::with_capacity(events),
            metadata: Vec::with_capacity(events),
            occurred_at: Vec::with_capacity(events),
            identity: Vec::with_capacity(events),
            body: Vec::with_capacity(events),
            repeated: Vec::new(),
            recorded_at,
        };
        for request in requests {
            let stream = request.stream.as_str();
            cols.stream.push(stream);
            cols.expected.push(match request.expected {
                ExpectedVersion::Any => None,
                ExpectedVersion::NoStream => Some(0),
                ExpectedVersion::Exact(v) => Some(v),
            });
            cols.count.push(request.events.len() as i32);
            for event in &request.events {
                cols.push_event(stream, event);
            }
        }
        cols.repeated = repeated_ids(&cols.event_id);
        cols
    }

    fn push_event(&mut self, stream: &'a str, event: &'a PreparedEvent) {
        self.event_id.push(event.event_id);
        self.event_stream.push(stream);
        self.event_type.push(&event.event_type);
        self.schema_version.push(event.schema_version);
        self.payload.push(&event.payload_json);
        self.metadata.push(&event.metadata_json);
        self.occurred_at.push(event.occurred_at);
        self.identity
            .push(canonical_identity(event.event_id, stream));
        self.body.push(canonical_body(&CanonicalRow {
            global_position: 0,
            event_id: event.event_id,
            stream_id: stream,
            stream_version: 0,
            event_type: &event.event_type,
            schema_version: event.schema_version,
            payload_json: event.payload_json.as_bytes(),
            metadata_json: event.metadata_json.as_bytes(),
            occurred_at: event.occurred_at,
            recorded_at: self.recorded_at,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_ids_are_those_given_twice_once_each() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        assert!(repeated_ids(&[a, b, c]).is_empty());
        assert_eq!(repeated_ids(&[c, a, c, b, c, a]), vec![a, c]);
    }
}
