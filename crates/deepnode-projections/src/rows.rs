//! The SQL side of the three projection tables: batched upserts and deletes (one `UNNEST` statement
//! per table per batch, whatever the number of rows) and typed readers of the stored rows.
//!
//! Rows are the book's own row views (`NodeRow`, `DeploymentRow`, `ExecutionRow`), so the columns
//! written here are exactly CONTRACT §5's. `double precision` holds an `f64` exactly, so a stored
//! float reads back bit for bit. This module decides nothing about *which* rows change: the caller
//! (the projection) passes the rows the fold touched.

use deepnode_domain::book::{DeploymentRow, ExecutionRow, NodeRow};
use futures::stream::BoxStream;
use futures::StreamExt;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

pub(crate) const NODE_COLUMNS: &str = "node_id, domain, stake, capacity, score, successes, errors, \
    timeouts, invalid_outputs, recent_failure_rate, status, slashed_amount, registered_at, updated_at";
pub(crate) const DEPLOYMENT_COLUMNS: &str = "model_id, node_id, tier, assigned_at";
pub(crate) const EXECUTION_COLUMNS: &str =
    "request_id, model_id, status, node_id, attempts, charged, requested_at, completed_at";

/// Inserts or replaces `rows` in `node_reputation` with one statement.
pub(crate) async fn upsert_nodes(
    conn: &mut PgConnection,
    rows: &[NodeRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&NodeRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
    let f64s = |f: fn(&NodeRow) -> f64| rows.iter().map(f).collect::<Vec<_>>();
    let i64s = |f: fn(&NodeRow) -> i64| rows.iter().map(f).collect::<Vec<_>>();
    let times =
        |f: fn(&NodeRow) -> chrono::DateTime<chrono::Utc>| rows.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO node_reputation (node_id, domain, stake, capacity, score, successes, errors,
             timeouts, invalid_outputs, recent_failure_rate, status, slashed_amount, registered_at, updated_at)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::float8[], $4::int4[], $5::float8[],
             $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::float8[], $11::text[], $12::float8[],
             $13::timestamptz[], $14::timestamptz[])
         ON CONFLICT (node_id) DO UPDATE SET domain = EXCLUDED.domain, stake = EXCLUDED.stake,
             capacity = EXCLUDED.capacity, score = EXCLUDED.score, successes = EXCLUDED.successes,
             errors = EXCLUDED.errors, timeouts = EXCLUDED.timeouts,
             invalid_outputs = EXCLUDED.invalid_outputs,
             recent_failure_rate = EXCLUDED.recent_failure_rate, status = EXCLUDED.status,
             slashed_amount = EXCLUDED.slashed_amount, registered_at = EXCLUDED.registered_at,
             updated_at = EXCLUDED.updated_at",
    )
    .bind(col(|r| r.node_id.clone()))
    .bind(col(|r| r.domain.clone()))
    .bind(f64s(|r| r.stake))
    .bind(rows.iter().map(|r| r.capacity).collect::<Vec<i32>>())
    .bind(f64s(|r| r.score))
    .bind(i64s(|r| r.successes))
    .bind(i64s(|r| r.errors))
    .bind(i64s(|r| r.timeouts))
    .bind(i64s(|r| r.invalid_outputs))
    .bind(f64s(|r| r.recent_failure_rate))
    .bind(col(|r| r.status.clone()))
    .bind(f64s(|r| r.slashed_amount))
    .bind(times(|r| r.registered_at))
    .bind(times(|r| r.updated_at))
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the `node_reputation` rows of `node_ids`.
pub(crate) async fn delete_nodes(
    conn: &mut PgConnection,
    node_ids: &[String],
) -> Result<(), sqlx::Error> {
    if node_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM node_reputation WHERE node_id = ANY($1::text[])")
        .bind(node_ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts or replaces `rows` in `deployments` with one statement.
pub(crate) async fn upsert_deployments(
    conn: &mut PgConnection,
    rows: &[DeploymentRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO deployments (model_id, node_id, tier, assigned_at)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[])
         ON CONFLICT (model_id, node_id) DO UPDATE SET tier = EXCLUDED.tier,
             assigned_at = EXCLUDED.assigned_at",
    )
    .bind(rows.iter().map(|r| r.model_id.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.node_id.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.tier.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.assigned_at).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the `deployments` rows of `(model_id, node_id)` keys.
pub(crate) async fn delete_deployments(
    conn: &mut PgConnection,
    keys: &[(String, String)],
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "DELETE FROM deployments d USING UNNEST($1::text[], $2::text[]) AS k(model_id, node_id)
         WHERE d.model_id = k.model_id AND d.node_id = k.node_id",
    )
    .bind(keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1.clone()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts or replaces `rows` in `executions` with one statement.
pub(crate) async fn upsert_executions(
    conn: &mut PgConnection,
    rows: &[ExecutionRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO executions (request_id, model_id, status, node_id, attempts, charged,
             requested_at, completed_at)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[],
             $6::bool[], $7::timestamptz[], $8::timestamptz[])
         ON CONFLICT (request_id) DO UPDATE SET model_id = EXCLUDED.model_id,
             status = EXCLUDED.status, node_id = EXCLUDED.node_id, attempts = EXCLUDED.attempts,
             charged = EXCLUDED.charged, requested_at = EXCLUDED.requested_at,
             completed_at = EXCLUDED.completed_at",
    )
    .bind(
        rows.iter()
            .map(|r| r.request_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.model_id.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.node_id.clone())
            .collect::<Vec<Option<String>>>(),
    )
    .bind(rows.iter().map(|r| r.attempts).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.charged).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.requested_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.completed_at).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the `executions` rows of `request_ids`.
pub(crate) async fn delete_executions(
    conn: &mut PgConnection,
    request_ids: &[String],
) -> Result<(), sqlx::Error> {
    if request_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM executions WHERE request_id = ANY($1::text[])")
        .bind(request_ids)
        .execute(conn)
        .await?;
    Ok(())
}

pub(crate) fn node_from_row(row: &PgRow) -> Result<NodeRow, sqlx::Error> {
    Ok(NodeRow {
        node_id: row.try_get(0)?,
        domain: row.try_get(1)?,
        stake: row.try_get(2)?,
        capacity: row.try_get(3)?,
        score: row.try_get(4)?,
        successes: row.try_get(5)?,
        errors: row.try_get(6)?,
        timeouts: row.try_get(7)?,
        invalid_outputs: row.try_get(8)?,
        recent_failure_rate: row.try_get(9)?,
        status: row.try_get(10)?,
        slashed_amount: row.try_get(11)?,
        registered_at: row.try_get(12)?,
        updated_at: row.try_get(13)?,
    })
}

pub(crate) fn deployment_from_row(row: &PgRow) -> Result<DeploymentRow, sqlx::Error> {
    Ok(DeploymentRow {
        model_id: row.try_get(0)?,
        node_id: row.try_get(1)?,
        tier: row.try_get(2)?,
        assigned_at: row.try_get(3)?,
    })
}

pub(crate) fn execution_from_row(row: &PgRow) -> Result<ExecutionRow, sqlx::Error> {
    Ok(ExecutionRow {
        request_id: row.try_get(0)?,
        model_id: row.try_get(1)?,
        status: row.try_get(2)?,
        node_id: row.try_get(3)?,
        attempts: row.try_get(4)?,
        charged: row.try_get(5)?,
        requested_at: row.try_get(6)?,
        completed_at: row.try_get(7)?,
    })
}

/// Every stored `node_reputation` row, in node id (byte) order.
pub async fn load_nodes(pool: &PgPool) -> Result<Vec<NodeRow>, crate::Error> {
    let sql = format!("SELECT {NODE_COLUMNS} FROM node_reputation ORDER BY node_id COLLATE \"C\"");
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    Ok(rows.iter().map(node_from_row).collect::<Result<_, _>>()?)
}

/// Every stored `deployments` row, in (model id, node id) byte order.
pub async fn load_deployments(pool: &PgPool) -> Result<Vec<DeploymentRow>, crate::Error> {
    let sql = format!(
        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY model_id COLLATE \"C\", node_id COLLATE \"C\""
    );
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    Ok(rows
        .iter()
        .map(deployment_from_row)
        .collect::<Result<_, _>>()?)
}

/// Every stored `executions` row, in request id (byte) order.
pub async fn load_executions(pool: &PgPool) -> Result<Vec<ExecutionRow>, crate::Error> {
    let sql =
        format!("SELECT {EXECUTION_COLUMNS} FROM executions ORDER BY request_id COLLATE \"C\"");
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    Ok(rows
        .iter()
        .map(execution_from_row)
        .collect::<Result<_, _>>()?)
}

/// Streams one table's rows in key byte order (the order of the book's `BTreeMap`s), decoded by
/// `decode`, on `conn`.
pub(crate) fn stream_rows<'c, T: Send + 'c>(
    conn: &'c mut PgConnection,
    sql: &'c str,
    decode: fn(&PgRow) -> Result<T, sqlx::Error>,
) -> BoxStream<'c, Result<T, sqlx::Error>> {
    sqlx::query(sql)
        .fetch(conn)
        .map(move |row| row.and_then(|r| decode(&r)))
        .boxed()
}
