//! Appending to the log with group commit.
//!
//! Every append in this process goes through one writer task. The writer takes whatever appends are
//! waiting, opens one transaction, locks the single `log_head` row (which serialises all appenders,
//! in this process and in others), decides each append in memory — idempotent replay by event id,
//! expected-version check, position and stream-version assignment, hash chain — writes all new rows
//! with one `INSERT … SELECT FROM unnest(…)`, moves the head and commits. Concurrent callers thus share
//! one commit (one WAL flush), while positions stay contiguous and commit order equals position order.
//!
//! A rejected append (conflict, reused id) does not abort the batch: it is decided before any SQL is
//! sent. Should the database still refuse a batch (a constraint the in-memory checks missed), each
//! append of it is retried alone, so one bad append never fails its neighbours.
//!
//! Each group commit is measured through the `metrics` facade (`deepnode_store_append_seconds`,
//! `deepnode_store_append_batch_events`, `deepnode_store_appends_total{result}`); without an
//! installed recorder those calls do nothing, so the store carries no exporter.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use deepnode_domain::log::{
    canonical_bytes, chain_hash, normalize_json, to_json_bytes, to_micros, CanonicalRow,
    ExpectedVersion, NewEvent, StreamId,
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
    pub payload: Value,
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
            payload: event.payload,
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

/// The group-commit writer's own connection: one long-lived session (no pool round trip per batch),
/// with generic plans disabled so the lookups always see the table's real size (a generic plan made
/// while the log was small would keep sequential-scanning it as it grows).
struct Writer {
    pool: PgPool,
    conn: Option<PgConnection>,
}

impl Writer {
    async fn connection(&mut self) -> Result<&mut PgConnection, Error> {
        if self.conn.is_none() {
            let mut conn = self.pool.acquire().await?.detach();
            conn.execute("SET plan_cache_mode = force_custom_plan")
                .await?;
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

    /// Writes one batch in one transaction: `BEGIN` + head lock, one lookup, one insert (which also
    /// moves the head), `COMMIT` — four round trips whatever the batch size. `Ok` carries one result
    /// per request (some may be rejections); `Err` means nothing of the batch was written.
    async fn write_batch(
        &mut self,
        requests: &[&AppendRequest],
    ) -> Result<Vec<Result<AppendResult, Error>>, Error> {
        let conn = self.connection().await?;
        let outcome = match write_in(conn, requests, Begin::Here).await {
            Ok((results, true)) => conn.execute("COMMIT").await.map(|_| results),
            Ok((results, false)) => conn.execute("ROLLBACK").await.map(|_| results),
            Err(e) => {
                // Leave the session clean for the next batch; if even that fails, drop it.
                if conn.execute("ROLLBACK").await.is_err() {
                    self.conn = None;
                }
                return Err(e);
            }
        };
        outcome.map_err(|e| {
            // The connection failed around COMMIT: the outcome is unknown to us, so report it as
            // transient; a retry with the same event ids is answered from the log (idempotent).
            self.conn = None;
            Error::from(e)
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

/// An event already in the log (or earlier in this batch), for idempotency checks.
struct Prior {
    position: i64,
    stream_id: String,
    stream_version: i64,
    event_type: String,
    schema_version: i32,
    payload: Value,
}

impl Prior {
    fn same_body(&self, stream: &StreamId, event: &PreparedEvent) -> bool {
        self.stream_id == stream.as_str()
            && self.event_type == event.event_type
            && self.schema_version == event.schema_version
            && self.payload == event.payload
    }
}

/// Columns of the rows to insert, as arrays for one `unnest` insert.
#[derive(Default)]
struct Rows {
    position: Vec<i64>,
    event_id: Vec<Uuid>,
    stream_id: Vec<String>,
    stream_version: Vec<i64>,
    event_type: Vec<String>,
    schema_version: Vec<i32>,
    payload: Vec<String>,
    metadata: Vec<String>,
    occurred_at: Vec<DateTime<Utc>>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

/// Appends one request inside the caller's transaction (see `EventStore::append_in`).
pub(crate) async fn append_in(
    conn: &mut PgConnection,
    request: &AppendRequest,
) -> Result<AppendResult, Error> {
    let (mut results, _) = write_in(conn, &[request], Begin::Already).await?;
    results.pop().unwrap_or(Err(Error::Closed))
}

/// Whether `write_in` opens the transaction itself (the writer's own connection) or runs inside the
/// caller's.
#[derive(Clone, Copy)]
enum Begin {
    Here,
    Already,
}

/// Decides and writes `requests` on `conn` inside a transaction: locks the head (until that
/// transaction ends), writes the accepted events and moves the head. Returns one result per request
/// and whether anything was written; committing is the caller's.
async fn write_in(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
    begin: Begin,
) -> Result<(Vec<Result<AppendResult, Error>>, bool), Error> {
    const LOCK_HEAD: &str = "SELECT position, hash FROM log_head WHERE id FOR UPDATE";
    let head = match begin {
        // One round trip for both (simple-query protocol, statement by statement).
        Begin::Here => {
            conn.fetch_one(concat!(
                "BEGIN; ",
                "SELECT position, hash FROM log_head WHERE id FOR UPDATE"
            ))
            .await?
        }
        Begin::Already => sqlx::query(LOCK_HEAD).fetch_one(&mut *conn).await?,
    };
    let head_position: i64 = head.try_get(0)?;
    let head_hash: Vec<u8> = head.try_get(1)?;

    let (mut versions, mut priors) = lookup(conn, requests).await?;

    let recorded_at = to_micros(Utc::now());
    let mut position = head_position;
    let mut prev_hash = head_hash;
    let mut rows = Rows::default();
    let mut results = Vec::with_capacity(requests.len());

    for request in requests {
        let stream = &request.stream;
        if let Some(replayed) = replay(request, &priors) {
            results.push(replayed);
            continue;
        }
        let actual = versions.get(stream.as_str()).copied().unwrap_or(0);
        if !request.expected.matches(actual) {
            results.push(Err(Error::Conflict {
                stream: stream.to_string(),
                expected: request.expected,
                actual,
            }));
            continue;
        }
        let mut version = actual;
        let mut positions = Vec::with_capacity(request.events.len());
        for event in &request.events {
            position += 1;
            version += 1;
            let hash = chain_hash(
                &prev_hash,
                &canonical_bytes(&CanonicalRow {
                    global_position: position,
                    event_id: event.event_id,
                    stream_id: stream.as_str(),
                    stream_version: version,
                    event_type: &event.event_type,
                    schema_version: event.schema_version,
                    payload_json: event.payload_json.as_bytes(),
                    metadata_json: event.metadata_json.as_bytes(),
                    occurred_at: event.occurred_at,
                    recorded_at,
                }),
            )
            .to_vec();
            rows.position.push(position);
            rows.event_id.push(event.event_id);
            rows.stream_id.push(stream.to_string());
            rows.stream_version.push(version);
            rows.event_type.push(event.event_type.clone());
            rows.schema_version.push(event.schema_version);
            rows.payload.push(event.payload_json.clone());
            rows.metadata.push(event.metadata_json.clone());
            rows.occurred_at.push(event.occurred_at);
            rows.prev_hash
                .push(std::mem::replace(&mut prev_hash, hash.clone()));
            rows.hash.push(hash);
            priors.insert(
                event.event_id,
                Prior {
                    position,
                    stream_id: stream.to_string(),
                    stream_version: version,
                    event_type: event.event_type.clone(),
                    schema_version: event.schema_version,
                    payload: event.payload.clone(),
                },
            );
            positions.push(position);
        }
        versions.insert(stream.to_string(), version);
        results.push(Ok(AppendResult {
            positions,
            stream_version: version,
            duplicate: false,
        }));
    }

    let wrote = position > head_position;
    if wrote {
        insert_rows(conn, rows, recorded_at, (position, &prev_hash)).await?;
    }
    Ok((results, wrote))
}

/// If the request's event ids were appended before, the original result (or why it is refused).
fn replay(
    request: &AppendRequest,
    priors: &HashMap<Uuid, Prior>,
) -> Option<Result<AppendResult, Error>> {
    let found: Vec<Option<&Prior>> = request
        .events
        .iter()
        .map(|e| priors.get(&e.event_id))
        .collect();
    if found.iter().all(Option::is_none) {
        return None;
    }
    let mut positions = Vec::with_capacity(found.len());
    let mut stream_version = 0;
    for (event, prior) in request.events.iter().zip(found) {
        match prior {
            Some(prior) if prior.same_body(&request.stream, event) => {
                positions.push(prior.position);
                stream_version = stream_version.max(prior.stream_version);
            }
            _ => {
                return Some(Err(Error::EventIdReused {
                    event_id: event.event_id,
                }))
            }
        }
    }
    Some(Ok(AppendResult {
        positions,
        stream_version,
        duplicate: true,
    }))
}

/// The current version of every stream of the batch and the events already stored under any of its
/// event ids, in one statement (one index probe per stream and per id).
async fn lookup(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
) -> Result<(BTreeMap<String, i64>, HashMap<Uuid, Prior>), Error> {
    let mut streams: Vec<&str> = requests.iter().map(|r| r.stream.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    let ids: Vec<Uuid> = requests
        .iter()
        .flat_map(|r| r.events.iter().map(|e| e.event_id))
        .collect();
    let rows = sqlx::query(
        "SELECT s.id, COALESCE((SELECT max(e.stream_version) FROM events e WHERE e.stream_id = s.id), 0),
                NULL::uuid, NULL::bigint, NULL::text, NULL::int, NULL::jsonb
           FROM unnest($1::text[]) AS s(id)
         UNION ALL
         SELECT stream_id, stream_version, event_id, global_position, event_type, schema_version, payload
           FROM events WHERE event_id = ANY($2)",
    )
    .bind(&streams)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut versions = BTreeMap::new();
    let mut priors = HashMap::new();
    for row in rows {
        let stream_id: String = row.try_get(0)?;
        let stream_version: i64 = row.try_get(1)?;
        match row.try_get::<Option<Uuid>, _>(2)? {
            None => {
                versions.insert(stream_id, stream_version);
            }
            Some(id) => {
                let prior = Prior {
                    position: row.try_get(3)?,
                    stream_id,
                    stream_version,
                    event_type: row.try_get(4)?,
                    schema_version: row.try_get(5)?,
                    payload: row.try_get(6)?,
                };
                priors.insert(id, prior);
            }
        }
    }
    Ok((versions, priors))
}

/// Inserts the rows and moves the head in one statement.
async fn insert_rows(
    conn: &mut PgConnection,
    rows: Rows,
    recorded_at: DateTime<Utc>,
    head: (i64, &[u8]),
) -> Result<(), Error> {
    sqlx::query(
        "WITH inserted AS (
             INSERT INTO events (global_position, event_id, stream_id, stream_version, event_type,
                                 schema_version, payload, metadata, occurred_at, recorded_at,
                                 prev_hash, hash)
             SELECT p, id, s, v, t, sv, pl::jsonb, md::jsonb, o, $12, ph, h
               FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::int[],
                           $7::text[], $8::text[], $9::timestamptz[], $10::bytea[], $11::bytea[])
                    AS r(p, id, s, v, t, sv, pl, md, o, ph, h)
             RETURNING 1)
         UPDATE log_head SET position = $13, hash = $14 WHERE id",
    )
    .bind(rows.position)
    .bind(rows.event_id)
    .bind(rows.stream_id)
    .bind(rows.stream_version)
    .bind(rows.event_type)
    .bind(rows.schema_version)
    .bind(rows.payload)
    .bind(rows.metadata)
    .bind(rows.occurred_at)
    .bind(rows.prev_hash)
    .bind(rows.hash)
    .bind(recorded_at)
    .bind(head.0)
    .bind(head.1)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
