//! Appending to the log with group commit.
//!
//! Every append in this process goes through one writer task. The writer takes whatever appends are
//! waiting and hands them all to one call of the database function `deepnode_append` (migration V5),
//! a statement that is its own transaction: it locks the single `log_head` row (which serialises all
//! appenders, in this process and in others), decides each append — idempotent replay by event id,
//! expected-version check, position and stream-version assignment, hash chain — inserts all new rows
//! with one `INSERT`, moves the head and commits. Concurrent callers thus share one round trip and one
//! commit (one WAL flush), while positions stay contiguous and commit order equals position order.
//! The appender encodes the parts of each event's canonical bytes that do not depend on its place in
//! the log, so the function only concatenates and hashes ([`deepnode_domain::log::canonical_bytes`]
//! defines the format).
//!
//! A rejected append (conflict, reused id) does not abort the batch: the function decides it and
//! writes the others. Should the database still refuse a batch (a constraint the checks missed), each
//! append of it is retried alone, so one bad append never fails its neighbours.
//!
//! Each group commit is measured through the `metrics` facade (`deepnode_store_append_seconds`,
//! `deepnode_store_append_batch_events`, `deepnode_store_appends_total{result}`); without an
//! installed recorder those calls do nothing, so the store carries no exporter.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use deepnode_domain::log::{
    canonical_body, canonical_identity, normalize_json, to_json_bytes, to_micros, CanonicalRow,
    ExpectedVersion, NewEvent, StreamId, CANONICAL_TAG,
};
use serde_json::Value;
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
pub(crate) struct PreparedEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload_json: String,
    pub metadata_json: String,
    pub occurred_at: DateTime<Utc>,
}

impl PreparedEvent {
    pub(crate) fn prepare(mut event: NewEvent) -> Result<PreparedEvent, Error> {
        event.validate()?;
        normalize_json(&mut event.payload);
        normalize_json(&mut event.metadata);
        // serde_json only ever writes UTF-8.
        let json = |v: &Value| String::from_utf8(to_json_bytes(v)).unwrap_or_default();
        Ok(PreparedEvent {
            event_id: event.event_id,
            event_type: event.event_type,
            schema_version: event.schema_version,
            payload_json: json(&event.payload),
            metadata_json: json(&event.metadata),
            occurred_at: to_micros(event.occurred_at),
        })
    }
}

/// Runs until every sender is dropped, committing waiting appends in batches.
pub(crate) async fn run_writer(pool: PgPool, mut rx: mpsc::Receiver<AppendRequest>) {
    let mut writer = Writer { pool, conn: None };
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

/// The group-commit writer's own connection: one long-lived session, so no pool round trip per batch
/// and `deepnode_append`'s cached plans are reused. Unlike the pool's sessions it plans its one
/// statement generically: re-planning the function call on every batch cost ~0.06 ms.
struct Writer {
    pool: PgPool,
    conn: Option<PgConnection>,
}

impl Writer {
    async fn connection(&mut self) -> Result<&mut PgConnection, Error> {
        if self.conn.is_none() {
            let mut conn = self.pool.acquire().await?.detach();
            conn.execute("SET plan_cache_mode = auto").await?;
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or(Error::Closed)
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
                        Ok(mut results) => results.pop().unwrap_or(Err(Error::Closed)),
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

    /// Writes one batch as one statement, `deepnode_append`, which is its own transaction: one round
    /// trip and one commit whatever the batch size. `Ok` carries one result per request (some may be
    /// rejections); `Err` means nothing of the batch was written.
    async fn write_batch(
        &mut self,
        requests: &[&AppendRequest],
    ) -> Result<Vec<Result<AppendResult, Error>>, Error> {
        let conn = self.connection().await?;
        write_in(conn, requests).await.inspect_err(|e| {
            // The connection failed mid-statement: the outcome is unknown to us, so the error is
            // transient; a retry with the same event ids is answered from the log (idempotent).
            if e.is_transient() {
                self.conn = None;
            }
        })
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
    let mut results = write_in(conn, &[request]).await?;
    results.pop().unwrap_or(Err(Error::Closed))
}

/// Decides and writes `requests` on `conn` with one call of `deepnode_append` (migration V5), which
/// locks the head until the surrounding transaction ends, assigns positions and stream versions,
/// chains the hashes and inserts the accepted events. The appender encodes the position-free parts
/// of each event's canonical bytes, so the database only concatenates and hashes. Returns one result
/// per request.
async fn write_in(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
) -> Result<Vec<Result<AppendResult, Error>>, Error> {
    let recorded_at = to_micros(Utc::now());
    let events: usize = requests.iter().map(|r| r.events.len()).sum();
    let mut streams = Vec::with_capacity(requests.len());
    let mut expected = Vec::with_capacity(requests.len());
    let mut counts = Vec::with_capacity(requests.len());
    let mut cols = Columns::with_capacity(events);
    for request in requests {
        streams.push(request.stream.as_str());
        expected.push(match request.expected {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(v),
        });
        counts.push(request.events.len() as i32);
        for event in &request.events {
            cols.push(request.stream.as_str(), event, recorded_at);
        }
    }
    let rows = sqlx::query(
        "SELECT o_append, o_outcome, o_stream_version, o_positions, o_actual, o_event_id
           FROM deepnode_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(&streams)
    .bind(&expected)
    .bind(&counts)
    .bind(&cols.event_id)
    .bind(&cols.event_type)
    .bind(&cols.schema_version)
    .bind(&cols.payload)
    .bind(&cols.metadata)
    .bind(&cols.occurred_at)
    .bind(&cols.identity)
    .bind(&cols.body)
    .bind(repeated_ids(&cols.event_id))
    .bind(recorded_at)
    .bind(CANONICAL_TAG)
    .fetch_all(&mut *conn)
    .await?;

    let mut results: Vec<Option<Result<AppendResult, Error>>> =
        (0..requests.len()).map(|_| None).collect();
    for row in rows {
        let index = usize::try_from(row.try_get::<i32, _>(0)? - 1).map_err(|_| Error::Closed)?;
        let request = requests.get(index).ok_or(Error::Closed)?;
        let outcome: &str = row.try_get(1)?;
        let result = match outcome {
            "appended" | "duplicate" => Ok(AppendResult {
                positions: row.try_get(3)?,
                stream_version: row.try_get(2)?,
                duplicate: outcome == "duplicate",
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
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or(Err(Error::Closed)))
        .collect())
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

/// Per-event columns of one `deepnode_append` call, the appends' events concatenated in order.
struct Columns<'a> {
    event_id: Vec<Uuid>,
    event_type: Vec<&'a str>,
    schema_version: Vec<i32>,
    payload: Vec<&'a str>,
    metadata: Vec<&'a str>,
    occurred_at: Vec<DateTime<Utc>>,
    identity: Vec<Vec<u8>>,
    body: Vec<Vec<u8>>,
}

impl<'a> Columns<'a> {
    fn with_capacity(n: usize) -> Self {
        Columns {
            event_id: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            schema_version: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            occurred_at: Vec::with_capacity(n),
            identity: Vec::with_capacity(n),
            body: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, stream: &str, event: &'a PreparedEvent, recorded_at: DateTime<Utc>) {
        self.event_id.push(event.event_id);
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
            recorded_at,
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
