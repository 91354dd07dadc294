//! What the services ask of PostgreSQL besides the log itself: exclusive leases (advisory locks),
//! named positions in `projection_checkpoints`, and the readiness probe's questions. With these,
//! every SQL statement a service runs lives in this crate.

use std::collections::BTreeMap;

use sqlx::{Connection, PgConnection, Postgres, Transaction};

use crate::{Error, EventStore};

/// A session-level advisory lock on a dedicated connection: held while this value lives (and its
/// connection does), released by [`Lease::release`], or by the server when the connection or the
/// process dies. Whoever holds it is the one instance doing the job (the relay, the SQL projection).
#[derive(Debug)]
pub struct Lease {
    conn: PgConnection,
}

impl Lease {
    /// Whether the lease is still held: its connection answers (if the connection died, so did the
    /// lock, and another instance may hold it now).
    pub async fn check(&mut self) -> Result<(), Error> {
        self.conn.ping().await?;
        Ok(())
    }

    /// Waits until the lease is lost, checking it every `every`; returns why (the connection's
    /// error). While this runs the holder may go on working; cancelling it is safe.
    pub async fn lost(&mut self, every: std::time::Duration) -> Error {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.check().await {
                return e;
            }
        }
    }

    /// Gives the lease up now (closing its connection).
    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}

/// A transaction-scoped advisory lock: held until [`HeldLock::release`] (or until dropped, when
/// the transaction rolls back). Its transaction writes nothing.
#[derive(Debug)]
pub struct HeldLock {
    tx: Transaction<'static, Postgres>,
}

impl HeldLock {
    /// Releases the lock by ending its (empty) transaction. If the connection is already gone, the
    /// lock went with it.
    pub async fn release(self) -> Result<(), Error> {
        self.tx.rollback().await?;
        Ok(())
    }
}

/// Asks for the session lock `key` on `conn`: whether it holds it now.
async fn try_session_lock(conn: &mut PgConnection, key: i64) -> Result<bool, Error> {
    let taken = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await?;
    Ok(taken)
}

impl EventStore {
    /// Takes the session lock `key` on a connection of its own, or `None` if another session holds
    /// it.
    pub async fn try_lease(&self, key: i64) -> Result<Option<Lease>, Error> {
        let mut conn = self.pool().acquire().await?.detach();
        if try_session_lock(&mut conn, key).await? {
            Ok(Some(Lease { conn }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Takes the session lock `key`, waiting for it: asks every `retry` on one connection of its own
    /// (a standby does not open a connection per try), and returns once it holds the lock. An error
    /// is the connection's; cancelling the wait is safe (the connection closes, and with it any
    /// lock).
    pub async fn take_lease(&self, key: i64, retry: std::time::Duration) -> Result<Lease, Error> {
        let mut conn = self.pool().acquire().await?.detach();
        while !try_session_lock(&mut conn, key).await? {
            tokio::time::sleep(retry).await;
        }
        Ok(Lease { conn })
    }

    /// Takes the transaction lock `key`, or `None` at once if another transaction holds it.
    pub async fn try_lock(&self, key: i64) -> Result<Option<HeldLock>, Error> {
        let mut tx = self.pool().begin().await?;
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
        Ok(taken.then_some(HeldLock { tx }))
    }

    /// The stored position named `name` in `projection_checkpoints` (0 when it has none yet).
    pub async fn checkpoint(&self, name: &str) -> Result<i64, Error> {
        crate::checkpoint(self.pool(), name).await
    }

    /// Moves the position named `name` forward to `position` (never back: a slower writer of the
    /// same name cannot undo a faster one).
    pub async fn advance_checkpoint(&self, name: &str, position: i64) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, global_position) VALUES ($1, $2)
             ON CONFLICT (projection) DO UPDATE
               SET global_position =
                   GREATEST(projection_checkpoints.global_position, EXCLUDED.global_position)",
        )
        .bind(name)
        .bind(position)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(self.pool())
            .await?;
        Ok(())
    }

    /// The newest migration applied to the database (0 before any).
    pub async fn applied_migration(&self) -> Result<i32, Error> {
        let applied: Option<i32> =
            sqlx::query_scalar("SELECT max(version) FROM refinery_schema_history")
                .fetch_one(self.pool())
                .await?;
        Ok(applied.unwrap_or(0))
    }

    /// The log's head and how far every named position trails it, in one statement.
    pub async fn lags(&self) -> Result<(i64, BTreeMap<String, i64>), Error> {
        let rows: Vec<(i64, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT h.position, c.projection, c.global_position
               FROM log_head h LEFT JOIN projection_checkpoints c ON true",
        )
        .fetch_all(self.pool())
        .await?;
        let head = rows.first().map_or(0, |r| r.0);
        let lags = rows
            .into_iter()
            .filter_map(|(head, name, at)| Some((name?, (head - at.unwrap_or(0)).max(0))))
            .collect();
        Ok((head, lags))
    }
}
