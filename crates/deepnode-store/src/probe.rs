//! Whether streams exist, asked by many tasks at once and answered a batch at a time.
//!
//! The scheduler asks for every request whose node is slow to answer whether its execution stream
//! is already in the log (a repeated `request_id`). Through the pool each question was three round
//! trips — sqlx pings a pooled connection when it is taken and again when it is given back — and
//! under load nearly every request asks. Here one task with its own connection takes every question
//! waiting and asks the database once (`stream_version = 1` on the `(stream_id, stream_version)`
//! unique index), so a burst of questions costs one round trip.

use std::collections::HashSet;

use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot};

use crate::Error;

/// One question: does `stream` have an event?
pub(crate) struct ProbeRequest {
    pub(crate) stream: String,
    pub(crate) reply: oneshot::Sender<Result<bool, Error>>,
}

/// Most questions one query carries.
const MAX_BATCH: usize = 1_024;

/// Runs until every sender is dropped, answering waiting questions a batch at a time.
pub(crate) async fn run_prober(pool: PgPool, mut rx: mpsc::Receiver<ProbeRequest>) {
    let mut conn: Option<PgConnection> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let streams: Vec<&str> = batch.iter().map(|q| q.stream.as_str()).collect();
        let found = existing(&pool, &mut conn, &streams).await;
        for question in batch {
            let answer = match &found {
                Ok(found) => Ok(found.contains(&question.stream)),
                Err(e) => Err(e.clone()),
            };
            let _ = question.reply.send(answer);
        }
    }
    if let Some(conn) = conn {
        let _ = conn.close().await;
    }
}

/// The streams of `streams` that have an event. A connection that died while idle is replaced once
/// and the question asked again (it is only a read).
async fn existing(
    pool: &PgPool,
    conn: &mut Option<PgConnection>,
    streams: &[&str],
) -> Result<HashSet<String>, Error> {
    let mut retried = false;
    loop {
        let session = match conn {
            Some(session) => session,
            None => conn.insert(pool.acquire().await?.detach()),
        };
        let found = sqlx::query_scalar::<_, String>(
            "SELECT stream_id FROM events WHERE stream_id = ANY($1) AND stream_version = 1",
        )
        .bind(streams)
        .fetch_all(&mut *session)
        .await;
        match found {
            Ok(found) => return Ok(found.into_iter().collect()),
            Err(e) => {
                *conn = None;
                if retried || !crate::error::is_transient(&e) {
                    return Err(e.into());
                }
                retried = true;
            }
        }
    }
}
